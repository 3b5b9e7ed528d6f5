"""The one membership writer: the pure diff, and scopes that never touch each other.

Every expected row is written out by hand.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.segments import membership
from microseg.segments.membership import Scope

T1 = datetime(2026, 10, 1)
T2 = datetime(2026, 10, 8)
T3 = datetime(2026, 10, 15)

PREVIOUS = "user_key string, segment_id string, definition_version string"
MEMBERS = "user_key string, segment_id string, score double, fallback boolean"
HELD = "user_key string, segment_id string, reason string"


def frame(spark, rows, schema):
    return spark.createDataFrame(rows, schema)


def test_diff_of_a_batch_run(spark):
    previous = frame(
        spark,
        [
            ("u1", "buyers", "v1"),  # stays, same version: nothing
            ("u2", "buyers", "v1"),  # leaves
            ("u3", "vip", "w1"),  # stays, vip's version changes: new interval, no change row
            ("u4", "vip", "w1"),  # held back (still qualifies, below minimum size)
            ("u5", "gone", "g1"),  # segment no longer published: retired
        ],
        PREVIOUS,
    )
    members = frame(
        spark,
        [
            ("u1", "buyers", None, False),
            ("u3", "vip", 0.5, False),
            ("u6", "buyers", None, True),  # enters by parent fallback
            ("u7", "vip", 0.9, False),  # enters a segment whose version changed
        ],
        MEMBERS,
    )
    held = frame(spark, [("u4", "vip", "below_minimum_size")], HELD)
    diff = membership.membership_diff(
        previous,
        members,
        as_of=T2,
        versions={"buyers": "v1", "vip": "w2"},
        held_df=held,
    )
    assert_df_equality(
        diff.closes,
        frame(
            spark,
            [("u2", "buyers", T2), ("u3", "vip", T2), ("u4", "vip", T2), ("u5", "gone", T2)],
            "user_key string, segment_id string, valid_to timestamp",
        ),
        ignore_row_order=True,
        ignore_nullable=True,
    )
    assert_df_equality(
        diff.opens,
        frame(
            spark,
            [
                ("u3", "vip", "w2", 0.5, T2, None),
                ("u6", "buyers", "v1", None, T2, None),
                ("u7", "vip", "w2", 0.9, T2, None),
            ],
            "user_key string, segment_id string, definition_version string, score double, "
            "valid_from timestamp, valid_to timestamp",
        ),
        ignore_row_order=True,
        ignore_nullable=True,
    )
    assert_df_equality(
        diff.changes,
        frame(
            spark,
            [
                ("u6", "buyers", "enter", "parent_fallback", T2, "v1"),
                ("u7", "vip", "enter", "definition_changed", T2, "w2"),
                ("u2", "buyers", "exit", "no_longer_matched", T2, "v1"),
                ("u4", "vip", "exit", "below_minimum_size", T2, "w1"),
                ("u5", "gone", "exit", "segment_retired", T2, "g1"),
            ],
            "user_key string, segment_id string, change string, reason string, "
            "changed_at timestamp, definition_version string",
        ),
        ignore_row_order=True,
        ignore_nullable=True,
    )


def test_diff_of_nothing_new_is_empty(spark):
    previous = frame(spark, [("u1", "buyers", "v1")], PREVIOUS)
    members = frame(spark, [("u1", "buyers", None, False)], MEMBERS)
    diff = membership.membership_diff(previous, members, as_of=T2, versions={"buyers": "v1"})
    assert diff.is_empty()


def intervals(spark, cfg):
    rows = (
        lake.read_table(spark, cfg.lake.root, lake.SEGMENT_MEMBERSHIP)
        .select("source", "scope", "user_key", "segment_id", "valid_from", "valid_to")
        .collect()
    )
    return sorted(tuple(r) for r in rows)


def changes(spark, cfg):
    rows = (
        lake.read_table(spark, cfg.lake.root, lake.SEGMENT_CHANGES)
        .select("scope", "user_key", "segment_id", "change", "reason", "changed_at")
        .collect()
    )
    return sorted(tuple(r) for r in rows)


def write(spark, cfg, scope, as_of, members, run_id="r"):
    """Members: segment_id -> [(user_key, score)]."""
    rows = [(u, sid, score, False) for sid, users in members.items() for u, score in users]
    return membership.write_membership(
        spark,
        cfg.lake.root,
        scope=scope,
        as_of=as_of,
        run_id=run_id,
        members_df=frame(spark, rows, MEMBERS),
        versions={sid: f"{scope.name}-v1" for sid in members},
    )


@pytest.fixture(scope="module")
def scoped_lake(spark, tmp_path_factory):
    """Two cluster models, two propensity targets (scored latest first) and a rule run in
    between, each in its own scope."""
    from tests.conftest import make_config

    cfg = make_config(tmp_path_factory.mktemp("scopes"))
    write(spark, cfg, Scope("cluster", "behavior"), T1, {"behavior_c0": [("u1", 0.1)]})
    write(spark, cfg, Scope("cluster", "value"), T1, {"value_c0": [("u1", 0.2), ("u2", 0.3)]})
    # target B at T3 first, then target A at the earlier T2: per scope, both move forward
    write(spark, cfg, Scope("propensity", "churn_30d"), T3, {"churn_top": [("u2", 0.8)]})
    write(spark, cfg, Scope("propensity", "purchase_7d"), T2, {"purchase_top": [("u1", 0.7)]})
    write(spark, cfg, Scope("rule", "segments"), T2, {"buyers": [("u2", None)]})
    # a second run of model "behavior": u2 joins c0; model "value" is untouched
    stats = write(
        spark,
        cfg,
        Scope("cluster", "behavior"),
        T3,
        {"behavior_c0": [("u1", 0.1), ("u2", 0.4)]},
    )
    return cfg, stats


def test_scopes_are_independent(spark, scoped_lake):
    cfg, stats = scoped_lake
    assert intervals(spark, cfg) == [
        ("cluster", "behavior", "u1", "behavior_c0", T1, None),
        ("cluster", "behavior", "u2", "behavior_c0", T3, None),
        ("cluster", "value", "u1", "value_c0", T1, None),
        ("cluster", "value", "u2", "value_c0", T1, None),
        ("propensity", "churn_30d", "u2", "churn_top", T3, None),
        ("propensity", "purchase_7d", "u1", "purchase_top", T2, None),
        ("rule", "segments", "u2", "buyers", T2, None),
    ]
    assert changes(spark, cfg) == [
        ("behavior", "u1", "behavior_c0", "enter", "cluster_assigned", T1),
        ("behavior", "u2", "behavior_c0", "enter", "cluster_assigned", T3),
        ("churn_30d", "u2", "churn_top", "enter", "propensity_assigned", T3),
        ("purchase_7d", "u1", "purchase_top", "enter", "propensity_assigned", T2),
        ("segments", "u2", "buyers", "enter", "rule_matched", T2),
        ("value", "u1", "value_c0", "enter", "cluster_assigned", T1),
        ("value", "u2", "value_c0", "enter", "cluster_assigned", T1),
    ]
    assert stats == {
        "behavior_c0": membership.SegmentStats("behavior_c0", 2, 1, 1, 0),
    }


def test_runs_move_forward_per_scope(spark, scoped_lake):
    cfg, _ = scoped_lake
    with pytest.raises(ValueError, match="cluster 'behavior' already runs to 2026-10-15"):
        write(spark, cfg, Scope("cluster", "behavior"), T2, {"behavior_c0": [("u3", 0.1)]})
    # re-running an as-of that already ran, with the same members, changes nothing
    before = intervals(spark, cfg)
    write(spark, cfg, Scope("propensity", "purchase_7d"), T2, {"purchase_top": [("u1", 0.7)]})
    assert intervals(spark, cfg) == before


def test_apply_is_idempotent(spark, tmp_path):
    from tests.conftest import make_config

    cfg = make_config(tmp_path)
    scope = Scope("stream", "segments")
    diff = membership.MembershipDiff(
        closes=frame(spark, [], "user_key string, segment_id string, valid_to timestamp"),
        opens=frame(
            spark,
            [("u1", "cart", "v1", None, T1, T2), ("u1", "cart", "v1", None, T3, None)],
            "user_key string, segment_id string, definition_version string, score double, "
            "valid_from timestamp, valid_to timestamp",
        ),
        changes=frame(
            spark,
            [
                ("u1", "cart", "enter", "rule_matched", T1, "v1"),
                ("u1", "cart", "exit", "no_longer_matched", T2, "v1"),
                ("u1", "cart", "enter", "rule_matched", T3, "v1"),
            ],
            "user_key string, segment_id string, change string, reason string, "
            "changed_at timestamp, definition_version string",
        ),
    )
    for _ in range(2):
        membership.apply_diff(spark, cfg.lake.root, scope, diff, run_id="r1", since=T1)
    assert intervals(spark, cfg) == [
        ("stream", "segments", "u1", "cart", T1, T2),
        ("stream", "segments", "u1", "cart", T3, None),
    ]
    assert len(changes(spark, cfg)) == 3
    current = lake.read_table(spark, cfg.lake.root, lake.SEGMENT_MEMBERSHIP).filter(
        F.col("is_current")
    )
    assert [(r.valid_from, r.closed_by_run_id) for r in current.collect()] == [(T3, None)]
