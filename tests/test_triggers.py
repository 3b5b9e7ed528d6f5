"""Triggers: hand-written timelines decided by the batch job and by the stream alike (delay
with a restart, a condition at the fire time, inactivity, caps, quiet hours, segment enters);
the trigger file's checks. Every expected row is worked out by hand in the comments.

Times are minutes after T0 = 2026-09-01 10:00 UTC (a Tuesday; Europe/Berlin is UTC+2 then).
"""

from __future__ import annotations

import textwrap
from datetime import datetime, timedelta

import pytest
from tests.conftest import make_config
from tests.test_activation import _change
from tests.test_experiments import _membership
from tests.test_sessions import T0, ev, write_bronze

from microseg.activation.fire import run_triggers
from microseg.activation.stream import run_activation_stream
from microseg.activation.triggers import QuietHours, defer_quiet, load_triggers
from microseg.core import lake, schemas
from microseg.segments.model import SegmentFileError

TRIGGERS = """\
triggers:
  - id: cart_reminder
    name: Cart reminder
    on: {event: add_to_cart}
    delay: 30m
    conditions:
      - {event: purchase, since_last: add_to_cart, at_most: 0}
    cap: {count: 1, per: 7d}
    lookback: 30d
  - id: win_back
    on: {inactivity: 48h}
    lookback: 30d
  - id: thank_you
    on: {event: purchase}
    delay: 1h
    quiet_hours: {start: "22:00", end: "08:00", timezone: Europe/Berlin}
    lookback: 30d
  - id: vip_welcome
    on: {enter: vip}
    delay: 1h
    in_segment: vip
    lookback: 30d
"""

EVENTS = [
    # u1: a cart add restarted after 10 minutes, one 2 days later, one 8 days later
    ev("a1", 0, "add_to_cart", user="u1"),
    ev("a2", 10, "add_to_cart", user="u1"),
    ev("a3", 2880, "add_to_cart", user="u1"),
    ev("a4", 11520, "add_to_cart", user="u1"),
    # u2: bought 20 minutes after the cart add
    ev("b1", 0, "add_to_cart", user="u2"),
    ev("b2", 20, "purchase", user="u2"),
    # u3: two cart adds 35 minutes apart
    ev("c1", 0, "add_to_cart", user="u3"),
    ev("c2", 35, "add_to_cart", user="u3"),
    # u4: a purchase at 20:00 UTC (22:00 in Berlin)
    ev("d1", 600, "purchase", user="u4"),
]
AS_OF = T0 + timedelta(minutes=14400)  # 10 days after T0


def t(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


# (trigger, user, anchor, fire minute, status, reason)
EXPECTED = sorted(
    [
        # u1 cart: a1 restarted by a2 (10 < 30 min); a2 due at 40 with no purchase: fires;
        # a3 due 2910 is within 7 days of 40: capped; a4 due 11550 is 11510 min > 7 d later
        ("cart_reminder", "u1", "a2", 40, "fired", None),
        ("cart_reminder", "u1", "a3", 2910, "suppressed", "capped"),
        ("cart_reminder", "u1", "a4", 11550, "fired", None),
        # u2 bought at 20, after the cart add: the condition fails at 30
        ("cart_reminder", "u2", "b1", 30, "suppressed", "conditions_not_met"),
        # u3: c1's next add is 35 >= 30 min later: due at 30, fires; c2 at 65 is capped
        ("cart_reminder", "u3", "c1", 30, "fired", None),
        ("cart_reminder", "u3", "c2", 65, "suppressed", "capped"),
        # inactivity 48 h = 2880 min after the last event with none since
        # u1: 10 -> 2880 is a gap of 2870 < 2880: no; 2880 -> 11520: fires at 5760;
        # 11520 + 2880 = 14400 = the as-of: fires
        ("win_back", "u1", "a3", 5760, "fired", None),
        ("win_back", "u1", "a4", 14400, "fired", None),
        ("win_back", "u2", "b2", 2900, "fired", None),
        ("win_back", "u3", "c2", 2915, "fired", None),
        ("win_back", "u4", "d1", 3480, "fired", None),
        # thank-you 1 h after a purchase: u2's at 80 (13:20 Berlin); u4's due at 660 is 23:00
        # in Berlin, quiet: waits until 08:00 Berlin = 06:00 UTC on 09-02 = minute 1200
        ("thank_you", "u2", "b2", 80, "fired", None),
        ("thank_you", "u4", "d1", 1200, "fired", None),
    ]
)


# vip: u5 enters at 100 and leaves at 130 (before the 1 h delay is up); u6 enters at 100
VIP_CHANGES = [_change("u5", "enter", t(100)), _change("u5", "exit", t(130))]
VIP_CHANGES += [_change("u6", "enter", t(100))]
VIP_INTERVALS = [_membership("u5", t(100), t(130), "vip"), _membership("u6", t(100), segment="vip")]


def trigger_lake(spark, tmp_path, *overrides, events=True):
    path = tmp_path / "triggers.yaml"
    path.write_text(TRIGGERS)
    cfg = make_config(tmp_path, f"triggers.file={path}", *overrides)
    if events:
        write_bronze(spark, cfg, EVENTS)
    root = cfg.lake.root
    for table, rows in (
        (lake.SEGMENT_CHANGES, VIP_CHANGES),
        (lake.SEGMENT_MEMBERSHIP, VIP_INTERVALS),
    ):
        lake.ensure_table(spark, root, table)
        frame = spark.createDataFrame(rows, table.schema)
        frame.write.format("delta").mode("append").save(lake.table_path(root, table))
    return cfg


def firings(spark, cfg) -> list[tuple]:
    rows = lake.read_table(spark, cfg.lake.root, lake.TRIGGER_FIRINGS).collect()
    return sorted(
        (
            r.trigger_id,
            r.user_key,
            r.anchor_key if r.trigger_id != "vip_welcome" else "enter",
            int((r.fire_at - T0).total_seconds() // 60),
            r.status,
            r.reason,
        )
        for r in rows
    )


VIP_EXPECTED = [
    # u5 left vip at 130, before the fire time 160; u6 is still in: fires at 160
    ("vip_welcome", "u5", "enter", 160, "suppressed", "not_in_segment"),
    ("vip_welcome", "u6", "enter", 160, "fired", None),
]


def test_batch_runs_decide_the_hand_written_timeline(spark, tmp_path):
    cfg = trigger_lake(spark, tmp_path)
    early = run_triggers(spark, cfg, as_of=t(1000), run_id="early")
    # due by 1000: the cart decisions up to 65, thank-you at 80 (u4's waits until 1200),
    # vip at 160; no inactivity period is over yet
    assert firings(spark, cfg) == sorted(
        [row for row in EXPECTED if row[0] == "cart_reminder" and row[3] <= 1000]
        + [("thank_you", "u2", "b2", 80, "fired", None)]
        + VIP_EXPECTED
    )
    assert early.fired == 4

    report = run_triggers(spark, cfg, as_of=AS_OF, run_id="late")
    assert firings(spark, cfg) == sorted(EXPECTED + VIP_EXPECTED)
    # the second run decided the rest: u1's two later carts (the cap counts the firing at 40
    # of the first run), every inactivity, u4's thank-you
    counts = {c.trigger_id: (c.fired, c.suppressed) for c in report.triggers}
    assert counts == {
        "cart_reminder": (1, {"capped": 1}),
        "win_back": (5, {}),
        "thank_you": (1, {}),
        "vip_welcome": (0, {}),
    }
    # a rerun decides nothing new
    again = run_triggers(spark, cfg, as_of=AS_OF, run_id="again")
    assert again.fired == 0
    assert len(firings(spark, cfg)) == len(EXPECTED) + len(VIP_EXPECTED)


def test_the_stream_decides_the_same_rows_and_delivers_them_once(spark, tmp_path):
    """The timeline arrives in two pieces; the stream's clock (latest event - 1 h) stops at
    2820 and 14400 minutes, a different cut from the batch runs (1000 and 14400), and its rows
    are the same hand-written ones. Firings of two triggers go to a CSV export from the
    stream."""
    destinations = tmp_path / "destinations.yaml"
    destinations.write_text(
        textwrap.dedent(
            f"""\
            destinations:
              - id: reminders
                type: file
                path: {tmp_path / "exports"}
                triggers: [cart_reminder, thank_you]
                fields: [user_key, segment_id, change, changed_at]
                consent: none
            """
        )
    )
    cfg = trigger_lake(
        spark,
        tmp_path,
        "stream.watermark_delay=1h",
        f"destinations.file={destinations}",
        events=False,
    )
    minute = lambda row: (row[1] - T0).total_seconds() / 60  # noqa: E731
    pieces = [
        [e for e in EVENTS if minute(e) <= 2880],
        [e for e in EVENTS if minute(e) > 2880] + [ev("z1", 14460, user="u9")],  # clock 14400
    ]
    clocks = []
    for i, piece in enumerate(pieces):
        write_bronze(spark, cfg, piece)
        report = run_activation_stream(spark, cfg, run_id=f"s{i}", available_now=True)
        clocks.append(report.clock)
    assert clocks == [t(2820), t(14400)]
    assert firings(spark, cfg) == sorted(EXPECTED + VIP_EXPECTED)
    rows = lake.read_table(spark, cfg.lake.root, lake.TRIGGER_FIRINGS).collect()
    assert {r.source for r in rows} == {"stream"}

    # cart_reminder fired for u1 at 40 and 11550, u3 at 30; thank_you for u2 at 80, u4 at 1200
    ledger = lake.read_table(spark, cfg.lake.root, lake.DELIVERIES).collect()
    assert sorted((r.segment_id, r.user_key, r.changed_at, r.status) for r in ledger) == [
        ("cart_reminder", "u1", t(40), "delivered"),
        ("cart_reminder", "u1", t(11550), "delivered"),
        ("cart_reminder", "u3", t(30), "delivered"),
        ("thank_you", "u2", t(80), "delivered"),
        ("thank_you", "u4", t(1200), "delivered"),
    ]
    exported = (
        spark.read.option("header", True)
        .option("recursiveFileLookup", True)
        .csv(str(tmp_path / "exports" / "reminders"))
    )
    assert sorted((r.segment_id, r.user_key, r.change) for r in exported.collect()) == [
        ("cart_reminder", "u1", "trigger"),
        ("cart_reminder", "u1", "trigger"),
        ("cart_reminder", "u3", "trigger"),
        ("thank_you", "u2", "trigger"),
        ("thank_you", "u4", "trigger"),
    ]


@pytest.mark.parametrize(
    "due, start, end, expected",
    [
        # Berlin is UTC+2 until 2026-10-25 03:00 local, UTC+1 after
        (datetime(2026, 9, 1, 19, 59), "22:00", "08:00", datetime(2026, 9, 1, 19, 59)),
        (datetime(2026, 9, 1, 20, 0), "22:00", "08:00", datetime(2026, 9, 2, 6, 0)),
        (datetime(2026, 9, 2, 3, 0), "22:00", "08:00", datetime(2026, 9, 2, 6, 0)),
        (datetime(2026, 9, 2, 6, 0), "22:00", "08:00", datetime(2026, 9, 2, 6, 0)),
        (datetime(2026, 10, 24, 22, 30), "22:00", "08:00", datetime(2026, 10, 25, 7, 0)),
        (datetime(2026, 9, 1, 10, 0), "12:30", "14:00", datetime(2026, 9, 1, 10, 0)),
        (datetime(2026, 9, 1, 10, 45), "12:30", "14:00", datetime(2026, 9, 1, 12, 0)),
    ],
)
def test_quiet_hours_by_hand_in_python_and_spark(spark, due, start, end, expected):
    from pyspark.sql import functions as F

    from microseg.activation.fire import quiet_fire_at

    hour, minute = (int(x) for x in start.split(":"))
    end_hour, end_minute = (int(x) for x in end.split(":"))
    from datetime import time

    quiet = QuietHours(time(hour, minute), time(end_hour, end_minute), "Europe/Berlin")
    assert defer_quiet(due, quiet) == expected
    got = spark.createDataFrame([(due,)], "due timestamp").select(
        quiet_fire_at(F.col("due"), quiet).alias("fire")
    )
    assert got.first().fire == expected


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "triggers:\n  - id: x\n    on: {event: add_to_kart}\n",
            "line 3: trigger 'x': on.event: unknown event type(s) ['add_to_kart']",
        ),
        ("triggers:\n  - id: x\n    delay: 30m\n", "line 2: trigger 'x': on is required"),
        (
            "triggers:\n  - id: x\n    on: {inactivity: 48h}\n    delay: 1h\n",
            "line 4: trigger 'x': an inactivity trigger fires after its inactivity period",
        ),
        (
            "triggers:\n  - id: x\n    on: {event: purchase}\n    cap: {count: 0, per: 7d}\n",
            "line 4: trigger 'x': cap.count must be a whole number >= 1",
        ),
        (
            "triggers:\n  - id: x\n    on: {event: purchase}\n"
            "    quiet_hours: {start: '22:00', end: '08:00', timezone: Mars/Olympus}\n",
            "is not an IANA time zone",
        ),
        (
            "triggers:\n  - id: x\n    on: {event: purchase}\n    conditions:\n"
            "      - {feature: orders_30d, gte: 1}\n",
            "line 5: trigger 'x': trigger conditions are event and last conditions",
        ),
        (
            "triggers:\n  - id: x\n    on: {event: purchase}\n    dealy: 1h\n",
            "line 4: trigger 'x': unknown key 'dealy' in a trigger",
        ),
    ],
)
def test_a_bad_trigger_file_names_the_line_and_the_problem(tmp_path, text, message):
    path = tmp_path / "triggers.yaml"
    path.write_text(textwrap.dedent(text))
    cfg = make_config(tmp_path, f"triggers.file={path}")
    with pytest.raises(SegmentFileError) as caught:
        load_triggers(cfg)
    assert message in "\n".join(caught.value.problems)


def test_the_default_trigger_file_is_valid():
    from tests.conftest import ROOT

    cfg = make_config(ROOT / "build" / "unused")
    triggers = load_triggers(cfg, ROOT / "conf" / "triggers.yaml")
    assert [t.id for t in triggers.triggers]
    assert schemas.TRIGGER_FIRINGS.names[:3] == ["trigger_id", "user_key", "anchor_key"]
