"""Point-in-time behavioral features per user (gold/user_features).

For an as-of time T, everything is computed from events with event_time strictly before T:
the identity map is learned from those events only, and sessions are rebuilt from them, so a
session running across T is cut at T. Nothing at or after T can change a feature.

Windows: `7d`, `30d`, `90d` cover [T - n days, T); `lifetime` covers everything before T.
Session counts per window count sessions that start in the window. An order is a session with
at least one purchase; revenue is the sum over purchase events of price x quantity (1 when
missing); the average order value is revenue / orders.

Every feature is defined once, in FEATURES below: its name, its meaning and its expression
over per-user aggregates. `features.include` in config selects them (default: all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from microseg.core.config import ConfigError
from microseg.silver.sessions import identity_map, sessionize, with_user_key

WINDOWS: dict[str, int | None] = {"7d": 7, "30d": 30, "90d": 90, "lifetime": None}
DEVICES = ("mobile", "desktop", "tablet")


@dataclass(frozen=True)
class Feature:
    name: str
    description: str
    expression: Callable[[], Column]  # over the per-user aggregate frame (see _aggregates)
    kind: str = "number"  # or "string": what segment rules may compare it with


def _ratio(numerator: str, denominator: str) -> Callable[[], Column]:
    return lambda: F.when(F.col(denominator) > 0, F.col(numerator) / F.col(denominator))


def _col(name: str) -> Callable[[], Column]:
    return lambda: F.col(name)


def _days_since(column: str) -> Callable[[], Column]:
    return lambda: (F.unix_micros(F.col("_as_of")) - F.unix_micros(F.col(column))) / 86_400e6


def _gap_days(start: str, end: str) -> Column:
    return (F.unix_micros(F.col(end)) - F.unix_micros(F.col(start))) / 86_400e6


def _feature_catalog() -> list[Feature]:
    features = [
        Feature(
            "days_since_last_event", "Days from the last event to T", _days_since("_last_event")
        ),
        Feature(
            "days_since_last_purchase",
            "Days from the last purchase to T; null if the user never bought",
            _days_since("_last_purchase"),
        ),
        Feature("tenure_days", "Days from the first event to T", _days_since("_first_event")),
    ]
    for w in WINDOWS:
        features += [
            Feature(f"orders_{w}", f"Sessions with a purchase ({w})", _col(f"_orders_{w}")),
            Feature(f"revenue_{w}", f"Purchase revenue ({w})", _col(f"_revenue_{w}")),
            Feature(
                f"avg_order_value_{w}",
                f"revenue / orders ({w}); null without orders",
                _ratio(f"_revenue_{w}", f"_orders_{w}"),
            ),
            Feature(f"sessions_{w}", f"Sessions started ({w})", _col(f"_sessions_{w}")),
            Feature(f"events_{w}", f"Events in those sessions ({w})", _col(f"_events_{w}")),
            Feature(
                f"avg_session_seconds_{w}",
                f"Mean session duration in seconds ({w})",
                _ratio(f"_duration_{w}", f"_sessions_{w}"),
            ),
            Feature(
                f"pages_per_session_{w}",
                f"(page_view + product_view events) / sessions ({w})",
                _ratio(f"_pages_{w}", f"_sessions_{w}"),
            ),
            Feature(
                f"bounce_rate_{w}",
                f"Share of one-event sessions ({w})",
                _ratio(f"_bounces_{w}", f"_sessions_{w}"),
            ),
            Feature(f"cart_adds_{w}", f"add_to_cart events ({w})", _col(f"_cart_adds_{w}")),
            Feature(f"checkouts_{w}", f"checkout_started events ({w})", _col(f"_checkouts_{w}")),
            Feature(
                f"cart_abandoned_sessions_{w}",
                f"Sessions with a cart add and no purchase ({w})",
                _col(f"_abandoned_{w}"),
            ),
            Feature(
                f"cart_abandonment_rate_{w}",
                f"Abandoned / sessions with a cart add ({w}); null without cart adds",
                _ratio(f"_abandoned_{w}", f"_cart_sessions_{w}"),
            ),
        ]
    features += [
        Feature(
            "max_views_one_product_unbought_7d",
            "Most product_view events of one product in the last 7 days among products not "
            "bought in those 7 days (the 'viewed a product more than 3 times' trigger); 0 if none",
            lambda: F.coalesce(F.col("_max_unbought_views_7d"), F.lit(0)),
        ),
        Feature(
            "days_since_first_purchase",
            "Days from the start of the first session with a purchase to T; null if none",
            _days_since("_first_order"),
        ),
        Feature(
            "order_days_lifetime",
            "Distinct UTC days with a purchase session",
            lambda: F.coalesce(F.col("_order_days"), F.lit(0)),
        ),
        Feature(
            "mean_days_between_orders",
            "(last - first purchase session start) / (orders_lifetime - 1), in days; null "
            "below 2 orders",
            lambda: F.when(
                F.col("_orders_lifetime") >= 2,
                _gap_days("_first_order", "_last_order") / (F.col("_orders_lifetime") - 1),
            ),
        ),
        Feature(
            "days_between_last_two_orders",
            "Days between the starts of the last two purchase sessions; null below 2 orders",
            lambda: _gap_days("_previous_order", "_last_order"),
        ),
        Feature(
            "orders_trend_30d",
            "orders_30d minus the 30-day average of the 60 days before it "
            "(orders_90d - orders_30d) / 2: above 0, buying more often lately",
            lambda: F.col("_orders_30d") - (F.col("_orders_90d") - F.col("_orders_30d")) / 2,
        ),
        Feature(
            "revenue_trend_30d",
            "revenue_30d minus (revenue_90d - revenue_30d) / 2: above 0, spending more lately",
            lambda: F.col("_revenue_30d") - (F.col("_revenue_90d") - F.col("_revenue_30d")) / 2,
        ),
        Feature(
            "distinct_categories", "Distinct categories of events", _col("_distinct_categories")
        ),
        Feature(
            "top_category",
            "Category with the most events (ties: alphabetically first)",
            _col("_top_category"),
            kind="string",
        ),
        Feature(
            "top_category_share",
            "Share of the top category among events with a category",
            _col("_top_category_share"),
        ),
        Feature(
            "preferred_hour",
            "Hour of day (UTC) with the most events (ties: earliest)",
            _col("_preferred_hour"),
        ),
        Feature(
            "preferred_weekday",
            "Day of week with the most events, 1 = Sunday .. 7 = Saturday (ties: lowest)",
            _col("_preferred_weekday"),
        ),
        *[
            Feature(
                f"{d}_session_share",
                f"Share of sessions on a {d} device",
                _ratio(f"_{d}_sessions", "_sessions_lifetime"),
            )
            for d in DEVICES
        ],
        Feature(
            "campaign_session_share",
            "Share of sessions whose first event carries a utm_campaign (sale and ad traffic)",
            _ratio("_campaign_sessions", "_sessions_lifetime"),
        ),
        Feature(
            "recency_score",
            "RFM R: 5 = bought most recently (quintiles of days_since_last_purchase among buyers); "
            "null for non-buyers",
            _col("_r_score"),
        ),
        Feature(
            "frequency_score",
            "RFM F: 1-5 quintile of lifetime orders among buyers; null for non-buyers",
            _col("_f_score"),
        ),
        Feature(
            "monetary_score",
            "RFM M: 1-5 quintile of lifetime revenue among buyers; null for non-buyers",
            _col("_m_score"),
        ),
        Feature(
            "engagement_score",
            "0-100: 40 x min(sessions_30d / 8, 1) + 30 x min(events_30d / 80, 1) "
            "+ 30 x exp(-days_since_last_event / 14)",
            lambda: F.round(
                40 * F.least(F.col("_sessions_30d") / 8, F.lit(1.0))
                + 30 * F.least(F.col("_events_30d") / 80, F.lit(1.0))
                + 30 * F.exp(-_days_since("_last_event")() / 14),
                2,
            ),
        ),
    ]
    return features


FEATURES: dict[str, Feature] = {f.name: f for f in _feature_catalog()}


def select_features(include: tuple[str, ...] | None) -> list[Feature]:
    if not include:
        return list(FEATURES.values())
    unknown = [name for name in include if name not in FEATURES]
    if unknown:
        raise ConfigError(
            f"features.include: unknown feature(s) {unknown}; see README for the list"
        )
    return [FEATURES[name] for name in include]


# --------------------------------------------------------------------------------------
# aggregates


def _in_window(time_col: str, as_of: datetime, days: int | None) -> Column:
    if days is None:
        return F.lit(True)
    return F.col(time_col) >= F.lit(as_of - timedelta(days=days))


def session_aggregates(sessions_df: DataFrame, as_of: datetime) -> DataFrame:
    aggs = []
    for w, days in WINDOWS.items():
        inside = _in_window("session_start", as_of, days)

        def total(value: Column, inside: Column = inside) -> Column:
            return F.coalesce(F.sum(F.when(inside, value)), F.lit(0))

        aggs += [
            F.count(F.when(inside, 1)).cast("int").alias(f"_sessions_{w}"),
            total(F.col("events")).cast("int").alias(f"_events_{w}"),
            total(F.col("duration_seconds")).cast("double").alias(f"_duration_{w}"),
            total(F.col("page_views") + F.col("product_views")).cast("int").alias(f"_pages_{w}"),
            F.count(F.when(inside & F.col("is_bounce"), 1)).cast("int").alias(f"_bounces_{w}"),
            F.count(F.when(inside & F.col("has_purchase"), 1)).cast("int").alias(f"_orders_{w}"),
            total(F.col("revenue")).cast("double").alias(f"_revenue_{w}"),
            total(F.col("cart_adds")).cast("int").alias(f"_cart_adds_{w}"),
            total(F.col("checkouts")).cast("int").alias(f"_checkouts_{w}"),
            F.count(F.when(inside & F.col("has_cart_add"), 1))
            .cast("int")
            .alias(f"_cart_sessions_{w}"),
            F.count(F.when(inside & F.col("is_cart_abandoned"), 1))
            .cast("int")
            .alias(f"_abandoned_{w}"),
        ]
    # purchase history: when the purchase sessions started (first, last, the one before the
    # last) and on how many UTC days
    bought_at = F.when(F.col("has_purchase"), F.col("session_start"))
    aggs += [
        F.min(bought_at).alias("_first_order"),
        F.max(bought_at).alias("_last_order"),
        F.try_element_at(F.sort_array(F.collect_list(bought_at), asc=False), F.lit(2)).alias(
            "_previous_order"
        ),
        F.count_distinct(F.to_date(bought_at)).cast("int").alias("_order_days"),
    ]
    aggs += [F.count(F.when(F.col("device") == d, 1)).alias(f"_{d}_sessions") for d in DEVICES]
    aggs.append(F.count(F.when(F.col("utm_campaign").isNotNull(), 1)).alias("_campaign_sessions"))
    return sessions_df.groupBy("user_key").agg(*aggs)


def _event_aggregates(events_df: DataFrame) -> DataFrame:
    return events_df.groupBy("user_key").agg(
        F.min("event_time").alias("_first_event"),
        F.max("event_time").alias("_last_event"),
        F.max(F.when(F.col("event_type") == "purchase", F.col("event_time"))).alias(
            "_last_purchase"
        ),
        F.count_distinct("category").cast("int").alias("_distinct_categories"),
    )


def mode_of(counts_df: DataFrame, name: str) -> DataFrame:
    """Per user, from (user_key, _value, count) rows: the most frequent value (ties: the
    smallest value) as `name`, and its share of the counts as `name`_share."""
    return counts_df.groupBy("user_key").agg(
        F.min_by("_value", F.struct(-F.col("count"), F.col("_value"))).alias(name),
        (F.max("count") / F.sum("count")).alias(f"{name}_share"),
    )


def _mode(events_df: DataFrame, value: Column, name: str) -> DataFrame:
    """Per user, the most frequent value (ties: the smallest value)."""
    return mode_of(
        events_df.filter(value.isNotNull()).groupBy("user_key", value.alias("_value")).count(),
        name,
    )


def unbought_views_7d(events_df: DataFrame, as_of: datetime) -> DataFrame:
    recent_df = events_df.filter(
        _in_window("event_time", as_of, 7) & F.col("product_id").isNotNull()
    )
    per_product_df = recent_df.groupBy("user_key", "product_id").agg(
        F.count(F.when(F.col("event_type") == "product_view", 1)).alias("views"),
        F.count(F.when(F.col("event_type") == "purchase", 1)).alias("purchases"),
    )
    return (
        per_product_df.filter(F.col("purchases") == 0)
        .groupBy("user_key")
        .agg(F.max("views").cast("int").alias("_max_unbought_views_7d"))
    )


def _rfm_scores(base_df: DataFrame) -> DataFrame:
    """Quintile scores 1-5 among buyers, from approximate quantile boundaries (no global sort).

    base_df is materialized once (a local checkpoint, freed with the frame): the boundaries
    and the caller's write then read it instead of computing the whole plan twice."""
    base_df = base_df.localCheckpoint(eager=True)
    buyers = F.col("_orders_lifetime") > 0
    recency = _days_since("_last_purchase")()
    metrics = {
        "_r_score": -recency,
        "_f_score": F.col("_orders_lifetime"),
        "_m_score": F.col("_revenue_lifetime"),
    }
    probabilities = [0.2, 0.4, 0.6, 0.8]
    bounds = (
        base_df.filter(buyers)
        .agg(*[F.percentile_approx(m, probabilities, 10_000).alias(n) for n, m in metrics.items()])
        .first()
    )
    scored = base_df
    for name, metric in metrics.items():
        edges = bounds[name] if bounds is not None and bounds[name] is not None else []
        score = F.lit(1)
        for edge in edges:
            score = score + F.when(metric > F.lit(edge), 1).otherwise(0)
        scored = scored.withColumn(name, F.when(buyers, score.cast("int")))
    return scored


def keyed_events_before(events_df: DataFrame, as_of: datetime) -> DataFrame:
    """Events strictly before as_of, keyed with the identity map learned from them alone."""
    before_df = events_df.filter(F.col("event_time") < F.lit(as_of))
    keyed_df = with_user_key(before_df, identity_map(before_df))
    return keyed_df.filter(F.col("user_key").isNotNull())


def compute_features(
    keyed_df: DataFrame,
    *,
    as_of: datetime,
    features: list[Feature],
    inactivity_timeout: timedelta,
    max_session_length: timedelta,
) -> DataFrame:
    """From scratch: one row per user key (user_key, as_of, then the features in order) from
    every event before as_of, sessions rebuilt from them. The definition that
    features.point_in_time (what `microseg features` runs) must equal row for row.

    keyed_df must come from keyed_events_before(events, as_of) (persist it: it is read five
    times). RFM boundaries are computed here with one small action.
    """
    sessions_df = sessionize(
        keyed_df, inactivity_timeout=inactivity_timeout, max_session_length=max_session_length
    )
    event_level_df = (
        _event_aggregates(keyed_df)
        .join(_mode(keyed_df, F.col("category"), "_top_category"), on="user_key", how="left")
        .join(_mode(keyed_df, F.hour("event_time"), "_preferred_hour"), on="user_key", how="left")
        .join(
            _mode(keyed_df, F.dayofweek("event_time"), "_preferred_weekday"),
            on="user_key",
            how="left",
        )
    )
    return assemble(
        event_level_df,
        sessions_df,
        unbought_views_7d(keyed_df, as_of),
        as_of=as_of,
        features=features,
    )


def assemble(
    event_level_df: DataFrame,
    sessions_df: DataFrame,
    unbought_df: DataFrame,
    *,
    as_of: datetime,
    features: list[Feature],
) -> DataFrame:
    """The feature rows from their parts: per-user event aggregates (one row per user key
    with an event before as_of), the sessions before as_of, and unbought_views_7d."""
    base_df = (
        event_level_df.join(session_aggregates(sessions_df, as_of), on="user_key", how="left")
        .join(unbought_df, on="user_key", how="left")
        .withColumn("_as_of", F.lit(as_of))
    )
    return _rfm_scores(base_df).select(
        "user_key",
        F.col("_as_of").alias("as_of"),
        *[f.expression().alias(f.name) for f in features],
    )
