"""Cluster names: the first NAME_RULES rule whose every claim holds for a cluster's profile,
else a name from its two most distinctive features.

A rule lists everything its name says about the cluster, not only what sets it apart: "New
visitors" says the members are recent (tenure low) and have not bought much (orders not
high), so a cluster of recent heavy buyers is not called new visitors. A name therefore never
contradicts the profile it was given; `holds` checks a rule against another profile (a
retrained cluster keeps its name only while the name still holds).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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


def _first(values: Mapping[str, float], names: tuple[str, ...]) -> str | None:
    """The first of `names` the profile has a value for."""
    return next((n for n in names if values.get(n) is not None), None)


@dataclass(frozen=True)
class Claim:
    """One thing a name says: the first feature of `features` the model uses, on the `scale`
    (z: standardized cluster mean; mean: the cluster mean in original units), compares to
    `limit` with `op`. A feature the model does not use fails the claim when `required`, and
    passes it otherwise (a claim that the cluster is *not* something cannot be contradicted
    by a feature that is not there)."""

    features: tuple[str, ...]
    op: str  # ">=", "<=", "<", ">"
    limit: float
    scale: str = "z"
    required: bool = True

    def holds(self, z: Mapping[str, float], mean: Mapping[str, float]) -> bool:
        values = z if self.scale == "z" else mean
        feature = _first(values, self.features)
        if feature is None:
            return not self.required
        value = values[feature]
        return {
            ">=": value >= self.limit,
            "<=": value <= self.limit,
            "<": value < self.limit,
            ">": value > self.limit,
        }[self.op]

    def text(self) -> str:
        what = "mean " if self.scale == "mean" else ""
        group = self.features[0] if len(self.features) == 1 else f"{self.features[0]}, ..."
        return f"{what}{group} {'z ' if self.scale == 'z' else ''}{self.op} {self.limit:g}"


@dataclass(frozen=True)
class AnyOf:
    claims: tuple[Claim, ...]

    def holds(self, z: Mapping[str, float], mean: Mapping[str, float]) -> bool:
        return any(c.holds(z, mean) for c in self.claims)

    def text(self) -> str:
        return "(" + " or ".join(c.text() for c in self.claims) + ")"

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(f for c in self.claims for f in c.features)


@dataclass(frozen=True)
class NameRule:
    name: str
    claims: tuple[Claim | AnyOf, ...]

    def holds(self, z: Mapping[str, float], mean: Mapping[str, float]) -> bool:
        return bool(z) and all(c.holds(z, mean) for c in self.claims)

    @property
    def meaning(self) -> str:
        return " and ".join(c.text() for c in self.claims)

    @property
    def features(self) -> set[str]:
        return {f for c in self.claims for f in c.features}


def high(features: tuple[str, ...], limit: float) -> Claim:
    return Claim(features, ">=", limit)


def low(features: tuple[str, ...], limit: float) -> Claim:
    return Claim(features, "<=", limit)


def not_high(features: tuple[str, ...], limit: float) -> Claim:
    return Claim(features, "<", limit, required=False)


def mean_at_least(features: tuple[str, ...], limit: float) -> Claim:
    return Claim(features, ">=", limit, scale="mean")


def mean_below(features: tuple[str, ...], limit: float, *, required: bool = True) -> Claim:
    return Claim(features, "<", limit, scale="mean", required=required)


# Mean orders per member (original units): "buyers" and "customers" need at least 0.5 (on
# average half the members bought), "frequent" at least 2; a name about not buying needs
# below 0.5.
BOUGHT = mean_at_least(ORDERS, 0.5)
DID_NOT_BUY = mean_below(ORDERS, 0.5)

# The first rule whose every claim holds names the cluster. z: the cluster's standardized
# means (see the profiles). Each list of names (ORDERS, SPEND, ...) means the first of them
# the model uses: spend is revenue, else average order value.
NAME_RULES = (
    NameRule(
        "Bouncers",
        (
            AnyOf((high(BOUNCE, 1.5), low(SECONDS, -2.5))),
            not_high(ORDERS, 0.5),
            mean_below(ORDERS, 0.5, required=False),
        ),
    ),
    NameRule(
        "New visitors from campaigns",
        (low(TENURE, -1.0), high(CAMPAIGN, 1.0), not_high(ORDERS, 0.5)),
    ),
    NameRule("New visitors", (low(TENURE, -1.0), not_high(ORDERS, 0.5))),
    NameRule("Lapsed high spenders", (high(RECENCY, 1.0), high(SPEND, 0.5), BOUGHT)),
    NameRule("Lapsed customers", (high(RECENCY, 1.0), BOUGHT)),
    NameRule("Lapsed visitors", (high(RECENCY, 1.0),)),
    NameRule(
        "High-value frequent buyers",
        (high(ORDERS, 1.0), high(SPEND, 0.5), mean_at_least(ORDERS, 2.0), not_high(RECENCY, 1.0)),
    ),
    NameRule(
        "Frequent buyers",
        (high(ORDERS, 1.0), mean_at_least(ORDERS, 2.0), not_high(RECENCY, 1.0)),
    ),
    NameRule("Cart abandoners", (high(ABANDON, 0.75), DID_NOT_BUY)),
    NameRule("Deal seekers", (high(CAMPAIGN, 1.0), BOUGHT)),
    NameRule("Campaign visitors", (high(CAMPAIGN, 1.0),)),
    NameRule("Big-ticket buyers", (high(AOV, 0.75), BOUGHT)),
    NameRule("Window shoppers", (DID_NOT_BUY, high(PAGES, 0.0))),
)
RULES_BY_NAME = {r.name: r for r in NAME_RULES}
STRONG = 0.5  # |z| from which a feature describes a cluster in a fallback name or qualifier


def feature_label(feature: str) -> str:
    return feature.replace("_", " ")


def _strongest(z: Mapping[str, float], skip: set[str] = frozenset()) -> list[tuple[str, float]]:
    """Features with |z| >= STRONG, strongest first (ties by name), except `skip`."""
    return sorted(
        ((f, v) for f, v in z.items() if abs(v) >= STRONG and f not in skip),
        key=lambda fv: (-abs(fv[1]), fv[0]),
    )


def _describe(feature: str, value: float) -> str:
    return f"{'high' if value > 0 else 'low'} {feature_label(feature)}"


def name_cluster(z: Mapping[str, float], mean: Mapping[str, float]) -> str:
    """The first NAME_RULES name whose claims all hold; else 'High <a>, low <b>' from the two
    largest |z| (or 'Average users' when no |z| reaches 0.5)."""
    if not z:
        return "Empty cluster"
    for rule in NAME_RULES:
        if rule.holds(z, mean):
            return rule.name
    strong = _strongest(z)[:2]
    if not strong:
        return "Average users"
    text = ", ".join(_describe(f, v) for f, v in strong)
    return text[0].upper() + text[1:]


def still_holds(base: str, z: Mapping[str, float], mean: Mapping[str, float]) -> bool:
    """Whether the name name_cluster gave an earlier version of a cluster (`base`, before
    unique_name) describes this profile: its rule's claims hold, or, for a name made of
    features, name_cluster gives it again."""
    rule = RULES_BY_NAME.get(base)
    if rule is not None:
        return rule.holds(z, mean)
    return name_cluster(z, mean) == base


def unique_name(name: str, taken: set[str], z: Mapping[str, float] | None = None) -> str:
    """name if free; else name qualified by the profile's strongest feature the name does not
    already speak of ('Window shoppers, high desktop session share'), the next strongest if
    that is taken too; else 'name 2', 'name 3', ..."""
    if name not in taken:
        return name
    rule = RULES_BY_NAME.get(name)
    for feature, value in _strongest(z or {}, rule.features if rule else set()):
        qualified = f"{name}, {_describe(feature, value)}"
        if feature_label(feature) not in name and qualified not in taken:
            return qualified
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name} {n}"
    return candidate
