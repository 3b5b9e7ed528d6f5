"""The trigger file (conf/triggers.yaml), parsed and checked: when a message should go to a
person, as rules on top of events and segments.

A trigger has an *anchor* (`on`), a delay, optional rule conditions checked at the fire time
(the segment rule language, compiled by segments.compile), an optional segment the user must
be in at the fire time, a frequency cap and quiet hours. README "Triggers" is the manual;
activation.fire evaluates them.

    on: {event: add_to_cart}         each add_to_cart; with a delay, only the last one before a
                                     pause of at least the delay (a later one restarts the wait)
    on: {inactivity: 48h}            48 hours after an event with no event since (`event:`
                                     beside it narrows what counts as activity)
    on: {enter: segment_id}          each time the user enters the segment (gold/segment_changes)

Every problem is reported with its file, line and trigger, together, as one SegmentFileError.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from microseg.core.config import Config, parse_duration
from microseg.segments.model import (
    SEGMENT_ID,
    Condition,
    EventCondition,
    Fact,
    FeatureCondition,
    SegmentFileError,
    SqlCondition,
    facts_of,
)
from microseg.segments.parse import RuleChecker, available_features, plain, read_rule_yaml

TRIGGER_KEYS = (
    "id",
    "name",
    "description",
    "on",
    "delay",
    "conditions",
    "in_segment",
    "cap",
    "quiet_hours",
    "lookback",
)
ON_KINDS = ("event", "inactivity", "enter")
DEFAULT_LOOKBACK = timedelta(days=7)


@dataclass(frozen=True)
class Cap:
    """At most `count` firings per user and trigger in any `per` window."""

    count: int
    per: timedelta


@dataclass(frozen=True)
class QuietHours:
    """Local times [start, end) (across midnight when start > end) in which nothing fires: a
    firing due then waits until `end`."""

    start: time
    end: time
    timezone: str


@dataclass(frozen=True)
class Trigger:
    id: str
    name: str
    kind: str  # event | inactivity | enter
    anchor_types: tuple[str, ...] | None  # event kinds: the anchor's event types (None: any)
    enter_segment: str | None  # enter: the segment
    delay: timedelta
    condition: Condition | None
    in_segment: str | None
    cap: Cap | None
    quiet_hours: QuietHours | None
    lookback: timedelta
    line: int
    definition: dict

    @property
    def version(self) -> str:
        text = json.dumps(self.definition, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def facts(self) -> list[Fact]:
        return [] if self.condition is None else facts_of(self.condition)


@dataclass(frozen=True)
class TriggerFile:
    path: str
    triggers: tuple[Trigger, ...]

    @property
    def name(self) -> str:
        return Path(self.path).stem

    def chosen(self, ids: list[str] | None) -> list[Trigger]:
        if not ids:
            return list(self.triggers)
        known = {t.id: t for t in self.triggers}
        missing = [i for i in ids if i not in known]
        if missing:
            raise SegmentFileError(
                [f"{self.path}: no trigger {', '.join(missing)} (ids: {', '.join(known)})"]
            )
        return [known[i] for i in ids]


_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class _TriggerChecker(RuleChecker):
    def trigger_of(self, raw: Any, index: int) -> Trigger | None:
        if not isinstance(raw, dict):
            self.segment = f"#{index + 1}"
            self.problem(self.line_of(raw), "a trigger must be a mapping with id, on, ...")
            return None
        if True in raw:  # YAML 1.1 reads a bare `on` key as the boolean true
            raw["on"] = raw.pop(True)
            if hasattr(raw, "key_lines"):
                raw.key_lines["on"] = raw.key_lines.get("True", 0)
        self.segment = str(raw.get("id", f"#{index + 1}"))
        line = self.line_of(raw)
        ok = self.only_keys(raw, TRIGGER_KEYS, "a trigger")
        trigger_id = raw.get("id")
        if not isinstance(trigger_id, str) or not SEGMENT_ID.match(trigger_id):
            self.problem(line, "id must be lower_snake_case (a-z, 0-9, _; starting with a letter)")
            ok = False
        name = raw.get("name", trigger_id)
        if not isinstance(name, str) or not name.strip():
            self.problem(self.line_of(raw, "name"), "name must be a non-empty string")
            ok = False
        anchor = self.anchor_of(raw, line)
        delay = self.positive(raw, "delay", allow_zero=True)
        if anchor is not None and anchor[0] == "inactivity" and "delay" in raw:
            self.problem(
                self.line_of(raw, "delay"),
                "an inactivity trigger fires after its inactivity period: drop delay",
            )
            ok = False
        condition = None
        if "conditions" in raw:
            condition = self.conditions_of(raw["conditions"], self.line_of(raw, "conditions"))
            ok = ok and condition is not None and self.event_only(condition)
        in_segment = raw.get("in_segment")
        if in_segment is not None and (
            not isinstance(in_segment, str) or not SEGMENT_ID.match(in_segment)
        ):
            self.problem(self.line_of(raw, "in_segment"), "in_segment must be a segment id")
            ok = False
        cap = self.cap_of(raw)
        quiet = self.quiet_of(raw)
        lookback = self.positive(raw, "lookback") or DEFAULT_LOOKBACK
        if not ok or anchor is None or delay is False or cap is False or quiet is False:
            return None
        kind, types, segment, period = anchor
        return Trigger(
            id=trigger_id,
            name=name,
            kind=kind,
            anchor_types=types,
            enter_segment=segment,
            delay=period if kind == "inactivity" else (delay or timedelta(0)),
            condition=condition,
            in_segment=in_segment,
            cap=cap,
            quiet_hours=quiet,
            lookback=lookback,
            line=line,
            definition=plain(dict(raw)),
        )

    def only_keys(self, raw: dict, allowed: tuple[str, ...], what: str) -> bool:
        extra = [k for k in raw if k not in allowed]
        for key in extra:
            self.problem(
                self.line_of(raw, key),
                f"unknown key '{key}' in {what} (allowed: {', '.join(allowed)})",
            )
        return not extra

    def positive(self, raw: dict, key: str, *, allow_zero: bool = False):
        """A duration (None when absent); False after a problem."""
        if key not in raw:
            return None
        value = parse_duration(raw[key])
        if (
            not isinstance(value, timedelta)
            or value < timedelta(0)
            or (value == timedelta(0) and not allow_zero)
        ):
            self.problem(
                self.line_of(raw, key),
                f"{key} must be a {'' if allow_zero else 'positive '}duration such as 30m, "
                f"48h, 7d, not {raw[key]!r}",
            )
            return False
        return value

    def anchor_of(self, raw: dict, line: int):
        on = raw.get("on")
        on_line = self.line_of(raw, "on") or line
        if not isinstance(on, dict):
            self.problem(
                on_line,
                "on is required: {event: TYPE}, {inactivity: DURATION} or {enter: SEGMENT}",
            )
            return None
        kinds = [k for k in ("inactivity", "enter") if k in on] or (
            ["event"] if "event" in on else []
        )
        if len(kinds) != 1:
            self.problem(
                on_line, "on takes one of event, inactivity (with an optional event) or enter"
            )
            return None
        kind = kinds[0]
        allowed = {"event": ("event",), "inactivity": ("inactivity", "event"), "enter": ("enter",)}
        if not self.only_keys(on, allowed[kind], f"on ({kind})"):
            return None
        if kind == "enter":
            segment = on["enter"]
            if not isinstance(segment, str) or not SEGMENT_ID.match(segment):
                self.problem(on_line, f"on.enter must be a segment id, not {segment!r}")
                return None
            return kind, None, segment, None
        types = self.types_of(on.get("event", "any"), on_line, "on.event")
        if types is False:
            return None
        period = None
        if kind == "inactivity":
            period = self.positive(on, "inactivity")
            if not period:
                return None
        return kind, types, None, period

    def event_only(self, condition: Condition) -> bool:
        """Trigger conditions are checked at each firing's own time, from events: feature
        snapshots, sql and per-product/session counts are not available there."""
        ok = True
        for c in condition.walk():
            if isinstance(c, FeatureCondition | SqlCondition):
                self.problem(
                    c.line,
                    "trigger conditions are event and last conditions (checked at the fire "
                    "time); for features, use in_segment with a segment",
                )
                ok = False
            elif isinstance(c, EventCondition) and not c.fact.streamable:
                self.problem(
                    c.line, "per-product/category and in-one-session counts are not available"
                )
                ok = False
        return ok

    def cap_of(self, raw: dict):
        if "cap" not in raw:
            return None
        value, line = raw["cap"], self.line_of(raw, "cap")
        if not isinstance(value, dict) or not self.only_keys(value, ("count", "per"), "cap"):
            if not isinstance(value, dict):
                self.problem(line, "cap must be a mapping {count: N, per: DURATION}")
            return False
        count = value.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            self.problem(line, f"cap.count must be a whole number >= 1, not {count!r}")
            return False
        per = self.positive(value, "per")
        if not per:
            if per is None:
                self.problem(line, "cap.per is required (a duration such as 7d)")
            return False
        return Cap(count, per)

    def quiet_of(self, raw: dict):
        if "quiet_hours" not in raw:
            return None
        value, line = raw["quiet_hours"], self.line_of(raw, "quiet_hours")
        keys = ("start", "end", "timezone")
        if not isinstance(value, dict) or set(value) != set(keys):
            self.problem(line, 'quiet_hours must be {start: "22:00", end: "08:00", timezone: TZ}')
            return False
        clocks = []
        for key in ("start", "end"):
            match = _CLOCK.match(str(value[key]))
            if not match:
                self.problem(line, f"quiet_hours.{key} must be HH:MM, not {value[key]!r}")
                return False
            clocks.append(time(int(match.group(1)), int(match.group(2))))
        if clocks[0] == clocks[1]:
            self.problem(line, "quiet_hours.start and end are equal")
            return False
        try:
            ZoneInfo(str(value["timezone"]))
        except (ZoneInfoNotFoundError, ValueError):
            self.problem(
                line, f"quiet_hours.timezone {value['timezone']!r} is not an IANA time zone"
            )
            return False
        return QuietHours(clocks[0], clocks[1], str(value["timezone"]))


def load_triggers(cfg: Config, path: str | Path | None = None) -> TriggerFile:
    """Read and check the trigger file; SegmentFileError lists every problem found."""
    path = Path(path or cfg.triggers.file)
    raw = read_rule_yaml(path, "triggers.file")
    return parse_triggers(raw, str(path), available_features(cfg), cfg.ingest.event_types)


def parse_triggers(
    raw: Any, path: str, features: dict[str, str], event_types: tuple[str, ...]
) -> TriggerFile:
    checker = _TriggerChecker(path, features, event_types, kind="trigger")
    triggers: dict[str, Trigger] = {}
    for i, item in enumerate(checker.top_level(raw, "triggers")):
        trigger = checker.trigger_of(item, i)
        if trigger is None:
            continue
        if trigger.id in triggers:
            checker.problem(trigger.line, f"id '{trigger.id}' is used twice")
        triggers[trigger.id] = trigger
    if checker.problems:
        raise SegmentFileError(checker.problems)
    return TriggerFile(path, tuple(triggers.values()))


def defer_quiet(due: datetime, quiet: QuietHours | None) -> datetime:
    """The fire time of a firing due at `due` (UTC): `due`, or the end of the quiet hours it
    falls in. The Python statement of what activation.fire computes with Spark columns; the
    tests check the two against each other."""
    if quiet is None:
        return due
    zone = ZoneInfo(quiet.timezone)
    aware = due if due.tzinfo else due.replace(tzinfo=timezone.utc)
    local = aware.astimezone(zone)
    clock = local.time().replace(tzinfo=None)
    start, end = quiet.start, quiet.end
    inside = (start <= clock < end) if start < end else (clock >= start or clock < end)
    if not inside:
        return due
    day = local.date() + (timedelta(days=1) if start > end and clock >= start else timedelta(0))
    fire = datetime.combine(day, end, tzinfo=zone).astimezone(timezone.utc)
    return fire if due.tzinfo else fire.replace(tzinfo=None)
