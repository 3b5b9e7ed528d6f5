"""Property-based ingest (hypothesis): random records with random corruptions; every record
ends in exactly one of bronze/events and bronze/quarantine, and a valid one in bronze."""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import TEST_KEY, make_config

from microseg.core import lake
from microseg.ingest.files import run_ingest

NOW = datetime(2026, 10, 1, tzinfo=timezone.utc)
TYPES = ["page_view", "product_view", "search", "add_to_cart", "purchase"]
# no control, surrogate or space characters: a line of these is never blank
NO_SPACE = ("Cs", "Cc", "Zs", "Zl", "Zp")
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
ID = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=10),
    st.integers(0, 10**9),
)


@st.composite
def valid_record(draw, index: int) -> dict:
    return {
        "id": f"ev-{index}",
        "ts": draw(st.datetimes(datetime(2020, 1, 1), datetime(2026, 9, 30))).isoformat() + "Z",
        "type": draw(st.sampled_from(TYPES)),
        "user": {
            "id": draw(st.none() | ID),
            "anon_id": draw(ID),
            "email": draw(st.none() | st.emails()),
        },
        "product": draw(
            st.none()
            | st.fixed_dictionaries(
                {
                    "id": ID,
                    "category": st.none() | TEXT,
                    "price": st.none() | st.floats(0, 1e6, allow_nan=False),
                }
            )
        ),
        "qty": draw(st.none() | st.integers(1, 100)),
        "currency": draw(st.sampled_from(["EUR", "USD", None])),
        "search": draw(st.none() | TEXT),
        "page": {"url": draw(st.none() | TEXT), "referrer": None},
        "device": draw(st.sampled_from(["mobile", "desktop", None])),
        "geo": {"country": "DE", "city": draw(st.none() | TEXT)},
        "utm": None,
        "consent": {"analytics": draw(st.booleans()), "marketing": draw(st.booleans())},
    }


CORRUPTIONS = [
    "none",
    "truncate",
    "trailing_garbage",
    "drop_time",
    "bad_time",
    "future_time",
    "unknown_type",
    "negative_price",
    "text_price",
    "object_user_id",
    "no_user_key",
    "random_text",
    "duplicate_id",
]


@st.composite
def line(draw, index: int) -> tuple[str, str]:
    """(kind of corruption, the line)."""
    record = draw(valid_record(index))
    kind = draw(st.sampled_from(CORRUPTIONS))
    if kind == "drop_time":
        del record["ts"]
    elif kind == "bad_time":
        record["ts"] = draw(TEXT.filter(lambda t: not t[:1].isdigit()))
    elif kind == "future_time":
        record["ts"] = "2027-01-01T00:00:00Z"
    elif kind == "unknown_type":
        record["type"] = "hover"
    elif kind == "negative_price":
        record["product"] = {"id": "p", "category": None, "price": -draw(st.floats(0.01, 1e6))}
    elif kind == "text_price":
        record["product"] = {"id": "p", "category": None, "price": "cheap"}
    elif kind == "object_user_id":
        record["user"]["id"] = {"x": draw(ID)}
    elif kind == "no_user_key":
        record["user"] = {"id": None, "anon_id": None, "email": None}
    elif kind == "duplicate_id":
        record["id"] = "ev-0"
    text = json.dumps(record)
    if kind == "truncate":
        text = text[: draw(st.integers(1, len(text) - 1))]
    elif kind == "trailing_garbage":
        text += " " + draw(st.text(alphabet="xyz{}[],1", min_size=1, max_size=5))
    elif kind == "random_text":
        text = draw(st.text(alphabet=st.characters(blacklist_categories=NO_SPACE), min_size=1))
    return kind, text


@st.composite
def batch(draw) -> list[tuple[str, str]]:
    size = draw(st.integers(20, 150))
    return [draw(line(i)) for i in range(size)]


TRIED = {"examples": 0, "records": 0}


@pytest.mark.slow
@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=batch())
def test_every_record_ends_in_exactly_one_of_bronze_and_quarantine(spark, lines):
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        cfg = make_config(base, f"privacy.pseudonymization_key={TEST_KEY}")
        path = base / "in" / "fuzz.jsonl"
        path.parent.mkdir()
        # the writer's line breaks only: a record's own \u2028 and the like stay inside it
        path.write_bytes("".join(text + "\n" for _, text in lines).encode("utf-8"))
        report = run_ingest(spark, cfg, source="synthetic", path=str(path), now=NOW)
        root = cfg.lake.root
        in_bronze = (
            [r.source_line for r in lake.read_table(spark, root, lake.EVENTS).collect()]
            if lake.table_exists(spark, root, lake.EVENTS)
            else []
        )
        quarantined = {
            r.source_line: r.reason for r in lake.read_table(spark, root, lake.QUARANTINE).collect()
        }
    expected_lines = list(range(1, len(lines) + 1))
    assert report.records == len(expected_lines)
    assert len(in_bronze) == len(set(in_bronze))
    assert sorted(in_bronze + list(quarantined)) == expected_lines
    assert report.events_added + report.quarantined == report.records
    for number, (kind, text) in enumerate(lines, 1):
        if kind in (
            "trailing_garbage",
            "unknown_type",
            "no_user_key",
            "object_user_id",
            "future_time",
            "negative_price",
            "text_price",
            "drop_time",
        ):
            assert number in quarantined, (kind, text)
        if kind == "none":
            assert number in in_bronze, (kind, text, quarantined.get(number))
    TRIED["examples"] += 1
    TRIED["records"] += len(expected_lines)
    print(f"fuzz: {TRIED['examples']} examples, {TRIED['records']} records so far")
