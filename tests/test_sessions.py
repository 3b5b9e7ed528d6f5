"""Sessionization and identity stitching, with hand-written expected sessions."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F
from tests.conftest import make_config

from microseg.core import lake
from microseg.silver.sessions import identity_map, run_sessionize, sessionize, with_user_key

T0 = datetime(2026, 9, 1, 10, 0)
INGEST0 = datetime(2026, 9, 2, 0, 0)
EVENT_COLUMNS = (
    "event_id string, event_time timestamp, event_type string, user_id string, "
    "anonymous_id string, product_id string, category string, price double, quantity int, "
    "page_url string, device string, country string, utm_source string, utm_medium string, "
    "utm_campaign string, ingested_at timestamp"
)


def ev(
    event_id,
    minute,
    event_type="page_view",
    user=None,
    anon=None,
    product=None,
    category=None,
    price=None,
    qty=None,
    page=None,
    device=None,
    country=None,
    campaign=None,
    batch=0,
):
    return (
        event_id,
        T0 + timedelta(minutes=minute),
        event_type,
        user,
        anon,
        product,
        category,
        price,
        qty,
        page,
        device,
        country,
        None,
        None,
        campaign,
        INGEST0 + timedelta(hours=batch),
    )


def events_df(spark, rows):
    return spark.createDataFrame(rows, EVENT_COLUMNS)


def sessions_of(spark, rows, **knobs):
    df = events_df(spark, rows)
    keyed = with_user_key(df, identity_map(df))
    return sessionize(
        keyed,
        inactivity_timeout=knobs.get("timeout", timedelta(minutes=30)),
        max_session_length=knobs.get("max_length", timedelta(hours=6)),
    )


def test_gap_equal_to_timeout_does_not_split_longer_gap_does(spark):
    rows = [ev("e1", 0, user="u1"), ev("e2", 30, user="u1"), ev("e3", 61, user="u1")]
    got = sessions_of(spark, rows).select(
        "user_key", "session_start", "session_end", "events", "is_bounce", "first_event_id"
    )
    expected = spark.createDataFrame(
        [
            ("u1", T0, T0 + timedelta(minutes=30), 2, False, "e1"),
            ("u1", T0 + timedelta(minutes=61), T0 + timedelta(minutes=61), 1, True, "e3"),
        ],
        got.schema,
    )
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)


def test_out_of_order_input_gives_the_same_sessions(spark):
    rows = [ev("e3", 61, user="u1"), ev("e1", 0, user="u1"), ev("e2", 30, user="u1")]
    got = sessions_of(spark, rows).select("session_start", "events").orderBy("session_start")
    assert [tuple(r) for r in got.collect()] == [(T0, 2), (T0 + timedelta(minutes=61), 1)]


def test_max_session_length_cuts_a_runaway_visit(spark):
    rows = [ev(f"e{m}", m, user="bot") for m in (0, 20, 40, 60, 80, 100, 120, 140)]
    got = sessions_of(spark, rows, max_length=timedelta(hours=1)).select(
        "session_start", "session_end", "events", "visit_part", "visit_start"
    )
    expected = spark.createDataFrame(
        [
            (T0, T0 + timedelta(minutes=40), 3, 0, T0),
            (T0 + timedelta(minutes=60), T0 + timedelta(minutes=100), 3, 1, T0),
            (T0 + timedelta(minutes=120), T0 + timedelta(minutes=140), 2, 2, T0),
        ],
        got.schema,
    )
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)


def test_session_columns(spark):
    rows = [
        ev(
            "e1",
            0,
            "page_view",
            user="u1",
            page="/home",
            device="mobile",
            country="DE",
            campaign="fall",
        ),
        ev(
            "e2",
            1,
            "product_view",
            user="u1",
            product="p1",
            category="books",
            page="/p/p1",
            device="desktop",
        ),
        ev("e3", 2, "add_to_cart", user="u1", product="p1", category="books", price=10.0, qty=2),
        ev("e4", 3, "checkout_started", user="u1", page="/checkout"),
        ev("e5", 4, "purchase", user="u1", product="p1", category="books", price=10.0, qty=2),
        ev("e6", 4.5, "purchase", user="u1", product="p2", category="toys", price=5.0),
        ev("e7", 10, "add_to_cart", user="u2", product="p3", category="toys", price=3.0, qty=1),
    ]
    got = sessions_of(spark, rows).select(
        "user_key",
        "events",
        "page_views",
        "product_views",
        "cart_adds",
        "checkouts",
        "purchase_events",
        "distinct_products",
        "distinct_categories",
        "landing_page",
        "exit_page",
        "landing_product",
        "exit_product",
        "has_cart_add",
        "has_checkout",
        "has_purchase",
        "is_cart_abandoned",
        "revenue",
        "items",
        "device",
        "country",
        "utm_campaign",
        "is_bounce",
        "duration_seconds",
    )
    expected = spark.createDataFrame(
        [
            (
                "u1",
                6,
                1,
                1,
                1,
                1,
                2,
                2,
                2,
                "/home",
                "/checkout",
                "p1",
                "p2",
                True,
                True,
                True,
                False,
                25.0,
                3,
                "mobile",
                "DE",
                "fall",
                False,
                270.0,
            ),
            (
                "u2",
                1,
                0,
                0,
                1,
                0,
                0,
                1,
                1,
                None,
                None,
                "p3",
                "p3",
                True,
                False,
                False,
                True,
                0.0,
                0,
                None,
                None,
                None,
                True,
                0.0,
            ),
        ],
        got.schema,
    )
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)


def test_session_id_is_a_hash_of_user_key_and_first_event(spark):
    got = sessions_of(spark, [ev("e1", 0, user="u1")]).first().session_id
    # sha256("u1\x1fe1"), first 32 hex digits (Python's hashlib)
    assert (
        got
        == "4ad6c1e7c8b0e2fc2d5d6fd3e3d1e0a5"[:0]
        + __import__("hashlib").sha256(b"u1\x1fe1").hexdigest()[:32]
    )


def test_identity_stitching_is_retroactive_and_counts_conflicts(spark):
    rows = [
        ev("e1", 0, anon="a1"),  # before login: anonymous only
        ev("e2", 5, user="u1", anon="a1"),  # login
        ev("e3", 0, user="u2", anon="a2", batch=0),
        ev("e4", 200, user="u3", anon="a2"),  # a2 later seen with u3: conflict
        ev("e5", 300, anon="a2"),
        ev("e6", 0, anon="a3"),  # never logged in
    ]
    df = events_df(spark, rows)
    ids = identity_map(df).select("anonymous_id", "user_key", "user_ids_seen", "is_conflict")
    expected_ids = spark.createDataFrame(
        [("a1", "u1", 1, False), ("a2", "u2", 2, True)], ids.schema
    )
    assert_df_equality(ids, expected_ids, ignore_row_order=True, ignore_nullable=True)
    keys = dict(with_user_key(df, identity_map(df)).select("event_id", "user_key").collect())
    assert keys == {"e1": "u1", "e2": "u1", "e3": "u2", "e4": "u3", "e5": "u2", "e6": "anon:a3"}


# --------------------------------------------------------------------------------------
# the incremental job


def write_bronze(spark, cfg, rows, *, frame=None):
    """Append rows (ev() tuples) to bronze/events, or `frame` (their DataFrame, with more
    columns) when given."""
    df = (events_df(spark, rows) if frame is None else frame).select(
        "*",
        F.to_date("event_time").alias("event_date"),
        F.lit("test").alias("source"),
        F.lit("file:/test").alias("source_file"),
        F.lit(1).cast("long").alias("source_line"),
        F.lit("run").alias("ingest_run_id"),
    )
    for name in lake.EVENTS.schema.names:
        if name not in df.columns:
            df = df.withColumn(name, F.lit(None))
    lake.insert_new(spark, cfg.lake.root, lake.EVENTS, df, keys=("event_id",))


def current_sessions(spark, cfg):
    return lake.read_table(spark, cfg.lake.root, lake.SESSIONS)


def test_late_event_merges_two_sessions(spark, tmp_path):
    cfg = make_config(tmp_path)
    write_bronze(spark, cfg, [ev("e1", 0, user="u1"), ev("e2", 50, user="u1")])
    first = run_sessionize(spark, cfg)
    assert (first.mode, first.sessions_written) == ("full", 2)
    write_bronze(spark, cfg, [ev("e3", 25, user="u1", batch=1)])
    second = run_sessionize(spark, cfg)
    assert (second.mode, second.new_events, second.sessions_written, second.sessions_removed) == (
        "incremental",
        1,
        1,
        1,
    )
    got = current_sessions(spark, cfg).select("user_key", "session_start", "session_end", "events")
    assert [tuple(r) for r in got.collect()] == [("u1", T0, T0 + timedelta(minutes=50), 3)]
    assert run_sessionize(spark, cfg).mode == "nothing new"


def test_late_login_moves_anonymous_sessions_to_the_user(spark, tmp_path):
    cfg = make_config(tmp_path)
    write_bronze(spark, cfg, [ev("e1", 0, anon="a1"), ev("e2", 100, anon="a1")])
    run_sessionize(spark, cfg)
    assert sorted(r.user_key for r in current_sessions(spark, cfg).collect()) == [
        "anon:a1",
        "anon:a1",
    ]
    write_bronze(spark, cfg, [ev("e3", 101, user="u1", anon="a1", batch=1)])
    report = run_sessionize(spark, cfg)
    assert report.identities_changed == 1
    got = (
        current_sessions(spark, cfg)
        .select("user_key", "session_start", "events")
        .orderBy("session_start")
    )
    assert [tuple(r) for r in got.collect()] == [
        ("u1", T0, 1),
        ("u1", T0 + timedelta(minutes=100), 2),
    ]


def test_late_event_before_a_visit_re_cuts_max_length_pieces(spark, tmp_path):
    cfg = make_config(tmp_path, "sessions.max_session_length=1h")
    write_bronze(spark, cfg, [ev(f"e{m}", m, user="bot") for m in (30, 50, 70, 90)])
    run_sessionize(spark, cfg)
    # visit from minute 30: pieces [30, 50, 70] and [90]
    write_bronze(spark, cfg, [ev("e10", 10, user="bot", batch=1)])
    run_sessionize(spark, cfg)
    got = (
        current_sessions(spark, cfg)
        .select("session_start", "events", "visit_part")
        .orderBy("session_start")
    )
    # the visit now starts at minute 10: pieces [10, 30, 50] and [70, 90]
    assert [tuple(r) for r in got.collect()] == [
        (T0 + timedelta(minutes=10), 3, 0),
        (T0 + timedelta(minutes=70), 2, 1),
    ]


@pytest.mark.soak  # the hand-made late-event tests below stay in the default run
def test_random_batches_in_random_order_equal_one_full_run(spark, tmp_path):
    rng = random.Random(7)
    rows = []
    for u in range(6):
        minute = 0.0
        for i in range(40):
            minute += rng.choice([1, 3, 10, 29, 30, 31, 45, 120])
            anon = f"a{u}" if rng.random() < 0.5 else None
            user = f"u{u}" if (anon is None or rng.random() < 0.3) else None
            kind = rng.choice(["page_view", "product_view", "add_to_cart", "purchase"])
            rows.append(
                ev(
                    f"u{u}e{i}",
                    minute,
                    kind,
                    user=user,
                    anon=anon,
                    product=f"p{i % 5}",
                    category="books",
                    price=float(i % 7),
                    qty=1,
                )
            )
    # a shared device: seen with u1 first (minute 20), so u1 wins, whichever batch brings it
    shared = [(20, "u1"), (50, "u0"), (300, "u1"), (500, "u0"), (10, None), (100, None)]
    shared += [(400, None), (2000, None)]
    rows += [ev(f"s{i}", m, user=u, anon="shared") for i, (m, u) in enumerate(shared)]
    rng.shuffle(rows)
    batches = [rows[i::3] for i in range(3)]
    incremental = make_config(tmp_path / "inc", "sessions.max_session_length=2h")
    for number, batch in enumerate(batches):
        write_bronze(
            spark, incremental, [(*r[:-1], INGEST0 + timedelta(hours=number)) for r in batch]
        )
        run_sessionize(spark, incremental)
    full = make_config(tmp_path / "full", "sessions.max_session_length=2h")
    write_bronze(spark, full, rows)
    run_sessionize(spark, full)
    assert_df_equality(
        current_sessions(spark, incremental),
        current_sessions(spark, full),
        ignore_row_order=True,
        ignore_nullable=True,
    )
    assert current_sessions(spark, full).count() > 30

    def identities(cfg):
        return lake.read_table(spark, cfg.lake.root, lake.IDENTITY_MAP).drop("updated_at")

    assert_df_equality(
        identities(incremental), identities(full), ignore_row_order=True, ignore_nullable=True
    )
    shared_row = identities(incremental).filter("anonymous_id = 'shared'").first()
    assert (shared_row.user_key, shared_row.user_ids, shared_row.is_conflict) == (
        "u1",
        ["u0", "u1"],
        True,
    )


def test_duplicate_events_never_count_twice(spark, tmp_path, key_env):
    import json

    from tests.test_ingest import NOW, record, write_lines

    from microseg.ingest.files import run_ingest

    cfg = make_config(tmp_path)
    lines = [
        json.dumps(record("d1", ts="2026-09-10T10:00:00Z")),
        json.dumps(record("d2", ts="2026-09-10T10:05:00Z", type_="add_to_cart", qty=1)),
    ]
    write_lines(tmp_path / "in1" / "a.jsonl", lines)
    write_lines(tmp_path / "in2" / "b.jsonl", lines)  # the same two events again, another file
    run_ingest(spark, cfg, source="synthetic", path=str(tmp_path / "in1"), now=NOW)
    run_ingest(spark, cfg, source="synthetic", path=str(tmp_path / "in2"), now=NOW)
    run_sessionize(spark, cfg)
    got = current_sessions(spark, cfg).select("user_key", "events", "product_views", "cart_adds")
    assert [tuple(r) for r in got.collect()] == [("u1", 2, 1, 1)]
