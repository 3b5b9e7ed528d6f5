"""Raw records -> the canonical event schema, and the checks that say what is wrong with one.

Pure DataFrame functions: `to_canonical` maps a source's records to the canonical fields and
runs the ordered list of `Check`s on them; `classify` adds duplicates against bronze. Reading
files and writing the tables is in `microseg.ingest.files`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import reduce

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from microseg.core.config import ConfigError
from microseg.core.privacy import audit_key, keyed_hash
from microseg.core.schemas import EVENT_FIELDS, MAPPABLE_FIELDS, USER_KEY_FIELDS
from microseg.ingest.sources import SourceMapping, column_for

# Reason codes of bronze/quarantine, in the order they are checked (a record gets the first).
REASONS = {
    "malformed_record": "the line is not one valid JSON object (text after it too) / has the "
    "wrong number of CSV columns",
    "missing_required_field": "event_time, event_type, or both user_id and anonymous_id missing",
    "unparseable_timestamp": "event_time does not match the source's timestamp format",
    "timestamp_out_of_range": "event_time is before ingest.min_event_time",
    "future_timestamp": "event_time is later than the ingest time plus ingest.max_future_skew",
    "unknown_event_type": "event_type (after the value map) is not in ingest.event_types",
    "wrong_type": "a value cannot be read as its field's type (number, integer, boolean), or "
    "an id (event_id, user_id, anonymous_id) is a JSON object or array",
    "impossible_value": "negative price, quantity below 1, non-finite number, bad currency code",
    "duplicate_event": "an event with the same event_id was already accepted",
}

_TYPE_NOUNS = {
    T.DoubleType: "a number",
    T.IntegerType: "a whole number",
    T.BooleanType: "true or false",
}
_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")


@dataclass(frozen=True, eq=False)
class Check:
    """One validation rule: a record whose `condition` is true fails with `reason` (a key of
    REASONS) and `message`. A null condition counts as passed."""

    reason: str
    condition: Column
    message: Column

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {self.reason!r}")


# --------------------------------------------------------------------------------------
# the staged columns: _raw_<field> as mapped, _t_<field> typed


def _raw(name: str) -> Column:
    return F.col(f"_raw_{name}")


def _typed(name: str) -> Column:
    return F.col(f"_t_{name}")


def _quote(column: Column) -> Column:
    return F.concat(F.lit("'"), column, F.lit("'"))


def _parse_time(raw: Column, fmt: str | None) -> Column:
    if fmt in (None, "iso8601"):
        return F.try_to_timestamp(raw)
    if fmt in ("epoch_seconds", "epoch_millis"):
        seconds = raw.try_cast("double") / (1000 if fmt == "epoch_millis" else 1)
        # bounds keep the conversion from overflowing on absurd numbers (year 1 .. 9999)
        return F.when(seconds.between(-62135596800, 253402300799), F.timestamp_seconds(seconds))
    return F.try_to_timestamp(raw, F.lit(fmt))


def _type_noun(name: str) -> str | None:
    """How a wrong_type message names a non-string field's type ('a number'), else None."""
    return _TYPE_NOUNS.get(type(EVENT_FIELDS[name][0]))


def _typed_value(name: str, raw: Column, fmt: str | None) -> Column:
    """The value of a canonical field in its type; null where the raw text does not fit it."""
    dtype = EVENT_FIELDS[name][0]
    if name == "event_time":
        return _parse_time(raw, fmt)
    if isinstance(dtype, T.DoubleType):
        return raw.try_cast("double")
    if isinstance(dtype, T.IntegerType):
        number = raw.try_cast("double")
        whole = number.isNotNull() & (number == F.floor(number)) & (F.abs(number) < 2**31)
        return F.when(whole, number.cast("int"))
    if isinstance(dtype, T.BooleanType):
        lowered = F.lower(raw)
        return F.when(lowered.isin(*_TRUE), F.lit(True)).when(lowered.isin(*_FALSE), F.lit(False))
    if name in ("event_type", "device"):
        return F.lower(raw)
    if name == "currency":
        return F.upper(raw)
    return raw


def _staged(records_df: DataFrame, mapping: SourceMapping) -> DataFrame:
    """read_records' rows with each mapped field as _raw_<field> (value map applied) and each
    property as _prop_<i>."""
    index_of = {path: i for i, path in enumerate(mapping.input_columns())}
    raw: dict[str, Column] = {}
    for name, field_mapping in mapping.fields.items():
        value = column_for(field_mapping, index_of)
        if field_mapping.values:
            lookup = F.create_map(*[F.lit(x) for kv in field_mapping.values.items() for x in kv])
            value = F.coalesce(lookup[value], value)
        raw[name] = value
    return records_df.select(
        "source_file",
        "source_line",
        "raw",
        "malformed",
        *[col.alias(f"_raw_{name}") for name, col in raw.items()],
        *[
            column_for(m, index_of).alias(f"_prop_{i}")
            for i, m in enumerate(mapping.properties.values())
        ],
    )


# --------------------------------------------------------------------------------------
# the checks, one builder per reason group


def _malformed_checks() -> list[Check]:
    return [Check("malformed_record", F.col("malformed").isNotNull(), F.col("malformed"))]


def _missing_field_checks(mapping: SourceMapping) -> list[Check]:
    required = ["event_time", "event_type"] + (["event_id"] if "event_id" in mapping.fields else [])
    checks = [
        Check(
            "missing_required_field",
            _raw(name).isNull(),
            F.lit(f"missing required field {name} (input column '{mapping.fields[name].column}')"),
        )
        for name in required
    ]
    user_keys = [k for k in USER_KEY_FIELDS if k in mapping.fields]
    checks.append(
        Check(
            "missing_required_field",
            reduce(lambda a, b: a & b, [_raw(k).isNull() for k in user_keys]),
            F.lit(f"missing {' and '.join(user_keys)}: a user key is required"),
        )
    )
    return checks


def _timestamp_checks(
    mapping: SourceMapping, *, earliest: datetime, latest: datetime | Column
) -> list[Check]:
    time_format = mapping.fields["event_time"].format or "iso8601"
    event_time = _typed("event_time")
    return [
        Check(
            "unparseable_timestamp",
            event_time.isNull(),
            F.concat(
                F.lit("event_time "),
                _quote(_raw("event_time")),
                F.lit(f" does not match format '{time_format}'"),
            ),
        ),
        Check(
            "timestamp_out_of_range",
            event_time < F.lit(earliest),
            F.concat(
                F.lit("event_time "),
                event_time.cast("string"),
                F.lit(f" is before ingest.min_event_time {earliest.isoformat()}"),
            ),
        ),
        Check(
            "future_timestamp",
            event_time > (latest if isinstance(latest, Column) else F.lit(latest)),
            F.concat(
                F.lit("event_time "),
                event_time.cast("string"),
                F.lit(" is after the ingest time plus max_future_skew ("),
                latest.cast("string") if isinstance(latest, Column) else F.lit(latest.isoformat()),
                F.lit(")"),
            ),
        ),
    ]


def _event_type_checks(event_types: tuple[str, ...]) -> list[Check]:
    return [
        Check(
            "unknown_event_type",
            ~_typed("event_type").isin(*event_types),
            F.concat(
                F.lit("event_type "),
                _quote(_raw("event_type")),
                F.lit(" is not one of ingest.event_types"),
            ),
        )
    ]


# Fields whose value names something (a person, an event): a JSON object or array there is
# not an id, even though its text would pass for one
_ID_FIELDS = ("event_id", "user_id", "anonymous_id")


def _is_json_structure(raw: Column) -> Column:
    """The text is a JSON object or array (e.g. `"user": {"id": {"x": 1}}` read as text)."""
    return raw.rlike(r"^\s*[\[{]") & (
        F.json_object_keys(raw).isNotNull() | F.json_array_length(raw).isNotNull()
    )


def _wrong_type_checks(mapping: SourceMapping) -> list[Check]:
    return [
        *(
            Check(
                "wrong_type",
                _raw(name).isNotNull() & _typed(name).isNull(),
                F.concat(F.lit(f"{name} "), _quote(_raw(name)), F.lit(f" is not {noun}")),
            )
            for name in mapping.fields
            if (noun := _type_noun(name))
        ),
        *(
            Check(
                "wrong_type",
                _is_json_structure(_raw(name)),
                F.concat(
                    F.lit(f"{name} "),
                    _quote(_raw(name)),
                    F.lit(" is a JSON object or array, not an id"),
                ),
            )
            for name in _ID_FIELDS
            if name in mapping.fields
        ),
    ]


def _impossible_value_checks(mapping: SourceMapping) -> list[Check]:
    impossible = {
        "price": [
            (
                F.isnan("_t_price") | _typed("price").isin(float("inf"), float("-inf")),
                "is not finite",
            ),
            (_typed("price") < 0, "is negative"),
        ],
        "quantity": [(_typed("quantity") < 1, "is less than 1")],
        "currency": [(~_typed("currency").rlike("^[A-Z]{3}$"), "is not a 3-letter ISO 4217 code")],
    }
    return [
        Check(
            "impossible_value",
            F.coalesce(condition, F.lit(False)),
            F.concat(F.lit(f"{name} "), _typed(name).cast("string"), F.lit(f" {text}")),
        )
        for name, conditions in impossible.items()
        if name in mapping.fields
        for condition, text in conditions
    ]


def checks_for(
    mapping: SourceMapping,
    *,
    event_types: tuple[str, ...],
    earliest: datetime,
    latest: datetime | Column,
) -> list[Check]:
    """Every check of a source's records, in the order they apply (that of REASONS).

    The conditions read the staged columns _raw_<field> and _t_<field>.
    """
    return [
        *_malformed_checks(),
        *_missing_field_checks(mapping),
        *_timestamp_checks(mapping, earliest=earliest, latest=latest),
        *_event_type_checks(event_types),
        *_wrong_type_checks(mapping),
        *_impossible_value_checks(mapping),
    ]


def first_failure(checks: Sequence[Check]) -> tuple[Column, Column]:
    """(reason, message) of the first check a record fails; both null when it fails none."""
    reason = message = None
    for check in checks:
        failed = F.coalesce(check.condition, F.lit(False))
        if reason is None:
            reason, message = F.when(failed, F.lit(check.reason)), F.when(failed, check.message)
        else:
            reason = reason.when(failed, F.lit(check.reason))
            message = message.when(failed, check.message)
    return reason, message


# --------------------------------------------------------------------------------------
# the canonical record


def _require_key(mapping: SourceMapping, key: bytes | None) -> None:
    if mapping.personal_fields() and key is None:
        raise ConfigError(
            f"source '{mapping.name}' marks {mapping.personal_fields()} as personal data but "
            "no pseudonymization key is set: export MICROSEG_PSEUDONYMIZATION_KEY (or the "
            "variable named by privacy.pseudonymization_key_env) or set "
            "privacy.pseudonymization_key"
        )


def _canonical_columns(mapping: SourceMapping, key: bytes | None) -> list[Column]:
    """MAPPABLE_FIELDS then properties, from the typed columns; personal values pseudonymized,
    a missing event_id replaced by a hash of the source and the raw record."""
    personal = {name for name, m in mapping.fields.items() if m.personal}

    def final(name: str) -> Column:
        dtype = EVENT_FIELDS[name][0]
        if name not in mapping.fields:
            return F.lit(None).cast(dtype)
        value = _typed(name)
        return keyed_hash(value, key) if name in personal else value

    event_id = (
        final("event_id")
        if "event_id" in mapping.fields
        else F.substring(
            F.sha2(F.concat_ws("\u001f", F.lit(mapping.name), F.col("raw")), 256), 1, 32
        )
    )
    property_entries = []
    for i, (prop, prop_mapping) in enumerate(mapping.properties.items()):
        value = F.col(f"_prop_{i}")
        property_entries += [
            F.lit(prop),
            keyed_hash(value, key) if prop_mapping.personal else value,
        ]
    properties = (
        F.map_filter(F.create_map(*property_entries), lambda _k, v: v.isNotNull())
        if property_entries
        else F.create_map().cast(EVENT_FIELDS["properties"][0])
    )
    return [
        *[
            (event_id if name == "event_id" else final(name)).alias(name)
            for name in MAPPABLE_FIELDS
        ],
        properties.alias("properties"),
    ]


def to_canonical(
    records_df: DataFrame,
    *,
    mapping: SourceMapping,
    event_types: tuple[str, ...],
    earliest: datetime,
    latest: datetime | Column,
    key: bytes | None,
) -> DataFrame:
    """Map raw records to canonical columns and name what is wrong with each.

    Returns source_file, source_line, raw, every canonical event field, and `reason` /
    `message` (null for a valid record). `latest` is the ingest time plus the allowed skew.
    """
    typed = {
        name: _typed_value(name, _raw(name), field_mapping.format)
        for name, field_mapping in mapping.fields.items()
    }
    reason, message = first_failure(
        checks_for(mapping, event_types=event_types, earliest=earliest, latest=latest)
    )
    checked_df = (
        _staged(records_df, mapping)
        .select("*", *[col.alias(f"_t_{name}") for name, col in typed.items()])
        .select("*", reason.alias("reason"), message.alias("message"))
    )
    _require_key(mapping, key)
    return checked_df.select(
        "source_file",
        "source_line",
        "raw",
        *_canonical_columns(mapping, key),
        "reason",
        "message",
    )


def classify(checked_df: DataFrame, existing_df: DataFrame | None) -> DataFrame:
    """Add `outcome`: new, present (this very record is in bronze already) or quarantined.

    A valid record whose event_id was accepted before (from another file or line, or earlier
    in this batch) is quarantined as duplicate_event, so that nothing is dropped silently.
    existing_df holds bronze's event_id, source_file, source_line.
    """
    valid = F.col("reason").isNull()
    # Valid records first, so a valid record's rank counts valid ones only. Partitioning by
    # event_id alone lets the join below reuse this shuffle.
    same_id = Window.partitionBy("event_id").orderBy(valid.desc(), "source_file", "source_line")
    ranked_df = checked_df.select(
        "*",
        F.row_number().over(same_id).alias("_rank"),
        F.first("source_file").over(same_id).alias("_first_file"),
        F.first("source_line").over(same_id).alias("_first_line"),
    )
    if existing_df is None:
        joined_df = ranked_df.select(
            "*",
            F.lit(None).cast("string").alias("_b_file"),
            F.lit(None).cast("long").alias("_b_line"),
        )
    else:
        joined_df = ranked_df.join(
            existing_df.select(
                "event_id",
                F.col("source_file").alias("_b_file"),
                F.col("source_line").alias("_b_line"),
            ),
            on="event_id",
            how="left",
        )
    in_bronze = F.col("_b_file").isNotNull()
    this_record = (F.col("_b_file") == F.col("source_file")) & (
        F.col("_b_line") == F.col("source_line")
    )
    duplicate = valid & ((in_bronze & ~this_record) | (~in_bronze & (F.col("_rank") > 1)))
    duplicate_message = F.when(
        in_bronze,
        F.format_string(
            "event_id %s was already ingested from %s line %d", "event_id", "_b_file", "_b_line"
        ),
    ).otherwise(
        F.format_string("event_id %s repeats %s line %d", "event_id", "_first_file", "_first_line")
    )
    return joined_df.select(
        *[c for c in checked_df.columns if c not in ("reason", "message")],
        F.when(duplicate, F.lit("duplicate_event")).otherwise(F.col("reason")).alias("reason"),
        F.when(duplicate, duplicate_message).otherwise(F.col("message")).alias("message"),
        F.when(~valid | duplicate, F.lit("quarantined"))
        .when(in_bronze, F.lit("present"))
        .otherwise(F.lit("new"))
        .alias("outcome"),
    )


def suppress(classified_df: DataFrame, suppressed_df: DataFrame | None, key: bytes) -> DataFrame:
    """Set `outcome` to suppressed for the records of erased people: those whose user_id or
    anonymous_id (as stored: pseudonymized where personal) has its audit hash in
    suppressed_df's id_hash (ops/suppression). They are written nowhere, not even to
    quarantine: bringing the person back is what the list prevents. A record whose line is
    not readable at all has no id to check and is quarantined as malformed."""
    if suppressed_df is None:
        return classified_df
    hashes = F.broadcast(suppressed_df.select("id_hash").distinct())
    audit = audit_key(key)
    marked_df = classified_df
    for column in USER_KEY_FIELDS:
        marked_df = marked_df.join(
            hashes.select(
                F.col("id_hash").alias(f"_h_{column}"), F.lit(True).alias(f"_s_{column}")
            ),
            on=keyed_hash(F.col(column), audit) == F.col(f"_h_{column}"),
            how="left",
        )
    hit = F.coalesce(*[F.col(f"_s_{c}") for c in USER_KEY_FIELDS], F.lit(False))
    return marked_df.select(
        *[c for c in classified_df.columns if c != "outcome"],
        F.when(hit, F.lit("suppressed")).otherwise(F.col("outcome")).alias("outcome"),
    )
