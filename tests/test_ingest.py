"""Batch ingest: mappings, every quarantine reason, no loss, idempotence, pseudonymization."""

from __future__ import annotations

import json
from datetime import date, datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F
from tests.conftest import DATA, ROOT, SHARED_DATA, make_config

from microseg.core import lake
from microseg.core.config import ConfigError
from microseg.ingest.canonical import REASONS, Check, checks_for
from microseg.ingest.files import run_ingest
from microseg.ingest.sources import SourceFormatError, load_source

NOW = datetime(2026, 10, 1, tzinfo=timezone.utc)


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def record(event_id, ts="2026-09-10T10:00:00.000Z", type_="product_view", **over) -> dict:
    """One raw record in the layout of conf/sources/synthetic.yaml."""
    rec = {
        "id": event_id,
        "ts": ts,
        "type": type_,
        "user": {"id": "u1", "anon_id": "a1", "email": "ada@example.com"},
        "product": {"id": "p1", "category": "books", "price": 19.99},
        "qty": None,
        "currency": "EUR",
        "search": None,
        "page": {"url": "https://shop.example.com/p/p1", "referrer": None},
        "device": "Mobile",
        "geo": {"country": "DE", "city": "Berlin"},
        "utm": None,
        "consent": {"analytics": True, "marketing": False},
    }
    rec.update(over)
    return rec


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def quarantine(spark, cfg):
    return lake.read_table(spark, cfg.lake.root, lake.QUARANTINE)


def events(spark, cfg):
    return lake.read_table(spark, cfg.lake.root, lake.EVENTS)


BAD_INPUT = [
    json.dumps(record("e1")),  # 1 valid
    '{"id": "e2", "ts": "2026-09-10T10:01:00Z", "type": "add_to_c',  # 2 truncated
    "",  # 3 blank: not a record
    json.dumps(record("e4", type_=None)),  # 4
    json.dumps(record("e5", ts="yesterday noon")),  # 5
    json.dumps(record("e6", ts="1999-12-31T23:59:59Z")),  # 6
    json.dumps(record("e7", ts="2099-01-01T00:00:00Z")),  # 7
    json.dumps(record("e8", type_="hover")),  # 8
    json.dumps(record("e9", product={"id": "p1", "category": "books", "price": "abc"})),  # 9
    json.dumps(record("e10", product={"id": "p1", "category": "books", "price": -5.0})),  # 10
    json.dumps(record("e11", type_="add_to_cart", qty=0)),  # 11
    json.dumps(record("e1")),  # 12 the same event again
    json.dumps(record("e13", user={"id": None, "anon_id": None, "email": None})),  # 13
    json.dumps(record("e14", consent={"analytics": True, "marketing": "maybe"})),  # 14
    json.dumps(record("e15", currency="EURO")),  # 15
    json.dumps(record("e16", ts="2026-10-01T00:59:00Z", type_="purchase", qty=2)),  # 16
    "[1, 2]",  # 17 JSON, but not an object
    json.dumps(
        record(
            "e18",
            type_="page_view",
            user={"id": None, "anon_id": "a9", "email": None},
            product=None,
            consent={"analytics": True, "marketing": True},
        )
    ),  # 18
]


@pytest.fixture
def bad_input_report(spark, cfg, tmp_path, key_env):
    path = write_lines(tmp_path / "in" / "events.jsonl", BAD_INPUT)
    report = run_ingest(spark, cfg, source="synthetic", path=str(path), now=NOW)
    return report, path


def test_every_reason_lands_in_quarantine(spark, cfg, bad_input_report):
    report, path = bad_input_report
    got = quarantine(spark, cfg).select("source_line", "reason", "event_id", "source_file")
    expected = spark.createDataFrame(
        [
            (2, "malformed_record", None),
            (4, "missing_required_field", "e4"),
            (5, "unparseable_timestamp", "e5"),
            (6, "timestamp_out_of_range", "e6"),
            (7, "future_timestamp", "e7"),
            (8, "unknown_event_type", "e8"),
            (9, "wrong_type", "e9"),
            (10, "impossible_value", "e10"),
            (11, "impossible_value", "e11"),
            (12, "duplicate_event", "e1"),
            (13, "missing_required_field", "e13"),
            (14, "wrong_type", "e14"),
            (15, "impossible_value", "e15"),
            (17, "malformed_record", None),
        ],
        "source_line long, reason string, event_id string",
    ).withColumn("source_file", F.lit(f"file:{path}"))
    assert_df_equality(
        got, expected, ignore_row_order=True, ignore_nullable=True, ignore_metadata=True
    )
    assert report.records == 17  # 18 lines, one blank
    assert (report.events_added, report.quarantined) == (3, 14)


def test_quarantine_messages_name_field_and_value(spark, cfg, bad_input_report):
    messages = dict(quarantine(spark, cfg).select("source_line", "message").collect())
    assert messages[2] == "not a valid JSON object"
    assert messages[4] == "missing required field event_type (input column 'type')"
    assert messages[5] == "event_time 'yesterday noon' does not match format 'iso8601'"
    assert messages[6] == (
        "event_time 1999-12-31 23:59:59 is before ingest.min_event_time 2000-01-01T00:00:00+00:00"
    )
    assert messages[7] == (
        "event_time 2099-01-01 00:00:00 is after the ingest time plus max_future_skew "
        "(2026-10-01T01:00:00+00:00)"
    )
    assert messages[8] == "event_type 'hover' is not one of ingest.event_types"
    assert messages[9] == "price 'abc' is not a number"
    assert messages[10] == "price -5.0 is negative"
    assert messages[11] == "quantity 0 is less than 1"
    assert messages[12].startswith("event_id e1 repeats file:") and messages[12].endswith(" line 1")
    assert messages[13] == "missing user_id and anonymous_id: a user key is required"
    assert messages[14] == "consent_marketing 'maybe' is not true or false"
    assert messages[15] == "currency EURO is not a 3-letter ISO 4217 code"


def test_quarantine_keeps_raw_text_verbatim(spark, cfg, bad_input_report):
    raw = dict(quarantine(spark, cfg).select("source_line", "raw").collect())
    assert raw[2] == BAD_INPUT[1]
    assert raw[17] == "[1, 2]"


def test_valid_records_become_canonical_events(spark, cfg, bad_input_report):
    got = events(spark, cfg).select(
        "event_id",
        "event_time",
        "event_type",
        "user_id",
        "anonymous_id",
        "product_id",
        "category",
        "price",
        "quantity",
        "currency",
        "device",
        "country",
        "consent_marketing",
        "event_date",
        "source",
        "source_line",
    )
    expected = spark.createDataFrame(
        [
            (
                "e1",
                utc(2026, 9, 10, 10),
                "product_view",
                "u1",
                "a1",
                "p1",
                "books",
                19.99,
                None,
                "EUR",
                "mobile",
                "DE",
                False,
                date(2026, 9, 10),
                "synthetic",
                1,
            ),
            (
                "e16",
                utc(2026, 10, 1, 0, 59),
                "purchase",
                "u1",
                "a1",
                "p1",
                "books",
                19.99,
                2,
                "EUR",
                "mobile",
                "DE",
                False,
                date(2026, 10, 1),
                "synthetic",
                16,
            ),
            (
                "e18",
                utc(2026, 9, 10, 10),
                "page_view",
                None,
                "a9",
                None,
                None,
                None,
                None,
                "EUR",
                "mobile",
                "DE",
                True,
                date(2026, 9, 10),
                "synthetic",
                18,
            ),
        ],
        got.schema,
    )
    assert_df_equality(
        got, expected, ignore_row_order=True, ignore_nullable=True, ignore_metadata=True
    )


def test_checks_of_a_mapping_run_in_the_order_of_reasons(spark):
    mapping = load_source(ROOT / "conf" / "sources", "synthetic")
    checks = checks_for(mapping, event_types=("page_view",), earliest=utc(2000, 1, 1), latest=NOW)
    assert [check.reason for check in checks] == [
        "malformed_record",
        *["missing_required_field"] * 4,  # event_time, event_type, event_id, a user key
        "unparseable_timestamp",
        "timestamp_out_of_range",
        "future_timestamp",
        "unknown_event_type",
        *["wrong_type"] * 4,  # price, quantity, consent_analytics, consent_marketing
        *["wrong_type"] * 3,  # event_id, user_id, anonymous_id: a JSON object or array
        *["impossible_value"] * 4,  # price not finite, price negative, quantity, currency
    ]
    order = list(REASONS)
    positions = [order.index(check.reason) for check in checks]
    assert positions == sorted(positions)


def test_a_check_names_a_known_reason(spark):
    with pytest.raises(ValueError, match="unknown quarantine reason 'bad_value'"):
        Check("bad_value", F.lit(True), F.lit("a message"))


def test_personal_fields_are_pseudonymized_with_the_key(spark, cfg, bad_input_report):
    props = dict(events(spark, cfg).select("event_id", "properties").collect())
    # HMAC-SHA256("test-only-pseudonymization-key", "ada@example.com"), from Python's hmac
    assert props["e1"] == {
        "email": "51a37e08fa6a4df1c13fd873c1abf28059da896c5cff01e034a1428bb1381f7b"
    }
    assert props["e18"] == {}  # no email: nothing to hash, no entry


def test_personal_fields_without_a_key_is_a_config_error(spark, cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MICROSEG_PSEUDONYMIZATION_KEY", raising=False)
    path = write_lines(tmp_path / "in" / "events.jsonl", [json.dumps(record("e1"))])
    with pytest.raises(ConfigError, match="marks \\['properties.email'\\] as personal data"):
        run_ingest(spark, cfg, source="synthetic", path=str(path), now=NOW)
    assert not lake.table_exists(spark, cfg.lake.root, lake.EVENTS)


def test_events_table_has_declared_schema_and_date_partitions(spark, cfg, bad_input_report):
    from delta.tables import DeltaTable

    detail = DeltaTable.forPath(spark, lake.table_path(cfg.lake.root, lake.EVENTS)).detail().first()
    assert detail.partitionColumns == ["event_date"]
    got = events(spark, cfg).schema
    assert [f.name for f in got.fields] == [f.name for f in lake.EVENTS.schema.fields]
    assert [f.dataType for f in got.fields] == [f.dataType for f in lake.EVENTS.schema.fields]


# --------------------------------------------------------------------------------------
# the real samples


def test_rees46_excerpt(spark, cfg):
    report = run_ingest(
        spark, cfg, source="rees46", path=str(DATA / "rees46-2019-oct-excerpt.csv"), now=NOW
    )
    assert (report.records, report.events_added, report.quarantined) == (4000, 3997, 3)
    by_type = dict(events(spark, cfg).groupBy("event_type").count().collect())
    assert by_type == {"product_view": 3915, "add_to_cart": 36, "purchase": 46}
    assert events(spark, cfg).select("user_id").distinct().count() == 1490
    assert events(spark, cfg).filter(F.col("category").isNull()).count() == 1255
    dups = quarantine(spark, cfg).select("source_line", "reason").orderBy("source_line").collect()
    assert [tuple(r) for r in dups] == [
        (3832, "duplicate_event"),
        (3833, "duplicate_event"),
        (3834, "duplicate_event"),
    ]
    first = events(spark, cfg).filter(F.col("source_line") == 2).first()
    assert first.event_time == datetime(2019, 10, 1, 0, 0)  # naive UTC, session zone is UTC
    assert (first.event_type, first.product_id, first.category, first.price, first.user_id) == (
        "product_view",
        "44600062",
        None,
        35.79,
        "541312140",
    )
    assert first.properties == {
        "category_id": "2103807459595387724",
        "brand": "shiseido",
        "site_session_id": "72d76fde-8bb3-4e00-8c23-a032dfed738c",
    }


def test_taobao_excerpt(spark, cfg):
    report = run_ingest(
        spark, cfg, source="taobao", path=str(DATA / "taobao-userbehavior-excerpt.csv"), now=NOW
    )
    assert (report.records, report.events_added, report.quarantined) == (2000, 2000, 0)
    by_type = dict(events(spark, cfg).groupBy("event_type").count().collect())
    assert by_type == {
        "product_view": 1819,
        "add_to_cart": 94,
        "add_to_wishlist": 39,
        "purchase": 48,
    }
    bounds = (
        events(spark, cfg)
        .agg(F.min("event_time"), F.max("event_time"), F.countDistinct("user_id"))
        .first()
    )
    assert tuple(bounds) == (datetime(2017, 11, 24, 16, 1, 4), datetime(2017, 12, 3, 15, 58, 6), 30)
    first = events(spark, cfg).filter(F.col("source_line") == 2).first()
    assert (
        first.user_id,
        first.product_id,
        first.category,
        first.event_type,
        first.event_time,
    ) == ("999477", "2200475", "3607361", "product_view", datetime(2017, 11, 28, 6, 1, 34))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside this clone")
@pytest.mark.slow
def test_full_shared_samples(spark, cfg):
    rees = run_ingest(
        spark, cfg, source="rees46", path=str(SHARED_DATA / "rees46-2019-oct-sample.csv"), now=NOW
    )
    taobao = run_ingest(
        spark,
        cfg,
        source="taobao",
        path=str(SHARED_DATA / "taobao-userbehavior-sample.csv"),
        now=NOW,
    )
    # README of shared/data: 17,434 and 10,000 events; 5 REES46 lines repeat an earlier line
    assert (rees.records, rees.events_added, rees.quarantined) == (17434, 17429, 5)
    assert (taobao.records, taobao.events_added, taobao.quarantined) == (10000, 10000, 0)
    assert events(spark, cfg).count() == 27429


# --------------------------------------------------------------------------------------
# idempotence and files


def test_reingest_adds_nothing(spark, cfg):
    path = str(DATA / "rees46-2019-oct-excerpt.csv")
    run_ingest(spark, cfg, source="rees46", path=path, now=NOW)
    skipped = run_ingest(spark, cfg, source="rees46", path=path, now=NOW)
    assert (skipped.files, len(skipped.skipped_files)) == ([], 1)
    again = run_ingest(spark, cfg, source="rees46", path=path, reprocess=True, now=NOW)
    assert (again.events_added, again.already_present, again.quarantined) == (0, 3997, 3)
    assert events(spark, cfg).count() == 3997
    assert quarantine(spark, cfg).count() == 3
    assert lake.read_table(spark, cfg.lake.root, lake.INGESTED_FILES).count() == 1


def test_event_seen_again_in_a_later_file_is_a_duplicate(spark, cfg, tmp_path, key_env):
    first = write_lines(
        tmp_path / "in" / "day1.jsonl", [json.dumps(record("e1")), json.dumps(record("e2"))]
    )
    run_ingest(spark, cfg, source="synthetic", path=str(first), now=NOW)
    second = write_lines(
        tmp_path / "in2" / "day2.jsonl", [json.dumps(record("e3")), json.dumps(record("e2"))]
    )
    report = run_ingest(spark, cfg, source="synthetic", path=str(second), now=NOW)
    assert (report.events_added, report.quarantined) == (1, 1)
    row = quarantine(spark, cfg).first()
    assert (row.source_line, row.reason, row.event_id) == (2, "duplicate_event", "e2")
    assert row.message == f"event_id e2 was already ingested from file:{first} line 2"


def test_folder_input_reads_every_file_and_skips_hidden(spark, cfg, tmp_path, key_env):
    folder = tmp_path / "in"
    write_lines(folder / "a.jsonl", [json.dumps(record("e1"))])
    write_lines(folder / "sub" / "b.jsonl", [json.dumps(record("e2")), json.dumps(record("e3"))])
    write_lines(folder / "_SUCCESS", ["not data"])
    write_lines(folder / ".hidden.jsonl", ["not data"])
    report = run_ingest(spark, cfg, source="synthetic", path=str(folder), now=NOW)
    assert sorted(f.file.path.rsplit("/", 1)[1] for f in report.files) == ["a.jsonl", "b.jsonl"]
    assert report.events_added == 3


def test_missing_input_path_is_reported(spark, cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="no input files at"):
        run_ingest(spark, cfg, source="rees46", path=str(tmp_path / "nope.csv"), now=NOW)


# --------------------------------------------------------------------------------------
# CSV and Parquet specifics


CSV_SOURCE = """
name: shop_csv
format: csv
csv:
  columns: [ts, kind, user, sku, amount]
fields:
  event_time: {column: ts, format: epoch_millis}
  event_type: {column: kind, values: {v: product_view, b: purchase}}
  user_id: user
  product_id: sku
  price: amount
"""


def test_csv_rows_with_wrong_column_counts_are_malformed(spark, tmp_path, sources_dir):
    (sources_dir / "shop_csv.yaml").write_text(CSV_SOURCE)
    cfg = make_config(tmp_path, f"ingest.sources_dir={sources_dir}")
    path = write_lines(
        tmp_path / "in" / "shop.csv",
        [
            "ts,kind,user,sku,amount",
            "1757498400000,v,u1,s1,10.5",  # 2 valid
            "1757498400000,v,u1,s1",  # 3 a column missing
            "1757498400000,v,u1,s1,10.5,extra",  # 4 one too many
            '1757498400000,b,u1,"s,2",3',  # 5 quoted delimiter: valid
            '1757498400000,b,u1,"s3,3',  # 6 quote never closed
            "1757498400000,v,,s1,1",  # 7 empty user: missing
        ],
    )
    report = run_ingest(spark, cfg, source="shop_csv", path=str(path), now=NOW)
    assert (report.records, report.events_added, report.quarantined) == (6, 2, 4)
    got = {r.source_line: (r.reason, r.message) for r in quarantine(spark, cfg).collect()}
    assert got == {
        3: ("malformed_record", "expected 5 columns, found 4"),
        4: ("malformed_record", "expected 5 columns, found 6"),
        6: ("malformed_record", "unbalanced quotes"),
        7: ("missing_required_field", "missing user_id: a user key is required"),
    }
    rows = {
        r.source_line: (r.product_id, r.price, r.event_type, r.event_time)
        for r in events(spark, cfg).collect()
    }
    assert rows == {
        2: ("s1", 10.5, "product_view", datetime(2025, 9, 10, 10, 0)),
        5: ("s,2", 3.0, "purchase", datetime(2025, 9, 10, 10, 0)),
    }


def test_csv_header_that_differs_fails_naming_the_file(spark, tmp_path, sources_dir):
    (sources_dir / "shop_csv.yaml").write_text(CSV_SOURCE)
    cfg = make_config(tmp_path, f"ingest.sources_dir={sources_dir}")
    path = write_lines(tmp_path / "in" / "shop.csv", ["ts,kind,user,amount,sku", "1,v,u,1,s"])
    with pytest.raises(
        SourceFormatError, match=r"shop.csv: header 'ts,kind,user,amount,sku' differs"
    ):
        run_ingest(spark, cfg, source="shop_csv", path=str(path), now=NOW)


def test_parquet_input_uses_row_numbers(spark, cfg, tmp_path, key_env):
    rows = [
        record("p1"),
        record("p2", product={"id": "p1", "category": "books", "price": -1.0}),
        record(
            "p3",
            type_="search",
            search="red shoes",
            utm={"source": "news", "medium": "email", "campaign": "fall"},
        ),
    ]
    for r in rows:
        r["qty"] = None
    table = pa.Table.from_pylist(rows)
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "events.parquet")
    report = run_ingest(
        spark, cfg, source="synthetic", path=str(tmp_path / "pq"), fmt="parquet", now=NOW
    )
    assert (report.records, report.events_added, report.quarantined) == (3, 2, 1)
    bad = quarantine(spark, cfg).first()
    assert (bad.source_line, bad.reason, bad.event_id) == (2, "impossible_value", "p2")
    assert json.loads(bad.raw)["product"]["price"] == -1.0
    search = events(spark, cfg).filter(F.col("event_id") == "p3").first()
    assert (search.search_query, search.source_line) == ("red shoes", 3)


def test_non_spark_reader_opens_bronze(spark, cfg, bad_input_report):
    from deltalake import DeltaTable

    bronze = DeltaTable(lake.table_path(cfg.lake.root, lake.EVENTS)).to_pyarrow_table()
    quarantined = DeltaTable(lake.table_path(cfg.lake.root, lake.QUARANTINE)).to_pyarrow_table()
    assert (bronze.num_rows, quarantined.num_rows) == (3, 14)
    assert sorted(bronze.column("event_id").to_pylist()) == ["e1", "e16", "e18"]


# --------------------------------------------------------------------------------------
# generated data with injected faults: the no-loss invariant at scale


def test_no_record_lost_on_generated_data_with_faults(spark, cfg, tmp_path, key_env):
    from microseg.core.config import GenerateConfig
    from microseg.ingest.generate import generate

    settings = GenerateConfig(
        users=120,
        days=30,
        output=str(tmp_path / "gen"),
        malformed_share=0.01,
        duplicate_share=0.01,
        late_share=0.02,
        invalid_share=0.02,
    )
    manifest = generate(settings)
    report = run_ingest(
        spark, cfg, source="synthetic", path=str(tmp_path / "gen" / "events"), now=NOW
    )

    total = manifest["total_records"]
    in_bronze, in_quarantine = events(spark, cfg).count(), quarantine(spark, cfg).count()
    assert in_bronze + in_quarantine == total == report.records
    faults, invalid = manifest["faults"], manifest["faults"]["invalid"]
    by_reason = dict(quarantine(spark, cfg).groupBy("reason").count().collect())
    expected = {
        "malformed_record": faults["malformed"],
        "duplicate_event": faults["duplicate"],
        "unknown_event_type": invalid["unknown_event_type"],
        "unparseable_timestamp": invalid["unparseable_timestamp"],
        "future_timestamp": invalid["future_timestamp"],
        "impossible_value": invalid["negative_price"],
        "missing_required_field": invalid["missing_user"] + invalid["missing_event_type"],
    }
    assert by_reason == {k: v for k, v in expected.items() if v}
    # late records are valid events that arrive in a later day's file: all in bronze
    late = (
        events(spark, cfg)
        .filter(
            F.col("event_date")
            < F.to_date(F.regexp_extract("source_file", r"events-(\d{4}-\d{2}-\d{2})", 1))
        )
        .count()
    )
    assert late == faults["late"]
    assert faults["late"] > 0 and faults["duplicate"] > 0 and faults["malformed"] > 0


def test_relative_lake_root_is_under_the_current_directory(spark, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, "lake.root=rel-lake")
    monkeypatch.chdir(tmp_path)
    run_ingest(
        spark, cfg, source="taobao", path=str(DATA / "taobao-userbehavior-excerpt.csv"), now=NOW
    )
    assert (tmp_path / "rel-lake" / "bronze" / "events" / "_delta_log").is_dir()
    assert (tmp_path / "rel-lake" / "bronze" / "quarantine" / "_delta_log").is_dir()


def test_text_after_the_object_and_object_valued_ids_are_quarantined(spark, cfg, tmp_path, key_env):
    ok = json.dumps(record("e1"))
    path = write_lines(
        tmp_path / "in" / "tricky.jsonl",
        [
            ok,  # 1 valid
            json.dumps(record("e2")) + " xyz",  # 2 trailing garbage
            json.dumps(record("e3")) + json.dumps(record("e4")),  # 3 two objects on one line
            json.dumps(record("e5")) + ", 1]",  # 4 closes an array we did not open
            json.dumps(record("e6")) + "   ",  # 5 trailing spaces: valid
            json.dumps(record("e7", user={"id": {"x": 1}, "anon_id": "a1"})),  # 6 object id
            json.dumps(record("e8", user={"id": ["u1"], "anon_id": "a1"})),  # 7 array id
            json.dumps(record("e9", user={"id": 42, "anon_id": "a1"})),  # 8 a number: valid
            json.dumps(record("e10", user={"id": "{x}", "anon_id": "a1"})),  # 9 braces: valid
            json.dumps(record({"nested": "id"})),  # 10 object event id
        ],
    )
    report = run_ingest(spark, cfg, source="synthetic", path=str(path), now=NOW)
    assert (report.records, report.events_added, report.quarantined) == (10, 4, 6)
    got = {r.source_line: (r.reason, r.message) for r in quarantine(spark, cfg).collect()}
    assert got == {
        2: ("malformed_record", "text after the JSON object"),
        3: ("malformed_record", "text after the JSON object"),
        4: ("malformed_record", "text after the JSON object"),
        6: ("wrong_type", """user_id '{"x":1}' is a JSON object or array, not an id"""),
        7: ("wrong_type", """user_id '["u1"]' is a JSON object or array, not an id"""),
        10: ("wrong_type", """event_id '{"nested":"id"}' is a JSON object or array, not an id"""),
    }
    rows = {r.source_line: r.user_id for r in events(spark, cfg).collect()}
    assert rows == {1: "u1", 5: "u1", 8: "42", 9: "{x}"}
