"""User keys: what an event is attributed to, before and after identity stitching."""

from __future__ import annotations

from pyspark.sql import Column
from pyspark.sql import functions as F

ANON_PREFIX = "anon:"


def user_key_of(user_id: Column, anonymous_id: Column, mapped_key: Column) -> Column:
    """The event's user_id; else the user its anonymous id is stitched to (`mapped_key`);
    else anon:<anonymous_id>. Null for an event with neither id."""
    return F.coalesce(user_id, mapped_key, F.concat(F.lit(ANON_PREFIX), anonymous_id))


def raw_key() -> Column:
    """An event's key before stitching: its user_id, else anon:<anonymous_id>."""
    return user_key_of(F.col("user_id"), F.col("anonymous_id"), F.lit(None))
