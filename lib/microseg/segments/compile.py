"""Compiling rules to Spark Column expressions: the one place that defines what a rule means.

A compiled condition is a non-null boolean Column over a per-user frame holding the feature
columns and one column per fact (named by the fact, see segments.model); the batch job and the
stream both evaluate rules with it and differ only in how they obtain the facts.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import Column
from pyspark.sql import functions as F

from microseg.segments.model import (
    AllCondition,
    AnyCondition,
    Condition,
    EventCondition,
    FeatureCondition,
    LastCondition,
    NotCondition,
    Segment,
    SegmentCatalog,
    SqlCondition,
)


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
