"""The segment rule language: validation errors, versions, and what each condition means."""

from __future__ import annotations

import textwrap
from datetime import datetime, timedelta

import pytest
from tests.test_sessions import ev, events_df

from microseg.features.user_features import keyed_events_before
from microseg.segments import evaluate as segments
from microseg.segments.facts import compute_facts, with_facts
from microseg.segments.model import SegmentCatalog, SegmentFileError
from microseg.segments.parse import available_features, load_segments

T = datetime(2026, 9, 1, 10, 0)  # T0 of test_sessions: ev(..., minute) is T + minutes
HOUR, DAY = 60, 24 * 60


def write(tmp_path, text: str):
    path = tmp_path / "segments.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load(cfg, tmp_path, text: str) -> SegmentCatalog:
    return load_segments(cfg, write(tmp_path, text))


def problems(cfg, tmp_path, text: str) -> list[str]:
    with pytest.raises(SegmentFileError) as info:
        load(cfg, tmp_path, text)
    return info.value.problems


# --------------------------------------------------------------------------------------
# validation (no Spark)


def test_default_catalog_is_valid_and_ordered_parents_first(cfg):
    catalog = load_segments(cfg)
    ids = catalog.ids()
    assert len(ids) == 12
    assert ids.index("high_value_customers") < ids.index("high_value_at_risk")
    assert catalog.streaming_capable("cart_abandoners_24h") == (
        True,
        "event counts, recency and snapshot features only",
    )
    capable, why = catalog.streaming_capable("browsing_enthusiasts")
    assert not capable and "in-one-session" in why


def test_unknown_feature_names_segment_line_and_suggests(cfg, tmp_path):
    found = problems(
        cfg,
        tmp_path,
        """\
        segments:
          - id: big
            name: Big
            conditions:
              - feature: revenue_lifetim
                gte: 100
        """,
    )
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'segments.yaml'} line 5: segment 'big': ")
    assert "unknown feature 'revenue_lifetim'" in found[0]
    assert "did you mean 'revenue_lifetime'" in found[0]


def test_every_problem_is_reported_with_its_line(cfg, tmp_path):
    found = problems(
        cfg,
        tmp_path,
        """\
        segments:
          - id: a
            name: A
            colour: red
            conditions:
              - feature: top_category
                gt: 3
          - id: b
            name: B
            parent: nope
            conditions:
              - event: add_to_kart
                within: 24h
                at_least: 1
          - id: c
            name: C
            conditions:
              - feature: orders_lifetime
                gte: "three"
          - id: d
            name: D
            conditions:
              - event: purchase
                within: soon
                at_least: 2
                at_most: 1
        """,
    )
    assert found == [
        f"{tmp_path / 'segments.yaml'} line 4: segment 'a': unknown key 'colour' "
        "(allowed: id, name, description, tags, conditions, parent, exclusive, min_size)",
        f"{tmp_path / 'segments.yaml'} line 6: segment 'a': feature 'top_category' (string): "
        "gt needs a number feature",
        f"{tmp_path / 'segments.yaml'} line 12: segment 'b': event: unknown event type(s) "
        "['add_to_kart'] (did you mean 'add_to_cart'?) (ingest.event_types: page_view, "
        "product_view, search, add_to_cart, remove_from_cart, add_to_wishlist, "
        "checkout_started, purchase)",
        f"{tmp_path / 'segments.yaml'} line 18: segment 'c': feature 'orders_lifetime' "
        "(number): gte takes a number, not 'three'",
        f"{tmp_path / 'segments.yaml'} line 23: segment 'd': within must be a positive "
        "duration such as 24h, 7d, 90m, not 'soon'",
        f"{tmp_path / 'segments.yaml'} line 23: segment 'd': at_least is larger than "
        "at_most: nobody can match",
    ]


def test_unknown_parent_cycle_and_shared_priority_are_errors(cfg, tmp_path):
    found = problems(
        cfg,
        tmp_path,
        """\
        segments:
          - id: a
            name: A
            parent: b
            conditions: [{feature: orders_lifetime, gte: 1}]
          - id: b
            name: B
            parent: a
            exclusive: {group: tier, priority: 1}
            conditions: [{feature: orders_lifetime, gte: 2}]
          - id: c
            name: C
            parent: x
            exclusive: {group: tier, priority: 1}
            conditions: [{feature: orders_lifetime, gte: 3}]
        """,
    )
    path = tmp_path / "segments.yaml"
    assert found == [
        f"{path} line 2: segment 'a': parent cycle: a -> b -> a",
        f"{path} line 6: segment 'b': parent cycle: b -> a -> b",
        f"{path} line 11: segment 'c': unknown parent 'x'",
        f"{path} line 11: segment 'c': exclusive group 'tier': priority 1 is also used by "
        "'b' (each priority once per group)",
    ]


def test_a_condition_needs_exactly_one_kind_and_known_keys(cfg, tmp_path):
    found = problems(
        cfg,
        tmp_path,
        """\
        segments:
          - id: a
            name: A
            conditions:
              - any:
                  - {feature: orders_lifetime, gte: 1, event: purchase}
                  - {last: purchase, within: 7d, older_than: 30d}
                  - {not: {feature: orders_lifetime, gte: 1, bogus: 2}}
        """,
    )
    assert [p.split(": segment 'a': ")[1] for p in found] == [
        "a condition needs exactly one of feature, event, last, all, any, not, sql "
        "(found: feature, gte, event)",
        "a last condition takes exactly one of within, older_than, never: true",
        "unknown key 'bogus' in a feature condition (allowed: feature, eq, ne, gt, gte, lt, "
        "lte, between, in, not_in, is_null)",
    ]


def test_feature_not_selected_in_config_is_unknown(tmp_path):
    from tests.conftest import make_config

    cfg = make_config(tmp_path, "features.include=[orders_lifetime]")
    found = problems(
        cfg,
        tmp_path,
        """\
        segments:
          - id: a
            name: A
            conditions: [{feature: revenue_lifetime, gte: 1}]
        """,
    )
    assert "unknown feature 'revenue_lifetime'" in found[0]


def test_version_follows_the_definition_not_the_labels(cfg, tmp_path):
    text = """\
        segments:
          - id: p
            name: Parent
            conditions: [{feature: orders_lifetime, gte: %d}]
          - id: c
            name: %s
            description: %s
            parent: p
            conditions: [{feature: revenue_lifetime, gte: 100}]
        """
    base = load(cfg, tmp_path, text % (1, "Child", "one"))
    relabelled = load(cfg, tmp_path, text % (1, "Renamed", "two"))
    parent_changed = load(cfg, tmp_path, text % (2, "Child", "one"))
    assert base.version("c") == relabelled.version("c")
    assert base.version("p") != parent_changed.version("p")
    assert base.version("c") != parent_changed.version("c")  # a child refines its parent


# --------------------------------------------------------------------------------------
# meaning: rules evaluated over hand-made features and events


def members(spark, cfg, tmp_path, text: str, features: dict, events=(), as_of=T) -> dict:
    """segment id -> sorted matching users (before guards)."""
    catalog = load(cfg, tmp_path, text)
    columns = sorted({k for values in features.values() for k in values})
    schema = ", ".join(
        ["user_key string"]
        + [
            f"{c} {'string' if available_features(cfg)[c] == 'string' else 'double'}"
            for c in columns
        ]
    )
    features_df = spark.createDataFrame(
        [(user, *[values.get(c) for c in columns]) for user, values in features.items()], schema
    )
    facts = catalog.facts()
    facts_df = None
    if facts:
        facts_df = compute_facts(
            keyed_events_before(events_df(spark, list(events)), as_of),
            facts,
            as_of=as_of,
            inactivity_timeout=timedelta(minutes=30),
            max_session_length=timedelta(hours=6),
        )
    segments.check_sql(catalog, features_df)
    flags = segments.evaluate(catalog, with_facts(features_df, facts_df, facts), as_of)
    rows = flags.collect()
    return {s.id: sorted(r.user_key for r in rows if r[f"_m_{s.id}"]) for s in catalog.segments}


def one(condition: str) -> str:
    body = textwrap.indent(textwrap.dedent(condition), " " * 6)
    return f"segments:\n  - id: s\n    name: S\n    conditions:\n{body}"


def test_feature_comparisons_and_nulls(spark, cfg, tmp_path):
    feats = {
        "u1": {"revenue_lifetime": 100.0, "top_category": "toys"},
        "u2": {"revenue_lifetime": 99.5, "top_category": "books"},
        "u3": {"revenue_lifetime": None, "top_category": None},
    }
    cases = {
        "- {feature: revenue_lifetime, gte: 100}": ["u1"],
        "- {feature: revenue_lifetime, gt: 99.5}": ["u1"],
        "- {feature: revenue_lifetime, lt: 100}": ["u2"],
        "- {feature: revenue_lifetime, lte: 100, ne: 99.5}": ["u1"],
        "- {feature: revenue_lifetime, between: [99.5, 100]}": ["u1", "u2"],
        "- {feature: revenue_lifetime, eq: 100}": ["u1"],
        "- {feature: top_category, in: [toys, garden]}": ["u1"],
        "- {feature: top_category, not_in: [toys]}": ["u2"],
        "- {feature: top_category, is_null: true}": ["u3"],
        "- {feature: revenue_lifetime, is_null: false}": ["u1", "u2"],
        # a comparison with null is false, so `not` of it includes the null user
        "- {not: {feature: revenue_lifetime, gte: 100}}": ["u2", "u3"],
        "- {any: [{feature: top_category, eq: books}, {feature: revenue_lifetime, gte: 100}]}": [
            "u1",
            "u2",
        ],
        "- {all: [{feature: top_category, eq: books}, {feature: revenue_lifetime, gte: 100}]}": [],
        "- {sql: \"revenue_lifetime > 99 AND top_category <> 'toys'\"}": ["u2"],
    }
    for condition, expected in cases.items():
        got = members(spark, cfg, tmp_path, one(condition), feats)["s"]
        assert got == expected, condition


def test_event_count_window_includes_its_start_and_excludes_t(spark, cfg, tmp_path):
    events = [
        ev("a1", -DAY, "add_to_cart", user="u1"),  # exactly T - 24h: inside
        ev("b1", -DAY - 1, "add_to_cart", user="u2"),  # one minute earlier: outside
        ev("c1", 0, "add_to_cart", user="u3"),  # at T: after the as-of, never counted
        ev("c2", -2 * DAY, "page_view", user="u3"),
        ev("d1", -60, "add_to_cart", user="u4"),
        ev("d2", -30, "add_to_cart", user="u4"),
    ]
    feats = {u: {"orders_lifetime": 0.0} for u in ("u1", "u2", "u3", "u4", "u5")}
    text = one("- {event: add_to_cart, within: 24h, at_least: 1}")
    assert members(spark, cfg, tmp_path, text, feats, events)["s"] == ["u1", "u4"]
    text = one("- {event: add_to_cart, within: 24h, at_least: 2}")
    assert members(spark, cfg, tmp_path, text, feats, events)["s"] == ["u4"]
    # u3's cart add at T does not count; u5 has no events at all: both count 0
    text = one("- {event: [add_to_cart, purchase], at_most: 0}")
    assert members(spark, cfg, tmp_path, text, feats, events)["s"] == ["u3", "u5"]


def test_since_last_counts_only_after_the_last_anchor(spark, cfg, tmp_path):
    events = [
        # u1: cart, purchase, cart again -> nothing bought since the last cart add
        ev("a1", -5 * HOUR, "add_to_cart", user="u1"),
        ev("a2", -4 * HOUR, "purchase", user="u1"),
        ev("a3", -2 * HOUR, "add_to_cart", user="u1"),
        # u2: cart then purchase
        ev("b1", -3 * HOUR, "add_to_cart", user="u2"),
        ev("b2", -1 * HOUR, "purchase", user="u2"),
        # u3: never added to cart: the since_last count is missing, so false
        ev("c1", -1 * HOUR, "page_view", user="u3"),
    ]
    feats = {u: {"orders_lifetime": 0.0} for u in ("u1", "u2", "u3")}
    text = one(
        """\
        - {event: add_to_cart, within: 24h, at_least: 1}
        - {event: purchase, since_last: add_to_cart, at_most: 0}
        """
    )
    assert members(spark, cfg, tmp_path, text, feats, events)["s"] == ["u1"]
    text = one("- {not: {event: purchase, since_last: add_to_cart, at_most: 0}}")
    assert members(spark, cfg, tmp_path, text, feats, events)["s"] == ["u2", "u3"]


def test_per_category_in_one_session(spark, cfg, tmp_path):
    def views(prefix, user, start, n, category, step=5):
        return [
            ev(f"{prefix}{i}", start + i * step, "product_view", user=user, category=category)
            for i in range(n)
        ]

    events = [
        *views("a", "u1", -3 * HOUR, 3, "toys"),  # 3 toys in one session ...
        *views("b", "u1", -HOUR, 3, "toys"),  # ... and 3 in another (gap 100 min): max 3
        *views("c", "u2", -HOUR, 4, "toys"),  # 4 toys in one session
        *views("d", "u3", -HOUR, 2, "toys"),
        *views("e", "u3", -HOUR + 1, 2, "books"),  # 4 views, but 2 per category
    ]
    feats = {u: {"orders_lifetime": 0.0} for u in ("u1", "u2", "u3")}
    in_session = one(
        "- {event: product_view, per: category, in_one_session: true, within: 1d, at_least: 4}"
    )
    assert members(spark, cfg, tmp_path, in_session, feats, events)["s"] == ["u2"]
    per_category = one("- {event: product_view, per: category, within: 1d, at_least: 4}")
    assert members(spark, cfg, tmp_path, per_category, feats, events)["s"] == ["u1", "u2"]


def test_recency_within_older_than_and_never(spark, cfg, tmp_path):
    events = [
        ev("a1", -30 * DAY, "purchase", user="u1"),  # exactly 30 days ago
        ev("b1", -30 * DAY - 1, "purchase", user="u2"),  # a minute more
        ev("b2", -HOUR, "page_view", user="u2"),
        ev("c1", -HOUR, "page_view", user="u3"),
    ]
    feats = {u: {"orders_lifetime": 0.0} for u in ("u1", "u2", "u3")}
    cases = {
        "- {last: purchase, within: 30d}": ["u1"],
        "- {last: purchase, older_than: 30d}": ["u2"],
        "- {last: purchase, never: true}": ["u3"],
        "- {last: any, within: 1d}": ["u2", "u3"],
        "- {last: [purchase, page_view], older_than: 2h}": ["u1"],
    }
    for condition, expected in cases.items():
        got = members(spark, cfg, tmp_path, one(condition), feats, events)["s"]
        assert got == expected, condition


def test_child_refines_parent_and_sql_errors_name_the_line(spark, cfg, tmp_path):
    feats = {
        "u1": {"orders_lifetime": 1.0, "revenue_lifetime": 500.0},
        "u2": {"orders_lifetime": 0.0, "revenue_lifetime": 500.0},
    }
    text = """\
        segments:
          - id: buyers
            name: Buyers
            conditions: [{feature: orders_lifetime, gte: 1}]
          - id: big
            name: Big
            parent: buyers
            conditions: [{feature: revenue_lifetime, gte: 100}]
        """
    assert members(spark, cfg, tmp_path, text, feats) == {"buyers": ["u1"], "big": ["u1"]}
    bad = """\
        segments:
          - id: x
            name: X
            conditions:
              - sql: revenue_lifetme > 3
          - id: y
            name: Y
            conditions:
              - sql: revenue_lifetime + 1
        """
    with pytest.raises(SegmentFileError) as info:
        members(spark, cfg, tmp_path, bad, feats)
    first, second = info.value.problems
    assert first.startswith(f"{tmp_path / 'segments.yaml'} line 5: segment 'x': sql: ")
    assert "does not resolve" in first and "revenue_lifetme" in first
    assert second == (
        f"{tmp_path / 'segments.yaml'} line 9: segment 'y': sql: 'revenue_lifetime + 1' "
        "is double, not boolean"
    )
