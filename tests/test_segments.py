"""Publishing rule segments: guards, versioned membership, changes, catalog, queries.

Three successive runs over hand-written features (written straight into gold/user_features)
with changing data and, at the third, a changed definition. Every expected row is written
out below.
"""

from __future__ import annotations

import textwrap
from datetime import datetime, timedelta

import pytest
from pyspark.sql import functions as F
from tests.test_sessions import ev, write_bronze

from microseg.core import lake
from microseg.features.job import run_features
from microseg.segments import membership
from microseg.segments.evaluate import run_segments

T1 = datetime(2026, 10, 1)
T2 = datetime(2026, 10, 8)
T3 = datetime(2026, 10, 15)

CATALOG = """\
segments:
  - id: buyers
    name: Buyers
    conditions: [{feature: orders_lifetime, gte: %d}]
  - id: big_buyers
    name: Big buyers
    parent: buyers
    min_size: 2
    conditions: [{feature: revenue_lifetime, gte: 100}]
  - id: regular
    name: Regular
    exclusive: {group: tier, priority: 2}
    conditions: [{feature: orders_lifetime, gte: 1}]
  - id: vip
    name: VIP
    parent: regular
    min_size: 2
    exclusive: {group: tier, priority: 1}
    conditions: [{feature: revenue_lifetime, gte: 500}]
"""

# user -> (orders_lifetime, revenue_lifetime) per as-of
FEATURES = {
    T1: {"u1": (1, 50.0), "u2": (2, 550.0), "u3": (3, 600.0), "u4": (0, 0.0)},
    T2: {"u1": (1, 50.0), "u2": (2, 150.0), "u3": (3, 600.0), "u4": (1, 10.0)},
    T3: {"u1": (1, 700.0), "u2": (2, 150.0), "u3": (3, 600.0), "u4": (1, 10.0)},
}


def write_features(spark, cfg, as_of, rows):
    df = spark.createDataFrame(
        [(user, orders, revenue) for user, (orders, revenue) in rows.items()],
        "user_key string, orders_lifetime int, revenue_lifetime double",
    ).select(
        "user_key",
        F.lit(as_of).alias("as_of"),
        F.lit(as_of.date()).alias("as_of_date"),
        F.current_timestamp().alias("computed_at"),
        F.lit("test").alias("run_id"),
        "orders_lifetime",
        "revenue_lifetime",
    )
    (
        df.write.format("delta")
        .mode("append")
        .partitionBy("as_of_date")
        .save(lake.table_path(cfg.lake.root, lake.USER_FEATURES))
    )


def run(spark, cfg, tmp_path, as_of, min_orders=1):
    path = tmp_path / "segments.yaml"
    path.write_text(CATALOG % min_orders)
    return run_segments(spark, cfg, as_of=as_of, path=str(path))


def table(spark, cfg, t):
    return lake.read_table(spark, cfg.lake.root, t)


def version_of(spark, cfg, t):
    from delta.tables import DeltaTable

    path = lake.table_path(cfg.lake.root, t)
    return DeltaTable.forPath(spark, path).history(1).first()["version"]


@pytest.fixture(scope="module")
def three_runs(spark, tmp_path_factory):
    from tests.conftest import make_config

    tmp_path = tmp_path_factory.mktemp("segments")
    cfg = make_config(tmp_path)
    for as_of, rows in FEATURES.items():
        write_features(spark, cfg, as_of, rows)
    reports = [
        run(spark, cfg, tmp_path, T1),
        run(spark, cfg, tmp_path, T2),
        run(spark, cfg, tmp_path, T3, min_orders=2),  # buyers' definition changes
    ]
    return cfg, tmp_path, reports


def test_changes_over_three_runs(spark, three_runs):
    cfg, _, _ = three_runs
    got = sorted(
        (r.changed_at, r.segment_id, r.user_key, r.change, r.reason)
        for r in table(spark, cfg, lake.SEGMENT_CHANGES).collect()
    )
    assert got == sorted(
        [
            (T1, "buyers", "u1", "enter", "rule_matched"),
            (T1, "buyers", "u2", "enter", "rule_matched"),
            (T1, "buyers", "u3", "enter", "rule_matched"),
            (T1, "big_buyers", "u2", "enter", "rule_matched"),
            (T1, "big_buyers", "u3", "enter", "rule_matched"),
            # u2 and u3 match regular too, but vip outranks it in group "tier"
            (T1, "regular", "u1", "enter", "rule_matched"),
            (T1, "vip", "u2", "enter", "rule_matched"),
            (T1, "vip", "u3", "enter", "rule_matched"),
            # T2: u4 buys; vip matches only u3, below its minimum of 2: not published
            (T2, "buyers", "u4", "enter", "rule_matched"),
            (T2, "vip", "u2", "exit", "no_longer_matched"),
            (T2, "vip", "u3", "exit", "below_minimum_size"),
            (T2, "regular", "u2", "enter", "rule_matched"),
            (T2, "regular", "u3", "enter", "parent_fallback"),
            (T2, "regular", "u4", "enter", "rule_matched"),
            # T3: buyers now needs 2 orders; u2 and u3 stay (new interval, no change row)
            (T3, "buyers", "u1", "exit", "definition_changed"),
            (T3, "buyers", "u4", "exit", "definition_changed"),
            # T3: u1 spends 700: vip matches 2 users again and outranks regular
            (T3, "vip", "u1", "enter", "rule_matched"),
            (T3, "vip", "u3", "enter", "rule_matched"),
            (T3, "regular", "u1", "exit", "outranked_in_exclusive_group"),
            (T3, "regular", "u3", "exit", "outranked_in_exclusive_group"),
        ]
    )


def test_membership_history_intervals(spark, three_runs):
    cfg, _, reports = three_runs
    rows = table(spark, cfg, lake.SEGMENT_MEMBERSHIP).collect()
    v1 = {s.segment_id: s.version for s in reports[0].segments}
    v3 = {s.segment_id: s.version for s in reports[2].segments}
    assert v1["buyers"] != v3["buyers"] and v1["big_buyers"] != v3["big_buyers"]
    assert v1["vip"] == v3["vip"] and v1["regular"] == v3["regular"]
    version_name = {v1["buyers"]: "b1", v3["buyers"]: "b3", v1["big_buyers"]: "bb1"}
    version_name |= {v3["big_buyers"]: "bb3", v1["vip"]: "v", v1["regular"]: "r"}
    got = sorted(
        (
            r.segment_id,
            r.user_key,
            version_name[r.definition_version],
            r.valid_from,
            r.valid_to,
            r.is_current,
            r.source,
        )
        for r in rows
    )
    assert got == sorted(
        [
            ("buyers", "u1", "b1", T1, T3, False, "rule"),
            ("buyers", "u2", "b1", T1, T3, False, "rule"),
            ("buyers", "u3", "b1", T1, T3, False, "rule"),
            ("buyers", "u4", "b1", T2, T3, False, "rule"),
            ("buyers", "u2", "b3", T3, None, True, "rule"),
            ("buyers", "u3", "b3", T3, None, True, "rule"),
            ("big_buyers", "u2", "bb1", T1, T3, False, "rule"),
            ("big_buyers", "u3", "bb1", T1, T3, False, "rule"),
            ("big_buyers", "u2", "bb3", T3, None, True, "rule"),
            ("big_buyers", "u3", "bb3", T3, None, True, "rule"),
            ("vip", "u2", "v", T1, T2, False, "rule"),
            ("vip", "u3", "v", T1, T2, False, "rule"),
            ("vip", "u1", "v", T3, None, True, "rule"),
            ("vip", "u3", "v", T3, None, True, "rule"),
            ("regular", "u1", "r", T1, T3, False, "rule"),
            ("regular", "u2", "r", T2, None, True, "rule"),
            ("regular", "u3", "r", T2, T3, False, "rule"),
            ("regular", "u4", "r", T2, None, True, "rule"),
        ]
    )


def test_catalog_sizes_status_stability_and_overlap(spark, three_runs):
    cfg, _, _ = three_runs
    rows = {(r.as_of, r.segment_id): r for r in table(spark, cfg, lake.SEGMENT_CATALOG).collect()}
    assert len(rows) == 12

    def summary(as_of, segment_id):
        r = rows[(as_of, segment_id)]
        return (r.status, r.matched, r.size, r.previous_size, r.entered, r.exited, r.stability)

    assert summary(T1, "buyers") == ("active", 3, 3, None, 3, 0, None)
    assert summary(T1, "vip") == ("active", 2, 2, None, 2, 0, None)
    assert summary(T1, "regular") == ("active", 3, 1, None, 1, 0, None)
    assert summary(T2, "buyers") == ("active", 4, 4, 3, 1, 0, 1.0)
    assert summary(T2, "vip") == ("below_minimum_size", 1, 0, 2, 0, 2, 0.0)
    assert summary(T2, "regular") == ("active", 4, 4, 1, 3, 0, 1.0)
    assert summary(T3, "buyers") == ("active", 2, 2, 4, 0, 2, 0.5)
    assert summary(T3, "big_buyers") == ("active", 2, 2, 2, 0, 0, 1.0)
    assert summary(T3, "vip") == ("active", 2, 2, 0, 2, 0, None)
    assert summary(T3, "regular") == ("active", 4, 2, 4, 0, 2, 0.5)
    assert rows[(T2, "vip")].status_reason == (
        "1 users matched, minimum 2 (min_size 2); members fall back to 'regular'"
    )
    assert rows[(T2, "vip")].overlap is None  # not published
    assert rows[(T2, "buyers")].overlap == {"big_buyers": 0.5, "regular": 1.0}
    assert rows[(T1, "vip")].overlap == {"buyers": 0.666667, "big_buyers": 1.0, "regular": 0.0}
    assert rows[(T3, "buyers")].definition_version != rows[(T1, "buyers")].definition_version
    assert '"gte": 2' in rows[(T3, "buyers")].definition


def test_point_in_time_queries(spark, three_runs):
    cfg, _, reports = three_runs
    root = cfg.lake.root

    def users(df):
        return sorted(r.user_key for r in df.collect())

    b1 = next(s.version for s in reports[0].segments if s.segment_id == "buyers")
    assert users(membership.members_at(spark, root, "buyers", T1 + timedelta(days=1))) == [
        "u1",
        "u2",
        "u3",
    ]
    assert users(membership.members_at(spark, root, "buyers", T2)) == ["u1", "u2", "u3", "u4"]
    assert users(membership.members_at(spark, root, "buyers", T3)) == ["u2", "u3"]
    assert users(membership.members_at(spark, root, "buyers", T3, version=b1)) == []
    assert users(membership.members_at(spark, root, "buyers", T2, version=b1)) == [
        "u1",
        "u2",
        "u3",
        "u4",
    ]
    assert users(membership.members_at(spark, root, "vip", T2 - timedelta(seconds=1))) == [
        "u2",
        "u3",
    ]
    assert users(membership.members_at(spark, root, "vip", T2)) == []
    assert users(membership.members_at(spark, root, "buyers", T1 - timedelta(days=1))) == []
    assert users(membership.current_members(spark, root, "regular")) == ["u2", "u4"]
    assert users(membership.current_members(spark, root, "vip")) == ["u1", "u3"]
    history = [
        (r.segment_id, r.valid_from, r.valid_to)
        for r in membership.user_history(spark, root, "u2").collect()
    ]
    assert history == [
        ("big_buyers", T1, T3),
        ("buyers", T1, T3),
        ("vip", T1, T2),
        ("regular", T2, None),
        ("big_buyers", T3, None),
        ("buyers", T3, None),
    ]


def test_change_data_feed_shows_the_last_run(spark, three_runs):
    cfg, _, _ = three_runs
    path = lake.table_path(cfg.lake.root, lake.SEGMENT_MEMBERSHIP)
    latest = version_of(spark, cfg, lake.SEGMENT_MEMBERSHIP)
    feed = (
        spark.read.format("delta")
        .option("readChangeFeed", "true")
        .option("startingVersion", latest)
        .load(path)
        .groupBy("_change_type")
        .count()
        .collect()
    )
    # T3 closed 4 + 2 + 2 intervals (buyers and big_buyers v1, regular) and opened 2 + 2 + 2
    # (buyers and big_buyers under the new versions, vip)
    assert {r._change_type: r["count"] for r in feed} == {
        "insert": 6,
        "update_preimage": 8,
        "update_postimage": 8,
    }


def test_rerun_of_the_same_as_of_changes_nothing_and_going_back_is_refused(spark, three_runs):
    cfg, tmp_path, reports = three_runs
    tables = (lake.SEGMENT_MEMBERSHIP, lake.SEGMENT_CHANGES)
    before = {t.name: version_of(spark, cfg, t) for t in tables}
    catalog_before = sorted(
        table(spark, cfg, lake.SEGMENT_CATALOG).drop("run_id", "recorded_at").collect()
    )
    again = run(spark, cfg, tmp_path, T3, min_orders=2)
    assert {t.name: version_of(spark, cfg, t) for t in tables} == before
    assert (
        sorted(table(spark, cfg, lake.SEGMENT_CATALOG).drop("run_id", "recorded_at").collect())
        == catalog_before
    )
    assert [(s.segment_id, s.size, s.entered, s.exited) for s in again.segments] == [
        (s.segment_id, s.size, s.entered, s.exited) for s in reports[2].segments
    ]
    # an earlier as-of that already ran: also a no-op
    run(spark, cfg, tmp_path, T2)
    assert {t.name: version_of(spark, cfg, t) for t in tables} == before
    # a new as-of before the latest would rewrite history: refused
    between = T2 + timedelta(days=1)
    write_features(spark, cfg, between, {**FEATURES[T2], "u1": (0, 0.0)})
    with pytest.raises(ValueError, match="already runs to 2026-10-15T00:00:00; a run as of 2026"):
        run(spark, cfg, tmp_path, between)
    assert {t.name: version_of(spark, cfg, t) for t in tables} == before


def test_missing_features_name_the_command_to_run(spark, tmp_path):
    from tests.conftest import make_config

    cfg = make_config(tmp_path)
    write_features(spark, cfg, T1, FEATURES[T1])
    with pytest.raises(FileNotFoundError, match=r"microseg features --as-of 2026-10-08T00:00:00Z"):
        run(spark, cfg, tmp_path, T2)


def test_segments_from_real_features_and_events(spark, tmp_path):
    """End to end over bronze events: features job, then event and recency rules."""
    from tests.conftest import make_config

    cfg = make_config(tmp_path)
    day = 24 * 60
    # ev(..., minute) is 2026-09-01 10:00 + minutes; as-of 2026-09-05 10:00 = minute 4 * day
    write_bronze(
        spark,
        cfg,
        [
            ev("a1", 4 * day - 120, "add_to_cart", user="u1", product="p1", price=5.0),
            ev("b1", 4 * day - 300, "add_to_cart", user="u2", product="p1", price=5.0),
            ev("b2", 4 * day - 200, "purchase", user="u2", product="p1", price=5.0),
            ev("c1", 0, "purchase", user="u3", product="p2", price=7.0),
            ev("c2", 4 * day, "add_to_cart", user="u3", product="p2", price=7.0),  # at T
        ],
    )
    as_of = datetime(2026, 9, 5, 10, 0)
    run_features(spark, cfg, as_of=as_of)
    path = tmp_path / "rules.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            segments:
              - id: abandoners
                name: Abandoners
                conditions:
                  - {event: add_to_cart, within: 24h, at_least: 1}
                  - {event: purchase, since_last: add_to_cart, at_most: 0}
              - id: buyers_3d
                name: Bought in the last 3 days
                conditions:
                  - {last: purchase, within: 3d}
              - id: lapsing
                name: Bought, then quiet for 3 days
                conditions:
                  - {feature: orders_lifetime, gte: 1}
                  - {last: any, older_than: 3d}
            """
        )
    )
    report = run_segments(spark, cfg, as_of=as_of, path=str(path))
    assert [(s.segment_id, s.size) for s in report.segments] == [
        ("abandoners", 1),
        ("buyers_3d", 1),
        ("lapsing", 1),
    ]
    got = sorted(
        (r.segment_id, r.user_key) for r in table(spark, cfg, lake.SEGMENT_MEMBERSHIP).collect()
    )
    assert got == [("abandoners", "u1"), ("buyers_3d", "u2"), ("lapsing", "u3")]
