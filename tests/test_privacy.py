"""Erasure (`microseg forget`): every table, file version and store; suppression at ingest.

The lake test reads every file under the lake folder itself (its own scan, not
microseg.ops.verify's): Parquet decoded, every value of every column, nested ones too, and
every file byte by byte. Expected counts were read off the generated input files by hand
(grep of the ids in the JSON lines)."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F
from tests.conftest import make_config
from tests.test_sessions import T0, ev, write_bronze

from microseg.core import lake
from microseg.core.config import GenerateConfig
from microseg.core.failpoints import Crash, crash_at
from microseg.core.online_store import open_store
from microseg.core.privacy import id_pattern, keyed_hash
from microseg.core.privacy import pseudonym as python_pseudonym
from microseg.features.job import run_features
from microseg.ingest.files import run_ingest
from microseg.ingest.generate import generate
from microseg.ops.forget import erase_clauses, record_erasure, run_forget
from microseg.ops.verify import scan_lake
from microseg.segments.evaluate import run_segments
from microseg.silver.sessions import run_sessionize

KEY = "privacy-test-key"
AS_OF = datetime(2026, 9, 25, tzinfo=timezone.utc)
# the three people: an anonymous visitor who logged in as u0000039, a user with a record in
# quarantine (an unknown event type), a user in the online store (segment members)
GIVEN = ["a00000055", "u0000033", "u0000002"]
# every id of theirs in the input files (each of the users used one anonymous id)
THEIR_IDS = ["a00000055", "u0000039", "u0000033", "a00000046", "u0000002", "a00000002"]
# input records holding one of THEIR_IDS (grep -c of the six quoted ids: 103 lines)
THEIR_RECORDS = 103


def pseudonym(value: str) -> str:
    return hmac.new(KEY.encode(), value.encode(), hashlib.sha256).hexdigest()


NEEDLES = set(THEIR_IDS) | {pseudonym(i) for i in THEIR_IDS}
TOKEN = re.compile(
    "(?:^|[^A-Za-z0-9_.@+-])(" + "|".join(sorted(NEEDLES)) + ")(?:$|[^A-Za-z0-9_.@+-])"
)


def values(obj):
    """Every scalar in a decoded Parquet value (dicts, lists, map pairs)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from values(k)
            yield from values(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from values(v)
    elif obj is not None:
        yield obj


def traces(root: Path) -> list[tuple[str, str]]:
    """(file, id) for every id of the people found anywhere under root."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        text = data.decode("latin-1")
        found += [(str(path), m.group(1)) for m in TOKEN.finditer(text)]
        if data[:4] == b"PAR1":
            table = pq.read_table(io.BytesIO(data))
            for column in table.columns:
                for value in values(column.to_pylist()):
                    if isinstance(value, bytes):
                        value = value.decode("latin-1")
                    match = TOKEN.search(str(value))
                    if match:
                        found.append((str(path), match.group(1)))
    return found


def other_rows(spark, root) -> dict[str, list]:
    """Every row of every identifier table that is not one of the people's, sorted."""
    keys = set(THEIR_IDS) | {f"anon:{i}" for i in THEIR_IDS if i.startswith("a")}
    out = {}
    for table in lake.ALL_TABLES:
        if not table.identifiers or not lake.table_exists(spark, root, table):
            continue
        rows = []
        for row in lake.read_table(spark, root, table).collect():
            record = row.asDict(recursive=True)
            text = json.dumps(record, default=str, sort_keys=True)
            if not any(k in text for k in keys):
                rows.append(text)
        out[table.name] = sorted(rows)
    return out


@pytest.fixture(scope="module")
def erased(spark, tmp_path_factory):
    """A small lake built as the demo builds it, before and after forgetting GIVEN."""
    base = tmp_path_factory.mktemp("privacy")
    cfg = make_config(
        base,
        f"privacy.pseudonymization_key={KEY}",
        "privacy.pseudonymization_key_env=MICROSEG_TEST_UNSET_KEY",
        "privacy.erasure_retention=0h",
    )
    settings = GenerateConfig(
        seed=42,
        users=80,
        days=30,
        start=datetime(2026, 9, 1, tzinfo=timezone.utc),
        output=str(base / "data"),
        malformed_share=0.01,
        invalid_share=0.01,
    )
    generate(settings)
    events = str(base / "data" / "events")
    run_ingest(spark, cfg, source="synthetic", path=events)
    run_sessionize(spark, cfg)
    run_features(spark, cfg, as_of=AS_OF)
    run_segments(spark, cfg, as_of=AS_OF)
    root = cfg.lake.root
    store = open_store(cfg)
    in_store_before = [m.segment_id for m in store.user_segments("u0000002")]
    store.close()
    before = other_rows(spark, root)
    pristine = base / "pristine"
    shutil.copytree(root, pristine)
    report = run_forget(spark, cfg, GIVEN, request_id="request-1")
    verification = scan_lake(root, report.subjects.keys)
    record_erasure(spark, cfg, report, verification=verification)
    return {
        "cfg": cfg,
        "events": events,
        "before": before,
        "pristine": pristine,
        "in_store_before": in_store_before,
        "report": report,
        "verification": verification,
    }


@pytest.mark.slow
def test_forget_leaves_no_id_of_the_people_in_any_file_and_others_unchanged(spark, erased):
    cfg, report = erased["cfg"], erased["report"]
    root = Path(cfg.lake.root)
    assert erased["in_store_before"], "u0000002 was in the online store before"
    assert report.subjects.user_ids == {"u0000039", "u0000033", "u0000002"}
    assert report.subjects.anonymous_ids == {"a00000055", "a00000046", "a00000002"}
    assert report.rows_removed == {
        "bronze/events": 102,  # + 1 record in quarantine = the 103 input records
        "bronze/quarantine": 1,
        "silver/identity_map": 3,
        "silver/sessions": 11,
        "silver/user_days": 13,
        "silver/consent": 6,  # one state per person and purpose (read off the input by hand)
        "gold/user_features": 3,
        "gold/segment_membership": 5,
        "gold/segment_changes": 5,
    }
    assert report.store_entries_removed == 8  # 5 memberships, 3 aliases
    # our own scan: every file, Parquet decoded, bytes as they are
    assert traces(root) == []
    assert erased["verification"].clean
    assert erased["verification"].files > 100
    assert other_rows(spark, cfg.lake.root) == erased["before"]
    store = open_store(cfg)
    assert store.user_segments("u0000002") == []
    assert store.resolve("a00000055") is None
    store.close()


@pytest.mark.slow
def test_the_audit_row_has_hashes_only_and_reingest_brings_nobody_back(spark, erased):
    cfg = erased["cfg"]
    audit = lake.read_table(spark, cfg.lake.root, lake.ERASURES).collect()
    assert len(audit) == 1
    row = audit[0]
    assert row.request_id == "request-1"
    assert len(row.subject_hashes) == 3
    assert not set(row.subject_hashes) & NEEDLES
    assert row.verified is True and row.verify_hits == 0
    assert row.rows_removed["bronze/events"] == 102
    assert row.identifiers == 9  # their 6 ids as stored, and the pseudonyms of the 3 given
    # the old files again: their records are dropped (not even quarantined)
    report = run_ingest(spark, cfg, source="synthetic", path=erased["events"], reprocess=True)
    assert report.suppressed == THEIR_RECORDS
    assert report.events_added == 0
    events = lake.read_table(spark, cfg.lake.root, lake.EVENTS)
    assert events.filter(events.user_id.isin(THEIR_IDS)).count() == 0
    assert events.filter(events.anonymous_id.isin(THEIR_IDS)).count() == 0
    # forgetting them again finds nothing left
    again = run_forget(spark, cfg, GIVEN, request_id="request-2")
    assert set(again.rows_removed.values()) == {0}
    assert again.store_entries_removed == 0


SETTINGS = [
    f"privacy.pseudonymization_key={KEY}",
    "privacy.pseudonymization_key_env=MICROSEG_TEST_UNSET_KEY",
    "privacy.erasure_retention=0h",
]


@pytest.mark.soak  # tests/test_crashes.py kills forget at 8 more points, also under -m soak
def test_a_forget_killed_midway_completes_when_run_again(spark, erased, tmp_path):
    """Killed after the store, or after bronze/events with only silver/identity_map left: the
    rerun finds the same people and leaves the lake as an uninterrupted forget does."""
    shutil.copytree(erased["pristine"], tmp_path / "lake")
    cfg = make_config(tmp_path, *SETTINGS)
    with pytest.raises(Crash), crash_at(names=("after.store",)):
        run_forget(spark, cfg, GIVEN, request_id="killed")
    with pytest.raises(Crash), crash_at(names=("after.bronze/events",)):
        run_forget(spark, cfg, GIVEN, request_id="killed again")
    report = run_forget(spark, cfg, GIVEN, request_id="rerun")
    assert report.subjects.user_ids == {"u0000039", "u0000033", "u0000002"}
    assert traces(tmp_path / "lake") == []
    assert other_rows(spark, cfg.lake.root) == erased["before"]


# --------------------------------------------------------------------------------------
# the pieces


def test_an_id_matches_as_a_whole_token_only():
    pattern = re.compile(id_pattern(["u1", "a.b@x.com"]))
    assert pattern.search('{"user":{"id":"u1"}}')
    assert pattern.search("u1,2026-09-01,view")
    assert pattern.search("anon:u1")
    assert not pattern.search('{"id":"u10"}')
    assert not pattern.search("xu1")
    assert not pattern.search("u1.5")
    assert pattern.search("to=a.b@x.com&")
    assert not pattern.search("a.b@x.comb")
    assert not pattern.search("aXb@x.com")  # the dot is literal


def test_the_python_pseudonym_is_the_one_spark_writes(spark):
    spark_value = (
        spark.createDataFrame([("u0000039",)], "v string")
        .select(keyed_hash(F.col("v"), KEY.encode()))
        .first()[0]
    )
    assert python_pseudonym("u0000039", KEY.encode()) == pseudonym("u0000039") == spark_value


def test_identity_map_rows_of_others_keep_them_and_lose_the_erased_id(spark, tmp_path):
    """anonymous id ax27 was seen with uA7 and uB7 and is stitched to uB7: erasing uA7 keeps
    ax27's row for uB7, without uA7 in its user ids."""
    cfg = make_config(
        tmp_path,
        f"privacy.pseudonymization_key={KEY}",
        "privacy.pseudonymization_key_env=MICROSEG_TEST_UNSET_KEY",
        "privacy.erasure_retention=0h",
    )
    write_bronze(
        spark,
        cfg,
        [
            ev("e1", 0, user="uA7", anon="ax17"),
            ev("e2", 1, anon="ax17"),
            ev("e3", 2, user="uB7", anon="ax27"),
            ev("e4", 3, user="uA7", anon="ax27"),
            ev("e5", 4, user="uB7", anon="ax27"),
            ev("e6", 5, user="uB7"),
        ],
    )
    root = cfg.lake.root
    lake.overwrite(
        spark,
        root,
        lake.IDENTITY_MAP,
        spark.createDataFrame(
            [
                ("ax17", "uA7", 1, ["uA7"], False, T0, T0, T0),
                ("ax27", "uB7", 2, ["uA7", "uB7"], True, T0, T0, T0),
            ],
            lake.IDENTITY_MAP.schema,
        ),
    )
    report = run_forget(spark, cfg, ["uA7"], request_id="r")
    assert report.subjects.user_ids == {"uA7"}
    assert report.subjects.anonymous_ids == {"ax17"}  # x2 is B's
    identity = lake.read_table(spark, root, lake.IDENTITY_MAP).collect()
    assert [
        (r.anonymous_id, r.user_key, r.user_ids, r.user_ids_seen, r.is_conflict) for r in identity
    ] == [("ax27", "uB7", ["uB7"], 1, False)]
    events = sorted(r.event_id for r in lake.read_table(spark, root, lake.EVENTS).collect())
    assert events == ["e3", "e5", "e6"]
    # the Delta log holds the MERGE's condition, never the ids it erased
    log = "".join(
        p.read_text() for p in (Path(root) / "bronze" / "events" / "_delta_log").glob("*.json")
    )
    assert "array_contains(keys#" in log
    assert "uA7" not in log and "ax17" not in log


def test_erase_clauses_name_each_identifier_kind():
    match, delete, updates = erase_clauses(lake.IDENTITY_MAP)
    assert delete == (
        "array_contains(s.keys, t.`anonymous_id`) OR array_contains(s.keys, t.`user_key`)"
    )
    assert match == delete + " OR arrays_overlap(t.`user_ids`, s.keys)"
    assert updates["`user_ids`"] == "array_except(t.`user_ids`, s.keys)"
    _, delete, updates = erase_clauses(lake.QUARANTINE)
    assert delete == (
        "coalesce(t.`raw` RLIKE s.pattern, false) OR coalesce(t.`message` RLIKE s.pattern, false)"
    )
    assert updates == {}
