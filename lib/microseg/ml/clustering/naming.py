"""Cluster names: the first NAME_RULES rule that holds for a cluster's profile, else a
name from its two most distinctive features."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NameRule:
    name: str
    meaning: str
    test: Any  # (z: dict, mean: dict) -> bool; a feature missing from the profile fails


def _first(values: Mapping[str, float], *names: str) -> float | None:
    for name in names:
        if values.get(name) is not None:
            return values[name]
    return None


def _z_at_least(limit: float, *names: str):
    def test(z: Mapping[str, float], mean: Mapping[str, float]) -> bool:
        value = _first(z, *names)
        return value is not None and value >= limit

    return test


def _z_at_most(limit: float, *names: str):
    def test(z: Mapping[str, float], mean: Mapping[str, float]) -> bool:
        value = _first(z, *names)
        return value is not None and value <= limit

    return test


def _all(*tests):
    return lambda z, mean: all(t(z, mean) for t in tests)


ORDERS = ("orders_lifetime", "orders_90d", "orders_30d")
SPEND = (
    "revenue_lifetime",
    "revenue_90d",
    "revenue_30d",
    "avg_order_value_lifetime",
    "avg_order_value_90d",
    "avg_order_value_30d",
)
AOV = ("avg_order_value_lifetime", "avg_order_value_90d", "avg_order_value_30d")
ABANDON = (
    "cart_abandonment_rate_lifetime",
    "cart_abandonment_rate_90d",
    "cart_abandoned_sessions_lifetime",
    "cart_abandoned_sessions_90d",
)
BOUNCE = ("bounce_rate_lifetime", "bounce_rate_90d", "bounce_rate_30d")
SECONDS = ("avg_session_seconds_lifetime", "avg_session_seconds_90d", "avg_session_seconds_30d")
PAGES = ("pages_per_session_lifetime", "pages_per_session_90d", "pages_per_session_30d")
RECENCY = ("days_since_last_event",)
TENURE = ("tenure_days",)
CAMPAIGN = ("campaign_session_share",)


def _orders_below(limit: float):
    """Mean orders (original units) below `limit`: most members never bought."""

    def test(z: Mapping[str, float], mean: Mapping[str, float]) -> bool:
        orders = _first(mean, *ORDERS)
        return orders is not None and orders < limit

    return test


def _any(*tests):
    return lambda z, mean: any(t(z, mean) for t in tests)


# The first rule that holds names the cluster. z: the cluster's standardized means (see the
# profiles); a feature the model does not use fails its test. Each list of names (ORDERS,
# SPEND, ...) means the first of them the model uses: spend is revenue, else average order
# value.
NAME_RULES = (
    NameRule(
        "Bouncers",
        "bounce rate z >= 1.5, or session seconds z <= -2.5",
        _any(_z_at_least(1.5, *BOUNCE), _z_at_most(-2.5, *SECONDS)),
    ),
    NameRule(
        "New visitors from campaigns",
        "tenure_days z <= -1 and campaign_session_share z >= 1",
        _all(_z_at_most(-1.0, *TENURE), _z_at_least(1.0, *CAMPAIGN)),
    ),
    NameRule("New visitors", "tenure_days z <= -1", _z_at_most(-1.0, *TENURE)),
    NameRule(
        "Lapsed high spenders",
        "days_since_last_event z >= 1 and spend z >= 0.5",
        _all(_z_at_least(1.0, *RECENCY), _z_at_least(0.5, *SPEND)),
    ),
    NameRule("Lapsed customers", "days_since_last_event z >= 1", _z_at_least(1.0, *RECENCY)),
    NameRule(
        "High-value frequent buyers",
        "orders z >= 1 and spend z >= 0.5",
        _all(_z_at_least(1.0, *ORDERS), _z_at_least(0.5, *SPEND)),
    ),
    NameRule("Frequent buyers", "orders z >= 1", _z_at_least(1.0, *ORDERS)),
    NameRule(
        "Cart abandoners",
        "cart abandonment (rate, else abandoned sessions) z >= 0.75 and mean orders below 0.5",
        _all(_z_at_least(0.75, *ABANDON), _orders_below(0.5)),
    ),
    NameRule("Deal seekers", "campaign_session_share z >= 1", _z_at_least(1.0, *CAMPAIGN)),
    NameRule("Big-ticket buyers", "average order value z >= 0.75", _z_at_least(0.75, *AOV)),
    NameRule(
        "Window shoppers",
        "mean orders below 0.5 and pages per session z >= 0",
        _all(_orders_below(0.5), _z_at_least(0.0, *PAGES)),
    ),
)


def feature_label(feature: str) -> str:
    return feature.replace("_", " ")


def name_cluster(z: Mapping[str, float], mean: Mapping[str, float]) -> str:
    """The first NAME_RULES name whose test holds; else 'High <a>, low <b>' from the two
    largest |z| (or 'Average users' when no |z| reaches 0.5)."""
    if not z:
        return "Empty cluster"
    for rule in NAME_RULES:
        if rule.test(z, mean):
            return rule.name
    strong = sorted(
        ((f, v) for f, v in z.items() if abs(v) >= 0.5), key=lambda fv: (-abs(fv[1]), fv[0])
    )[:2]
    if not strong:
        return "Average users"
    text = ", ".join(f"{'high' if v > 0 else 'low'} {feature_label(f)}" for f, v in strong)
    return text[0].upper() + text[1:]


def unique_name(name: str, taken: set[str]) -> str:
    """name, or 'name 2', 'name 3', ... the first not taken."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name} {n}"
    return candidate
