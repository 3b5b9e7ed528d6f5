"""Segment health at an as-of (`microseg health --as-of T`): KPIs per segment, anomaly alerts
on size and engagement, and tests that each segment differs from its parent and siblings.

KPIs (gold/segment_kpis): the members valid at T (gold/segment_membership) joined with their
features as of T; `all_users` is everyone with features, the parent of segments without one.

Anomalies: per segment, the values of its previous `window` runs (sizes from
gold/segment_catalog, sessions per user from gold/segment_kpis) get a Theil-Sen line (robust
to a few outliers, and it follows a steady trend); the forecast is the line at T and the
spread is 1.4826 x the median absolute deviation of the residuals (a standard deviation for
normal noise, unmoved by outliers). The value at T is an anomaly when it is `threshold`
spreads or more from the forecast and, so that a flat history (zero spread) does not alert
on noise, at least `min_relative_change` of the forecast away (and `min_size_change` users,
for sizes).

Distinctness: a 2 x 2 chi-square test (scipy) per key behaviour, the share of buyers in the
last 30 days and the share active in the last 7 days: a segment against the rest of its parent
(its parent's members minus its own), and against each sibling (segments of the same parent or
exclusive group). A segment whose every test has p >= alpha is flagged as not distinct.
Overlapping siblings share members: their tests are conservative.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from scipy.stats import chi2_contingency, theilslopes

from microseg.core import lake
from microseg.core.clock import naive_utc
from microseg.core.config import Config, HealthConfig
from microseg.core.failpoints import durable
from microseg.core.runs import new_run_id
from microseg.features import snapshots
from microseg.segments.membership import valid_at

ALL_USERS = "all_users"
POPULATION = "population"
KPI_FEATURES = ("orders_30d", "revenue_30d", "sessions_7d", "sessions_30d", "sessions_90d")
ENGAGEMENT = "sessions_per_user_30d"
# gold/segment_kpis columns as the console and the report label them, and how they print:
# rate (a share), amount (a number with 2 decimals) or count
KPI_LABELS = (
    ("members", "members", "count"),
    ("conversion_rate_30d", "conversion 30d", "rate"),
    ("revenue_per_user_30d", "revenue / user 30d", "amount"),
    ("aov_30d", "AOV 30d", "amount"),
    (ENGAGEMENT, "sessions / user 30d", "amount"),
    ("retention_30d", "retention 30d", "rate"),
)


def kpi_text(value, kind: str) -> str:
    """A KPI value as printed: '' for none, 12.5% for a rate, 1,234.50 for an amount."""
    if value is None or value != value:  # None or NaN
        return ""
    if kind == "rate":
        return f"{value:.1%}"
    if kind == "amount":
        return f"{value:,.2f}"
    return f"{int(value):,}"


BEHAVIOURS = (("buyers_30d", "bought in 30 days"), ("active_7d", "active in 7 days"))


def segment_kpis(members_df: DataFrame, features_df: DataFrame) -> DataFrame:
    """Per segment of members_df (user_key, segment_id, source), and for `all_users` (every
    user of features_df): members, buyers_30d, active_7d and the KPI rates."""
    everyone_df = features_df.select(
        "user_key", F.lit(ALL_USERS).alias("segment_id"), F.lit(POPULATION).alias("source")
    )
    joined_df = (
        members_df.select("user_key", "segment_id", "source")
        .unionByName(everyone_df)
        .join(features_df.select("user_key", *KPI_FEATURES), "user_key")
    )
    orders, revenue = F.coalesce(F.col("orders_30d"), F.lit(0)), F.col("revenue_30d")
    earlier = F.coalesce(F.col("sessions_90d"), F.lit(0)) - F.coalesce(
        F.col("sessions_30d"), F.lit(0)
    )
    members = F.count(F.lit(1))
    return (
        joined_df.groupBy("segment_id", "source")
        .agg(
            members.alias("members"),
            F.count(F.when(orders > 0, 1)).alias("buyers_30d"),
            F.count(F.when(F.col("sessions_7d") > 0, 1)).alias("active_7d"),
            F.sum(F.coalesce(revenue, F.lit(0.0))).alias("_revenue"),
            F.sum(orders).alias("_orders"),
            F.sum(F.coalesce(F.col("sessions_30d"), F.lit(0))).alias("_sessions"),
            F.count(F.when(earlier > 0, 1)).alias("_earlier"),
            F.count(F.when((earlier > 0) & (F.col("sessions_30d") > 0), 1)).alias("_returned"),
        )
        .select(
            "segment_id",
            "source",
            "members",
            "buyers_30d",
            "active_7d",
            (F.col("buyers_30d") / F.col("members")).alias("conversion_rate_30d"),
            (F.col("_revenue") / F.col("members")).alias("revenue_per_user_30d"),
            F.when(F.col("_orders") > 0, F.col("_revenue") / F.col("_orders")).alias("aov_30d"),
            (F.col("_sessions") / F.col("members")).alias(ENGAGEMENT),
            F.when(F.col("_earlier") > 0, F.col("_returned") / F.col("_earlier")).alias(
                "retention_30d"
            ),
        )
    )


@dataclass(frozen=True)
class Forecast:
    expected: float
    spread: float  # robust standard deviation of the residuals
    runs: int


def forecast(history: list[tuple[float, float]], at: float) -> Forecast:
    """The Theil-Sen line through history [(time, value)] evaluated at `at`, and the robust
    spread of the residuals (1.4826 x their median absolute deviation)."""
    times = np.array([t for t, _ in history], dtype=float)
    values = np.array([v for _, v in history], dtype=float)
    if len(history) >= 2 and np.ptp(times) > 0:
        slope, intercept, _, _ = theilslopes(values, times)
    else:
        slope, intercept = 0.0, float(np.median(values))
    residuals = values - (intercept + slope * times)
    spread = 1.4826 * float(np.median(np.abs(residuals - np.median(residuals))))
    return Forecast(float(intercept + slope * at), spread, len(history))


@dataclass(frozen=True)
class Anomaly:
    direction: str  # drop or spike
    value: float
    expected: float
    z: float | None  # None when the spread is 0


def anomaly(
    history: list[tuple[float, float]],
    at: float,
    value: float,
    settings: HealthConfig,
    *,
    min_change: float = 0.0,
) -> Anomaly | None:
    """The anomaly of `value` at time `at` against the last settings.window points of
    history (times in any unit, increasing), or None (also when history is too short)."""
    recent = history[-settings.window :]
    if len(recent) < settings.min_history:
        return None
    f = forecast(recent, at)
    change = value - f.expected
    if abs(change) < max(min_change, settings.min_relative_change * abs(f.expected)):
        return None
    z = change / f.spread if f.spread > 0 else None
    if z is not None and abs(z) < settings.threshold:
        return None
    return Anomaly("drop" if change < 0 else "spike", value, f.expected, z)


@dataclass(frozen=True)
class Difference:
    other: str
    p_values: dict[str, float]  # behaviour -> p
    alpha: float

    @property
    def distinct(self) -> bool:
        return any(p < self.alpha for p in self.p_values.values())


def chi_square_p(a_hits: int, a_total: int, b_hits: int, b_total: int) -> float:
    """p-value of the 2 x 2 chi-square test (no continuity correction) that two groups have
    the same share of hits; 1.0 when a row or column of the table is empty."""
    table = np.array([[a_hits, a_total - a_hits], [b_hits, b_total - b_hits]], dtype=float)
    if (table.sum(axis=0) == 0).any() or (table.sum(axis=1) == 0).any():
        return 1.0
    return float(chi2_contingency(table, correction=False).pvalue)


def difference(a: dict, b: dict, *, other: str, alpha: float, subtract: bool) -> Difference:
    """Tests of a (a KPI row) against b: b minus a when `subtract` (a is part of b)."""
    p_values = {}
    for column, _ in BEHAVIOURS:
        b_hits, b_total = b[column], b["members"]
        if subtract:
            b_hits, b_total = b_hits - a[column], b_total - a["members"]
        p_values[column] = chi_square_p(a[column], a["members"], b_hits, b_total)
    return Difference(other, p_values, alpha)


def _days(at: datetime) -> float:
    return (at - datetime(1970, 1, 1)).total_seconds() / 86_400


@dataclass
class HealthReport:
    run_id: str
    as_of: datetime
    segments: int
    kpis: list[dict]  # per segment (and all_users), as written
    alerts: list[dict]  # as written


def _alert(row: dict, alert: str, metric: str, message: str, **values) -> dict:
    return {
        "segment_id": row["segment_id"],
        "source": row["source"],
        "alert": alert,
        "metric": metric,
        "value": values.get("value"),
        "expected": values.get("expected"),
        "score": values.get("score"),
        "other_segment": values.get("other"),
        "message": message,
    }


def _anomaly_alert(row: dict, metric: str, found: Anomaly | None, kind: str) -> list[dict]:
    if found is None:
        return []
    z = "flat history" if found.z is None else f"robust z {found.z:+.1f}"
    return [
        _alert(
            row,
            f"{kind}_{found.direction}",
            metric,
            f"{row['segment_id']}: {metric} {found.value:,.4g} against {found.expected:,.4g} "
            f"expected ({z})",
            value=found.value,
            expected=found.expected,
            score=found.z,
        )
    ]


def _distinct_alert(row: dict, found: Difference, kind: str) -> list[dict]:
    if found.distinct:
        return []
    tests = ", ".join(f"{label} p={found.p_values[column]:.2g}" for column, label in BEHAVIOURS)
    return [
        _alert(
            row,
            f"not_distinct_from_{kind}",
            "+".join(c for c, _ in BEHAVIOURS),
            f"{row['segment_id']}: not distinct from {kind} {found.other} ({tests})",
            score=min(found.p_values.values()),
            other=found.other,
        )
    ]


def find_alerts(
    current: list[dict],
    kpis: dict[str, dict],
    sizes: dict[str, list[tuple[float, float]]],
    engagement: dict[str, list[tuple[float, float]]],
    *,
    at: float,
    settings: HealthConfig,
) -> list[dict]:
    """Alerts of the segments `current` (catalog rows: segment_id, source, size, parent,
    exclusive_group) given their KPIs at the as-of (by segment_id, with all_users), their
    earlier sizes and engagement [(day, value)], oldest first."""
    alerts: list[dict] = []
    by_group: dict[str, list[dict]] = {}
    for row in current:
        sid = row["segment_id"]
        alerts += _anomaly_alert(
            row,
            "size",
            anomaly(
                sizes.get(sid, []), at, row["size"], settings, min_change=settings.min_size_change
            ),
            "size",
        )
        kpi = kpis.get(sid)
        if kpi is None or kpi[ENGAGEMENT] is None:
            continue
        alerts += _anomaly_alert(
            row,
            ENGAGEMENT,
            anomaly(engagement.get(sid, []), at, kpi[ENGAGEMENT], settings),
            "engagement",
        )
        if kpi["members"] < settings.min_members:
            continue
        parent = row.get("parent") or ALL_USERS
        if parent in kpis and kpis[parent]["members"] - kpi["members"] >= settings.min_members:
            alerts += _distinct_alert(
                row,
                difference(kpi, kpis[parent], other=parent, alpha=settings.alpha, subtract=True),
                "parent",
            )
        group = row.get("parent") or row.get("exclusive_group")
        if group:
            by_group.setdefault(group, []).append(row)
    for rows in by_group.values():
        rows = sorted(rows, key=lambda r: r["segment_id"])
        for i, a in enumerate(rows):
            for b in rows[i + 1 :]:
                found = difference(
                    kpis[a["segment_id"]],
                    kpis[b["segment_id"]],
                    other=b["segment_id"],
                    alpha=settings.alpha,
                    subtract=False,
                )
                alerts += _distinct_alert(a, found, "sibling")
    return alerts


def run_health(
    spark: SparkSession, cfg: Config, *, as_of: datetime, run_id: str | None = None
) -> HealthReport:
    """KPIs and alerts of every segment the catalog has at `as_of`; replaces that as-of's
    rows of gold/segment_kpis and gold/segment_alerts."""
    root = cfg.lake.root
    as_of = naive_utc(as_of)
    run_id = run_id or new_run_id()
    if not lake.table_exists(spark, root, lake.SEGMENT_CATALOG):
        raise FileNotFoundError(
            f"no gold/segment_catalog under {root}: run `microseg segments run --as-of T` first"
        )
    catalog_df = lake.read_table(spark, root, lake.SEGMENT_CATALOG).filter(
        (F.col("as_of") <= F.lit(as_of)) & (F.col("status") == "active")
    )
    rows = catalog_df.select(
        "as_of", "segment_id", "source", "size", "parent", "exclusive_group"
    ).collect()
    current = [r.asDict() for r in rows if r.as_of == as_of]
    if not current:
        raise ValueError(
            f"no active segment in gold/segment_catalog at {as_of.isoformat()}: run the "
            "segments, clusters or propensity scores of that as-of first"
        )
    sizes: dict[str, list[tuple[float, float]]] = {}
    for r in sorted(rows, key=lambda r: r.as_of):
        if r.as_of < as_of:
            sizes.setdefault(r.segment_id, []).append((_days(r.as_of), float(r.size)))
    members_df = (
        lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP)
        .filter(valid_at(as_of))
        .filter(F.col("segment_id").isin([r["segment_id"] for r in current]))
        .select("user_key", "segment_id", "source")
    )
    features_df = snapshots.snapshot(spark, root, as_of, columns=list(KPI_FEATURES))
    kpi_rows = [r.asDict() for r in segment_kpis(members_df, features_df).collect()]
    kpis = {r["segment_id"]: r for r in kpi_rows}
    engagement: dict[str, list[tuple[float, float]]] = {}
    if lake.table_exists(spark, root, lake.SEGMENT_KPIS):
        earlier = (
            lake.read_table(spark, root, lake.SEGMENT_KPIS)
            .filter(F.col("as_of") < F.lit(as_of))
            .select("as_of", "segment_id", ENGAGEMENT)
            .orderBy("as_of")
            .collect()
        )
        for r in earlier:
            if r[ENGAGEMENT] is not None:
                engagement.setdefault(r.segment_id, []).append((_days(r.as_of), r[ENGAGEMENT]))
    alerts = find_alerts(current, kpis, sizes, engagement, at=_days(as_of), settings=cfg.health)
    stamp = {"as_of": as_of, "run_id": run_id}
    _replace(
        spark,
        root,
        lake.SEGMENT_KPIS,
        [
            {**r, **stamp, "as_of_date": as_of.date(), "computed_at": datetime.now()}
            for r in kpi_rows
        ],
        as_of,
    )
    _replace(
        spark,
        root,
        lake.SEGMENT_ALERTS,
        [{**a, **stamp, "detected_at": datetime.now()} for a in alerts],
        as_of,
    )
    return HealthReport(run_id, as_of, len(current), kpi_rows, alerts)


def _replace(spark: SparkSession, root: str, table: lake.Table, rows: list[dict], as_of) -> None:
    """Replace the table's rows of `as_of` with rows (one commit)."""
    schema = table.schema
    rows_df = spark.createDataFrame([[r.get(f.name) for f in schema.fields] for r in rows], schema)
    lake.ensure_table(spark, root, table)
    (
        rows_df.write.format("delta")
        .mode("overwrite")
        .option("replaceWhere", f"as_of = TIMESTAMP '{as_of.isoformat(sep=' ')}'")
        .save(lake.table_path(root, table))
    )
    durable(table.name)
