"""The stream's per-user state: what it keeps for the streamed rules' facts (the plan), how
an event or the passing of time changes it, and the stateful operator that emits facts at
evaluation points (streaming.query's docstring describes the clock)."""

from __future__ import annotations

import bisect
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import pandas as pd
from pyspark import cloudpickle
from pyspark.sql import DataFrame, Row
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.streaming import StatefulProcessor
from pyspark.sql.streaming.state import GroupState, GroupStateTimeout

from microseg.core.config import ConfigError
from microseg.segments.model import (
    EventCondition,
    EventCount,
    LastCondition,
    LastTime,
    SegmentCatalog,
    facts_of,
)
from microseg.silver.keys import user_key_of
from microseg.silver.sessions import with_user_key

# --------------------------------------------------------------------------------------
# which segments, and what the state must keep for them


def streamed_segments(catalog: SegmentCatalog, chosen: tuple[str, ...] | None) -> list[str]:
    """Ids of the segments the stream keeps, in catalog order (see the module docstring)."""
    if chosen is not None:
        problems = []
        for segment_id in chosen:
            if segment_id not in catalog.ids():
                problems.append(f"stream.segments: unknown segment '{segment_id}'")
                continue
            capable, why = catalog.streaming_capable(segment_id)
            if not capable:
                problems.append(f"stream.segments: '{segment_id}' cannot be streamed: {why}")
        if problems:
            raise ConfigError("; ".join(problems))
        return [s for s in catalog.ids() if s in chosen]
    return [
        s.id
        for s in catalog.segments
        if catalog.streaming_capable(s.id)[0]
        and any(facts_of(c.condition) for c in catalog.chain(s.id))
    ]


@dataclass(frozen=True)
class CountPlan:
    name: str  # the fact's column name (EventCount.name)
    types: tuple[str, ...] | None
    within: int | None  # microseconds
    anchor: str | None  # key of the since_last anchor
    cap: int


@dataclass(frozen=True)
class LastPlan:
    name: str  # LastTime.name
    types: tuple[str, ...] | None
    lapses: tuple[int, ...]  # durations d (us): a condition flips at last + d + 1us


@dataclass(frozen=True)
class FactPlan:
    counts: tuple[CountPlan, ...]
    lasts: tuple[LastPlan, ...]
    anchors: tuple[tuple[str, tuple[str, ...] | None], ...]

    def names(self) -> list[str]:
        return [c.name for c in self.counts] + [x.name for x in self.lasts]


def micros(delta) -> int:
    return round(delta.total_seconds() * 1_000_000)


def fact_plan(catalog: SegmentCatalog, segment_ids: list[str]) -> FactPlan:
    """What the state keeps for the facts of the segments' rules (and their ancestors')."""
    caps: dict[EventCount, int] = {}
    lapses: dict[LastTime, set[int]] = {}
    seen: set[str] = set()
    for segment_id in segment_ids:
        for segment in catalog.chain(segment_id):
            if segment.id in seen:
                continue
            seen.add(segment.id)
            for condition in segment.condition.walk():
                if isinstance(condition, EventCondition):
                    bounds = [condition.at_least or 0]
                    if condition.at_most is not None:
                        bounds.append(condition.at_most + 1)
                    caps[condition.fact] = max(caps.get(condition.fact, 1), *bounds)
                elif isinstance(condition, LastCondition):
                    durations = lapses.setdefault(condition.fact, set())
                    for d in (condition.within, condition.older_than):
                        if d is not None:
                            durations.add(micros(d))
    anchors = sorted({f.since_last for f in caps if f.since_last}, key=repr)
    anchor_keys = {types: f"a{i}" for i, types in enumerate(anchors)}
    return FactPlan(
        counts=tuple(
            CountPlan(
                name=f.name,
                types=f.types,
                within=None if f.within is None else micros(f.within),
                anchor=anchor_keys[f.since_last] if f.since_last else None,
                cap=cap,
            )
            for f, cap in sorted(caps.items(), key=lambda item: item[0].name)
        ),
        lasts=tuple(
            LastPlan(name=f.name, types=f.types, lapses=tuple(sorted(ds)))
            for f, ds in sorted(lapses.items(), key=lambda item: item[0].name)
        ),
        anchors=tuple((key, types) for types, key in anchor_keys.items()),
    )


# --------------------------------------------------------------------------------------
# the per-user state machine (plain Python over integer microseconds)


def _matches(types: tuple[str, ...] | None, event_type: str) -> bool:
    return types is None or event_type in types


@dataclass
class UserState:
    clock: int | None = None
    times: dict[str, list[int]] = field(default_factory=dict)  # count fact -> ascending times
    anchors: dict[str, int] = field(default_factory=dict)
    lasts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"clock": self.clock, "n": self.times, "a": self.anchors, "l": self.lasts},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> UserState:
        data = json.loads(text)
        return cls(data["clock"], data["n"], data["a"], data["l"])


def apply_event(plan: FactPlan, state: UserState, event_type: str, t: int) -> None:
    for key, types in plan.anchors:
        if _matches(types, event_type) and t > state.anchors.get(key, t - 1):
            state.anchors[key] = t
    for count in plan.counts:
        times = state.times.setdefault(count.name, [])
        if count.anchor is not None:
            anchor = state.anchors.get(count.anchor)
            if anchor is None:
                continue  # no anchor yet: nothing counts (the fact is null)
            if times and times[0] <= anchor:
                times[:] = [x for x in times if x > anchor]
            if t <= anchor:
                continue
        if _matches(count.types, event_type):
            bisect.insort(times, t)
            if len(times) > count.cap:
                del times[: len(times) - count.cap]
    for last in plan.lasts:
        if _matches(last.types, event_type) and t > state.lasts.get(last.name, t - 1):
            state.lasts[last.name] = t


def fact_values(plan: FactPlan, state: UserState, point: int) -> list[int | None]:
    """Every fact as of `point` (events strictly before it), in plan.names() order."""
    values: list[int | None] = []
    for count in plan.counts:
        if count.anchor is not None and count.anchor not in state.anchors:
            values.append(None)
            continue
        times = state.times.get(count.name, [])
        start = bisect.bisect_left(times, point - count.within) if count.within is not None else 0
        values.append(bisect.bisect_left(times, point) - start)
    values.extend(state.lasts.get(last.name) for last in plan.lasts)
    return values


def next_lapse(plan: FactPlan, state: UserState) -> int | None:
    """The first instant after the clock at which a fact changes with no new event."""
    clock = state.clock
    if clock is None:
        return None
    candidates = []
    for count in plan.counts:
        if count.within is None:
            continue
        times = state.times.get(count.name, [])
        # an event at x is inside [P - within, P) up to P = x + within
        i = bisect.bisect_left(times, clock - count.within)
        if i < len(times):
            candidates.append(times[i] + count.within + 1)
    for last in plan.lasts:
        t = state.lasts.get(last.name)
        if t is not None:
            candidates += [t + d + 1 for d in last.lapses if t + d + 1 > clock]
    return min(candidates) if candidates else None


def _prune(plan: FactPlan, state: UserState) -> None:
    for count in plan.counts:
        times = state.times.get(count.name)
        if count.within is not None and times and state.clock is not None:
            keep = bisect.bisect_left(times, state.clock - count.within)
            if keep:
                del times[:keep]


def advance(
    plan: FactPlan,
    state: UserState,
    events: list[tuple[int, str]],
    watermark: int | None,
) -> list[tuple[int, list[int | None]]]:
    """Apply new events (t, event_type) and return the evaluation points (point, facts) in
    time order: lapses before each event, just after each event time, and lapses up to the
    watermark (all in microseconds; see the module docstring)."""
    events = sorted(events)
    out: list[tuple[int, list[int | None]]] = []

    def evaluate(point: int) -> None:
        state.clock = point
        out.append((point, fact_values(plan, state, point)))
        _prune(plan, state)

    i = 0
    while True:
        lapse = next_lapse(plan, state)
        if i < len(events):
            t = events[i][0]
            if lapse is not None and lapse <= t:
                evaluate(lapse)
                continue
            while i < len(events) and events[i][0] == t:
                apply_event(plan, state, events[i][1], t)
                i += 1
            evaluate(t + 1 if state.clock is None else max(t + 1, state.clock + 1))
        elif lapse is not None and watermark is not None and lapse <= watermark:
            evaluate(lapse)
        else:
            return out


def timer_ms(lapse: int) -> int:
    """The event-time timeout (ms) that fires exactly when the watermark reaches `lapse` (us):
    Spark fires a timeout t once the watermark (ms) is past t."""
    return -(-lapse // 1000) - 1


# --------------------------------------------------------------------------------------
# the streaming query


def facts_schema(plan: FactPlan) -> T.StructType:
    return T.StructType(
        [T.StructField("user_key", T.StringType()), T.StructField("point", T.LongType())]
        + [T.StructField(name, T.LongType()) for name in plan.names()]
    )


def _advance_group(
    plan: FactPlan, key: tuple, frames: Iterator[pd.DataFrame], group: GroupState
) -> Iterator[pd.DataFrame]:
    state = UserState.from_json(group.get[0]) if group.exists else UserState()
    events: list[tuple[int, str]] = []
    for frame in frames:
        events.extend(zip(frame["t"].tolist(), frame["event_type"].tolist(), strict=True))
    watermark_ms = group.getCurrentWatermarkMs()
    points = advance(plan, state, events, watermark_ms * 1000 if watermark_ms > 0 else None)
    group.update((state.to_json(),))
    lapse = next_lapse(plan, state)
    if lapse is not None:
        group.setTimeoutTimestamp(timer_ms(lapse))
    if points:
        columns = ["user_key", "point", *plan.names()]
        rows = [(key[0], point, *values) for point, values in points]
        # object columns of ints and None: Arrow makes them bigint with nulls, and this is
        # ~15x cheaper per user than nullable Int64 columns (it runs once per user and batch)
        yield pd.DataFrame(rows, columns=columns, dtype=object)


class FactsProcessor(StatefulProcessor):
    """The same state machine for Spark's state API v2 (stream.state_api transform_with_state
    or transform_with_state_in_pandas): the state (UserState's JSON) in a value state, the next
    lapse as an event-time timer. Every state and timer call is a round trip from the Python
    worker to the JVM's state server; bench/state_api_bench.py measures what that costs."""

    def __init__(self, plan: FactPlan, *, pandas: bool) -> None:
        self.plan, self.pandas = plan, pandas

    def init(self, handle) -> None:
        self.handle = handle
        self.state = handle.getValueState("facts", "state string, timer long")

    def _advance(
        self,
        key: tuple,
        events: list[tuple[int, str]],
        watermark_ms: int,
        fired: int | None = None,
    ):
        # each state or timer call is a round trip to the JVM: the registered timer is kept
        # in the state value (its "timer"), so a user costs a get and an update, plus a timer
        # call only when the next lapse moves
        stored = self.state.get()
        state = UserState() if stored is None else UserState.from_json(stored[0])
        timer = None if stored is None else stored[1]
        if timer == fired:
            timer = None  # it fired: Spark removed it
        points = advance(
            self.plan, state, events, watermark_ms * 1000 if watermark_ms > 0 else None
        )
        lapse = next_lapse(self.plan, state)
        # v2 event-time timers fire once the watermark (ms) reaches them
        wanted = None if lapse is None else -(-lapse // 1000)
        if wanted != timer:
            if timer is not None:
                self.handle.deleteTimer(timer)
            if wanted is not None:
                self.handle.registerTimer(wanted)
        self.state.update((state.to_json(), wanted))
        if not points:
            return
        rows = [(key[0], point, *values) for point, values in points]
        if self.pandas:
            yield pd.DataFrame(
                rows, columns=["user_key", "point", *self.plan.names()], dtype=object
            )
        else:
            names = ["user_key", "point", *self.plan.names()]
            yield from (Row(**dict(zip(names, row, strict=True))) for row in rows)

    def handleInputRows(self, key, rows, timerValues):
        events: list[tuple[int, str]] = []
        if self.pandas:
            for frame in rows:
                events.extend(zip(frame["t"].tolist(), frame["event_type"].tolist(), strict=True))
        else:
            events = [(row.t, row.event_type) for row in rows]
        yield from self._advance(key, events, timerValues.getCurrentWatermarkInMs())

    def handleExpiredTimer(self, key, timerValues, expiredTimerInfo):
        yield from self._advance(
            key,
            [],
            timerValues.getCurrentWatermarkInMs(),
            fired=expiredTimerInfo.getExpiryTimeInMs(),
        )

    def close(self) -> None:
        pass


# The state API v2 unpickles the processor in a Python worker that Spark's driver starts with
# spark.pyspark.python, without the job's --py-files on its path: on a cluster that
# interpreter has microseg's dependencies but not microseg. So this module's classes and
# functions travel by value (they use only the standard library, pandas and pyspark).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


STATE_APIS = (
    "apply_in_pandas_with_state",
    "transform_with_state_in_pandas",
    "transform_with_state",
)


def keyed_events(events_df: DataFrame, identity_df: DataFrame | None) -> DataFrame:
    """user_key, event_time, event_type of events with a key (see the module docstring)."""
    if identity_df is None:
        keyed_df = events_df.withColumn(
            "user_key",
            user_key_of(F.col("user_id"), F.col("anonymous_id"), F.lit(None).cast("string")),
        )
    else:
        keyed_df = with_user_key(events_df, identity_df, broadcast=True)
    return keyed_df.filter(F.col("user_key").isNotNull()).select(
        "user_key", "event_time", "event_type"
    )


def live_facts(
    keyed_df: DataFrame,
    plan: FactPlan,
    *,
    watermark_delay_ms: int | None,
    state_api: str = "apply_in_pandas_with_state",
) -> DataFrame:
    """Per user and evaluation point: user_key, point (us), one column per fact (us for
    last times), from a streaming frame of keyed events. `state_api`: one of STATE_APIS.
    watermark_delay_ms None: keyed_df has its event-time watermark already."""
    if watermark_delay_ms is not None:
        keyed_df = keyed_df.withWatermark("event_time", f"{watermark_delay_ms} milliseconds")
    grouped = keyed_df.select(
        "user_key", "event_time", F.unix_micros("event_time").alias("t"), "event_type"
    ).groupBy("user_key")
    if state_api != "apply_in_pandas_with_state":
        pandas = state_api == "transform_with_state_in_pandas"
        transform = grouped.transformWithStateInPandas if pandas else grouped.transformWithState
        return transform(
            FactsProcessor(plan, pandas=pandas),
            facts_schema(plan),
            "Append",
            "EventTime",
        )
    return grouped.applyInPandasWithState(
        partial(_advance_group, plan),
        facts_schema(plan),
        "state string",
        "append",
        GroupStateTimeout.EventTimeTimeout,
    )
