"""Streaming segments: the per-user state machine, enters and exits, timers, replay, a kill -9
mid-batch, and parity with the batch job. Expected rows are written out by hand.

ev(..., minute) is 2026-09-01 10:00 + minutes (tests.test_sessions). The stream evaluates a
user just after each event time t, at t + 1 microsecond (facts use events strictly before
the point, as the batch as-of does), so an enter caused by an event at minute m is at(m).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta

import pytest
from tests.conftest import ROOT, make_config
from tests.serving_server import ApiServer
from tests.streaming_child import STREAM_SETTINGS
from tests.test_sessions import T0, ev, write_bronze

from microseg.core import lake
from microseg.core.config import ConfigError
from microseg.core.online_store import open_store
from microseg.features.job import run_features
from microseg.segments.evaluate import run_segments
from microseg.segments.parse import load_segments
from microseg.serving.api import create_app
from microseg.silver.sessions import run_sessionize
from microseg.streaming import checkpoint as stream_checkpoint
from microseg.streaming import query as streaming
from microseg.streaming import sink as stream_sink
from microseg.streaming import state as stream_state

# pandas functions run in Python workers: the same interpreter as the tests (scripts/test sets
# it too; the session fixture starts after collection, so this is in time)
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

US = timedelta(microseconds=1)
HOUR, DAY = 60, 24 * 60

CATALOG = """\
segments:
  - id: cart_abandoners_24h
    name: Cart abandoners (24h)
    conditions:
      - {event: add_to_cart, within: 24h, at_least: 1}
      - {event: purchase, since_last: add_to_cart, at_most: 0}
  - id: recent_buyers
    name: Recent buyers
    conditions:
      - {last: purchase, within: 30d}
  - id: carting_buyers
    name: Carting buyers (no feature snapshot in these tests, so nobody)
    conditions:
      - {feature: orders_lifetime, gte: 1}
      - {event: add_to_cart, within: 24h, at_least: 1}
"""
CAB, RB = "cart_abandoners_24h", "recent_buyers"


def at(minute: float) -> datetime:
    """The evaluation point just after an event at `minute`."""
    return T0 + timedelta(minutes=minute) + US


def stream_config(tmp_path, text=CATALOG, *overrides):
    path = tmp_path / "segments.yaml"
    path.write_text(textwrap.dedent(text))
    cfg = make_config(tmp_path, *STREAM_SETTINGS, f"segments.file={path}", *overrides)
    return cfg


def changes(spark, cfg) -> list[tuple]:
    rows = lake.read_table(spark, cfg.lake.root, lake.SEGMENT_CHANGES).collect()
    return sorted(
        (r.user_key, r.segment_id, r.change, r.reason, r.changed_at)
        for r in rows
        if r.source == "stream"
    )


def store_rows(cfg) -> list[tuple]:
    """(user_key, segment_id, entered_at) of the stream's members in the online store."""
    store = open_store(cfg)
    try:
        members = store.scope_members("stream", load_segments(cfg).name)
    finally:
        store.close()
    return sorted(
        (m.user_key, m.segment_id, datetime(1970, 1, 1) + m.entered_at * US)
        for m in members.values()
    )


def intervals(spark, cfg) -> list[tuple]:
    rows = lake.read_table(spark, cfg.lake.root, lake.SEGMENT_MEMBERSHIP).collect()
    return sorted(
        (r.user_key, r.segment_id, r.valid_from, r.valid_to, r.is_current)
        for r in rows
        if r.source == "stream"
    )


# --------------------------------------------------------------------------------------
# the state machine alone (no Spark)


def plan_of(cfg) -> stream_state.FactPlan:
    from microseg.segments.parse import load_segments

    catalog = load_segments(cfg)
    return stream_state.fact_plan(catalog, stream_state.streamed_segments(catalog, None))


def m(minute: float) -> int:
    """T0 + minutes, in microseconds since the epoch."""
    return (T0 + timedelta(minutes=minute) - datetime(1970, 1, 1)) // US


def test_state_machine_points_lapses_and_caps(tmp_path):
    cfg = stream_config(
        tmp_path,
        CATALOG
        + """\
  - id: busy
    name: Busy
    conditions:
      - {event: any, within: 1h, at_least: 3}
""",
    )
    plan = plan_of(cfg)
    add, since = (
        next(c for c in plan.counts if c.types == ("add_to_cart",)),
        next(c for c in plan.counts if c.anchor),
    )
    busy = next(c for c in plan.counts if c.types is None)
    assert (add.cap, since.cap, busy.cap) == (1, 1, 3)
    names = plan.names()
    state = stream_state.UserState()

    def facts(point_values):
        point, values = point_values
        return point, dict(zip(names, values, strict=True))

    # two events in one instant are one point; facts count events strictly before it
    out = stream_state.advance(
        plan, state, [(m(0), "add_to_cart"), (m(0), "page_view"), (m(10), "page_view")], None
    )
    assert [facts(p) for p in out] == [
        (m(0) + 1, {add.name: 1, since.name: 0, busy.name: 2, plan.lasts[0].name: None}),
        (m(10) + 1, {add.name: 1, since.name: 0, busy.name: 3, plan.lasts[0].name: None}),
    ]
    # the next lapse: the two events at minute 0 leave the 1h window at 60 min + 1us
    assert stream_state.next_lapse(plan, state) == m(60) + 1
    # a watermark short of it evaluates nothing; past it, every lapse up to it in order
    assert stream_state.advance(plan, state, [], m(60)) == []
    out = stream_state.advance(plan, state, [], m(70) + 5)
    assert [(p, v[names.index(busy.name)]) for p, v in out] == [(m(60) + 1, 1), (m(70) + 1, 0)]
    # the cart add leaves its 24h window at 24h + 1us; a later event evaluates that lapse first
    out = stream_state.advance(plan, state, [(m(DAY + 5), "purchase")], None)
    assert [p for p, _ in out] == [m(DAY) + 1, m(DAY + 5) + 1]
    assert out[0][1][names.index(add.name)] == 0
    last = dict(zip(names, out[1][1], strict=True))
    assert (last[since.name], last[plan.lasts[0].name]) == (1, m(DAY + 5))
    # the purchase leaves busy's 1h window first (recent_buyers' 30 days come later)
    assert stream_state.next_lapse(plan, state) == m(DAY + 65) + 1
    # an event older than the clock (out of order, not late) is evaluated just after the clock
    clock = state.clock
    out = stream_state.advance(plan, state, [(m(DAY + 1), "add_to_cart")], None)
    assert [p for p, _ in out] == [clock + 1]
    assert dict(zip(names, out[0][1], strict=True))[since.name] == 1  # older than the purchase


def test_timer_fires_when_the_watermark_reaches_the_lapse():
    # Spark fires a timeout t (ms) once the watermark (ms) is past t
    for lapse_us, watermark_ms, fires in [
        (5_000_001, 5_000, False),
        (5_000_001, 5_001, True),
        (5_000_000, 5_000, True),
        (5_000_000, 4_999, False),
    ]:
        assert (stream_state.timer_ms(lapse_us) < watermark_ms) == fires
        assert (lapse_us <= watermark_ms * 1000) == fires


def test_default_catalog_streams_event_rules_only(cfg):

    catalog = load_segments(cfg)
    assert stream_state.streamed_segments(catalog, None) == [
        "cart_abandoners_24h",
        "recent_buyers",
        "lapsed_customers",
        "high_value_at_risk",
    ]


# --------------------------------------------------------------------------------------
# the stream


def test_cart_abandoner_enters_on_add_to_cart_and_exits_on_purchase(spark, tmp_path):
    cfg = stream_config(tmp_path)
    write_bronze(
        spark, cfg, [ev("e1", 0, "add_to_cart", user="u1"), ev("e2", 10, "page_view", user="u2")]
    )
    report = streaming.run_stream(spark, cfg, available_now=True)
    assert report.segments == [CAB, RB, "carting_buyers"]
    assert changes(spark, cfg) == [("u1", CAB, "enter", "rule_matched", at(0))]
    assert intervals(spark, cfg) == [("u1", CAB, at(0), None, True)]

    write_bronze(spark, cfg, [ev("e3", 30, "purchase", user="u1", batch=1)])
    streaming.run_stream(spark, cfg, available_now=True)
    assert changes(spark, cfg) == [
        ("u1", CAB, "enter", "rule_matched", at(0)),
        ("u1", CAB, "exit", "no_longer_matched", at(30)),
        ("u1", RB, "enter", "rule_matched", at(30)),
    ]
    assert intervals(spark, cfg) == [
        ("u1", CAB, at(0), at(30), False),
        ("u1", RB, at(30), None, True),
    ]

    # the checkpoint's state was built for these rules: a changed rule needs a new checkpoint
    (tmp_path / "segments.yaml").write_text(CATALOG.replace("within: 24h", "within: 12h"))
    with pytest.raises(ConfigError, match="'cart_abandoners_24h' changed"):
        streaming.start_stream(spark, cfg)


@pytest.mark.parametrize("state_api", ["apply_in_pandas_with_state", "transform_with_state"])
def test_window_lapse_exits_by_timer_and_late_events_are_counted(spark, tmp_path, state_api):
    cfg = stream_config(tmp_path, CATALOG, f"stream.state_api={state_api}")  # watermark 1h
    write_bronze(
        spark,
        cfg,
        [
            ev("a1", 0, "add_to_cart", user="u1"),
            ev("b1", 10, "page_view", user="u2"),
            # another user's event 26h later moves the watermark to 25h: past u1's lapse
            ev("b2", 26 * HOUR, "page_view", user="u2"),
        ],
    )
    report = streaming.run_stream(spark, cfg, available_now=True)
    assert report.late_events == 0
    assert changes(spark, cfg) == [
        ("u1", CAB, "enter", "rule_matched", at(0)),
        ("u1", CAB, "exit", "no_longer_matched", at(DAY)),
    ]
    assert intervals(spark, cfg) == [("u1", CAB, at(0), at(DAY), False)]

    # an add_to_cart an hour after T0 is behind the watermark (25h): dropped, counted, in bronze
    write_bronze(spark, cfg, [ev("c1", 60, "add_to_cart", user="u3", batch=1)])
    report = streaming.run_stream(spark, cfg, available_now=True)
    assert report.late_events == 1
    assert [c[0] for c in changes(spark, cfg)] == ["u1", "u1"]
    events = lake.read_table(spark, cfg.lake.root, lake.EVENTS)
    assert events.filter("event_id = 'c1'").count() == 1


def test_replaying_a_batch_changes_nothing(spark, tmp_path):

    cfg = stream_config(tmp_path)
    catalog = load_segments(cfg)
    sink = stream_sink.stream_sink(
        spark, cfg, catalog, stream_state.streamed_segments(catalog, None)
    )
    plan = sink.plan
    add = next(c.name for c in plan.counts if not c.anchor)
    since = next(c.name for c in plan.counts if c.anchor)
    last = plan.lasts[0].name

    def batch(rows):
        """rows: (user, minute, cart adds in 24h, purchases since the last add, last purchase
        minute)"""
        data = [
            {
                "user_key": user,
                "point": m(minute) + 1,
                add: adds,
                since: bought,
                last: None if last_purchase is None else m(last_purchase),
            }
            for user, minute, adds, bought, last_purchase in rows
        ]
        schema = stream_state.facts_schema(plan)
        return spark.createDataFrame([[d[f.name] for f in schema.fields] for d in data], schema)

    def write(df, batch_id):
        path = lake.table_path(cfg.lake.root, lake.SEGMENT_CHANGES)
        before = lake.table_version(spark, cfg.lake.root, lake.SEGMENT_CHANGES)
        stream_sink.write_batch(df, batch_id, sink=sink)
        # the history query's micro-batch: the rows of the new commit
        new_df = spark.read.format("delta").load(path)
        if before is not None:
            new_df = new_df.subtract(
                spark.read.format("delta").option("versionAsOf", before).load(path)
            )
        stream_sink.apply_history(new_df, batch_id, sink=sink)

    write(batch([("u1", 0, 1, 0, None)]), 0)
    second = batch(
        [
            ("u1", 30, 1, 1, 30),  # bought: leaves the abandoners, becomes a recent buyer
            ("u1", 40, 2, 0, 30),  # a new cart add: back in
            ("u2", 35, 0, None, None),  # nothing, then in
            ("u2", 45, 1, 0, None),
            ("u3", 50, 1, 0, None),  # in, then out within the batch
            ("u3", 55, 1, 1, 55),
        ]
    )
    write(second, 1)

    def snapshot():
        return [
            sorted(map(tuple, lake.read_table(spark, cfg.lake.root, t).collect()), key=repr)
            for t in (lake.SEGMENT_CHANGES, lake.SEGMENT_MEMBERSHIP)
        ] + [store_rows(cfg)]

    after_first = snapshot()
    assert changes(spark, cfg) == [
        ("u1", CAB, "enter", "rule_matched", at(0)),
        ("u1", CAB, "enter", "rule_matched", at(40)),
        ("u1", CAB, "exit", "no_longer_matched", at(30)),
        ("u1", RB, "enter", "rule_matched", at(30)),
        ("u2", CAB, "enter", "rule_matched", at(45)),
        ("u3", CAB, "enter", "rule_matched", at(50)),
        ("u3", CAB, "exit", "no_longer_matched", at(55)),
        ("u3", RB, "enter", "rule_matched", at(55)),
    ]
    assert intervals(spark, cfg) == [
        ("u1", CAB, at(0), at(30), False),
        ("u1", CAB, at(40), None, True),
        ("u1", RB, at(30), None, True),
        ("u2", CAB, at(45), None, True),
        ("u3", CAB, at(50), at(55), False),
        ("u3", RB, at(55), None, True),
    ]
    # the online store holds who is in now, with the time they entered
    assert store_rows(cfg) == [
        ("u1", CAB, at(40)),
        ("u1", RB, at(30)),
        ("u2", CAB, at(45)),
        ("u3", RB, at(55)),
    ]
    write(second, 1)  # the engine replays the last batch after a crash
    assert snapshot() == after_first
    sink.close()


KILL_STEPS = [
    [
        ev("a1", 0, "add_to_cart", user="u1"),
        ev("b1", 5, "add_to_cart", user="u2"),
        ev("c1", 10, "purchase", user="u3"),
    ],
    [
        ev("a2", 100, "purchase", user="u1", batch=1),
        ev("d1", 110, "add_to_cart", user="u4", batch=1),
        ev("b2", 130, "page_view", user="u2", batch=1),
    ],
    # 27h: the watermark (26h) passes the lapses of u2's and u4's cart adds
    [ev("e1", 27 * HOUR, "page_view", user="u5", batch=2)],
]
KILL_EXPECTED = [
    ("u1", CAB, "enter", "rule_matched", at(0)),
    ("u1", CAB, "exit", "no_longer_matched", at(100)),
    ("u1", RB, "enter", "rule_matched", at(100)),
    ("u2", CAB, "enter", "rule_matched", at(5)),
    ("u2", CAB, "exit", "no_longer_matched", at(DAY + 5)),
    ("u3", RB, "enter", "rule_matched", at(10)),
    ("u4", CAB, "enter", "rule_matched", at(110)),
    ("u4", CAB, "exit", "no_longer_matched", at(DAY + 110)),
]


def _wait_for(condition, what: str, child, log, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"stream process ended ({child.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def reference(spark, tmp_path_factory):
    """The uninterrupted run of KILL_STEPS (the SQLite store; its rows are compared by value)."""
    cfg = stream_config(tmp_path_factory.mktemp("reference"))
    write_bronze(spark, cfg, [e for step in KILL_STEPS for e in step])
    streaming.run_stream(spark, cfg, available_now=True)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize(
    "store", [pytest.param("sqlite", marks=pytest.mark.soak), "redis"]
)  # the recovery is the store's: Redis in the default suite, SQLite with the soak tests
def test_kill_9_mid_batch_and_restart_equals_an_uninterrupted_run(
    spark, tmp_path, request, store, reference
):
    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    settings = []
    if store == "redis":
        url = request.getfixturevalue("redis_url")
        settings = ["serving.store=redis", f"serving.redis_url={url}"]
    cfg = stream_config(killed_dir, CATALOG, *settings, "serving.redis_prefix=killed.")
    write_bronze(spark, cfg, KILL_STEPS[0])
    marker, log = killed_dir / "paused", killed_dir / "child.log"
    checkpoint = stream_checkpoint.checkpoint_path(cfg)
    with open(log, "w") as out:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.streaming_child",
                str(killed_dir),
                str(killed_dir / "segments.yaml"),
                (T0 + timedelta(minutes=100)).isoformat(),
                str(marker),
                *settings,
                "serving.redis_prefix=killed.",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the JVM dies with it
        )
    try:
        _wait_for(lambda: os.path.exists(f"{checkpoint}/commits/0"), "batch 0", child, log)
        write_bronze(spark, cfg, KILL_STEPS[1])
        _wait_for(marker.exists, "the pause in the step-2 batch", child, log)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    # killed between the store's transaction and the Delta append: the store has u4, the
    # change rows do not
    assert ("u4", CAB, at(110)) in store_rows(cfg)
    assert ("u4", CAB, "enter", "rule_matched", at(110)) not in changes(spark, cfg)

    write_bronze(spark, cfg, KILL_STEPS[2])
    streaming.run_stream(spark, cfg, available_now=True)  # restart from the checkpoint

    assert changes(spark, cfg) == KILL_EXPECTED
    assert changes(spark, reference) == KILL_EXPECTED
    assert intervals(spark, cfg) == intervals(spark, reference)
    assert store_rows(cfg) == store_rows(reference) == [("u1", RB, at(100)), ("u3", RB, at(10))]
    assert intervals(spark, cfg) == [
        ("u1", CAB, at(0), at(100), False),
        ("u1", RB, at(100), None, True),
        ("u2", CAB, at(5), at(DAY + 5), False),
        ("u3", RB, at(10), None, True),
        ("u4", CAB, at(110), at(DAY + 110), False),
    ]


PARITY_CATALOG = """\
segments:
  - id: cart_abandoners_24h
    name: Cart abandoners (24h)
    conditions:
      - {event: add_to_cart, within: 24h, at_least: 1}
      - {event: purchase, since_last: add_to_cart, at_most: 0}
  - id: recent_buyers
    name: Recent buyers
    exclusive: {group: life, priority: 1}
    conditions:
      - {last: purchase, within: 3d}
  - id: lapsed
    name: Lapsed
    exclusive: {group: life, priority: 2}
    conditions:
      - {event: purchase, at_least: 1}
      - {last: any, older_than: 2d}
  - id: engaged_buyers
    name: Engaged buyers
    conditions:
      - {feature: orders_lifetime, gte: 1}
      - {event: product_view, within: 2d, at_least: 2}
  - id: category_fans
    name: Category fans (not streamable)
    conditions:
      - {event: product_view, per: category, within: 7d, at_least: 2}
  - id: buyers
    name: Buyers (features only, not streamed)
    conditions:
      - {feature: orders_lifetime, gte: 1}
"""


PARITY_AS_OF = T0 + timedelta(days=5)


@pytest.fixture(scope="module")
def parity(spark, tmp_path_factory):
    """A lake with the batch job as of PARITY_AS_OF and the stream over the same events:
    (config, the stream's report)."""
    # watermark delay 0: at the end the watermark is the last event (minute 5d - 1), and no
    # fact changes between it and the batch as-of T = 5d
    tmp_path = tmp_path_factory.mktemp("parity")
    cfg = stream_config(tmp_path, PARITY_CATALOG, "stream.watermark_delay=0s")
    as_of = PARITY_AS_OF
    write_bronze(
        spark,
        cfg,
        [
            # u1: cart add exactly 24h before T (the window includes its start)
            ev("a1", 4 * DAY, "add_to_cart", user="u1", product="p1"),
            # u2: cart add 4 days before T: lapses at 2d, fired by the watermark
            ev("b1", DAY, "add_to_cart", user="u2", product="p1"),
            # u3: cart add then purchase: a recent buyer
            ev("c1", 4 * DAY + 60, "add_to_cart", user="u3", product="p1"),
            ev("c2", 4 * DAY + 90, "purchase", user="u3", product="p1", price=10.0),
            # u4: bought at T0, quiet since minute 10: recent buyer until 3d, lapsed (outranked
            # by recent_buyers from 2d10m) after
            ev("d1", 0, "purchase", user="u4", product="p2", price=5.0),
            ev("d2", 10, "page_view", user="u4"),
            # u5: bought 2 days before T and viewed twice: engaged buyer and recent buyer
            ev("e1", 3 * DAY, "purchase", user="u5", product="p3", price=7.0),
            ev("e2", 4 * DAY + 100, "product_view", user="u5", product="p3", category="toys"),
            ev("e3", 4 * DAY + 110, "product_view", user="u5", product="p4", category="toys"),
            # u6: a cart add while anonymous, then a login on the same device
            ev("f1", 4 * DAY + 200, "add_to_cart", anon="a6", product="p1"),
            ev("f2", 4 * DAY + 210, "page_view", user="u6", anon="a6"),
            # u7: the latest event, the stream's clock
            ev("g1", 5 * DAY - 1, "page_view", user="u7"),
        ],
    )
    run_sessionize(spark, cfg)  # silver/identity_map: a6 -> u6
    run_features(spark, cfg, as_of=as_of)
    run_segments(spark, cfg, as_of=as_of)
    return cfg, streaming.run_stream(spark, cfg, available_now=True)


@pytest.mark.slow
def test_stream_membership_equals_the_batch_job(spark, parity):
    cfg, report = parity
    as_of = PARITY_AS_OF
    streamed = ["cart_abandoners_24h", "recent_buyers", "lapsed", "engaged_buyers"]
    assert report.segments == streamed
    expected = {
        "cart_abandoners_24h": ["u1", "u6"],
        "recent_buyers": ["u3", "u5"],
        "lapsed": ["u4"],
        "engaged_buyers": ["u5"],
    }
    membership_df = lake.read_table(spark, cfg.lake.root, lake.SEGMENT_MEMBERSHIP)

    def members(source: str) -> dict[str, list[str]]:
        rows = membership_df.filter(
            (membership_df.source == source)
            & (membership_df.valid_from <= as_of)
            & (membership_df.valid_to.isNull() | (membership_df.valid_to > as_of))
        ).collect()
        return {sid: sorted(r.user_key for r in rows if r.segment_id == sid) for sid in streamed}

    assert members("rule") == expected
    assert members("stream") == expected
    current = membership_df.filter("source = 'stream' AND is_current").collect()
    assert sorted((r.segment_id, r.user_key) for r in current) == sorted(
        (sid, u) for sid, users in expected.items() for u in users
    )
    # the online store: both paths wrote their current members, and they agree
    store = open_store(cfg)
    try:
        for source in ("rule", "stream"):
            members = store.scope_members(source, "segments")
            assert {
                sid: sorted(u for u, s in members if s == sid) for sid in streamed
            } == expected, source
        assert store.resolve("a6") == "u6"
        assert store.streamed() == set(streamed)
    finally:
        store.close()
    assert [c for c in changes(spark, cfg) if c[0] in ("u2", "u4")] == [
        ("u2", "cart_abandoners_24h", "enter", "rule_matched", at(DAY)),
        ("u2", "cart_abandoners_24h", "exit", "no_longer_matched", at(2 * DAY)),
        ("u4", "lapsed", "enter", "rule_matched", at(3 * DAY)),
        ("u4", "recent_buyers", "enter", "rule_matched", at(0)),
        ("u4", "recent_buyers", "exit", "no_longer_matched", at(3 * DAY)),
    ]


def iso(at: datetime) -> str:
    return at.isoformat() + "Z"


@pytest.mark.slow
def test_api_answers_from_the_store_of_both_paths_and_the_history(spark, parity):
    """`microseg serve` on a real HTTP server over the parity lake: the streamed segments are
    answered from the stream's rows, the others from the batch run's (tests.test_serving has
    the store's own tests)."""
    cfg, _ = parity
    T = PARITY_AS_OF
    with ApiServer(create_app(cfg)) as api:

        def answer(user, **params):
            body = api.get(f"/users/{user}/segments", params=params).json()
            segments = [(s["segment_id"], s["source"], s["entered_at"]) for s in body["segments"]]
            return body["user_key"], segments

        assert answer("u5") == (
            "u5",
            [
                ("buyers", "rule", iso(T)),
                ("category_fans", "rule", iso(T)),
                ("engaged_buyers", "stream", iso(at(4 * DAY + 110))),
                ("recent_buyers", "stream", iso(at(3 * DAY))),
            ],
        )
        full = api.get("/users/u1/segments").json()
        assert full["as_of"] is None
        assert full["segments"] == [
            {
                "segment_id": "cart_abandoners_24h",
                "source": "stream",
                "scope": "segments",
                "entered_at": "2026-09-05T10:00:00.000001Z",
                "score": None,
                "definition_version": load_segments(cfg).version("cart_abandoners_24h"),
            }
        ]
        # the anonymous id that logged in answers with the user's segments
        assert answer("a6") == ("u6", [("cart_abandoners_24h", "stream", iso(at(4 * DAY + 200)))])
        # as of a day in (the stream's intervals; the batch ran at 5d); an offset is converted
        assert answer("u4", as_of="2026-09-02T11:00:00+01:00") == (
            "u4",
            [("recent_buyers", "stream", iso(at(0)))],
        )
        assert answer("u4", as_of=iso(T)) == (
            "u4",
            [("buyers", "rule", iso(T)), ("lapsed", "stream", iso(at(3 * DAY)))],
        )
        assert answer("nobody") == ("nobody", [])
        bad = api.get("/users/u1/segments", params={"as_of": "yesterday"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["query", "as_of"]

        sizes = {(s["segment_id"], s["source"]): s["size"] for s in api.get("/segments").json()}
        assert sizes == {
            ("buyers", "rule"): 3,
            ("cart_abandoners_24h", "rule"): 2,
            ("cart_abandoners_24h", "stream"): 2,
            ("category_fans", "rule"): 1,
            ("engaged_buyers", "rule"): 1,
            ("engaged_buyers", "stream"): 1,
            ("lapsed", "rule"): 1,
            ("lapsed", "stream"): 1,
            ("recent_buyers", "rule"): 2,
            ("recent_buyers", "stream"): 2,
        }
        buyers = api.get("/segments/buyers").json()
        assert [(d["source"], d["name"], d["streamed"]) for d in buyers] == [
            ("rule", "Buyers (features only, not streamed)", False)
        ]
        assert buyers[0]["sizes"] == [{"as_of": iso(T), "size": 3, "status": "active"}]
        assert buyers[0]["definition"]["conditions"] == [{"feature": "orders_lifetime", "gte": 1}]
        missing = api.get("/segments/nope")
        assert (missing.status_code, missing.json()) == (404, {"detail": "no segment 'nope'"})
        health = api.get("/health").json()
        assert (health["status"], health["store"]) == ("ok", "sqlite")
        assert "/users/{user_id}/segments" in api.get("/openapi.json").json()["paths"]
        assert api.get("/docs").status_code == 200


# --------------------------------------------------------------------------------------
# Kafka: a real single-node broker (KRaft), started from Maven Central artifacts


@pytest.fixture(scope="module")
def kafka(tmp_path_factory, kafka_connector_problem):
    from tests.kafka_broker import BrokerUnavailable, start_broker

    if kafka_connector_problem:
        pytest.skip(f"Kafka test skipped: no Spark Kafka connector: {kafka_connector_problem}")
    try:
        broker = start_broker(tmp_path_factory.mktemp("kafka"))
    except BrokerUnavailable as exc:
        pytest.skip(f"Kafka test skipped: the broker cannot be started here: {exc}")
    yield broker.bootstrap_servers
    broker.stop()


def produce(spark, bootstrap: str, topic: str, values: list[str]) -> None:
    """Append records (values only) to the topic with Spark's Kafka writer, in this order."""
    spark.createDataFrame([(v,) for v in values], "value string").coalesce(1).write.format(
        "kafka"
    ).option("kafka.bootstrap.servers", bootstrap).option("topic", topic).save()


def tracked(event_id: str, minute: int, event_type: str, user: str) -> str:
    """One event as the synthetic source mapping's JSON (what a tracking SDK sends)."""
    ts = (T0 + timedelta(minutes=minute)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f'{{"id": "{event_id}", "ts": "{ts}", "type": "{event_type}", "user": {{"id": "{user}"}}}}'
    )


@pytest.mark.slow
def test_kafka_topic_is_ingested_with_quarantine_and_updates_segments(
    spark, tmp_path, kafka, key_env
):
    topic = "events-" + tmp_path.name.replace("_", "-")[-40:]
    cfg = stream_config(
        tmp_path,
        CATALOG,
        "stream.source=kafka",
        f"stream.kafka.bootstrap_servers={kafka}",
        f"stream.kafka.topic={topic}",
        "stream.kafka.mapping=synthetic",
    )
    produce(
        spark,
        kafka,
        topic,
        [
            tracked("k1", 0, "add_to_cart", "u1"),  # offset 0
            tracked("k2", 10, "page_view", "u2"),  # 1
            '{"id": "k3", "ts": "2026-09-01T10:20:00Z", "type": ',  # 2: cut off
            tracked("k4", 20, "teleport", "u2"),  # 3: unknown event type
            tracked("k1", 25, "add_to_cart", "u1"),  # 4: event_id k1 again
        ],
    )
    report = streaming.run_stream(spark, cfg, available_now=True)
    assert (report.kafka.records, report.kafka.events_added, report.kafka.quarantined) == (5, 2, 3)
    source_file = f"kafka:{topic}/0"
    events = lake.read_table(spark, cfg.lake.root, lake.EVENTS)
    assert sorted(
        (r.event_id, r.event_type, r.user_id, r.source, r.source_file, r.source_line)
        for r in events.collect()
    ) == [
        ("k1", "add_to_cart", "u1", "synthetic", source_file, 0),
        ("k2", "page_view", "u2", "synthetic", source_file, 1),
    ]
    quarantine = lake.read_table(spark, cfg.lake.root, lake.QUARANTINE)
    assert sorted((r.source_line, r.reason) for r in quarantine.collect()) == [
        (2, "malformed_record"),
        (3, "unknown_event_type"),
        (4, "duplicate_event"),
    ]
    assert changes(spark, cfg) == [("u1", CAB, "enter", "rule_matched", at(0))]

    # the next run reads only the new offsets, from the Kafka query's checkpoint
    produce(spark, kafka, topic, [tracked("k5", 30, "purchase", "u1")])
    report = streaming.run_stream(spark, cfg, available_now=True)
    assert (report.kafka.records, report.kafka.events_added) == (1, 1)
    assert changes(spark, cfg) == [
        ("u1", CAB, "enter", "rule_matched", at(0)),
        ("u1", CAB, "exit", "no_longer_matched", at(30)),
        ("u1", RB, "enter", "rule_matched", at(30)),
    ]

    # reading the whole topic again (a lost Kafka checkpoint) adds nothing anywhere
    again = stream_config(
        tmp_path,
        CATALOG,
        "stream.source=kafka",
        f"stream.kafka.bootstrap_servers={kafka}",
        f"stream.kafka.topic={topic}",
        f"stream.checkpoint={tmp_path / 'second-checkpoint'}",
    )
    report = streaming.run_stream(spark, again, available_now=True)
    assert (report.kafka.records, report.kafka.events_added) == (6, 0)
    assert report.kafka.already_present == 3
    assert lake.read_table(spark, cfg.lake.root, lake.EVENTS).count() == 3
    assert lake.read_table(spark, cfg.lake.root, lake.QUARANTINE).count() == 3
    assert len(changes(spark, cfg)) == 3


def test_segment_changes_go_to_a_kafka_topic_once(spark, kafka, tmp_path):
    """A Kafka destination of `microseg activate`: one message per consented change (key:
    its idempotency key), and a second run sends nothing (tests/test_activation.py has the
    changes and the hand count)."""
    from tests.test_activation import CHANGES, CONSENT, NO_CONSENT, SENT

    from microseg.activation.deliver import run_activate

    destinations = tmp_path / "destinations.yaml"
    destinations.write_text(
        "destinations:\n  - id: bus\n    type: kafka\n"
        f"    bootstrap_servers: {kafka}\n    topic: segment-changes\n"
        "    segments: [vip]\n    batch_size: 10\n"
    )
    cfg = make_config(tmp_path, f"destinations.file={destinations}")
    root = cfg.lake.root
    lake.overwrite(
        spark,
        root,
        lake.SEGMENT_CHANGES,
        spark.createDataFrame(CHANGES, lake.SEGMENT_CHANGES.schema),
    )
    lake.overwrite(spark, root, lake.CONSENT, spark.createDataFrame(CONSENT, lake.CONSENT.schema))
    first = run_activate(spark, cfg, run_id="k1").destinations[0]
    assert (first.planned, first.no_consent, first.delivered, first.batches_sent) == (
        SENT,
        NO_CONSENT,
        SENT,
        4,  # 34 changes in batches of 10
    )
    assert run_activate(spark, cfg, run_id="k2").destinations[0].batches_sent == 0
    messages = (
        spark.read.format("kafka")
        .option("kafka.bootstrap.servers", kafka)
        .option("subscribe", "segment-changes")
        .option("startingOffsets", "earliest")
        .load()
        .selectExpr("CAST(key AS STRING) AS key", "CAST(value AS STRING) AS value")
        .collect()
    )
    keys = [m.key for m in messages]
    delivered = {
        r.idempotency_key
        for r in lake.read_table(spark, root, lake.DELIVERIES).collect()
        if r.status == "delivered"
    }
    assert sorted(keys) == sorted(delivered) and len(keys) == SENT
    sample = json.loads(messages[0].value)
    assert set(sample) == {"idempotency_key", "user_key", "segment_id", "change", "changed_at"}

    # erasing u03 (sent: enter and exit) and u26 (never sent: no consent) adds one removal
    from microseg.activation.deliver import notify_erasure

    assert notify_erasure(spark, cfg, {"u03", "u26"}) == {"bus": 1}
    values = [
        m.value
        for m in spark.read.format("kafka")
        .option("kafka.bootstrap.servers", kafka)
        .option("subscribe", "segment-changes")
        .option("startingOffsets", "earliest")
        .load()
        .selectExpr("CAST(value AS STRING) AS value")
        .collect()
    ]
    assert len(values) == SENT + 1
    assert '{"remove": {"user_key": "u03"}}' in values
