"""Tests of the synthetic event generator (no Spark).

Every expectation is derived by reading the written files back, never from generator internals.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from microseg.core.config import GenerateConfig
from microseg.ingest.generate import estimate_users_for_events, generate

START = datetime(2026, 9, 1, tzinfo=timezone.utc)
DAYS = 30
SHOP = "https://shop.example.com"
PERSONAS = {
    "loyal_frequent_buyer",
    "high_value_occasional",
    "deal_seeker",
    "window_shopper",
    "cart_abandoner",
    "lapsed_customer",
    "new_visitor",
}
EVENT_TYPES = {
    "page_view",
    "product_view",
    "search",
    "add_to_cart",
    "remove_from_cart",
    "add_to_wishlist",
    "checkout_started",
    "purchase",
}
PRODUCT_TYPES = {"product_view", "add_to_cart", "remove_from_cart", "add_to_wishlist", "purchase"}
KEYS = [
    "id",
    "ts",
    "type",
    "user",
    "product",
    "qty",
    "currency",
    "search",
    "page",
    "device",
    "geo",
    "utm",
    "consent",
]
NESTED_KEYS = {
    "user": ["id", "anon_id", "email"],
    "product": ["id", "category", "price"],
    "page": ["url", "referrer"],
    "geo": ["country", "city"],
    "utm": ["source", "medium", "campaign"],
    "consent": ["analytics", "marketing"],
}
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
FAULTS = dict(malformed_share=0.01, duplicate_share=0.01, late_share=0.01, invalid_share=0.012)


def settings(**overrides) -> GenerateConfig:
    values = dict(seed=7, users=700, start=START, days=DAYS, format="json")
    values.update(overrides)
    return GenerateConfig(**values)


def parse_ts(value):
    if not isinstance(value, str) or not TS_RE.match(value):
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def file_day(path: Path):
    return datetime.strptime(path.name[len("events-") :][:10], "%Y-%m-%d").date()


def read_json(out: Path):
    """[(file, line, record or None)] for every line of every event file, in file order."""
    rows = []
    for path in sorted((out / "events").glob("events-*.jsonl")):
        for line in path.read_text().split("\n")[:-1]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            rows.append((path, line, record))
    return rows


def read_parquet(out: Path):
    rows = []
    for path in sorted((out / "events").glob("events-*.parquet")):
        for record in pq.read_table(path).to_pylist():
            rows.append((path, None, record))
    return rows


def read_users(out: Path) -> list[dict]:
    with open(out / "users.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def invalid_kind(record) -> str | None:
    ts = record["ts"]
    if record["type"] is None:
        return "missing_event_type"
    if record["type"] == "hover":
        return "unknown_event_type"
    if ts == "yesterday noon":
        return "unparseable_timestamp"
    if parse_ts(ts) is not None and parse_ts(ts).year >= 2099:
        return "future_timestamp"
    if record["product"] is not None and record["product"]["price"] < 0:
        return "negative_price"
    if record["user"]["id"] is None and record["user"]["anon_id"] is None:
        return "missing_user"
    return None


def owner_of_anon(users: list[dict]) -> dict[str, str]:
    """Anonymous id -> user for cookies used by one user only."""
    owners = {}
    for u in users:
        for anon in u["anonymous_ids"].split(";"):
            if anon != u["shared_anonymous_id"]:
                owners[anon] = u["user_id"]
    return owners


def attributed(rows, users):
    """[(user_id, record)] for parseable records that belong to one known user."""
    owners = owner_of_anon(users)
    out = []
    for _, _, record in rows:
        if record is None:
            continue
        user = record["user"]["id"] or owners.get(record["user"]["anon_id"])
        if user is not None:
            out.append((user, record))
    return out


def digest(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def manifest_without_output(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"].pop("output")
    return manifest


# --------------------------------------------------------------------------------------
# fixtures: generated once per module


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    out = tmp_path_factory.mktemp("faulty")
    manifest = generate(settings(**FAULTS), out)
    return out, manifest, read_json(out), read_users(out)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    manifest = generate(settings(seed=11), out)
    return out, manifest, read_json(out), read_users(out)


@pytest.fixture(scope="module")
def faulty_parquet(tmp_path_factory):
    out = tmp_path_factory.mktemp("faulty_parquet")
    manifest = generate(settings(users=300, format="parquet", **FAULTS), out)
    return out, manifest, read_parquet(out), read_users(out)


# --------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_same_settings_give_identical_files(tmp_path, fmt):
    s = settings(users=150, days=10, format=fmt, **FAULTS)
    generate(s, tmp_path / "a")
    generate(s, tmp_path / "b")
    first, second = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert any(name.startswith("events/") for name in first)
    assert first == second
    assert manifest_without_output(tmp_path / "a") == manifest_without_output(tmp_path / "b")

    generate(s.model_copy(update={"seed": s.seed + 1}), tmp_path / "c")
    third = digest(tmp_path / "c")
    assert third["users.csv"] != first["users.csv"]
    assert all(third.get(name) != h for name, h in first.items() if name.startswith("events/"))


def test_rerun_into_same_folder_replaces_old_event_files(tmp_path):
    generate(settings(users=50, days=5), tmp_path)
    generate(settings(users=50, days=3, format="parquet"), tmp_path)
    names = sorted(p.name for p in (tmp_path / "events").iterdir())
    assert names == [f"events-2026-09-0{d}.parquet" for d in (1, 2, 3)]


# --------------------------------------------------------------------------------------
# layout of records and files


def test_json_records_have_the_documented_layout(clean):
    out, manifest, rows, _ = clean
    assert rows
    for _, line, record in rows:
        assert record is not None
        assert list(record) == KEYS
        for key, nested in NESTED_KEYS.items():
            if record[key] is not None:
                assert list(record[key]) == nested
        # compact JSON, numbers as Python writes them (e.g. 60.0, 59.9)
        assert json.dumps(record, separators=(",", ":")) == line
        assert record["id"].startswith("ev-11-")
        assert TS_RE.match(record["ts"])
        assert record["type"] in EVENT_TYPES
        assert record["currency"] == "EUR"
        assert record["device"] in {"mobile", "desktop", "tablet"}
        user = record["user"]
        assert user["anon_id"] is not None
        assert (user["id"] is None) == (user["email"] is None)
        if user["id"] is not None:
            assert user["email"] == f"{user['id']}@example.com"
        assert (record["product"] is not None) == (record["type"] in PRODUCT_TYPES)
        if record["product"] is not None:
            price = record["product"]["price"]
            assert price > 0 and round(price, 2) == price
            assert record["page"]["url"] in (
                f"{SHOP}/p/{record['product']['id']}",
                f"{SHOP}/cart",
                f"{SHOP}/checkout/confirmation",
            )
        has_qty = record["type"] in {"add_to_cart", "remove_from_cart", "purchase"}
        assert (record["qty"] is not None) == has_qty
        assert (record["search"] is not None) == (record["type"] == "search")
        assert record["page"]["url"].startswith(SHOP)


def test_files_are_per_day_sorted_and_match_the_manifest(clean):
    out, manifest, rows, _ = clean
    by_file = defaultdict(list)
    for path, _, record in rows:
        by_file[path].append(record)
    listed = {f["path"]: f["records"] for f in manifest["files"]}
    assert listed == {f"events/{p.name}": len(r) for p, r in by_file.items()}
    first_day, last_day = START.date(), (START + timedelta(days=DAYS - 1)).date()
    for path, records in by_file.items():
        assert first_day <= file_day(path) <= last_day
        stamps = [r["ts"] for r in records]
        assert stamps == sorted(stamps)
        # a clean run: every record is in the file of its own day
        assert {parse_ts(ts).date() for ts in stamps} == {file_day(path)}
    assert manifest["total_records"] == len(rows) == manifest["clean_events"]
    counts = Counter(r["type"] for _, _, r in rows)
    assert manifest["events_per_type"] == {t: counts.get(t, 0) for t in manifest["events_per_type"]}
    assert len({r["id"] for _, _, r in rows}) == len(rows)
    assert all(v == 0 for k, v in manifest["faults"].items() if k != "invalid")
    assert all(v == 0 for v in manifest["faults"]["invalid"].values())


def test_files_follow_utc_days_when_the_range_starts_mid_day(tmp_path):
    start = datetime(2026, 3, 1, 15, 30, tzinfo=timezone(timedelta(hours=2)))
    generate(settings(users=100, days=3, start=start), tmp_path)
    rows = read_json(tmp_path)
    names = sorted({p.name for p, _, _ in rows})
    assert names[0] == "events-2026-03-01.jsonl" and len(names) <= 4
    for path, _, record in rows:
        ts = parse_ts(record["ts"])
        assert ts.date() == file_day(path)
        assert start <= ts < start + timedelta(days=3)


def test_parquet_holds_the_same_records_as_json(tmp_path):
    common = dict(users=120, days=7, duplicate_share=0.02, late_share=0.02, invalid_share=0.03)
    generate(settings(format="json", **common), tmp_path / "j")
    generate(settings(format="parquet", **common), tmp_path / "p")
    from_json = [(p.stem, r) for p, _, r in read_json(tmp_path / "j")]
    from_parquet = [(p.stem, r) for p, _, r in read_parquet(tmp_path / "p")]
    assert from_json == from_parquet
    schema = pq.read_schema(next((tmp_path / "p" / "events").glob("*.parquet")))
    assert schema.names == KEYS
    assert str(schema.field("qty").type) == "int32"
    assert str(schema.field("ts").type) == "string"
    for key, nested in NESTED_KEYS.items():
        assert [f.name for f in schema.field(key).type] == nested


# --------------------------------------------------------------------------------------
# ground truth and persona behaviour


def test_users_csv_ground_truth(faulty):
    out, manifest, rows, users = faulty
    assert len(users) == 700 == manifest["users"]
    assert list(users[0]) == [
        "user_id",
        "persona",
        "first_seen",
        "last_seen",
        "anonymous_ids",
        "shared_anonymous_id",
    ]
    assert len({u["user_id"] for u in users}) == 700
    assert {u["persona"] for u in users} == PERSONAS
    assert Counter(u["persona"] for u in users) == manifest["personas"]
    holders = defaultdict(set)
    for u in users:
        anons = u["anonymous_ids"].split(";")
        assert 1 <= len(anons) <= 2
        assert parse_ts(u["first_seen"]) <= parse_ts(u["last_seen"])
        for anon in anons:
            holders[anon].add(u["user_id"])
        if u["shared_anonymous_id"]:
            assert u["shared_anonymous_id"] in anons
    shared = {a for a, h in holders.items() if len(h) > 1}
    assert all(len(holders[a]) == 2 for a in shared)
    assert shared == {u["shared_anonymous_id"] for u in users if u["shared_anonymous_id"]}
    assert manifest["shared_anonymous_ids"] == len(shared) >= 1
    assert len(holders) == manifest["anonymous_ids"]


def test_users_first_and_last_seen_match_their_events(clean):
    out, _, rows, users = clean
    seen = defaultdict(list)
    for user, record in attributed(rows, users):
        seen[user].append(record["ts"])
    for u in users:
        if u["shared_anonymous_id"]:
            continue  # some of their anonymous events cannot be attributed
        assert min(seen[u["user_id"]]) == u["first_seen"]
        assert max(seen[u["user_id"]]) == u["last_seen"]


def test_window_shoppers_never_buy(faulty):
    _, _, rows, users = faulty
    persona = {u["user_id"]: u["persona"] for u in users}
    purchases = [r for _, _, r in rows if r is not None and r["type"] == "purchase"]
    assert purchases
    buyers = {r["user"]["id"] for r in purchases if r["user"]["id"] is not None}
    assert buyers and not any(persona[b] == "window_shopper" for b in buyers)
    shoppers = {u for u, p in persona.items() if p == "window_shopper"}
    for user, record in attributed(rows, users):
        if user in shoppers:
            assert record["type"] not in {"checkout_started", "purchase"}


def test_lapsed_customers_are_silent_in_the_last_two_thirds(faulty):
    _, _, rows, users = faulty
    lapsed = {u["user_id"] for u in users if u["persona"] == "lapsed_customer"}
    cutoff = START + timedelta(days=DAYS / 3)
    count = 0
    for user, record in attributed(rows, users):
        ts = parse_ts(record["ts"])
        if user in lapsed and ts is not None and ts.year < 2099:
            assert ts < cutoff
            count += 1
    assert count > 0
    assert all(parse_ts(u["last_seen"]) < cutoff for u in users if u["user_id"] in lapsed)


def test_new_visitors_arrive_in_the_last_ten_days(clean):
    _, _, rows, users = clean
    recent = START + timedelta(days=DAYS - 10)
    new = {u["user_id"] for u in users if u["persona"] == "new_visitor"}
    assert new and all(parse_ts(u["first_seen"]) >= recent for u in users if u["user_id"] in new)
    events = [r for user, r in attributed(rows, users) if user in new]
    assert events
    # they mostly stay anonymous
    assert sum(r["user"]["id"] is None for r in events) / len(events) > 0.6


def test_personas_differ_in_behaviour(clean):
    _, _, rows, users = clean
    persona = {u["user_id"]: u["persona"] for u in users}
    stats = defaultdict(Counter)
    order_value = defaultdict(float)
    for user, r in attributed(rows, users):
        p = persona[user]
        stats[p]["events"] += 1
        stats[p][r["type"]] += 1
        stats[p][r["device"]] += 1
        if r["utm"] and r["utm"]["campaign"] in {"summer_sale", "black_friday"}:
            stats[p]["sale_campaign"] += 1
        if r["type"] == "purchase":
            order_value[p] += r["product"]["price"] * r["qty"]
    share = {p: {k: v / s["events"] for k, v in s.items()} for p, s in stats.items()}
    aov = {p: order_value[p] / max(stats[p]["checkout_started"], 1) for p in stats}
    assert share["cart_abandoner"]["add_to_cart"] > 2 * share["window_shopper"]["add_to_cart"]
    assert stats["cart_abandoner"]["purchase"] < 0.1 * stats["loyal_frequent_buyer"]["purchase"]
    assert aov["high_value_occasional"] > 3 * aov["loyal_frequent_buyer"]
    assert share["deal_seeker"].get("sale_campaign", 0) > 0.3
    assert share["high_value_occasional"]["desktop"] > 0.5
    assert share["window_shopper"]["mobile"] > 0.5
    per_user = (
        stats["loyal_frequent_buyer"]["events"] / Counter(persona.values())["loyal_frequent_buyer"]
    )
    assert (
        per_user
        > stats["high_value_occasional"]["events"]
        / Counter(persona.values())["high_value_occasional"]
    )


# --------------------------------------------------------------------------------------
# sessions and identity


def sessions_by_cookie(rows, users):
    """Sessions rebuilt from the data: a session starts where the referrer is not the shop."""
    shared = {u["shared_anonymous_id"] for u in users if u["shared_anonymous_id"]}
    by_anon = defaultdict(list)
    for _, _, r in rows:
        if r["user"]["anon_id"] not in shared:
            by_anon[r["user"]["anon_id"]].append(r)
    sessions = []
    for records in by_anon.values():
        records.sort(key=lambda r: (r["ts"], int(r["id"].rsplit("-", 1)[1])))
        for r in records:
            referrer = r["page"]["referrer"]
            if referrer is None or not referrer.startswith(SHOP):
                sessions.append([])
            assert sessions, "a cookie's first event must start a session"
            sessions[-1].append(r)
    return sessions


def test_sessions_are_bursts_that_do_not_overlap(clean):
    _, _, rows, users = clean
    owners = owner_of_anon(users)
    sessions = sessions_by_cookie(rows, users)
    assert len(sessions) > 1000
    per_user = defaultdict(list)
    for s in sessions:
        assert len({r["user"]["anon_id"] for r in s}) == 1
        for prev, r in zip(s, s[1:], strict=False):
            assert r["page"]["referrer"] == prev["page"]["url"]
            gap = parse_ts(r["ts"]) - parse_ts(prev["ts"])
            assert timedelta(0) < gap < timedelta(minutes=30)
        per_user[owners[s[0]["user"]["anon_id"]]].append(
            (parse_ts(s[0]["ts"]), parse_ts(s[-1]["ts"]))
        )
    for spans in per_user.values():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start - end >= timedelta(minutes=30)


def test_session_funnel_and_login(clean):
    _, _, rows, users = clean
    for s in sessions_by_cookie(rows, users):
        types = [r["type"] for r in s]
        assert types[0] in {"page_view", "search", "product_view"}
        logged_in = [r["user"]["id"] is not None for r in s]
        assert logged_in == sorted(logged_in), "once logged in, a session stays logged in"
        assert len({r["user"]["id"] for r in s if r["user"]["id"]}) <= 1
        carted = set()
        for prev, r in zip(s, s[1:], strict=False):
            if r["type"] == "add_to_cart":
                assert prev["type"] == "product_view"
                assert r["product"]["id"] == prev["product"]["id"]
                carted.add(r["product"]["id"])
        if "purchase" in types:
            assert types.count("checkout_started") == 1
            assert types.index("checkout_started") < types.index("purchase")
            bought = {r["product"]["id"] for r in s if r["type"] == "purchase"}
            assert bought <= carted
            assert all(r["user"]["id"] is not None for r in s if r["type"] == "purchase")


# --------------------------------------------------------------------------------------
# injected faults


def count_faults(rows):
    parsed = [(path, r) for path, _, r in rows if r is not None]
    ids = Counter(r["id"] for _, r in parsed)
    invalid = Counter(k for _, r in parsed if (k := invalid_kind(r)) is not None)
    late = 0
    for path, r in parsed:
        ts = parse_ts(r["ts"])
        if ts is not None and ids[r["id"]] == 1 and ts.date() < file_day(path):
            assert 1 <= (file_day(path) - ts.date()).days <= 3
            late += 1
    return {
        "malformed": sum(r is None for _, _, r in rows),
        "duplicate": sum(n - 1 for n in ids.values()),
        "late": late,
        "invalid": dict(invalid),
    }


@pytest.mark.parametrize("which", ["faulty", "faulty_parquet"])
def test_fault_counts_in_manifest_match_the_files(which, request):
    out, manifest, rows, _ = request.getfixturevalue(which)
    faults = manifest["faults"]
    found = count_faults(rows)
    n = manifest["clean_events"]
    assert faults["duplicate"] == found["duplicate"] == int(n * 0.01) > 0
    assert faults["late"] == found["late"] == int(n * 0.01)
    assert faults["invalid"] == found["invalid"]
    assert faults["invalid_total"] == sum(found["invalid"].values()) == int(n * 0.012)
    assert set(found["invalid"]) == set(faults["invalid"])
    assert all(v > 0 for v in faults["invalid"].values())
    if which == "faulty":
        assert faults["malformed"] == found["malformed"] == int(n * 0.01) > 0
    else:
        assert faults["malformed"] == found["malformed"] == 0
    assert manifest["total_records"] == len(rows) == n + faults["duplicate"]


def test_duplicates_are_exact_copies_in_the_same_or_next_file(faulty):
    _, _, rows, _ = faulty
    copies = defaultdict(list)
    for path, line, record in rows:
        if record is not None:
            copies[record["id"]].append((file_day(path), line))
    dups = [c for c in copies.values() if len(c) > 1]
    assert dups
    for (day_a, line_a), (day_b, line_b) in dups:
        assert line_a == line_b
        assert (day_b - day_a).days in (0, 1)


def test_malformed_lines_are_cut_records(faulty):
    _, _, rows, _ = faulty
    broken = [line for _, line, r in rows if r is None]
    assert broken
    for line in broken:
        assert line.startswith('{"id":"ev-7-')
        assert len(line) > 20
        assert line.count("{") > line.count("}")  # an object left open


def test_too_many_faults_are_refused(tmp_path):
    with pytest.raises(ValueError, match="fault shares"):
        generate(
            settings(users=20, days=3, duplicate_share=0.5, late_share=0.5, invalid_share=0.5),
            tmp_path,
        )


# --------------------------------------------------------------------------------------
# sizing


def test_estimate_users_for_events(tmp_path):
    users = estimate_users_for_events(40_000)
    assert estimate_users_for_events(400_000) == pytest.approx(10 * users, rel=0.01)
    manifest = generate(GenerateConfig(seed=3, users=users, format="parquet"), tmp_path)
    assert 0.8 * 40_000 < manifest["clean_events"] < 1.2 * 40_000
