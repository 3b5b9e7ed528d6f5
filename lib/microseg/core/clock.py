"""Time helpers: microseg's datetimes are naive and mean UTC (see core.spark.use_utc_clock)."""

from __future__ import annotations

from datetime import datetime, timezone


def naive_utc(value: datetime) -> datetime:
    """`value` as a naive UTC datetime: an aware one converted to UTC, a naive one as it is."""
    return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value


def utc_now() -> datetime:
    """Now, as a naive UTC datetime."""
    return datetime.now(timezone.utc).replace(tzinfo=None)
