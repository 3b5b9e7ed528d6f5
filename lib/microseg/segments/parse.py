"""Reading and checking a segment file (conf/segments.yaml) into a SegmentCatalog.

Every problem found is collected, each naming the file, line and segment, and raised together
as one SegmentFileError, so a user fixes a file in one pass.
"""

from __future__ import annotations

import difflib
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from microseg.core.config import Config, parse_duration
from microseg.segments.model import (
    ANY,
    COMPARISONS,
    ORDERED,
    PER,
    SEGMENT_ID,
    SEGMENT_KEYS,
    AllCondition,
    AnyCondition,
    Condition,
    EventCondition,
    EventCount,
    FeatureCondition,
    LastCondition,
    LastTime,
    MinSize,
    NotCondition,
    Segment,
    SegmentCatalog,
    SegmentFileError,
    SqlCondition,
)

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
    def __init__(
        self,
        path: str,
        features: dict[str, str],
        event_types: tuple[str, ...],
        kind: str = "segment",
    ):
        self.path = path
        self.kind = kind  # what a problem names: "segment 'x'" or "trigger 'x'"
        self.features = features  # name -> kind ("number" or "string")
        self.event_types = event_types
        self.problems: list[str] = []
        self.segment = "?"

    def top_level(self, raw: Any, key: str) -> list:
        """The file's one top-level list, `key:`; SegmentFileError when the file is not that."""
        if not isinstance(raw, dict) or not isinstance(raw.get(key), list):
            raise SegmentFileError([f"{self.path}: expected a mapping with a `{key}:` list"])
        for other in raw:
            if other != key:
                line = self.line_of(raw, other)
                raise SegmentFileError(
                    [f"{self.path} line {line}: unknown top-level key '{other}'"]
                )
        return raw[key]

    def problem(self, line: int, text: str) -> None:
        self.problems.append(f"{self.path} line {line}: {self.kind} '{self.segment}': {text}")

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


def available_features(cfg: Config) -> dict[str, str]:
    """Features a rule may use: those `features.include` selects, with their kinds."""
    from microseg.features.user_features import select_features

    return {f.name: f.kind for f in select_features(cfg.features.include)}


def read_rule_yaml(path: Path, setting: str) -> Any:
    """A rule file (segments, triggers) read with the line of every mapping and key; a
    missing file, invalid YAML or a repeated key raises SegmentFileError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"file {path} not found ({setting})")
    try:
        return yaml.load(path.read_text(), Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except SegmentFileError as exc:
        raise SegmentFileError([f"{path} {p}" for p in exc.problems]) from None
    except yaml.YAMLError as exc:
        raise SegmentFileError([f"{path}: not valid YAML: {exc}"]) from None


# the checker of rule conditions, for other rule files (triggers) that embed conditions
RuleChecker = _Checker
plain = _plain


def load_segments(cfg: Config, path: str | Path | None = None) -> SegmentCatalog:
    """Read and check a segment file; SegmentFileError lists every problem found."""
    path = Path(path or cfg.segments.file)
    raw = read_rule_yaml(path, "segments.file")
    return parse_segments(raw, str(path), available_features(cfg), cfg.ingest.event_types)


def parse_segments(
    raw: Any, path: str, features: dict[str, str], event_types: tuple[str, ...]
) -> SegmentCatalog:
    checker = _Checker(path, features, event_types)
    checker.top_level(raw, "segments")
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
