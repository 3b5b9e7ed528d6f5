"""The segment rule language, parsed: conditions, facts, segments and the catalog of a file.

A segment's conditions form a tree of Condition objects (`Condition.walk()` visits it); the
leaves that look at events name a *fact* (an event count or a last-event time) that both the
batch job (segments.facts) and the stream compute, and that segments.compile turns into Spark
Column expressions. README "Segment rules" is the user's manual of the language.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from microseg.core.config import ConfigError

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

    def children(self) -> tuple[Condition, ...]:
        """The conditions directly inside this one (none for a leaf)."""
        return ()

    def walk(self) -> Iterator[Condition]:
        """This condition and every condition inside it, depth first, parents first."""
        yield self
        for child in self.children():
            yield from child.walk()


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

    def children(self) -> tuple[Condition, ...]:
        return self.items


@dataclass(frozen=True)
class AnyCondition(Condition):
    items: tuple[Condition, ...]

    def children(self) -> tuple[Condition, ...]:
        return self.items


@dataclass(frozen=True)
class NotCondition(Condition):
    item: Condition

    def children(self) -> tuple[Condition, ...]:
        return (self.item,)


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

    @property
    def name(self) -> str:
        """The file's name without its extension: the scope of its membership rows."""
        return Path(self.path).stem

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


def facts_of(condition: Condition) -> list[Fact]:
    """The facts the condition's event and recency leaves need, in tree order."""
    return [c.fact for c in condition.walk() if isinstance(c, EventCondition | LastCondition)]


def sql_conditions(condition: Condition) -> list[SqlCondition]:
    """The condition's sql leaves, in tree order."""
    return [c for c in condition.walk() if isinstance(c, SqlCondition)]


def _not_streamable(condition: Condition) -> str | None:
    """Why the stream cannot keep the condition incrementally, or None."""
    for c in condition.walk():
        if isinstance(c, EventCondition) and not c.fact.streamable:
            return f"line {c.line}: per-product/category or in-one-session counts"
    return None
