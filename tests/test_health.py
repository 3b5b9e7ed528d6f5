"""Segment health: the anomaly detector, the chi-square distinctness tests and the KPIs, on
hand-made values."""

from __future__ import annotations

import math

import pytest

from microseg.core.config import HealthConfig
from microseg.segments.health import (
    ALL_USERS,
    anomaly,
    chi_square_p,
    find_alerts,
    forecast,
    segment_kpis,
)

SETTINGS = HealthConfig(min_relative_change=0.2)  # window 12, min_history 4, threshold 4


def test_a_steady_trend_is_forecast_and_a_flat_history_alerts_on_the_relative_change():
    history = [(1, 100), (2, 110), (3, 120), (4, 130), (5, 140)]
    f = forecast(history, 6)
    assert (f.expected, f.spread) == (pytest.approx(150.0), pytest.approx(0.0))
    assert anomaly(history, 6, 150, SETTINGS) is None
    # 20 below the line: less than 20% of 150
    assert anomaly(history, 6, 130, SETTINGS) is None
    found = anomaly(history, 6, 100, SETTINGS)
    assert (found.direction, found.value, found.expected, found.z) == (
        "drop",
        100,
        pytest.approx(150.0),
        None,
    )
    # three runs are not a history
    assert anomaly(history[:3], 4, 10, SETTINGS) is None


def test_noisy_history_uses_the_robust_spread():
    # values 100, 104, 96 twice: the Theil-Sen slope is the median of the 15 pairwise slopes,
    # 0; the intercept the median value, 100; residuals 0, 4, -4, ...: their median absolute
    # deviation is 4, the spread 1.4826 x 4 = 5.9304
    history = [(1, 100), (2, 104), (3, 96), (4, 100), (5, 104), (6, 96)]
    f = forecast(history, 7)
    assert (f.expected, f.spread) == (pytest.approx(100.0), pytest.approx(5.9304))
    # -25: 4.22 spreads and 25% away
    found = anomaly(history, 7, 75, SETTINGS)
    assert (found.direction, found.z) == ("drop", pytest.approx(-25 / 5.9304))
    assert anomaly(history, 7, 125, SETTINGS).direction == "spike"
    # -22: 22% away but 3.71 spreads
    assert anomaly(history, 7, 78, SETTINGS) is None
    # a small segment: 5 users from 12 is 4.7 spreads of 1.48 and 58% away, but not 10 users
    small = [(1, 12), (2, 13), (3, 11), (4, 12), (5, 13), (6, 11)]
    assert anomaly(small, 7, 5, SETTINGS) is not None
    assert anomaly(small, 7, 5, SETTINGS, min_change=10) is None


def test_chi_square_by_hand():
    # [[30, 70], [50, 50]]: chi2 = 200 x (30 x 50 - 70 x 50)^2 / (100 x 100 x 80 x 120) = 25/3;
    # with one degree of freedom p = erfc(sqrt(chi2 / 2))
    assert chi_square_p(30, 100, 50, 100) == pytest.approx(math.erfc(math.sqrt(25 / 6)))
    assert chi_square_p(10, 100, 90, 900) == pytest.approx(1.0)
    assert chi_square_p(0, 10, 0, 10) == 1.0  # nobody bought anywhere: nothing to tell apart


def kpi(members, buyers, active, sessions=2.0):
    return {
        "members": members,
        "buyers_30d": buyers,
        "active_7d": active,
        "sessions_per_user_30d": sessions,
    }


def test_alerts_for_a_segment_like_its_parent_and_like_a_sibling():
    # everyone: 1000 users, 10% bought, 30% active. a has the same rates as the other 900 users;
    # b bought five times as often; c is like a. a, b and c are one exclusive group.
    kpis = {
        ALL_USERS: kpi(1000, 100, 300),
        "a": kpi(100, 10, 30),
        "b": kpi(100, 50, 30),
        "c": kpi(100, 11, 31),
    }
    current = [
        {"segment_id": s, "source": "rule", "size": 100, "parent": None, "exclusive_group": "g"}
        for s in ("a", "b", "c")
    ]
    # a's size history was flat at 200: its 100 is a drop; b's was 100
    sizes = {"a": [(d, 200.0) for d in range(1, 6)], "b": [(d, 100.0) for d in range(1, 6)]}
    alerts = find_alerts(current, kpis, sizes, {}, at=6.0, settings=SETTINGS)
    got = sorted((a["segment_id"], a["alert"], a["other_segment"]) for a in alerts)
    assert got == [
        ("a", "not_distinct_from_parent", ALL_USERS),
        ("a", "not_distinct_from_sibling", "c"),
        ("a", "size_drop", None),
        ("c", "not_distinct_from_parent", ALL_USERS),
    ]
    drop = next(a for a in alerts if a["alert"] == "size_drop")
    assert (drop["value"], drop["expected"], drop["score"]) == (100, pytest.approx(200.0), None)
    assert drop["message"] == "a: size 100 against 200 expected (flat history)"
    parent = next(
        a for a in alerts if a["alert"] == "not_distinct_from_parent" and a["segment_id"] == "a"
    )
    assert parent["score"] == pytest.approx(1.0)  # the same rates exactly


def test_kpis_of_hand_made_members(spark):
    features = spark.createDataFrame(
        [
            # user, orders_30d, revenue_30d, sessions_7d, sessions_30d, sessions_90d
            ("u1", 2, 100.0, 1, 4, 6),
            ("u2", 0, 0.0, 0, 0, 3),
            ("u3", 1, 30.0, 0, 2, 2),
            ("u4", None, None, None, None, None),
        ],
        "user_key string, orders_30d int, revenue_30d double, sessions_7d int, "
        "sessions_30d int, sessions_90d int",
    )
    members = spark.createDataFrame(
        [("u1", "x", "rule"), ("u2", "x", "rule"), ("u9", "x", "rule")],  # u9 has no features
        "user_key string, segment_id string, source string",
    )
    got = {r.segment_id: r.asDict() for r in segment_kpis(members, features).collect()}
    # x: u1 and u2. 1 buyer of 2; revenue 100 / 2 users, 100 / 2 orders; sessions 4 / 2;
    # active 30-90 days ago: u1 (6 - 4) and u2 (3 - 0); back in the last 30: u1 -> 1/2
    assert got["x"] == {
        "segment_id": "x",
        "source": "rule",
        "members": 2,
        "buyers_30d": 1,
        "active_7d": 1,
        "conversion_rate_30d": 0.5,
        "revenue_per_user_30d": 50.0,
        "aov_30d": 50.0,
        "sessions_per_user_30d": 2.0,
        "retention_30d": 0.5,
    }
    # everyone: 4 users, 2 buyers, revenue 130 over 3 orders, 6 sessions; u1 and u2 were
    # active earlier, u3 only recently
    assert got[ALL_USERS] == {
        "segment_id": ALL_USERS,
        "source": "population",
        "members": 4,
        "buyers_30d": 2,
        "active_7d": 1,
        "conversion_rate_30d": 0.5,
        "revenue_per_user_30d": 32.5,
        "aov_30d": pytest.approx(130 / 3),
        "sessions_per_user_30d": 1.5,
        "retention_30d": 0.5,
    }
