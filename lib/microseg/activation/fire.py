"""Deciding trigger firings (`microseg triggers run`, and the activation stream): which
trigger fires for whom, and when. One definition, `decide`, serves the batch job and the
stream, so both give the same rows.

For a trigger and a time T (the batch job's as-of; the stream's clock), from the events
strictly before T (keyed as the segment job keys them) and the segment changes at or before T:

1. **Anchors**: the trigger's anchor events (`on: {event: ...}` and `on: {inactivity: ...}`)
   or its segment's enter changes (`on: {enter: ...}`).
2. **Candidates**: an anchor at time t is due at D = t + delay unless another anchor of the
   same user comes in (t, D): a later one restarts the wait (for inactivity: activity before
   the period is up). The fire time F is D, or the end of the quiet hours D falls in (local
   time of the trigger's zone). Of candidates with the same user and F, the latest anchor is
   kept. A candidate is decided once F <= T and F > T - lookback, and only once: the
   decisions are insert-once in gold/trigger_firings, keyed by trigger, user and anchor.
3. **Checks at F**: the user must be in `in_segment` at F (gold/segment_membership's
   intervals), and the rule conditions must hold from the events strictly before F (the
   segment rule compiler, with the facts taken at F).
4. **Cap**: of the candidates that pass, in order of F, each fires only if fewer than
   cap.count firings of the trigger (earlier ones included) fell in (F - cap.per, F].

Every decided candidate gets a row: `fired`, or `suppressed` with its reason
(not_in_segment, conditions_not_met, capped). The stream decides at its clock, the latest
event time it has read minus stream.watermark_delay; given events arrive no later than that
delay, it decides every candidate exactly as a batch run at the same T would.
"""

from __future__ import annotations

import time as clock_time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from microseg.activation.triggers import QuietHours, Trigger, load_triggers
from microseg.core import lake, progress
from microseg.core.clock import naive_utc
from microseg.core.config import Config
from microseg.features.user_features import keyed_events_before
from microseg.segments.compile import compile_condition
from microseg.segments.facts import facts_at_points
from microseg.streaming.state import micros

FIRED, SUPPRESSED = "fired", "suppressed"
_DAY_MICROS = 86_400_000_000


def hash_key(*parts) -> Column:
    """A 32-hex-digit key of the columns' values (the same on every run)."""
    return F.substring(F.sha2(F.concat_ws("|", *parts), 256), 1, 32)


def anchors_frame(
    trigger: Trigger, keyed_df: DataFrame, changes_df: DataFrame | None
) -> DataFrame | None:
    """(user_key, anchor_key, anchor_at) of the trigger's anchors."""
    if trigger.kind == "enter":
        if changes_df is None:
            return None
        enters = changes_df.filter(
            (F.col("segment_id") == trigger.enter_segment) & (F.col("change") == "enter")
        )
        return enters.select(
            "user_key",
            hash_key(
                "user_key",
                "segment_id",
                "source",
                "scope",
                F.date_format("changed_at", "yyyy-MM-dd'T'HH:mm:ss.SSSSSS"),
            ).alias("anchor_key"),
            F.col("changed_at").alias("anchor_at"),
        )
    events = keyed_df
    if trigger.anchor_types is not None:
        events = events.filter(F.col("event_type").isin(list(trigger.anchor_types)))
    return events.select(
        "user_key", F.col("event_id").alias("anchor_key"), F.col("event_time").alias("anchor_at")
    )


def quiet_fire_at(due: Column, quiet: QuietHours | None) -> Column:
    """The fire time of a firing due at `due`: `due`, or the end of the quiet hours it falls
    in (triggers.defer_quiet states the same in Python)."""
    if quiet is None:
        return due
    local = F.from_utc_timestamp(due, quiet.timezone)
    day = F.date_trunc("day", local)
    of_day = F.unix_micros(local) - F.unix_micros(day)
    start = (quiet.start.hour * 60 + quiet.start.minute) * 60_000_000
    end = (quiet.end.hour * 60 + quiet.end.minute) * 60_000_000
    if start < end:
        inside = (of_day >= start) & (of_day < end)
        end_local = F.unix_micros(day) + end
    else:  # across midnight
        inside = (of_day >= start) | (of_day < end)
        end_local = F.unix_micros(day) + end + F.when(of_day >= start, _DAY_MICROS).otherwise(0)
    deferred = F.to_utc_timestamp(F.timestamp_micros(end_local), quiet.timezone)
    return F.when(inside, deferred).otherwise(due)


def candidates_frame(trigger: Trigger, anchors_df: DataFrame, as_of: datetime) -> DataFrame:
    """(user_key, anchor_key, anchor_at, due_at, fire_at): the candidates decidable at as_of."""
    delay = micros(trigger.delay)
    t = F.unix_micros("anchor_at")
    # a candidate fires within a day of its due time (quiet hours last less than a day), and
    # only the ones due in the lookback are decided: older anchors cannot matter
    earliest = as_of - trigger.lookback - trigger.delay - timedelta(days=1)
    out = anchors_df.filter(F.col("anchor_at") > F.lit(earliest))
    if delay > 0:
        later = Window.partitionBy("user_key").orderBy(t).rangeBetween(1, Window.unboundedFollowing)
        out = out.withColumn("_next", F.min(t).over(later)).filter(
            F.col("_next").isNull() | (F.col("_next") >= t + delay)
        )
    out = out.withColumn("due_at", F.timestamp_micros(t + delay))
    out = out.withColumn("fire_at", quiet_fire_at(F.col("due_at"), trigger.quiet_hours))
    out = out.filter(
        (F.col("fire_at") <= F.lit(as_of)) & (F.col("fire_at") > F.lit(as_of - trigger.lookback))
    )
    latest = Window.partitionBy("user_key", "fire_at").orderBy(
        F.col("anchor_at").desc(), F.col("anchor_key").desc()
    )
    return (
        out.withColumn("_n", F.row_number().over(latest))
        .filter(F.col("_n") == 1)
        .select("user_key", "anchor_key", "anchor_at", "due_at", "fire_at")
    )


def _member_at_fire(candidates_df: DataFrame, membership_df: DataFrame | None, segment: str):
    """candidates_df with `_member`: the user is in `segment` at fire_at."""
    if membership_df is None:
        return candidates_df.withColumn("_member", F.lit(False))
    spans = membership_df.filter(F.col("segment_id") == segment).select(
        F.col("user_key").alias("_m_user"), "valid_from", "valid_to"
    )
    inside = (
        (F.col("_m_user") == F.col("user_key"))
        & (F.col("valid_from") <= F.col("fire_at"))
        & (F.col("valid_to").isNull() | (F.col("valid_to") > F.col("fire_at")))
    )
    members = candidates_df.join(spans, inside, "left_semi").select(
        "user_key", "anchor_key", F.lit(True).alias("_member")
    )
    return candidates_df.join(members, ["user_key", "anchor_key"], "left").fillna(
        False, subset=["_member"]
    )


def _conditions_hold(trigger: Trigger, candidates_df: DataFrame, keyed_df: DataFrame):
    """candidates_df with `_holds`: the trigger's conditions at fire_at."""
    if trigger.condition is None:
        return candidates_df.withColumn("_holds", F.lit(True))
    facts_df = facts_at_points(
        keyed_df, trigger.facts, candidates_df, key="anchor_key", at="fire_at"
    )
    holds = compile_condition(trigger.condition, F.col("fire_at"))
    return facts_df.select(*candidates_df.columns, holds.alias("_holds"))


def _capped(trigger: Trigger, checked_df: DataFrame, fired_before: DataFrame | None, as_of):
    """checked_df with `_allowed`: whether the cap lets an eligible candidate fire (null for
    the others). A fold per user over the eligible candidates and the earlier firings that can
    count (fire_at in the cap's period before the lookback), in time order."""
    assert trigger.cap is not None
    per, count = micros(trigger.cap.per), trigger.cap.count
    rows = checked_df.withColumn("_new", F.lit(1))
    if fired_before is not None:
        earliest = as_of - trigger.lookback - trigger.cap.per
        before = fired_before.filter(F.col("fire_at") > F.lit(earliest)).select(
            "user_key", "anchor_key", "fire_at", F.lit(0).alias("_new")
        )
        rows = rows.unionByName(before, allowMissingColumns=True)
    item = F.struct(F.unix_micros("fire_at").alias("_t"), "_new", "anchor_key")
    counted = (F.col("_new") == 0) | (F.col("_member") & F.col("_holds"))
    items = F.array_sort(F.collect_list(F.when(counted, item)).over(Window.partitionBy("user_key")))
    # the accepted times so far, and the keys of the new ones accepted
    fold = F.expr(
        "aggregate(_items, named_struct('times', cast(array() as array<bigint>), "
        "'keys', cast(array() as array<string>)), (acc, x) -> CASE "
        "WHEN x._new = 0 THEN named_struct('times', concat(acc.times, array(x._t)), "
        "'keys', acc.keys) "
        f"WHEN size(filter(acc.times, a -> a > x._t - {per})) < {count} "
        "THEN named_struct('times', concat(acc.times, array(x._t)), "
        "'keys', concat(acc.keys, array(x.anchor_key))) "
        "ELSE acc END).keys"
    )
    allowed = F.when(F.array_contains(fold, F.col("anchor_key")), F.lit(True))
    return (
        rows.withColumn("_items", items)
        .filter(F.col("_new") == 1)
        .withColumn("_allowed", allowed)
        .drop("_items", "_new")
    )


def decide(
    trigger: Trigger,
    *,
    keyed_df: DataFrame,
    changes_df: DataFrame | None,
    membership_df: DataFrame | None,
    firings_df: DataFrame | None,
    as_of: datetime,
    run_id: str,
    source: str,
) -> DataFrame | None:
    """The trigger's decisions at as_of not yet in firings_df (gold/trigger_firings rows)."""
    anchors_df = anchors_frame(trigger, keyed_df, changes_df)
    if anchors_df is None:
        return None
    candidates_df = candidates_frame(trigger, anchors_df, as_of)
    mine = None
    if firings_df is not None:
        mine = firings_df.filter(F.col("trigger_id") == trigger.id)
        candidates_df = candidates_df.join(
            mine.select("user_key", "anchor_key"), ["user_key", "anchor_key"], "left_anti"
        )
    checked = candidates_df
    if trigger.in_segment is not None:
        checked = _member_at_fire(checked, membership_df, trigger.in_segment)
    else:
        checked = checked.withColumn("_member", F.lit(True))
    checked = _conditions_hold(trigger, checked, keyed_df)
    if trigger.cap is not None:
        fired_before = None if mine is None else mine.filter(F.col("status") == FIRED)
        checked = _capped(trigger, checked, fired_before, as_of)
    else:
        checked = checked.withColumn("_allowed", F.lit(True))
    reason = (
        F.when(~F.col("_member"), "not_in_segment")
        .when(~F.col("_holds"), "conditions_not_met")
        .when(F.col("_allowed").isNull(), "capped")
    )
    return checked.select(
        F.lit(trigger.id).alias("trigger_id"),
        "user_key",
        "anchor_key",
        "anchor_at",
        "due_at",
        "fire_at",
        F.when(reason.isNull(), FIRED).otherwise(SUPPRESSED).alias("status"),
        reason.alias("reason"),
        F.lit(trigger.version).alias("definition_version"),
        F.lit(source).alias("source"),
        F.lit(as_of).cast("timestamp").alias("decided_at"),
        F.lit(run_id).alias("run_id"),
    )


@dataclass
class TriggerCounts:
    trigger_id: str
    name: str
    fired: int = 0
    suppressed: dict[str, int] = field(default_factory=dict)


@dataclass
class TriggerReport:
    run_id: str
    as_of: datetime
    source: str
    triggers: list[TriggerCounts] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fired(self) -> int:
        return sum(t.fired for t in self.triggers)


def run_triggers(
    spark: SparkSession,
    cfg: Config,
    *,
    as_of: datetime,
    run_id: str,
    source: str = "batch",
    trigger_ids: list[str] | None = None,
    path: str | None = None,
) -> TriggerReport:
    """Decide the triggers at as_of into gold/trigger_firings (one commit); a rerun at the
    same as-of adds nothing."""
    started = clock_time.monotonic()
    as_of = naive_utc(as_of)
    root = cfg.lake.root
    triggers = load_triggers(cfg, path).chosen(trigger_ids)
    report = TriggerReport(run_id, as_of, source)
    report.triggers = [TriggerCounts(t.id, t.name) for t in triggers]
    if not triggers or not lake.table_exists(spark, root, lake.EVENTS):
        return report

    def table(t: lake.Table) -> DataFrame | None:
        return lake.read_table(spark, root, t) if lake.table_exists(spark, root, t) else None

    progress.step(f"deciding {len(triggers)} trigger(s) as of {as_of:%Y-%m-%d %H:%M:%S}")
    keyed_df = keyed_events_before(lake.read_table(spark, root, lake.EVENTS), as_of).persist()
    changes_df = table(lake.SEGMENT_CHANGES)
    if changes_df is not None:
        changes_df = changes_df.filter(F.col("changed_at") <= F.lit(as_of))
    membership_df, firings_df = table(lake.SEGMENT_MEMBERSHIP), table(lake.TRIGGER_FIRINGS)
    cached: list[DataFrame] = [keyed_df]
    try:
        parts = [
            decide(
                trigger,
                keyed_df=keyed_df,
                changes_df=changes_df,
                membership_df=membership_df,
                firings_df=firings_df,
                as_of=as_of,
                run_id=run_id,
                source=source,
            )
            for trigger in triggers
        ]
        parts = [p for p in parts if p is not None]
        counted = []
        if parts:
            rows = parts[0]
            for part in parts[1:]:
                rows = rows.unionByName(part)
            rows = lake.conform(rows, lake.TRIGGER_FIRINGS).persist()
            cached.append(rows)
            counted = rows.groupBy("trigger_id", "status", "reason").count().collect()
        if counted:  # rows known to be new (the MERGE still inserts each key once)
            lake.insert_new(
                spark, root, lake.TRIGGER_FIRINGS, rows, ("trigger_id", "user_key", "anchor_key")
            )
    finally:
        for frame in cached:
            frame.unpersist()
    by_id = {t.trigger_id: t for t in report.triggers}
    for row in counted:
        counts = by_id[row.trigger_id]
        if row.status == FIRED:
            counts.fired += row["count"]
        else:
            counts.suppressed[row.reason] = counts.suppressed.get(row.reason, 0) + row["count"]
    report.seconds = clock_time.monotonic() - started
    return report
