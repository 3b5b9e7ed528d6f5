"""Every table's schema, as StructType constants. Writers select exactly these columns, in order."""

from __future__ import annotations

from pyspark.sql import types as T


def _field(name: str, dtype: T.DataType, nullable: bool = True, comment: str = "") -> T.StructField:
    return T.StructField(name, dtype, nullable, {"comment": comment} if comment else {})


STRING = T.StringType()
TIMESTAMP = T.TimestampType()

# Canonical event fields a source mapping can fill, with their types. Order is the table's order.
EVENT_FIELDS: dict[str, tuple[T.DataType, str]] = {
    "event_id": (STRING, "Unique id: the source's own, or a hash of the record's content"),
    "event_time": (TIMESTAMP, "When the event happened, UTC"),
    "event_type": (STRING, "One of ingest.event_types, after the source's value map"),
    "user_id": (STRING, "Known (logged-in) user id; pseudonymized where marked personal"),
    "anonymous_id": (STRING, "Cookie / device id of a visitor not (yet) identified"),
    "product_id": (STRING, "Product or item id"),
    "category": (STRING, "Product category, dotted path where the source has one"),
    "price": (T.DoubleType(), "Unit price in `currency`; never negative"),
    "quantity": (T.IntegerType(), "Units; at least 1 where present"),
    "currency": (STRING, "ISO 4217 code, upper case"),
    "search_query": (STRING, "Search text of a search event"),
    "page_url": (STRING, "Page or screen"),
    "referrer": (STRING, "Referring URL"),
    "device": (STRING, "Device class: mobile, desktop, tablet, app, ..."),
    "country": (STRING, "Country (ISO 3166 alpha-2 where known)"),
    "city": (STRING, "City"),
    "utm_source": (STRING, "Campaign source"),
    "utm_medium": (STRING, "Campaign medium"),
    "utm_campaign": (STRING, "Campaign name"),
    "consent_analytics": (T.BooleanType(), "Visitor consented to analytics"),
    "consent_marketing": (T.BooleanType(), "Visitor consented to marketing use (activation)"),
    "properties": (
        T.MapType(STRING, STRING),
        "Free-form source attributes kept as strings (e.g. brand, site session id)",
    ),
}

# Fields a source may map. event_id is optional (a content hash stands in for it).
MAPPABLE_FIELDS = tuple(name for name in EVENT_FIELDS if name != "properties")
REQUIRED_FIELDS = ("event_time", "event_type")
USER_KEY_FIELDS = ("user_id", "anonymous_id")

_NOT_NULL = {"event_id", "event_time", "event_type"}

EVENTS = T.StructType(
    [
        _field(name, dtype, name not in _NOT_NULL, comment)
        for name, (dtype, comment) in EVENT_FIELDS.items()
    ]
    + [
        _field("event_date", T.DateType(), False, "UTC date of event_time; partition column"),
        _field("source", STRING, False, "Source mapping name"),
        _field("source_file", STRING, False, "File the record came from"),
        _field("source_line", T.LongType(), False, "Line (text) or row (Parquet) number, from 1"),
        _field("ingested_at", TIMESTAMP, False, "Start of the ingest run that added the event"),
        _field("ingest_run_id", STRING, False, "Id of that run"),
    ]
)

QUARANTINE = T.StructType(
    [
        _field("record_id", STRING, False, "Hash of source file and line: one row per bad record"),
        _field("source", STRING, False, "Source mapping name"),
        _field("source_file", STRING, False, "File the record came from"),
        _field("source_line", T.LongType(), True, "Line (text) or row (Parquet) number, from 1"),
        _field("raw", STRING, True, "The record verbatim (Parquet rows as JSON)"),
        _field("reason", STRING, False, "Reason code, see README"),
        _field("message", STRING, False, "What is wrong, naming the field and value"),
        _field("event_id", STRING, True, "The event id where one could be derived"),
        _field("quarantined_at", TIMESTAMP, False, "Start of the ingest run"),
        _field("ingest_run_id", STRING, False, "Id of the ingest run"),
    ]
)

INGESTED_FILES = T.StructType(
    [
        _field("source", STRING, False, "Source mapping name"),
        _field("file_path", STRING, False, "The file, fully qualified"),
        _field("file_size", T.LongType(), False, "Its size in bytes when ingested"),
        _field("file_modified_at", TIMESTAMP, False, "Its modification time when ingested"),
        _field("records", T.LongType(), False, "Records read from the file"),
        _field("events_added", T.LongType(), False, "New events this run added to bronze"),
        _field("already_present", T.LongType(), False, "Events already in bronze from this file"),
        _field("quarantined", T.LongType(), False, "Records in quarantine from this file"),
        _field("ingested_at", TIMESTAMP, False, "Start of the ingest run"),
        _field("ingest_run_id", STRING, False, "Id of the ingest run"),
    ]
)

INT = T.IntegerType()
LONG = T.LongType()
DOUBLE = T.DoubleType()
BOOLEAN = T.BooleanType()

IDENTITY_MAP = T.StructType(
    [
        _field("anonymous_id", STRING, False, "Anonymous (cookie / device) id"),
        _field("user_key", STRING, False, "The user id it is stitched to"),
        _field("user_ids_seen", LONG, False, "Distinct user ids seen with it"),
        _field("user_ids", T.ArrayType(STRING), False, "Those user ids (sorted)"),
        _field("is_conflict", BOOLEAN, False, "Seen with more than one user id"),
        _field("first_seen", TIMESTAMP, False, "First event with it and a user id"),
        _field("last_seen", TIMESTAMP, False, "Last event with it and a user id"),
        _field("updated_at", TIMESTAMP, False, "Start of the run that last changed the row"),
    ]
)

SESSIONS = T.StructType(
    [
        _field("session_id", STRING, False, "sha256(user_key, first event_id), 32 hex digits"),
        _field("user_key", STRING, False, "user_id, stitched user id, or anon:<anonymous_id>"),
        _field("session_start", TIMESTAMP, False, "First event time (UTC)"),
        _field("session_end", TIMESTAMP, False, "Last event time (UTC)"),
        _field("duration_seconds", DOUBLE, False, "session_end - session_start"),
        _field("events", INT, False, "Events in the session"),
        _field("page_views", INT, False, "page_view events"),
        _field("product_views", INT, False, "product_view events"),
        _field("searches", INT, False, "search events"),
        _field("cart_adds", INT, False, "add_to_cart events"),
        _field("cart_removes", INT, False, "remove_from_cart events"),
        _field("wishlist_adds", INT, False, "add_to_wishlist events"),
        _field("checkouts", INT, False, "checkout_started events"),
        _field("purchase_events", INT, False, "purchase events"),
        _field("distinct_products", INT, False, "Distinct product ids"),
        _field("distinct_categories", INT, False, "Distinct categories"),
        _field("landing_page", STRING, True, "First page_url"),
        _field("exit_page", STRING, True, "Last page_url"),
        _field("landing_product", STRING, True, "First product_id"),
        _field("exit_product", STRING, True, "Last product_id"),
        _field("has_cart_add", BOOLEAN, False, "At least one add_to_cart"),
        _field("has_checkout", BOOLEAN, False, "At least one checkout_started"),
        _field("has_purchase", BOOLEAN, False, "At least one purchase"),
        _field("is_cart_abandoned", BOOLEAN, False, "Cart add(s) but no purchase"),
        _field("revenue", DOUBLE, False, "Sum of price x quantity (1 if missing) of purchases"),
        _field("items", INT, False, "Units purchased"),
        _field("device", STRING, True, "Device of the first event that has one"),
        _field("country", STRING, True, "Country of the first event that has one"),
        _field("utm_source", STRING, True, "Campaign of the first event"),
        _field("utm_medium", STRING, True, "Campaign medium of the first event"),
        _field("utm_campaign", STRING, True, "Campaign name of the first event"),
        _field("is_bounce", BOOLEAN, False, "Exactly one event"),
        _field(
            "visit_part",
            INT,
            False,
            "0, or n for the n-th cut of a visit longer than the maximum session length",
        ),
        _field(
            "visit_start",
            TIMESTAMP,
            False,
            "Start of the visit (inactivity-gap session) it belongs to",
        ),
        _field("first_event_id", STRING, False, "event_id of the first event"),
        _field("session_date", T.DateType(), False, "UTC date of session_start"),
        _field(
            "anonymous_ids",
            T.ArrayType(STRING),
            False,
            "Anonymous ids of its events without a user id that are stitched to user_key "
            "(sorted); as of a time before their link was first seen, they are not",
        ),
    ]
)

# silver/user_days: additive rollups of bronze/events per raw key and day, which features
# sum over their windows (features.point_in_time) instead of reading every event again.
USER_DAYS = T.StructType(
    [
        _field("raw_key", STRING, False, "user_id, else anon:<anonymous_id> (not stitched)"),
        _field("anonymous_id", STRING, True, "The anonymous id of an anon: raw key, else null"),
        _field("event_date", T.DateType(), False, "UTC date"),
        _field("events", LONG, False, "Events of the raw key that day"),
        _field("first_event", TIMESTAMP, False, "First event time that day"),
        _field("last_event", TIMESTAMP, False, "Last event time that day"),
        _field("last_purchase", TIMESTAMP, True, "Last purchase event time that day"),
        _field(
            "category_events",
            T.MapType(STRING, LONG),
            False,
            "Events per category (events with a category)",
        ),
        _field("hour_events", T.MapType(INT, LONG), False, "Events per hour of day"),
    ]
)

# silver/consent: per user and purpose, one row per consent state (microseg.silver.consent).
CONSENT = T.StructType(
    [
        _field("user_key", STRING, False, "User key (see silver/sessions)"),
        _field("purpose", STRING, False, "analytics or marketing"),
        _field("granted", BOOLEAN, False, "Consent granted (true) or denied (false)"),
        _field("valid_from", TIMESTAMP, False, "Time of the event that set it"),
        _field("valid_to", TIMESTAMP, True, "Time of the next change; null while current"),
        _field("is_current", BOOLEAN, False, "valid_to is null"),
        _field("event_id", STRING, False, "The event that set it"),
    ]
)

WATERMARKS = T.StructType(
    [
        _field("job", STRING, False, "Job name"),
        _field("watermark", TIMESTAMP, False, "Latest ingested_at the job has processed"),
        _field("run_id", STRING, False, "Run that set it"),
        _field("updated_at", TIMESTAMP, False, "When"),
    ]
)

# gold/user_features: these columns, then the selected features (README lists them all).
USER_FEATURES_KEYS = T.StructType(
    [
        _field("user_key", STRING, False, "User key (see silver/sessions)"),
        _field("as_of", TIMESTAMP, False, "Features use only events strictly before this time"),
        _field("as_of_date", T.DateType(), False, "UTC date of as_of; partition column"),
        _field("computed_at", TIMESTAMP, False, "When the row was computed"),
        _field("run_id", STRING, False, "Id of the features run"),
    ]
)

SCOPE_COMMENT = "What the run covers: rule file name, cluster model name or propensity target"

# gold/segment_membership: history of who was in which segment when (one row per interval).
SEGMENT_MEMBERSHIP = T.StructType(
    [
        _field("user_key", STRING, False, "User key (see silver/sessions)"),
        _field("segment_id", STRING, False, "Segment id (conf/segments.yaml, cluster or model)"),
        _field("source", STRING, False, "What assigned it: rule, cluster, propensity or stream"),
        _field(
            "scope",
            STRING,
            False,
            "The rule file, cluster model or propensity target whose run wrote it",
        ),
        _field("definition_version", STRING, False, "Hash of the segment definition or model"),
        _field("score", T.DoubleType(), True, "Score at entry (cluster distance, propensity)"),
        _field("valid_from", TIMESTAMP, False, "as-of time of the run the user entered"),
        _field("valid_to", TIMESTAMP, True, "as-of time of the run the user left; null if current"),
        _field("is_current", T.BooleanType(), False, "valid_to is null"),
        _field("run_id", STRING, False, "Run that opened the interval"),
        _field("closed_by_run_id", STRING, True, "Run that closed it"),
    ]
)

# gold/segment_changes: one row per enter or exit, what activation systems consume.
SEGMENT_CHANGES = T.StructType(
    [
        _field("user_key", STRING, False, "User key"),
        _field("segment_id", STRING, False, "Segment id"),
        _field("source", STRING, False, "rule, cluster, propensity or stream"),
        _field(
            "scope",
            STRING,
            False,
            "The rule file, cluster model or propensity target whose run wrote it",
        ),
        _field("change", STRING, False, "enter or exit"),
        _field(
            "reason",
            STRING,
            False,
            "Enter: rule_matched, parent_fallback, definition_changed (or SOURCE_assigned). "
            "Exit: no_longer_matched, definition_changed, below_minimum_size, "
            "outranked_in_exclusive_group, segment_retired",
        ),
        _field("changed_at", TIMESTAMP, False, "as-of time of the run that saw the change"),
        _field("definition_version", STRING, False, "Version after an enter, before an exit"),
        _field("run_id", STRING, False, "Run that recorded it"),
        _field("recorded_at", TIMESTAMP, False, "Wall-clock time of the run"),
    ]
)

# gold/segment_catalog: per run (as-of) and segment, its definition, size and health.
SEGMENT_CATALOG = T.StructType(
    [
        _field("as_of", TIMESTAMP, False, "as-of time of the run"),
        _field("source", STRING, False, "rule, cluster or propensity"),
        _field(
            "scope",
            STRING,
            False,
            "The rule file, cluster model or propensity target whose run wrote it",
        ),
        _field("segment_id", STRING, False, "Segment id"),
        _field("name", STRING, False, "Readable name"),
        _field("description", STRING, True, "What it is for"),
        _field("tags", T.ArrayType(STRING), True, "Tags"),
        _field("definition", STRING, False, "The definition as JSON"),
        _field("definition_version", STRING, False, "Hash of the definition"),
        _field("parent", STRING, True, "Parent segment id"),
        _field("exclusive_group", STRING, True, "Exclusive group"),
        _field("priority", T.IntegerType(), True, "Priority in the group (1 wins)"),
        _field("min_size", STRING, True, "Minimum size: a count or a share such as 0.5%"),
        _field("matched", T.LongType(), False, "Users matching the definition (before guards)"),
        _field("size", T.LongType(), False, "Published members"),
        _field(
            "status",
            STRING,
            False,
            "active, below_minimum_size, parent_not_published or retired",
        ),
        _field("status_reason", STRING, True, "Why it is not active, and where members went"),
        _field("previous_size", T.LongType(), True, "Members at the previous run"),
        _field("entered", T.LongType(), False, "Users who entered at this as-of"),
        _field("exited", T.LongType(), False, "Users who left at this as-of"),
        _field("stability", T.DoubleType(), True, "Share of the previous members kept"),
        _field(
            "overlap",
            T.MapType(STRING, T.DoubleType()),
            True,
            "Jaccard index with every other segment published at this as-of",
        ),
        _field("run_id", STRING, False, "Run that recorded it"),
        _field("recorded_at", TIMESTAMP, False, "Wall-clock time of the run"),
    ]
)

# gold/model_registry: one row per trained model version (clustering, propensity).
MODEL_REGISTRY = T.StructType(
    [
        _field("model_name", STRING, False, "Model name, e.g. behavior or purchase_7d"),
        _field("version", STRING, False, "Version id (time-ordered)"),
        _field("kind", STRING, False, "cluster or propensity"),
        _field("trained_at", TIMESTAMP, False, "Wall-clock time of training"),
        _field("training_as_of", T.ArrayType(TIMESTAMP), False, "Feature snapshots trained on"),
        _field("evaluation_as_of", TIMESTAMP, True, "Snapshot it was evaluated on, if any"),
        _field("params", STRING, False, "Parameters as JSON"),
        _field("metrics", T.MapType(STRING, T.DoubleType()), False, "Headline metrics"),
        _field("details", STRING, True, "Everything else as JSON (per-k scores, profiles, ...)"),
        _field("training_data_hash", STRING, False, "Hash of the training rows"),
        _field("path", STRING, False, "Where the PipelineModel is saved"),
        _field("run_id", STRING, False, "Run that trained it"),
    ]
)

# gold/propensity_scores: one row per target, as-of and user (microseg.ml.propensity).
PROPENSITY_SCORES = T.StructType(
    [
        _field("model_name", STRING, False, "Target / model name, e.g. purchase_7d"),
        _field("model_version", STRING, False, "Model version that scored (gold/model_registry)"),
        _field("as_of", TIMESTAMP, False, "Features use only events strictly before this time"),
        _field("as_of_date", T.DateType(), False, "UTC date of as_of; partition column"),
        _field("user_key", STRING, False, "User key (see silver/sessions)"),
        _field(
            "score",
            DOUBLE,
            False,
            "Calibrated probability of the target in [as_of, as_of + horizon)",
        ),
        _field("raw_score", DOUBLE, False, "GBT positive-class probability before calibration"),
        _field("rank", LONG, False, "1 = highest; ties by raw_score, then user_key"),
        _field("percentile", DOUBLE, False, "(users - rank + 1) / users: 1.0 for the top user"),
        _field(
            "reasons",
            T.ArrayType(
                T.StructType(
                    [
                        # nested fields stay nullable: Delta has no NOT NULL inside arrays
                        _field("feature", STRING, True, "Feature name"),
                        _field("value", DOUBLE, True, "The user's value (after imputation)"),
                        _field(
                            "contribution",
                            DOUBLE,
                            True,
                            "TreeSHAP value: log-odds this feature adds to the GBT's score",
                        ),
                    ]
                )
            ),
            True,
            "The features with the largest |contribution|, largest first (propensity.reasons); "
            "null when not computed",
        ),
        _field("run_id", STRING, False, "Run that scored"),
        _field("scored_at", TIMESTAMP, False, "Wall-clock time of the run"),
    ]
)

# ops/runs: one row per job run.
RUNS = T.StructType(
    [
        _field("run_id", STRING, False, "Run id"),
        _field("job", STRING, False, "Job (command), e.g. ingest, segments run, pipeline"),
        _field("as_of", TIMESTAMP, True, "as-of time, for jobs that have one"),
        _field("started_at", TIMESTAMP, False, "Start, UTC"),
        _field("ended_at", TIMESTAMP, False, "End, UTC"),
        _field("status", STRING, False, "succeeded, failed or interrupted"),
        _field("rows_read", T.MapType(STRING, T.LongType()), False, "Rows read per table"),
        _field(
            "rows_written",
            T.MapType(STRING, T.LongType()),
            False,
            "Rows added or changed per table (Delta commit metrics)",
        ),
        _field(
            "delta_versions",
            T.MapType(STRING, T.LongType()),
            False,
            "Latest Delta version per table the run changed",
        ),
        _field("error", STRING, True, "Error type and first line of its message, if it failed"),
    ]
)

# ops/erasures: one row per `microseg forget` request; never the identifiers themselves.
ERASURES = T.StructType(
    [
        _field("request_id", STRING, False, "Id of the request (and of its run)"),
        _field(
            "subject_hashes",
            T.ArrayType(STRING),
            False,
            "Audit hashes (keyed, not the pseudonymization hash) of the ids given",
        ),
        _field("identifiers", LONG, False, "Identifiers of the people found and erased"),
        _field("requested_at", TIMESTAMP, False, "When the request started"),
        _field("completed_at", TIMESTAMP, False, "When the erasure finished"),
        _field("rows_removed", T.MapType(STRING, LONG), False, "Rows removed per table"),
        _field("store_entries_removed", LONG, False, "Online store entries removed"),
        _field("checkpoints_removed", T.ArrayType(STRING), False, "Stream checkpoints deleted"),
        _field("vacuum_retention_hours", DOUBLE, False, "VACUUM retention used"),
        _field(
            "erasure_deadline",
            TIMESTAMP,
            False,
            "When no file of the lake holds the rows any more (file and log retention)",
        ),
        _field("verified", BOOLEAN, True, "forget --verify found no hit; null: not verified"),
        _field("verify_hits", LONG, True, "Hits of the verification scan"),
        _field("files_scanned", LONG, True, "Files the verification read"),
    ]
)

# ops/suppression: the ids of erased people; ingest (batch and stream) drops their records.
SUPPRESSION = T.StructType(
    [
        _field("id_hash", STRING, False, "Audit hash of an identifier as the lake stores it"),
        _field("request_id", STRING, False, "The erasure request that added it"),
        _field("added_at", TIMESTAMP, False, "When"),
    ]
)

# gold/experiment_assignments: insert-once, one row per experiment and user.
EXPERIMENT_ASSIGNMENTS = T.StructType(
    [
        _field("experiment_id", STRING, False, "Experiment id (conf/experiments.yaml)"),
        _field("user_key", STRING, False, "User key: the value hashed (GrowthBook's hash value)"),
        _field("variant", STRING, False, "Variant name, or `holdout`"),
        _field("variant_index", INT, False, "Index in the experiment's variants; -1: holdout"),
        _field("bucket", DOUBLE, False, "GrowthBook hash of the user key with the seed, [0, 1)"),
        _field(
            "weights",
            T.ArrayType(DOUBLE, False),
            False,
            "Variant weights the user was assigned under (fixed, or the bandit's version)",
        ),
        _field("allocation_version", INT, False, "0: fixed weights; n: the bandit's version n"),
        _field("segment_id", STRING, False, "Target segment the user was a member of"),
        _field("definition_version", STRING, False, "Hash of the assignment settings"),
        _field("assigned_at", TIMESTAMP, False, "as-of time of the run that assigned"),
        _field("run_id", STRING, False, "Run that assigned"),
    ]
)

# gold/exposures: insert-once, the first session of an assigned user after assignment.
EXPOSURES = T.StructType(
    [
        _field("experiment_id", STRING, False, "Experiment id"),
        _field("user_key", STRING, False, "User key"),
        _field("variant", STRING, False, "Assigned variant"),
        _field("exposed_at", TIMESTAMP, False, "Start of the first session at or after assignment"),
        _field("session_id", STRING, False, "That session (silver/sessions)"),
        _field("run_id", STRING, False, "Run that recorded it"),
    ]
)

# gold/experiment_results: one row per analysis run, experiment and variant.
EXPERIMENT_RESULTS = T.StructType(
    [
        _field("experiment_id", STRING, False, "Experiment id"),
        _field("as_of", TIMESTAMP, False, "Outcomes counted up to this time"),
        _field("variant", STRING, False, "Variant (or holdout)"),
        _field("is_control", BOOLEAN, False, "The first variant"),
        _field("assigned", LONG, False, "Users assigned"),
        _field("expected_share", DOUBLE, True, "Share of assigned users the weights expect"),
        _field("exposed", LONG, False, "Users exposed (the analysis population)"),
        _field("conversions", LONG, False, "Exposed users with a purchase in their window"),
        _field("conversion_rate", DOUBLE, True, "conversions / exposed"),
        _field("revenue_per_user", DOUBLE, True, "Mean revenue per exposed user in the window"),
        _field("lift", DOUBLE, True, "Relative lift of the conversion rate over control"),
        _field("lift_ci_low", DOUBLE, True, "Lower bound of lift's CI (delta method)"),
        _field("lift_ci_high", DOUBLE, True, "Upper bound of lift's CI"),
        _field("diff", DOUBLE, True, "Conversion rate minus control's"),
        _field("diff_ci_low", DOUBLE, True, "Lower bound of diff's CI (unpooled)"),
        _field("diff_ci_high", DOUBLE, True, "Upper bound of diff's CI"),
        _field("z", DOUBLE, True, "Two-proportion z statistic vs control (pooled)"),
        _field("p_value", DOUBLE, True, "Its two-sided p-value"),
        _field("revenue_diff", DOUBLE, True, "Revenue per user minus control's"),
        _field("revenue_p_value", DOUBLE, True, "Welch's t-test p-value of revenue per user"),
        _field("cuped_revenue_diff", DOUBLE, True, "revenue_diff adjusted by CUPED"),
        _field("cuped_revenue_ci_low", DOUBLE, True, "Lower bound of its CI"),
        _field("cuped_revenue_ci_high", DOUBLE, True, "Upper bound of its CI"),
        _field("cuped_revenue_p_value", DOUBLE, True, "Welch's p-value after CUPED"),
        _field("cuped_variance_reduction", DOUBLE, True, "1 - adjusted / raw variance"),
        _field("chi2_p_value", DOUBLE, True, "Chi-square test of conversion x variant (all)"),
        _field("srm_p_value", DOUBLE, True, "Chi-square goodness of fit of assigned counts"),
        _field("srm_flag", BOOLEAN, False, "srm_p_value below metrics.srm_threshold"),
        _field("run_id", STRING, False, "Run that analyzed"),
        _field("analyzed_at", TIMESTAMP, False, "Wall-clock time of the run"),
    ]
)

# gold/experiment_allocations: the bandit's versioned weights, one row per version and variant.
EXPERIMENT_ALLOCATIONS = T.StructType(
    [
        _field("experiment_id", STRING, False, "Experiment id"),
        _field("version", INT, False, "1, 2, ...: new assignments use the latest"),
        _field("as_of", TIMESTAMP, False, "Outcomes counted up to this time"),
        _field("variant", STRING, False, "Variant"),
        _field("weight", DOUBLE, False, "Allocation weight (P(best) with the floor applied)"),
        _field("p_best", DOUBLE, False, "Posterior probability that the variant is best"),
        _field("exposed", LONG, False, "Exposed users counted"),
        _field("conversions", LONG, False, "Of them converted"),
        _field("alpha", DOUBLE, False, "Beta posterior: 1 + conversions"),
        _field("beta", DOUBLE, False, "Beta posterior: 1 + exposed - conversions"),
        _field("run_id", STRING, False, "Run that computed it"),
    ]
)

# gold/deliveries: the delivery ledger, one row per destination and change.
TRIGGER_FIRINGS = T.StructType(
    [
        _field("trigger_id", STRING, False, "Trigger id (conf/triggers.yaml)"),
        _field("user_key", STRING, False, "User key (see silver/sessions)"),
        _field(
            "anchor_key",
            STRING,
            False,
            "What started the wait: the anchor event's event_id, or a hash of the segment change",
        ),
        _field("anchor_at", TIMESTAMP, False, "Time of the anchor event or segment change"),
        _field("due_at", TIMESTAMP, False, "anchor_at + the trigger's delay"),
        _field("fire_at", TIMESTAMP, False, "due_at, or the end of the quiet hours it fell in"),
        _field("status", STRING, False, "fired or suppressed"),
        _field(
            "reason",
            STRING,
            True,
            "Why suppressed: conditions_not_met, not_in_segment or capped; null when fired",
        ),
        _field("definition_version", STRING, False, "Hash of the trigger's definition"),
        _field("source", STRING, False, "batch (microseg triggers run) or stream"),
        _field("decided_at", TIMESTAMP, False, "as-of of the run (a stream: its clock)"),
        _field("run_id", STRING, False, "Run that decided it"),
    ]
)


DELIVERIES = T.StructType(
    [
        _field("destination_id", STRING, False, "Destination id (conf/destinations.yaml)"),
        _field(
            "idempotency_key",
            STRING,
            False,
            "Hash of destination and change: the same on every run; receivers dedupe on it",
        ),
        _field("user_key", STRING, False, "User key of the change"),
        _field("segment_id", STRING, False, "Segment of the change (a firing: the trigger id)"),
        _field("change", STRING, False, "enter, exit, or trigger (a trigger firing)"),
        _field("changed_at", TIMESTAMP, False, "as-of time of the run that saw the change"),
        _field("batch_id", STRING, True, "The POST or file it goes in (Idempotency-Key header)"),
        _field("payload", STRING, True, "The change as sent (JSON of the destination's fields)"),
        _field("status", STRING, False, "pending, delivered, failed or no_consent"),
        _field("attempts", INT, False, "Requests made for its batch, over all runs"),
        _field("first_attempt_at", TIMESTAMP, True, "First request of its batch"),
        _field("delivered_at", TIMESTAMP, True, "When the destination accepted it"),
        _field("last_error", STRING, True, "The last failure (HTTP status or connection error)"),
        _field("run_id", STRING, False, "Run that planned it"),
        _field("updated_at", TIMESTAMP, False, "Last change of this row"),
    ]
)


# gold/segment_kpis: one row per as-of and segment, from the members at that as-of and their
# features (microseg health).
SEGMENT_KPIS = T.StructType(
    [
        _field("as_of", TIMESTAMP, False, "as-of time of the run"),
        _field("as_of_date", T.DateType(), False, "UTC date of as_of; partition column"),
        _field("segment_id", STRING, False, "Segment id; all_users: everyone with features"),
        _field("source", STRING, False, "rule, cluster, propensity, stream or population"),
        _field("members", LONG, False, "Members with features at as_of"),
        _field("buyers_30d", LONG, False, "Members with an order in the 30 days before as_of"),
        _field("active_7d", LONG, False, "Members with a session in the 7 days before as_of"),
        _field("conversion_rate_30d", DOUBLE, True, "buyers_30d / members"),
        _field("revenue_per_user_30d", DOUBLE, True, "Revenue of the last 30 days / members"),
        _field("aov_30d", DOUBLE, True, "Average order value of the last 30 days"),
        _field("sessions_per_user_30d", DOUBLE, True, "Sessions of the last 30 days / members"),
        _field(
            "retention_30d",
            DOUBLE,
            True,
            "Of the members active 30-90 days before as_of, the share also active in the "
            "last 30 days",
        ),
        _field("run_id", STRING, False, "Run that computed it"),
        _field("computed_at", TIMESTAMP, False, "Wall-clock time of the run"),
    ]
)

# gold/segment_alerts: what `microseg health` found wrong with a segment at an as-of.
SEGMENT_ALERTS = T.StructType(
    [
        _field("as_of", TIMESTAMP, False, "as-of time of the run"),
        _field("segment_id", STRING, False, "Segment id"),
        _field("source", STRING, False, "rule, cluster, propensity or stream"),
        _field(
            "alert",
            STRING,
            False,
            "size_drop, size_spike, engagement_drop, engagement_spike, "
            "not_distinct_from_parent or not_distinct_from_sibling",
        ),
        _field("metric", STRING, False, "size, sessions_per_user_30d, or the tested behaviours"),
        _field("value", DOUBLE, True, "The value at as_of"),
        _field("expected", DOUBLE, True, "The baseline's forecast, or the other group's value"),
        _field("score", DOUBLE, True, "Robust z-score, or the smallest test p-value"),
        _field("other_segment", STRING, True, "The parent or sibling compared with"),
        _field("message", STRING, False, "One line for a person"),
        _field("run_id", STRING, False, "Run that found it"),
        _field("detected_at", TIMESTAMP, False, "Wall-clock time of the run"),
    ]
)
