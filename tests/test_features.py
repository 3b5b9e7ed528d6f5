"""Point-in-time features with hand-written expectations."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from pyspark.sql import functions as F
from tests.conftest import make_config
from tests.test_sessions import ev, events_df, write_bronze

from microseg.core import lake
from microseg.core.config import ConfigError
from microseg.features.job import run_features
from microseg.features.user_features import (
    FEATURES,
    compute_features,
    keyed_events_before,
    select_features,
)

AS_OF = datetime(2026, 9, 1, 10, 0)  # T0 of test_sessions: ev(..., minute) is T0 + minutes
DAY = 24 * 60


def features_of(spark, rows, as_of=AS_OF, names=None):
    df = events_df(spark, rows)
    out = compute_features(
        keyed_events_before(df, as_of),
        as_of=as_of,
        features=select_features(names),
        inactivity_timeout=timedelta(minutes=30),
        max_session_length=timedelta(hours=6),
    )
    return {r.user_key: r.asDict() for r in out.collect()}


BASE = [
    # u1: bought 10.0 x 2 one day before T, viewed p1 four times in the last week, never bought it
    ev("a1", -DAY - 10, "product_view", user="u1", product="p9", category="books", device="mobile"),
    ev("a2", -DAY - 5, "add_to_cart", user="u1", product="p9", category="books", price=10.0, qty=2),
    ev("a3", -DAY, "purchase", user="u1", product="p9", category="books", price=10.0, qty=2),
    *[
        ev(
            f"v{i}",
            -3 * DAY + i,
            "product_view",
            user="u1",
            product="p1",
            category="toys",
            device="mobile",
        )
        for i in range(4)
    ],
    # p2 viewed five times and bought: not "unbought"
    *[
        ev(f"w{i}", -2 * DAY + i, "product_view", user="u1", product="p2", category="toys")
        for i in range(5)
    ],
    ev("w9", -2 * DAY + 6, "purchase", user="u1", product="p2", category="toys", price=4.0),
    # p3 viewed six times, but eight days ago
    *[
        ev(f"x{i}", -8 * DAY + i, "product_view", user="u1", product="p3", category="toys")
        for i in range(6)
    ],
    # u2: one cart add 40 days ago, abandoned
    ev(
        "b1",
        -40 * DAY,
        "add_to_cart",
        user="u2",
        product="p5",
        category="home",
        price=3.0,
        qty=1,
        device="desktop",
    ),
]


def test_features_by_hand(spark):
    got = features_of(spark, BASE)
    u1, u2 = got["u1"], got["u2"]
    assert u1["orders_lifetime"] == 2 and u1["orders_7d"] == 2 and u1["orders_30d"] == 2
    assert u1["revenue_lifetime"] == pytest.approx(24.0)
    assert u1["avg_order_value_lifetime"] == pytest.approx(12.0)
    assert u1["days_since_last_purchase"] == pytest.approx(1.0)
    assert u1["days_since_last_event"] == pytest.approx(1.0)
    assert u1["tenure_days"] == pytest.approx(8.0)
    assert u1["sessions_lifetime"] == 4 and u1["sessions_7d"] == 3
    assert u1["max_views_one_product_unbought_7d"] == 4
    assert u1["distinct_categories"] == 2
    assert (u1["top_category"], u1["top_category_share"]) == ("toys", pytest.approx(16 / 19))
    assert u1["cart_abandoned_sessions_lifetime"] == 0
    assert u2["orders_lifetime"] == 0 and u2["avg_order_value_lifetime"] is None
    assert u2["days_since_last_purchase"] is None
    assert (
        u2["cart_abandoned_sessions_lifetime"] == 1 and u2["cart_abandonment_rate_lifetime"] == 1.0
    )
    assert u2["sessions_30d"] == 0 and u2["sessions_90d"] == 1
    assert u2["recency_score"] is None and u1["recency_score"] is not None
    assert u2["desktop_session_share"] == 1.0 and u2["mobile_session_share"] == 0.0
    # purchase history: u1's purchase sessions start at T - 2 days (w0) and T - 1 day - 10 min
    # (a1), on two UTC days; the gap between them is 1 day less 10 minutes
    gap = 1 - 10 / DAY
    assert u1["days_since_first_purchase"] == pytest.approx(2.0)
    assert u1["order_days_lifetime"] == 2
    assert u1["mean_days_between_orders"] == pytest.approx(gap)
    assert u1["days_between_last_two_orders"] == pytest.approx(gap)
    # both orders in the last 30 days, none in the 60 before
    assert (u1["orders_trend_30d"], u1["revenue_trend_30d"]) == (2.0, pytest.approx(24.0))
    assert (u2["days_since_first_purchase"], u2["order_days_lifetime"]) == (None, 0)
    assert (u2["mean_days_between_orders"], u2["days_between_last_two_orders"]) == (None, None)
    assert (u2["orders_trend_30d"], u2["revenue_trend_30d"]) == (0.0, 0.0)


def test_inter_purchase_gaps_of_three_orders(spark):
    # purchase sessions 30, 20 and 5 days before T (more than 30 minutes apart): mean gap
    # (30 - 5) / 2 = 12.5 days, last gap 15 days; orders_30d counts the three (the window is
    # inclusive at T - 30 days), orders_90d too: trend 3 - 0 = 3
    rows = [
        ev(f"p{d}", -d * DAY, "purchase", user="u3", product="p1", category="toys", price=5.0)
        for d in (30, 20, 5)
    ]
    u3 = features_of(spark, rows)["u3"]
    assert u3["days_since_first_purchase"] == pytest.approx(30.0)
    assert u3["order_days_lifetime"] == 3
    assert u3["mean_days_between_orders"] == pytest.approx(12.5)
    assert u3["days_between_last_two_orders"] == pytest.approx(15.0)
    assert u3["orders_trend_30d"] == 3.0
    # a fourth order 50 days before T: 3 in the last 30 days, 1 in the 60 before -> 3 - 1/2
    u4 = features_of(
        spark,
        [*rows, ev("p50", -50 * DAY, "purchase", user="u3", product="p1", price=5.0)],
    )["u3"]
    assert u4["orders_trend_30d"] == 2.5
    assert u4["revenue_trend_30d"] == pytest.approx(15.0 - 5.0 / 2)
    assert u4["mean_days_between_orders"] == pytest.approx((50 - 5) / 3)


def test_events_at_or_after_as_of_change_nothing(spark):
    later = [
        ev("z1", 0, "purchase", user="u1", product="p1", category="toys", price=99.0),  # at T
        ev("z2", 1, "product_view", user="u1", product="p1", category="toys"),
        ev("z3", 5, "purchase", user="u3", product="p1", price=5.0),  # a user only after T
        ev("z4", 2, "page_view", user="u9", anon="shared"),  # identity learned after T
    ]
    assert features_of(spark, BASE + later) == features_of(spark, BASE)


def test_window_boundary_is_inclusive_at_t_minus_n_days(spark):
    rows = [
        ev("p1", -7 * DAY, "purchase", user="u1", price=1.0),
        ev("p2", -7 * DAY - 1, "purchase", user="u2", price=1.0),
    ]
    got = features_of(spark, rows, names=("orders_7d", "orders_30d"))
    assert (got["u1"]["orders_7d"], got["u2"]["orders_7d"]) == (1, 0)
    assert (got["u1"]["orders_30d"], got["u2"]["orders_30d"]) == (1, 1)


def test_rfm_quintiles_among_buyers(spark):
    rows = [
        ev(f"o{i}", -i * DAY, "purchase", user=f"u{i}", price=float(10 * i)) for i in range(1, 6)
    ]
    got = features_of(spark, rows, names=("recency_score", "monetary_score"))
    # u1 bought most recently and spent least; u5 bought longest ago and spent most
    assert [got[f"u{i}"]["recency_score"] for i in range(1, 6)] == [5, 4, 3, 2, 1]
    assert [got[f"u{i}"]["monetary_score"] for i in range(1, 6)] == [1, 2, 3, 4, 5]


def test_unknown_feature_in_config_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown feature\(s\) \['revenu_7d'\]"):
        select_features(("revenue_7d", "revenu_7d"))


def test_run_writes_selected_features_and_rerun_replaces_its_as_of(spark, tmp_path):
    cfg = make_config(tmp_path, "features.include=[orders_lifetime, revenue_lifetime]")
    write_bronze(spark, cfg, BASE)
    run_features(spark, cfg, as_of=AS_OF)
    run_features(spark, cfg, as_of=AS_OF)
    run_features(spark, cfg, as_of=AS_OF - timedelta(days=2))
    table = lake.read_table(spark, cfg.lake.root, lake.USER_FEATURES)
    assert table.columns[:4] == ["user_key", "as_of", "orders_lifetime", "revenue_lifetime"]
    counts = {r.as_of: r["count"] for r in table.groupBy("as_of").count().collect()}
    assert counts == {AS_OF: 2, AS_OF - timedelta(days=2): 2}
    early = (
        table.filter(F.col("as_of") == AS_OF - timedelta(days=2)).filter("user_key = 'u1'").first()
    )
    assert (early.orders_lifetime, early.revenue_lifetime) == (0, 0.0)


def test_every_feature_has_a_description():
    assert len(FEATURES) > 60
    assert all(f.description for f in FEATURES.values())


def test_events_without_any_id_make_no_user_row(spark):
    rows = [ev("k1", -60, user="u1"), ev("k2", -30)]  # k2: neither user_id nor anonymous_id
    assert sorted(features_of(spark, rows)) == ["u1"]


def test_as_of_means_utc_whatever_the_process_time_zone(tmp_path):
    """PySpark reads naive datetimes in the process's zone; microseg's sessions run in UTC."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, TEST_SETTINGS

    script = (
        "import sys; from datetime import datetime\n"
        "from pyspark.sql import functions as F\n"
        "from microseg.core.config import load_config\n"
        "from microseg.core.spark import build_spark\n"
        "cfg = load_config('conf/local.yaml', sys.argv[1:])\n"
        "spark = build_spark(cfg.spark)\n"
        "t = datetime(2026, 9, 6, 22, 4)\n"
        "row = spark.range(1).select(F.unix_micros(F.lit(t)).alias('us')).first()\n"
        "print(row.us, spark.createDataFrame([(t,)], 'ts timestamp').first().ts)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *TEST_SETTINGS],
        cwd=ROOT,
        env={**os.environ, "TZ": "America/New_York"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # 2026-09-06 22:04 UTC is 1788732240 s after the epoch
    assert result.stdout.split()[-3:] == ["1788732240000000", "2026-09-06", "22:04:00"]
