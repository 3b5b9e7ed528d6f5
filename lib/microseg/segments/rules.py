"""The segment rule language: parsing and checking conf/segments.yaml, and compiling rules.

This module is the one place that defines what a rule means. A segment's conditions compile
to a Spark Column over a per-user frame holding the user features (gold/user_features at the
as-of time T) and the *facts* the conditions need, computed from the user's events strictly
before T (see `compute_facts`). The batch job and the streaming job both evaluate rules with
`compile_condition`; they differ only in how they obtain the facts.

Condition kinds (README "Segment rules" has the user's manual):

    {feature: F, gte: 3}                 comparisons: eq ne gt gte lt lte between in not_in
                                         is_null (several in one mapping must all hold)
    {event: add_to_cart, within: 24h, at_least: 1}
                                         count of events of the type(s) in [T - within, T);
                                         at_least / at_most; options: since_last: TYPE (only
                                         events after the user's last TYPE event), per:
                                         product|category (the largest count of one product or
                                         category), in_one_session: true (within one session)
    {last: purchase, within: 30d}        recency: the last event of the type(s) is in the
    {last: any, older_than: 60d}         window / is older / does not exist (never: true)
    {all: [...]}, {any: [...]}, {not: C} combinations
    {sql: "revenue_90d > 2 * revenue_30d"}
                                         Spark SQL boolean expression over feature columns

Missing values: a comparison with a null feature, or an event count `since_last` a type the
user never had, is false (never null), so `not` always means the opposite.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from microseg.core.config import Config, ConfigError, parse_duration

ANY = "any"
SEGMENT_ID = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte", "between", "in", "not_in", "is_null")
ORDERED = ("gt", "gte", "lt", "lte", "between")
PER = {"product": "product_id", "category": "category"}
SEGMENT_KEYS = (
    "id",
    "name",
    "description",
    "tags",
    "conditions",
    "parent",
    "exclusive",
    "min_size",
)


class SegmentFileError(ConfigError):
    """One or more problems in a segment file; each names the file, line and segment."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


# --------------------------------------------------------------------------------------
# the parsed form


@dataclass(frozen=True)
class EventCount:
    """Fact: how many events of `types` (None: any) the user had in [T - within, T)."""

    types: tuple[str, ...] | None
    within: timedelta | None = None
    since_last: tuple[str, ...] | None = None
    per: str | None = None  # "product" or "category": the largest count of one of them
    in_one_session: bool = False

    @property
    def name(self) -> str:
        return "_fact_n_" + _digest(repr(self))[:12]

    @property
    def streamable(self) -> bool:
        return self.per is None and not self.in_one_session


@dataclass(frozen=True)
class LastTime:
    """Fact: the time of the user's last event of `types` (None: any) before T."""

    types: tuple[str, ...] | None

    @property
    def name(self) -> str:
        return "_fact_last_" + _digest(repr(self))[:12]

    streamable = True


Fact = EventCount | LastTime


@dataclass(frozen=True)
class Condition:
    line: int


@dataclass(frozen=True)
class FeatureCondition(Condition):
    feature: str
    tests: tuple[tuple[str, Any], ...]  # (comparison, value), all must hold


@dataclass(frozen=True)
class EventCondition(Condition):
    fact: EventCount
    at_least: int | None
    at_most: int | None


@dataclass(frozen=True)
class LastCondition(Condition):
    fact: LastTime
    within: timedelta | None
    older_than: timedelta | None
    never: bool


@dataclass(frozen=True)
class AllCondition(Condition):
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyCondition(Condition):
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class NotCondition(Condition):
    item: Condition


@dataclass(frozen=True)
class SqlCondition(Condition):
    expression: str


@dataclass(frozen=True)
class MinSize:
    count: int | None = None
    share: float | None = None  # of all users with features at T, 0..1

    def threshold(self, users: int) -> int:
        if self.count is not None:
            return self.count
        return int(-(-(self.share or 0.0) * users // 1))  # ceiling

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{(self.share or 0) * 100:g}%"


@dataclass(frozen=True)
class Segment:
    id: str
    name: str
    description: str
    tags: tuple[str, ...]
    condition: Condition
    parent: str | None
    exclusive_group: str | None
    priority: int | None
    min_size: MinSize | None
    line: int
    definition: dict = field(hash=False, compare=False)  # as written, for the catalog

    @property
    def own_version(self) -> str:
        """Hash of what decides membership (not name, description or tags)."""
        keys = ("conditions", "parent", "exclusive", "min_size")
        material = {k: self.definition.get(k) for k in keys}
        return _digest(json.dumps(material, sort_keys=True, default=str))[:16]


@dataclass(frozen=True)
class SegmentCatalog:
    path: str
    segments: tuple[Segment, ...]  # parents before children

    def __getitem__(self, segment_id: str) -> Segment:
        for segment in self.segments:
            if segment.id == segment_id:
                return segment
        raise KeyError(segment_id)

    def ids(self) -> list[str]:
        return [s.id for s in self.segments]

    def version(self, segment_id: str) -> str:
        """A segment's version covers its own definition and its ancestors'."""
        segment = self[segment_id]
        own = segment.own_version
        if segment.parent is None:
            return own
        return _digest(own + self.version(segment.parent))[:16]

    def chain(self, segment_id: str) -> list[Segment]:
        """The segment and its ancestors, the segment first."""
        out = [self[segment_id]]
        while out[-1].parent is not None:
            out.append(self[out[-1].parent])
        return out

    def facts(self) -> list[Fact]:
        seen: dict[str, Fact] = {}
        for segment in self.segments:
            for fact in facts_of(segment.condition):
                seen.setdefault(fact.name, fact)
        return list(seen.values())

    def streaming_capable(self, segment_id: str) -> tuple[bool, str]:
        """Whether the streaming job can keep it incrementally, and if not, why."""
        for segment in self.chain(segment_id):
            blocked = _not_streamable(segment.condition)
            if blocked:
                where = "" if segment.id == segment_id else f" (in parent '{segment.id}')"
                return False, blocked + where
        return True, "event counts, recency and snapshot features only"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------
# YAML with line numbers


class _Located(dict):
    line: int = 0
    key_lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Located:
    loader.flatten_mapping(node)
    mapping = _Located()
    mapping.line = node.start_mark.line + 1
    mapping.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise SegmentFileError(
                [f"line {key_node.start_mark.line + 1}: key '{key}' appears twice in one mapping"]
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[str(key)] = key_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _plain(value: Any) -> Any:
    """The value as plain JSON-able data (for the catalog and the version hash)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, datetime | timedelta):
        return str(value)
    return value


# --------------------------------------------------------------------------------------
# parsing and checking


class _Checker:
    def __init__(self, path: str, features: dict[str, str], event_types: tuple[str, ...]):
        self.path = path
        self.features = features  # name -> kind ("number" or "string")
        self.event_types = event_types
        self.problems: list[str] = []
        self.segment = "?"

    def problem(self, line: int, text: str) -> None:
        self.problems.append(f"{self.path} line {line}: segment '{self.segment}': {text}")

    def line_of(self, mapping: Any, key: str | None = None) -> int:
        if isinstance(mapping, _Located):
            return mapping.key_lines.get(key, mapping.line) if key else mapping.line
        return 0

    # ---- segments

    def segment_of(self, raw: Any, index: int) -> Segment | None:
        if not isinstance(raw, dict):
            self.segment = f"#{index + 1}"
            self.problem(self.line_of(raw), "a segment must be a mapping with id, name, ...")
            return None
        self.segment = str(raw.get("id", f"#{index + 1}"))
        line = self.line_of(raw)
        for key in raw:
            if key not in SEGMENT_KEYS:
                self.problem(
                    self.line_of(raw, key),
                    f"unknown key '{key}'{_suggest(key, SEGMENT_KEYS)} "
                    f"(allowed: {', '.join(SEGMENT_KEYS)})",
                )
        segment_id = raw.get("id")
        if not isinstance(segment_id, str) or not SEGMENT_ID.match(segment_id):
            self.problem(line, "id must be lower_snake_case (a-z, 0-9, _; starting with a letter)")
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            self.problem(self.line_of(raw, "name"), "name is required (a non-empty string)")
        description = raw.get("description", "")
        if not isinstance(description, str):
            self.problem(self.line_of(raw, "description"), "description must be a string")
        tags = raw.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            self.problem(self.line_of(raw, "tags"), "tags must be a list of strings")
            tags = []
        parent = raw.get("parent")
        if parent is not None and not isinstance(parent, str):
            self.problem(self.line_of(raw, "parent"), "parent must be a segment id")
            parent = None
        group, priority = self.exclusive_of(raw)
        min_size = self.min_size_of(raw)
        if "conditions" not in raw:
            self.problem(line, "conditions are required")
            condition: Condition | None = None
        else:
            condition = self.conditions_of(raw["conditions"], self.line_of(raw, "conditions"))
        if condition is None or not isinstance(segment_id, str):
            return None
        return Segment(
            id=segment_id,
            name=name if isinstance(name, str) else segment_id,
            description=description if isinstance(description, str) else "",
            tags=tuple(tags),
            condition=condition,
            parent=parent,
            exclusive_group=group,
            priority=priority,
            min_size=min_size,
            line=line,
            definition=_plain(dict(raw)),
        )

    def exclusive_of(self, raw: dict) -> tuple[str | None, int | None]:
        value = raw.get("exclusive")
        if value is None:
            return None, None
        line = self.line_of(raw, "exclusive")
        if not isinstance(value, dict) or set(value) != {"group", "priority"}:
            self.problem(line, "exclusive must be a mapping {group: NAME, priority: N}")
            return None, None
        group, priority = value["group"], value["priority"]
        if not isinstance(group, str) or not group:
            self.problem(line, "exclusive.group must be a name")
            return None, None
        if not isinstance(priority, int) or isinstance(priority, bool) or priority < 1:
            self.problem(line, "exclusive.priority must be a whole number >= 1 (1 wins)")
            return None, None
        return group, priority

    def min_size_of(self, raw: dict) -> MinSize | None:
        value = raw.get("min_size")
        if value is None:
            return None
        line = self.line_of(raw, "min_size")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return MinSize(count=value)
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", value)
            if match and 0 < float(match.group(1)) <= 100:
                return MinSize(share=float(match.group(1)) / 100)
        self.problem(
            line, f"min_size must be a user count (>= 0) or a share like '0.5%', not {value!r}"
        )
        return None

    # ---- conditions

    def conditions_of(self, raw: Any, line: int) -> Condition | None:
        if isinstance(raw, list):
            if not raw:
                self.problem(line, "conditions must not be empty")
                return None
            items = [self.condition_of(item, line) for item in raw]
            if any(item is None for item in items):
                return None
            return items[0] if len(items) == 1 else AllCondition(line, tuple(items))  # type: ignore[arg-type]
        return self.condition_of(raw, line)

    def condition_of(self, raw: Any, outer_line: int) -> Condition | None:
        line = self.line_of(raw) or outer_line
        if not isinstance(raw, dict) or not raw:
            self.problem(line, f"a condition must be a mapping, not {raw!r}")
            return None
        kinds = [k for k in ("feature", "event", "last", "all", "any", "not", "sql") if k in raw]
        if len(kinds) != 1:
            keys = ", ".join(map(str, raw))
            self.problem(
                line,
                f"a condition needs exactly one of feature, event, last, all, any, not, sql "
                f"(found: {keys})",
            )
            return None
        kind = kinds[0]
        if kind in ("all", "any"):
            self.only(raw, (kind,), line)
            items_raw = raw[kind]
            if not isinstance(items_raw, list) or not items_raw:
                self.problem(line, f"{kind} takes a non-empty list of conditions")
                return None
            items = [self.condition_of(item, line) for item in items_raw]
            if any(item is None for item in items):
                return None
            cls = AllCondition if kind == "all" else AnyCondition
            return cls(line, tuple(items))  # type: ignore[arg-type]
        if kind == "not":
            self.only(raw, ("not",), line)
            item = self.condition_of(raw["not"], line)
            return None if item is None else NotCondition(line, item)
        if kind == "sql":
            self.only(raw, ("sql",), line)
            if not isinstance(raw["sql"], str) or not raw["sql"].strip():
                self.problem(line, "sql takes a Spark SQL boolean expression (a string)")
                return None
            return SqlCondition(line, raw["sql"].strip())
        return getattr(self, f"{kind}_condition")(raw, line)

    def only(self, raw: dict, allowed: tuple[str, ...], line: int) -> bool:
        extra = [k for k in raw if k not in allowed]
        for key in extra:
            self.problem(
                self.line_of(raw, key) or line,
                f"unknown key '{key}' in a {allowed[0]} condition{_suggest(key, allowed)} "
                f"(allowed: {', '.join(allowed)})",
            )
        return not extra

    def feature_condition(self, raw: dict, line: int) -> Condition | None:
        ok = self.only(raw, ("feature", *COMPARISONS), line)
        name = raw["feature"]
        if not isinstance(name, str) or name not in self.features:
            self.problem(
                line,
                f"unknown feature {name!r}{_suggest(str(name), self.features)} "
                "(features.include in the config selects the available ones)",
            )
            return None
        kind = self.features[name]
        tests = []
        for comparison in COMPARISONS:
            if comparison not in raw:
                continue
            value = raw[comparison]
            problem = _check_value(comparison, value, kind)
            if problem:
                self.problem(line, f"feature '{name}' ({kind}): {problem}")
                ok = False
            tests.append((comparison, tuple(value) if isinstance(value, list) else value))
        if not tests:
            self.problem(line, f"feature '{name}': add a comparison ({', '.join(COMPARISONS)})")
            return None
        return FeatureCondition(line, name, tuple(tests)) if ok else None

    def types_of(self, value: Any, line: int, key: str) -> tuple[str, ...] | None | bool:
        """Event types (None: any); False after a problem."""
        if value == ANY:
            return None
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            self.problem(line, f"{key} takes an event type, a list of them, or 'any'")
            return False
        unknown = [v for v in values if v not in self.event_types]
        if unknown:
            self.problem(
                line,
                f"{key}: unknown event type(s) {unknown}{_suggest(unknown[0], self.event_types)} "
                f"(ingest.event_types: {', '.join(self.event_types)})",
            )
            return False
        return tuple(values)

    def duration_of(self, raw: dict, key: str, line: int) -> timedelta | None | bool:
        if key not in raw:
            return None
        value = parse_duration(raw[key])
        if not isinstance(value, timedelta) or value <= timedelta(0):
            self.problem(
                line, f"{key} must be a positive duration such as 24h, 7d, 90m, not {raw[key]!r}"
            )
            return False
        return value

    def event_condition(self, raw: dict, line: int) -> Condition | None:
        keys = ("event", "within", "at_least", "at_most", "since_last", "per", "in_one_session")
        ok = self.only(raw, keys, line)
        types = self.types_of(raw["event"], line, "event")
        within = self.duration_of(raw, "within", line)
        since = (
            self.types_of(raw["since_last"], line, "since_last") if "since_last" in raw else None
        )
        bounds = {}
        for key in ("at_least", "at_most"):
            value = raw.get(key)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                self.problem(line, f"{key} must be a whole number >= 0, not {value!r}")
                ok = False
            bounds[key] = value
        if bounds["at_least"] is None and bounds["at_most"] is None:
            self.problem(line, "an event condition needs at_least and/or at_most")
            ok = False
        elif ok and None not in bounds.values() and bounds["at_least"] > bounds["at_most"]:
            self.problem(line, "at_least is larger than at_most: nobody can match")
            ok = False
        per = raw.get("per")
        if per is not None and per not in PER:
            self.problem(line, f"per must be one of {', '.join(PER)}, not {per!r}")
            ok = False
        in_one_session = raw.get("in_one_session", False)
        if not isinstance(in_one_session, bool):
            self.problem(line, "in_one_session must be true or false")
            ok = False
        if since is not None and (per is not None or in_one_session):
            self.problem(line, "since_last cannot be combined with per or in_one_session")
            ok = False
        if not ok or types is False or within is False or since is False:
            return None
        fact = EventCount(types, within, since, per, in_one_session)  # type: ignore[arg-type]
        return EventCondition(line, fact, bounds["at_least"], bounds["at_most"])

    def last_condition(self, raw: dict, line: int) -> Condition | None:
        ok = self.only(raw, ("last", "within", "older_than", "never"), line)
        types = self.types_of(raw["last"], line, "last")
        within = self.duration_of(raw, "within", line)
        older = self.duration_of(raw, "older_than", line)
        never = raw.get("never", False)
        if not isinstance(never, bool):
            self.problem(line, "never must be true or false")
            return None
        chosen = [k for k in ("within", "older_than") if k in raw] + (["never"] if never else [])
        if len(chosen) != 1:
            self.problem(
                line, "a last condition takes exactly one of within, older_than, never: true"
            )
            return None
        if not ok or types is False or within is False or older is False:
            return None
        return LastCondition(line, LastTime(types), within, older, never)  # type: ignore[arg-type]


def _check_value(comparison: str, value: Any, kind: str) -> str | None:
    def fits(v: Any) -> bool:
        if kind == "string":
            return isinstance(v, str)
        return isinstance(v, int | float) and not isinstance(v, bool)

    if comparison == "is_null":
        return None if isinstance(value, bool) else "is_null takes true or false"
    if comparison in ORDERED and kind == "string":
        return f"{comparison} needs a number feature"
    if comparison == "between":
        if not (isinstance(value, list) and len(value) == 2 and all(fits(v) for v in value)):
            return "between takes [low, high] (numbers, both included)"
        if value[0] > value[1]:
            return f"between [{value[0]}, {value[1]}]: low is above high"
        return None
    if comparison in ("in", "not_in"):
        if not (isinstance(value, list) and value and all(fits(v) for v in value)):
            return f"{comparison} takes a non-empty list of {kind}s"
        return None
    return None if fits(value) else f"{comparison} takes a {kind}, not {value!r}"


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _not_streamable(condition: Condition) -> str | None:
    if isinstance(condition, SqlCondition):
        return None  # over snapshot features
    if isinstance(condition, EventCondition) and not condition.fact.streamable:
        return f"line {condition.line}: per-product/category or in-one-session counts"
    for child in _children(condition):
        blocked = _not_streamable(child)
        if blocked:
            return blocked
    return None


def _children(condition: Condition) -> tuple[Condition, ...]:
    if isinstance(condition, AllCondition | AnyCondition):
        return condition.items
    if isinstance(condition, NotCondition):
        return (condition.item,)
    return ()


def available_features(cfg: Config) -> dict[str, str]:
    """Features a rule may use: those `features.include` selects, with their kinds."""
    from microseg.features.user_features import select_features

    return {f.name: f.kind for f in select_features(cfg.features.include)}


def load_segments(cfg: Config, path: str | Path | None = None) -> SegmentCatalog:
    """Read and check a segment file; SegmentFileError lists every problem found."""
    path = Path(path or cfg.segments.file)
    if not path.is_file():
        raise FileNotFoundError(f"segment file {path} not found (segments.file)")
    try:
        raw = yaml.load(path.read_text(), Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except SegmentFileError as exc:
        raise SegmentFileError([f"{path} {p}" for p in exc.problems]) from None
    except yaml.YAMLError as exc:
        raise SegmentFileError([f"{path}: not valid YAML: {exc}"]) from None
    return parse_segments(raw, str(path), available_features(cfg), cfg.ingest.event_types)


def parse_segments(
    raw: Any, path: str, features: dict[str, str], event_types: tuple[str, ...]
) -> SegmentCatalog:
    checker = _Checker(path, features, event_types)
    if not isinstance(raw, dict) or not isinstance(raw.get("segments"), list):
        raise SegmentFileError([f"{path}: expected a mapping with a `segments:` list"])
    for key in raw:
        if key != "segments":
            raise SegmentFileError(
                [f"{path} line {checker.line_of(raw, key)}: unknown top-level key '{key}'"]
            )
    parsed = [checker.segment_of(item, i) for i, item in enumerate(raw["segments"])]
    segments = {}
    for segment in parsed:
        if segment is None:
            continue
        checker.segment = segment.id
        if segment.id in segments:
            checker.problem(segment.line, f"id '{segment.id}' is used twice")
        segments[segment.id] = segment
    # a parent that is in the file but has problems of its own is not also "unknown"
    written = {item.get("id") for item in raw["segments"] if isinstance(item, dict)}
    _check_graph(checker, segments, written)
    if checker.problems:
        raise SegmentFileError(checker.problems)
    return SegmentCatalog(path, tuple(_parents_first(segments)))


def _check_graph(checker: _Checker, segments: dict[str, Segment], written: set) -> None:
    priorities: dict[tuple[str, int], str] = {}
    for segment in segments.values():
        checker.segment = segment.id
        if segment.parent is not None and segment.parent not in written:
            checker.problem(
                segment.line,
                f"unknown parent '{segment.parent}'{_suggest(segment.parent, segments)}",
            )
        seen = [segment.id]
        parent = segment.parent
        while parent in segments:
            if parent in seen:
                checker.problem(segment.line, f"parent cycle: {' -> '.join([*seen, parent])}")
                break
            seen.append(parent)
            parent = segments[parent].parent
        if segment.exclusive_group is not None:
            key = (segment.exclusive_group, segment.priority or 0)
            if key in priorities:
                checker.problem(
                    segment.line,
                    f"exclusive group '{key[0]}': priority {key[1]} is also used by "
                    f"'{priorities[key]}' (each priority once per group)",
                )
            priorities[key] = segment.id


def _parents_first(segments: dict[str, Segment]) -> list[Segment]:
    def depth(s: Segment) -> int:
        return 0 if s.parent is None else 1 + depth(segments[s.parent])

    order = {sid: i for i, sid in enumerate(segments)}
    return sorted(segments.values(), key=lambda s: (depth(s), order[s.id]))


# --------------------------------------------------------------------------------------
# compiling


def facts_of(condition: Condition) -> list[Fact]:
    if isinstance(condition, EventCondition | LastCondition):
        return [condition.fact]
    return [fact for child in _children(condition) for fact in facts_of(child)]


def compile_condition(condition: Condition, as_of: Column) -> Column:
    """The condition as a non-null boolean Column over features + fact columns."""
    if isinstance(condition, AllCondition):
        out = compile_condition(condition.items[0], as_of)
        for item in condition.items[1:]:
            out = out & compile_condition(item, as_of)
        return out
    if isinstance(condition, AnyCondition):
        out = compile_condition(condition.items[0], as_of)
        for item in condition.items[1:]:
            out = out | compile_condition(item, as_of)
        return out
    if isinstance(condition, NotCondition):
        return ~compile_condition(condition.item, as_of)
    if isinstance(condition, SqlCondition):
        return F.coalesce(F.expr(condition.expression).cast("boolean"), F.lit(False))
    if isinstance(condition, FeatureCondition):
        value = F.col(condition.feature)
        out = F.lit(True)
        for comparison, arg in condition.tests:
            out = out & _compare(value, comparison, arg)
        return F.coalesce(out, F.lit(False))
    if isinstance(condition, EventCondition):
        count = F.col(condition.fact.name)
        out = F.lit(True)
        if condition.at_least is not None:
            out = out & (count >= condition.at_least)
        if condition.at_most is not None:
            out = out & (count <= condition.at_most)
        return F.coalesce(out, F.lit(False))
    if isinstance(condition, LastCondition):
        last = F.col(condition.fact.name)
        if condition.never:
            return last.isNull()
        age_micros = F.unix_micros(as_of) - F.unix_micros(last)
        if condition.within is not None:
            out = age_micros <= int(condition.within.total_seconds() * 1e6)
        else:
            assert condition.older_than is not None
            out = age_micros > int(condition.older_than.total_seconds() * 1e6)
        return F.coalesce(out, F.lit(False))
    raise TypeError(f"unknown condition {condition!r}")


def _compare(value: Column, comparison: str, arg: Any) -> Column:
    if comparison == "is_null":
        return value.isNull() if arg else value.isNotNull()
    if comparison == "between":
        return value.between(arg[0], arg[1])
    if comparison == "in":
        return value.isin(list(arg))
    if comparison == "not_in":
        return ~value.isin(list(arg))
    operators = {
        "eq": value.__eq__,
        "ne": value.__ne__,
        "gt": value.__gt__,
        "gte": value.__ge__,
        "lt": value.__lt__,
        "lte": value.__le__,
    }
    return operators[comparison](F.lit(arg))


def segment_condition(catalog: SegmentCatalog, segment_id: str, as_of: Column) -> Column:
    """A segment's own conditions and its ancestors' (a child refines its parent)."""
    out = F.lit(True)
    for segment in catalog.chain(segment_id):
        out = out & compile_condition(segment.condition, as_of)
    return out


# --------------------------------------------------------------------------------------
# facts from events (batch)


def _type_match(types: tuple[str, ...] | None) -> Column:
    return F.lit(True) if types is None else F.col("event_type").isin(list(types))


def _window_match(within: timedelta | None, as_of: datetime) -> Column:
    return F.lit(True) if within is None else F.col("event_time") >= F.lit(as_of - within)


def compute_facts(
    keyed_events_df: DataFrame,
    facts: list[Fact],
    *,
    as_of: datetime,
    inactivity_timeout: timedelta,
    max_session_length: timedelta,
) -> DataFrame | None:
    """Per user_key, one column per fact, from events strictly before as_of (already keyed
    and filtered by features.keyed_events_before). None when there are no facts."""
    if not facts:
        return None
    events_df = keyed_events_df.filter(F.col("user_key").isNotNull())
    simple = [f for f in facts if isinstance(f, LastTime) or (f.streamable and not f.since_last)]
    anchored = [f for f in facts if isinstance(f, EventCount) and f.since_last]
    grouped = [f for f in facts if isinstance(f, EventCount) and not f.streamable]
    parts: list[DataFrame] = []
    aggs = []
    for fact in simple:
        if isinstance(fact, LastTime):
            aggs.append(
                F.max(F.when(_type_match(fact.types), F.col("event_time"))).alias(fact.name)
            )
        else:
            inside = _type_match(fact.types) & _window_match(fact.within, as_of)
            aggs.append(F.count(F.when(inside, 1)).alias(fact.name))
    anchors = {f"_anchor_{_digest(repr(f.since_last))[:12]}": f.since_last for f in anchored}
    for name, types in anchors.items():
        aggs.append(F.max(F.when(_type_match(types), F.col("event_time"))).alias(name))
    if aggs:
        parts.append(events_df.groupBy("user_key").agg(*aggs))
    if anchored:
        anchor_df = parts[0].select("user_key", *anchors)
        joined_df = events_df.join(anchor_df, on="user_key")
        counts = []
        for fact in anchored:
            anchor = F.col(f"_anchor_{_digest(repr(fact.since_last))[:12]}")
            inside = (
                _type_match(fact.types)
                & _window_match(fact.within, as_of)
                & (F.col("event_time") > anchor)
            )
            # null when the user never had the anchor event: the condition is then false
            counts.append(
                F.when(F.max(anchor).isNotNull(), F.count(F.when(inside, 1))).alias(fact.name)
            )
        parts.append(joined_df.groupBy("user_key").agg(*counts))
    if grouped:
        parts.append(
            _grouped_counts(events_df, grouped, as_of, inactivity_timeout, max_session_length)
        )
    result = parts[0].drop(*anchors)
    for part in parts[1:]:
        result = result.join(part, on="user_key", how="full")
    return result


def _grouped_counts(
    events_df: DataFrame,
    facts: list[EventCount],
    as_of: datetime,
    inactivity_timeout: timedelta,
    max_session_length: timedelta,
) -> DataFrame:
    """Largest count of one product / category / session per user, per fact."""
    from microseg.silver.sessions import label_sessions

    if any(f.in_one_session for f in facts):
        events_df = label_sessions(
            events_df, inactivity_timeout=inactivity_timeout, max_session_length=max_session_length
        )
    out = None
    for fact in facts:
        keys = ["user_key"]
        if fact.in_one_session:
            keys += ["_visit", "_piece"]
        selected = events_df.filter(_type_match(fact.types) & _window_match(fact.within, as_of))
        if fact.per is not None:
            keys.append(PER[fact.per])
            selected = selected.filter(F.col(PER[fact.per]).isNotNull())
        part = (
            selected.groupBy(*keys).count().groupBy("user_key").agg(F.max("count").alias(fact.name))
        )
        out = part if out is None else out.join(part, on="user_key", how="full")
    assert out is not None
    return out


def with_facts(features_df: DataFrame, facts_df: DataFrame | None, facts: list[Fact]) -> DataFrame:
    """Features joined with the facts; users without events in a count get 0."""
    if facts_df is None:
        return features_df
    joined = features_df.join(facts_df, on="user_key", how="left")
    for fact in facts:
        if isinstance(fact, EventCount) and not fact.since_last:
            joined = joined.withColumn(fact.name, F.coalesce(F.col(fact.name), F.lit(0)))
    return joined


def exclusive_winners(segments, flag_of) -> dict[str, Column]:
    """Per exclusive group of `segments`, the Column naming the matching member with the best
    priority (1 beats 2), or null; flag_of(segment_id) is the name of its boolean column."""
    groups: dict[str, list[Segment]] = {}
    for segment in segments:
        if segment.exclusive_group is not None:
            groups.setdefault(segment.exclusive_group, []).append(segment)
    winners: dict[str, Column] = {}
    for group, members in groups.items():
        winner = F.lit(None).cast("string")
        for segment in sorted(members, key=lambda s: s.priority or 0, reverse=True):
            winner = F.when(F.col(flag_of(segment.id)), F.lit(segment.id)).otherwise(winner)
        winners[group] = winner
    return winners
