"""Consent as history (silver/consent) and where it is honoured: features (analytics) and
marketing segments. Timelines and expected values are written out by hand."""

from __future__ import annotations

from datetime import datetime, timedelta

from pyspark.sql import functions as F
from tests.conftest import make_config
from tests.test_sessions import T0, ev, events_df, write_bronze

from microseg.core import lake
from microseg.features.job import run_features
from microseg.segments.evaluate import run_segments
from microseg.silver.consent import consent_at, consent_history
from microseg.silver.sessions import run_sessionize

US = timedelta(microseconds=1)


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


# event id -> (consent_analytics, consent_marketing)
CONSENT = {
    "e1": (True, None),  # u1 grants analytics
    "e2": (True, True),  # u1 repeats analytics (no change), grants marketing
    "e3": (False, None),  # u1 withdraws analytics at minute 20
    "e4": (None, False),  # anonymous a1 (later u2) denies marketing
    "e5": (None, None),  # u2 logs in from a1: no signal
    "e6": (None, True),  # u2 grants marketing at minute 40
    "e7": (True, None),  # u3: analytics only, never marketing
}
EVENTS = [
    ev("e1", 0, user="u1"),
    ev("e2", 10, user="u1"),
    ev("e3", 20, user="u1"),
    ev("e4", 5, anon="a1"),
    ev("e5", 30, user="u2", anon="a1"),
    ev("e6", 40, user="u2"),
    ev("e7", 1, user="u3"),
]


def with_consent(spark, rows):
    df = events_df(spark, rows)
    mapping = F.create_map(
        *[F.lit(x) for k, (a, m) in CONSENT.items() for x in (k, F.array(F.lit(a), F.lit(m)))]
    )
    return df.select(
        "*",
        mapping[F.col("event_id")][0].cast("boolean").alias("consent_analytics"),
        mapping[F.col("event_id")][1].cast("boolean").alias("consent_marketing"),
    )


def history(spark):
    keyed = with_consent(spark, EVENTS).withColumn(
        "user_key",
        F.coalesce("user_id", F.when(F.col("anonymous_id") == "a1", F.lit("u2"))),
    )
    return consent_history(keyed)


def test_history_has_one_row_per_change(spark):
    rows = sorted(
        (r.user_key, r.purpose, r.granted, r.valid_from, r.valid_to, r.is_current, r.event_id)
        for r in history(spark).collect()
    )
    assert rows == [
        ("u1", "analytics", False, at(20), None, True, "e3"),
        ("u1", "analytics", True, at(0), at(20), False, "e1"),
        ("u1", "marketing", True, at(10), None, True, "e2"),
        ("u2", "marketing", False, at(5), at(40), False, "e4"),
        ("u2", "marketing", True, at(40), None, True, "e6"),
        ("u3", "analytics", True, at(1), None, True, "e7"),
    ]


def test_state_at_a_time_uses_signals_strictly_before_it(spark):
    h = history(spark)

    def state(purpose, when):
        return sorted((r.user_key, r.granted) for r in consent_at(h, purpose, when).collect())

    assert state("analytics", at(20)) == [("u1", True), ("u3", True)]  # the change at 20: not yet
    assert state("analytics", at(20) + US) == [("u1", False), ("u3", True)]
    assert state("marketing", at(5)) == []
    assert state("marketing", at(40)) == [("u1", True), ("u2", False)]
    assert state("marketing", at(40) + US) == [("u1", True), ("u2", True)]


def write_events(spark, cfg, rows):
    write_bronze(spark, cfg, rows, frame=with_consent(spark, rows))


CATALOG = """\
segments:
  - id: visitors_email
    name: Visitors (for an email)
    tags: [marketing]
    conditions:
      - {last: any, within: 30d}
  - id: visitors
    name: Visitors (analytics only)
    conditions:
      - {last: any, within: 30d}
"""


def test_features_leave_out_analytics_denied_and_marketing_segments_need_consent(spark, tmp_path):
    segments = tmp_path / "segments.yaml"
    segments.write_text(CATALOG)
    cfg = make_config(
        tmp_path,
        f"segments.file={segments}",
        "privacy.consent.marketing_tags=[marketing]",
    )
    write_events(spark, cfg, [*EVENTS, ev("e8", 2, user="u4")])  # u4: no signal at all
    run_sessionize(spark, cfg)
    stored = lake.read_table(spark, cfg.lake.root, lake.CONSENT).count()
    assert stored == 6

    def members(as_of):
        run_features(spark, cfg, as_of=as_of)
        users = sorted(
            r.user_key
            for r in lake.read_table(spark, cfg.lake.root, lake.USER_FEATURES)
            .filter(F.col("as_of") == as_of)
            .collect()
        )
        run_segments(spark, cfg, as_of=as_of)
        current = lake.read_table(spark, cfg.lake.root, lake.SEGMENT_MEMBERSHIP).filter(
            "is_current"
        )
        by_segment = {}
        for r in current.collect():
            by_segment.setdefault(r.segment_id, []).append(r.user_key)
        return users, {k: sorted(v) for k, v in by_segment.items()}

    # at minute 45: u1 withdrew analytics (no features, no segment at all); u2 granted
    # marketing at 40; u3 never said (marketing unknown: denied); u4 nothing (analytics
    # unknown: granted, marketing unknown: denied)
    users, segments_at = members(at(45))
    assert users == ["u2", "u3", "u4"]
    assert segments_at == {"visitors": ["u2", "u3", "u4"], "visitors_email": ["u2"]}


STREAM_CATALOG = """\
segments:
  - id: promo_ready
    name: Promo-ready
    tags: [promo]
    conditions:
      - {feature: orders_lifetime, gte: 0}
  - id: everyone
    name: Everyone
    conditions:
      - {feature: orders_lifetime, gte: 0}
"""


def test_the_stream_gates_marketing_segments_by_consent_at_each_point(spark, tmp_path):
    """A stream's point is an event's time and counts that event: a signal at the point
    counts (the batch counts signals strictly before its as-of)."""
    from microseg.segments.parse import load_segments
    from microseg.silver.consent import consent_at_points
    from microseg.streaming.sink import member_flags, stream_sink

    path = tmp_path / "segments.yaml"
    path.write_text(STREAM_CATALOG)
    cfg = make_config(
        tmp_path, f"segments.file={path}", "privacy.consent.marketing_tags=[promo, vip]"
    )
    catalog = load_segments(cfg)
    sink = stream_sink(spark, cfg, catalog, ["promo_ready", "everyone"])
    sink.close()
    assert sink.marketing == {"promo_ready"}
    assert sink.marketing_unknown_granted is False

    points = [
        ("u1", at(10) - US),  # before u1's grant at minute 10: no signal yet
        ("u1", at(10)),  # the grant's own event
        ("u2", at(5)),  # a1 (u2) denies at 5
        ("u2", at(40) - US),
        ("u2", at(40)),  # u2 grants at 40
        ("u3", at(50)),  # never a marketing signal
    ]
    frame_df = spark.createDataFrame(points, "user_key string, as_of timestamp").withColumn(
        "orders_lifetime", F.lit(1.0)
    )
    gated = consent_at_points(frame_df, history(spark), "marketing", default=False)
    flags = {
        (r.user_key, r.as_of, r.segment_id): r.member
        for r in member_flags(catalog, ["promo_ready", "everyone"], gated, sink.marketing).collect()
    }
    assert {(u, t): flags[(u, t, "promo_ready")] for u, t in points} == {
        ("u1", at(10) - US): False,
        ("u1", at(10)): True,
        ("u2", at(5)): False,
        ("u2", at(40) - US): False,
        ("u2", at(40)): True,
        ("u3", at(50)): False,
    }
    assert all(flags[(u, t, "everyone")] for u, t in points)  # not a marketing segment
    # no silver/consent yet: every point takes the default
    assert {
        r.consent_ok for r in consent_at_points(frame_df, None, "marketing", True).collect()
    } == {True}
