"""Behavioral clusters: custom steps, k search, stable ids across retrains, registry, members.

Hand-made users in three obvious groups are written straight into gold/user_features:

* b01..b12 buyers: 8-10 orders, 800-910 revenue, 20-23 sessions, 4 pages per session
* w01..w10 window shoppers: no orders, 12-14 sessions, 9-9.9 pages per session
* n01..n08 new visitors: 1-2 sessions, known for 1-3 days (n01 and n06 bought once)

and, for the third training, d01..d08 (lapsed big spenders) replace the new visitors.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyspark.ml import PipelineModel
from pyspark.ml.clustering import KMeansModel
from pyspark.ml.feature import StandardScalerModel, VectorAssembler
from pyspark.sql import functions as F
from tests.conftest import make_config

from microseg.core import lake
from microseg.core.config import ClusterConfig, ConfigError
from microseg.ml.clustering.fit import fit_clusters
from microseg.ml.clustering.jobs import assign_clusters, train_clusters
from microseg.ml.clustering.matching import match_clusters, match_distances
from microseg.ml.clustering.naming import name_cluster, still_holds, unique_name
from microseg.ml.clustering.pipeline import check_config, fill_rules, population
from microseg.ml.clustering.quality import adjusted_rand_index, persona_ari
from microseg.ml.clustering.steps import ClusterLabeler, FillMissing, Log1p

T1 = datetime(2026, 10, 1)
T2 = datetime(2026, 10, 8)
T3 = datetime(2026, 10, 15)

FEATURES = (
    "orders_lifetime",
    "revenue_lifetime",
    "sessions_90d",
    "pages_per_session_lifetime",
    "days_since_last_purchase",
    "tenure_days",
)
SETTINGS = (
    f"cluster.features=[{', '.join(FEATURES)}]",
    "cluster.log_features=[revenue_lifetime]",
    "cluster.k_min=2",
    "cluster.k_max=4",
    "cluster.population.active_within_days=null",  # the hand-made rows have no recency
)
COLUMNS = (
    "user_key string, orders_lifetime int, revenue_lifetime double, sessions_90d int, "
    "pages_per_session_lifetime double, days_since_last_purchase double, tenure_days double"
)


def buyers():
    return [
        (f"b{i + 1:02d}", 8 + i % 3, 800.0 + 10 * i, 20 + i % 4, 4.0, 2.0 + i % 3, 50.0 + i % 5)
        for i in range(12)
    ]


def shoppers():
    return [
        (f"w{i + 1:02d}", 0, 0.0, 12 + i % 3, 9.0 + i / 10, None, 45.0 + i % 5) for i in range(10)
    ]


def newcomers():
    return [
        ("n01", 1, 30.0, 2, 2.0, 1.0, 2.0),
        ("n02", 0, 0.0, 1, 1.0, None, 1.0),
        ("n03", 0, 0.0, 2, 2.0, None, 3.0),
        ("n04", 0, 0.0, 1, 3.0, None, 2.0),
        ("n05", 0, 0.0, 1, 2.0, None, 1.0),
        ("n06", 1, 20.0, 2, 2.0, 1.0, 3.0),
        ("n07", 0, 0.0, 1, 1.0, None, 2.0),
        ("n08", 0, 0.0, 2, 3.0, None, 1.0),
    ]


def lapsed():
    return [(f"d{i + 1:02d}", 3, 3000.0, 5, 3.0, 40.0 + i, 55.0 + i) for i in range(8)]


def features_df(spark, rows, as_of):
    return spark.createDataFrame(rows, COLUMNS).select(
        "user_key",
        F.lit(as_of).alias("as_of"),
        F.lit(as_of.date()).alias("as_of_date"),
        F.current_timestamp().alias("computed_at"),
        F.lit("test").alias("run_id"),
        *FEATURES,
    )


def write_features(spark, cfg, as_of, rows):
    (
        features_df(spark, rows, as_of)
        .write.format("delta")
        .mode("append")
        .option("mergeSchema", "true")
        .partitionBy("as_of_date")
        .save(lake.table_path(cfg.lake.root, lake.USER_FEATURES))
    )


def groups(assignments):
    """user prefix (b, w, n, d) -> the set of cluster ids its users got."""
    out: dict[str, set[str]] = {}
    for user, cluster in assignments.items():
        out.setdefault(user[0], set()).add(cluster)
    return out


def registry_rows(spark, cfg):
    return {
        r.version: r for r in lake.read_table(spark, cfg.lake.root, lake.MODEL_REGISTRY).collect()
    }


@pytest.fixture(scope="module")
def three_trainings(spark, tmp_path_factory):
    """v1 at T1 (b, w, n); v2 at T2: the same rows shuffled, another seed; v3 at T3: d
    replaces n, k fixed to 3."""
    tmp_path = tmp_path_factory.mktemp("clustering")
    cfg = make_config(tmp_path, *SETTINGS)
    first = buyers() + shoppers() + newcomers()
    write_features(spark, cfg, T1, first)
    shuffled = list(first)
    random.Random(7).shuffle(shuffled)
    write_features(spark, cfg, T2, shuffled)
    write_features(spark, cfg, T3, buyers() + shoppers() + lapsed())
    reports = [
        train_clusters(spark, cfg, as_of=T1),
        train_clusters(
            spark,
            make_config(
                tmp_path, *SETTINGS, "cluster.seed=7", "cluster.k_min=3", "cluster.k_max=3"
            ),
            as_of=T2,
        ),
        train_clusters(
            spark, make_config(tmp_path, *SETTINGS, "cluster.k_min=3", "cluster.k_max=3"), as_of=T3
        ),
    ]
    return cfg, reports


def model_assignments(spark, cfg, report, as_of, rows):
    model = PipelineModel.load(report.path)
    out = model.transform(features_df(spark, rows, as_of)).select("user_key", "cluster_id")
    return {r.user_key: r.cluster_id for r in out.collect()}


# --------------------------------------------------------------------------------------
# custom steps, config, names, matching, ARI: no fitting


def test_fill_missing_and_log1p_on_hand_written_rows(spark):
    rows = spark.createDataFrame(
        [
            ("u1", None, 12.0, None, 1.718281828459045),
            ("u2", 3.0, 40.0, 0.25, 0.0),
            ("u3", None, None, float("nan"), -5.0),
            ("u4", 7.0, 9.0, 1.0, None),
        ],
        "user_key string, days_since_last_purchase double, tenure_days double, "
        "cart_abandonment_rate_lifetime double, revenue_lifetime double",
    )
    filled = FillMissing(
        inputCols=["days_since_last_purchase", "cart_abandonment_rate_lifetime"],
        fillValues=[365.0, 0.0],
        fillFromCols=["tenure_days", ""],
    ).transform(rows)
    logged = Log1p(inputCols=["revenue_lifetime"], outputCols=["log_revenue"]).transform(filled)
    got = {
        r.user_key: (r.days_since_last_purchase, r.cart_abandonment_rate_lifetime, r.log_revenue)
        for r in logged.collect()
    }
    # u1: never bought -> tenure 12; u3: no tenure either -> 365; NaN -> 0; log1p(e - 1) = 1,
    # log1p(0) = 0, negative clipped to 0, null stays null
    assert got["u1"] == (12.0, 0.0, pytest.approx(1.0))
    assert got["u2"] == (3.0, 0.25, 0.0)
    assert got["u3"] == (365.0, 0.0, 0.0)
    assert got["u4"] == (7.0, 1.0, None)


def test_fill_rules_take_tenure_only_when_computed():
    assert fill_rules(("days_since_last_purchase", "orders_30d"), {"tenure_days"}) == {
        "days_since_last_purchase": ("tenure_days", 365.0),
        "orders_30d": ("", 0.0),
    }
    assert fill_rules(("days_since_last_purchase",), set()) == {
        "days_since_last_purchase": ("", 365.0)
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["cluster.features=[orders_lifetime, nope]"],
            "cluster.features: unknown feature(s) ['nope']",
        ),
        (
            [
                "features.include=[orders_lifetime]",
                "cluster.features=[orders_lifetime, tenure_days]",
            ],
            "cluster.features: ['tenure_days'] not computed: not in features.include",
        ),
        (["cluster.features=[orders_lifetime, top_category]"], "['top_category'] are not number"),
        (
            [
                "cluster.features=[orders_lifetime, tenure_days]",
                "cluster.log_features=[revenue_30d]",
            ],
            "cluster.log_features: ['revenue_30d'] not in cluster.features",
        ),
        (
            ["cluster.k_min=6", "cluster.k_max=4"],
            "cluster.k_min (6) is larger than cluster.k_max (4)",
        ),
    ],
)
def test_config_problems_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(make_config(tmp_path, *overrides))
    assert message in str(err.value)


def test_unknown_cluster_key_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'kk'"):
        make_config(tmp_path, "cluster.kk=3")


def test_default_cluster_features_are_valid(tmp_path):
    assert len(check_config(make_config(tmp_path))) == 10


def test_names_follow_the_rules_and_stay_unique():
    cases = [
        # (z, mean in original units, expected name)
        ({"avg_session_seconds_lifetime": -5.5, "tenure_days": -2.2}, {}, "Bouncers"),
        ({"tenure_days": -1.8, "campaign_session_share": 1.6}, {}, "New visitors from campaigns"),
        ({"tenure_days": -1.4, "orders_lifetime": 0.2}, {}, "New visitors"),
        (
            {"days_since_last_event": 1.2, "revenue_lifetime": 0.9, "tenure_days": 0.3},
            {"orders_lifetime": 1.4},
            "Lapsed high spenders",
        ),
        # spend is revenue when the model has it, else average order value
        (
            {"days_since_last_event": 1.2, "revenue_lifetime": 0.1, "avg_order_value_lifetime": 2},
            {"orders_lifetime": 1.0},
            "Lapsed customers",
        ),
        # gone, but most never bought: not customers
        ({"days_since_last_event": 2.0}, {"orders_lifetime": 0.1}, "Lapsed visitors"),
        (
            {"orders_lifetime": 2.1, "avg_order_value_lifetime": 1.1},
            {"orders_lifetime": 13.0},
            "High-value frequent buyers",
        ),
        (
            {"orders_lifetime": 1.5, "revenue_lifetime": 0.2},
            {"orders_lifetime": 4.0},
            "Frequent buyers",
        ),
        # recent and +3.4 standard deviations of orders: buyers, not new visitors (the demo
        # once called such a cluster "New visitors")
        (
            {"tenure_days": -1.3, "orders_lifetime": 3.4, "avg_order_value_lifetime": 1.0},
            {"orders_lifetime": 12.0},
            "High-value frequent buyers",
        ),
        (
            {"cart_abandoned_sessions_lifetime": 1.6, "pages_per_session_lifetime": 0.1},
            {"orders_lifetime": 0.04},
            "Cart abandoners",
        ),
        # abandoning carts but buying too: not cart abandoners
        (
            {"cart_abandonment_rate_lifetime": 1.1, "avg_order_value_lifetime": 0.8},
            {"orders_lifetime": 2.0},
            "Big-ticket buyers",
        ),
        (
            {"campaign_session_share": 1.1, "avg_order_value_lifetime": 1.2},
            {"orders_lifetime": 1.5},
            "Deal seekers",
        ),
        # recent campaign visitors who bought above average: not new visitors, and one order
        # each is not frequent
        (
            {"tenure_days": -1.2, "campaign_session_share": 1.5, "orders_lifetime": 1.2},
            {"orders_lifetime": 1.0},
            "Deal seekers",
        ),
        ({"campaign_session_share": 1.3}, {"orders_lifetime": 0.2}, "Campaign visitors"),
        (
            {"pages_per_session_lifetime": 0.0, "cart_abandoned_sessions_lifetime": -0.5},
            {"orders_lifetime": 0.0},
            "Window shoppers",
        ),
        # no rule: the two strongest features
        (
            {"sessions_90d": 0.8, "tenure_days": -0.6, "x": 0.1},
            {},
            "High sessions 90d, low tenure days",
        ),
        ({"sessions_90d": 0.2}, {}, "Average users"),
        ({}, {}, "Empty cluster"),
    ]
    assert [name_cluster(z, mean) for z, mean, _ in cases] == [name for _, _, name in cases]
    # a second cluster of the same kind is told apart by its strongest feature the name does
    # not already speak of (pages per session is part of "Window shoppers")
    z = {"pages_per_session_lifetime": 2.0, "desktop_session_share": 1.3, "tenure_days": 0.2}
    assert unique_name("Window shoppers", {"Window shoppers"}, z) == (
        "Window shoppers, high desktop session share"
    )
    taken = {"Window shoppers", "Window shoppers, high desktop session share"}
    assert unique_name("Window shoppers", taken, z) == "Window shoppers 2"
    assert unique_name("Window shoppers", {"Window shoppers", "Window shoppers 2"}) == (
        "Window shoppers 3"
    )
    assert unique_name("Deal seekers", {"Window shoppers"}) == "Deal seekers"
    # a retrained cluster keeps its name only while the name's claims hold
    assert still_holds("Frequent buyers", {"orders_lifetime": 1.2}, {"orders_lifetime": 3.0})
    assert not still_holds("Frequent buyers", {"orders_lifetime": 0.4}, {"orders_lifetime": 3.0})
    assert not still_holds("High sessions 90d", {"sessions_90d": 0.9, "tenure_days": -0.7}, {})
    assert still_holds("High sessions 90d, low tenure days", cases[-3][0], {})


# What each word of a name says about the cluster, written independently of NAME_RULES:
# (word in the name, the test the default model's profile must pass). `z` has every default
# cluster feature; spend is avg_order_value_lifetime, the only money feature of the default.
def _orders(z, mean):
    return mean["orders_lifetime"]


IMPLIED = [
    ("New visitors", lambda z, m: z["tenure_days"] <= -1 and z["orders_lifetime"] < 0.5),
    ("Lapsed", lambda z, m: z["days_since_last_event"] >= 1),
    (
        "Frequent",
        lambda z, m: (
            z["orders_lifetime"] >= 1 and _orders(z, m) >= 2 and z["days_since_last_event"] < 1
        ),
    ),
    ("buyers", lambda z, m: _orders(z, m) >= 0.5),
    ("customers", lambda z, m: _orders(z, m) >= 0.5),
    ("spenders", lambda z, m: _orders(z, m) >= 0.5 and z["avg_order_value_lifetime"] >= 0.5),
    ("High-value", lambda z, m: z["avg_order_value_lifetime"] >= 0.5),
    ("Deal seekers", lambda z, m: _orders(z, m) >= 0.5 and z["campaign_session_share"] >= 1),
    ("Campaign visitors", lambda z, m: z["campaign_session_share"] >= 1),
    ("from campaigns", lambda z, m: z["campaign_session_share"] >= 1),
    ("Big-ticket", lambda z, m: z["avg_order_value_lifetime"] >= 0.75),
    ("Window shoppers", lambda z, m: _orders(z, m) < 0.5),
    ("Cart abandoners", lambda z, m: _orders(z, m) < 0.5),
    ("Bouncers", lambda z, m: z["orders_lifetime"] < 0.5 and _orders(z, m) < 0.5),
    ("Average users", lambda z, m: all(abs(v) < 0.5 for v in z.values())),
]
DEFAULT_FEATURES = ClusterConfig().features


@settings(max_examples=400, deadline=None)
@given(
    zs=st.lists(st.floats(-4, 4, allow_nan=False), min_size=len(DEFAULT_FEATURES), max_size=10),
    orders=st.floats(0, 20, allow_nan=False),
)
def test_a_name_never_contradicts_its_profile(zs, orders):
    z = dict(zip(DEFAULT_FEATURES, zs, strict=False))
    mean = {"orders_lifetime": orders}
    name = name_cluster(z, mean)
    for word, implied in IMPLIED:
        if word in name:
            assert implied(z, mean), (name, word, z, mean)
    # a name made of features: each says high or low of a feature whose |z| is >= 0.5
    for part in re.findall(r"(?i)\b(high|low) ([a-z0-9 ]+?)(?:,|$)", name):
        feature = part[1].replace(" ", "_")
        if feature in z:
            assert (z[feature] >= 0.5) if part[0].lower() == "high" else (z[feature] <= -0.5)


def test_matching_is_one_to_one_by_standardized_distance():
    new = [{"a": 0.0, "b": 0.0}, {"a": 10.0, "b": 10.0}, {"a": 50.0, "b": -50.0}]
    old = [{"a": 10.5, "b": 10.0}, {"a": 0.0, "b": 1.0}]
    costs = match_distances(new, old, std={"a": 1.0, "b": 2.0})
    # new 0 vs old 1: sqrt((0 + 0.5^2) / 2); new 1 vs old 0: sqrt((0.5^2 + 0) / 2)
    assert costs[0, 1] == pytest.approx(math.sqrt(0.125))
    assert costs[1, 0] == pytest.approx(math.sqrt(0.125))
    assert match_clusters(costs, 1.0) == [
        (0, 1, pytest.approx(math.sqrt(0.125))),
        (1, 0, pytest.approx(math.sqrt(0.125))),
    ]
    # a threshold below the distance matches nothing
    assert match_clusters(costs, 0.3) == []


def test_adjusted_rand_index_from_hand_written_tables():
    # the same partition under other labels
    assert adjusted_rand_index({("x", 1): 3, ("y", 2): 2}) == 1.0
    # labels_true [0, 0, 1, 1], labels_pred [0, 0, 1, 2]: 4/7 (scikit-learn's doc example)
    assert adjusted_rand_index({(0, 0): 2, (1, 1): 1, (1, 2): 1}) == pytest.approx(4 / 7)
    # every pair split by the prediction, none by the truth
    assert adjusted_rand_index({(0, 0): 1, (0, 1): 1, (0, 2): 1, (0, 3): 1}) == 0.0
    # [0,0,0,1,1,1] vs [0,0,1,1,2,2]: index 2, expected 6 * 3 / 15, max 4.5 -> 0.8 / 3.3
    assert adjusted_rand_index({(0, 0): 2, (0, 1): 1, (1, 1): 1, (1, 2): 2}) == pytest.approx(
        (2 - 1.2) / (4.5 - 1.2)
    )


def test_persona_ari_maps_user_ids_and_anonymous_ids(spark, tmp_path):
    users_csv = tmp_path / "users.csv"
    users_csv.write_text(
        "user_id,persona,first_seen,last_seen,anonymous_ids,shared_anonymous_id\n"
        "u1,loyal,2026-09-01T00:00:00Z,2026-10-01T00:00:00Z,a1;a2,\n"
        "u2,loyal,2026-09-01T00:00:00Z,2026-10-01T00:00:00Z,a3,s1\n"
        "u3,lapsed,2026-09-01T00:00:00Z,2026-10-01T00:00:00Z,a4,\n"
        "u4,lapsed,2026-09-01T00:00:00Z,2026-10-01T00:00:00Z,a5;s1,s1\n"
    )
    # u1 and u2 logged in; u3 never did (key anon:a4); a2 is an unstitched second cookie of
    # u1; anon:s1 is claimed by two personas and left out; zz is nobody's
    assignments = spark.createDataFrame(
        [
            ("u1", "c01"),
            ("anon:a2", "c01"),
            ("u2", "c01"),
            ("anon:a4", "c02"),
            ("u4", "c02"),
            ("anon:s1", "c01"),
            ("zz", "c02"),
        ],
        "user_key string, cluster_id string",
    )
    assert persona_ari(spark, assignments, str(users_csv)) == (1.0, 5)


# --------------------------------------------------------------------------------------
# fitting


def test_saved_pipeline_loads_and_assigns_identically(spark, tmp_path):
    cfg = make_config(tmp_path, *SETTINGS, "cluster.k_min=3", "cluster.k_max=3")
    df = features_df(spark, buyers() + shoppers() + newcomers(), T1)
    fill = fill_rules(FEATURES, set(FEATURES))
    fitted = fit_clusters(df, cfg.cluster, fill=fill)
    fitted.release()
    path = str(tmp_path / "model")
    fitted.model.write().save(path)
    loaded = PipelineModel.load(path)
    assert [type(s) for s in loaded.stages] == [
        FillMissing,
        Log1p,
        VectorAssembler,
        StandardScalerModel,
        KMeansModel,
        ClusterLabeler,
    ]
    columns = ["user_key", "cluster_id", "segment_id", "cluster_name", "cluster_distance"]
    got = sorted(tuple(r) for r in loaded.transform(df).select(*columns).collect())
    assert got == sorted(tuple(r) for r in fitted.model.transform(df).select(*columns).collect())
    assert groups({user: cluster for user, cluster, *_ in got}) == {
        "b": {"c01"},
        "w": {"c02"},
        "n": {"c03"},
    }


@pytest.mark.slow
def test_bisecting_kmeans_on_pca_components_finds_the_groups(spark, tmp_path):
    """Spark's BisectingKMeans does not split data centred at the origin: it gets uncentred
    scaled vectors (PCA of them here)."""
    cfg = make_config(
        tmp_path,
        *SETTINGS,
        "cluster.algorithm=bisecting_kmeans",
        "cluster.pca_components=3",
        "cluster.k_min=3",
        "cluster.k_max=3",
    )
    df = features_df(spark, buyers() + shoppers() + newcomers(), T1)
    fitted = fit_clusters(df, cfg.cluster, fill=fill_rules(FEATURES, set(FEATURES)))
    got = {r.user_key: r.cluster_id for r in fitted.assignments_df.collect()}
    fitted.release()
    assert groups(got) == {"b": {"c01"}, "w": {"c02"}, "n": {"c03"}}
    assert [p["name"] for p in fitted.profiles if p["stable_id"] == "c03"] == ["New visitors"]


def test_gaussian_mixture_finds_the_groups(spark, tmp_path):
    # Spark's GaussianMixture starts from random rows: on these 30 rows seeds 7 and 1 find
    # the three groups, 42 puts seven newcomers in the buyers' component
    cfg = make_config(
        tmp_path,
        *SETTINGS,
        "cluster.seed=7",
        "cluster.algorithm=gaussian_mixture",
        "cluster.k_min=3",
        "cluster.k_max=3",
    )
    df = features_df(spark, buyers() + shoppers() + newcomers(), T1)
    fitted = fit_clusters(df, cfg.cluster, fill=fill_rules(FEATURES, set(FEATURES)))
    got = {r.user_key: r.cluster_id for r in fitted.assignments_df.collect()}
    fitted.release()
    assert groups(got) == {"b": {"c01"}, "w": {"c02"}, "n": {"c03"}}
    assert {p["stable_id"]: p["name"] for p in fitted.profiles} == {
        "c01": "High-value frequent buyers",
        "c02": "Window shoppers",
        "c03": "New visitors",
    }
    assert fitted.wcss > 0


def test_silhouette_metrics_on_four_points(spark, tmp_path):
    """One feature, points 0, 1, 10, 11 in two clusters. Standardizing scales every distance
    alike, so the silhouettes are those of the raw points:
    euclidean: point 0: a = 1, b = (10 + 11) / 2 = 10.5, s = 9.5 / 10.5; point 1: a = 1,
    b = (9 + 10) / 2, s = 8.5 / 9.5; 10 and 11 mirror them.
    squared euclidean: point 0: b = (100 + 121) / 2, s = 109.5 / 110.5; point 1:
    b = (81 + 100) / 2, s = 89.5 / 90.5."""
    df = spark.createDataFrame(
        [("a", 0), ("b", 1), ("c", 10), ("d", 11)], "user_key string, orders_lifetime int"
    )
    fill = fill_rules(("orders_lifetime",), {"orders_lifetime"})
    expected = {
        "euclidean": (9.5 / 10.5 + 8.5 / 9.5) / 2,  # 0.899749
        "squared_euclidean": (109.5 / 110.5 + 89.5 / 90.5) / 2,  # 0.989950
    }
    for metric, value in expected.items():
        cfg = make_config(
            tmp_path,
            "cluster.features=[orders_lifetime]",
            "cluster.log_features=[]",
            "cluster.k_min=2",
            "cluster.k_max=2",
            f"cluster.silhouette={metric}",
        )
        fitted = fit_clusters(df, cfg.cluster, fill=fill)
        fitted.release()
        assert fitted.silhouette == pytest.approx(value, abs=1e-6), metric
        # k-means cost: four deviations of 0.5 from the centres, squared, in standardized
        # units: divided by the sample variance of 0, 1, 10, 11 (squares about 5.5 sum to 101)
        assert fitted.wcss == pytest.approx(4 * 0.25 / (101 / 3), rel=1e-6)


def test_population_filter(spark, tmp_path):
    rows = [("u1", 89.9), ("u2", 90.0), ("u3", 90.1), ("u4", None)]
    df = spark.createDataFrame(rows, "user_key string, days_since_last_event double")
    chosen = make_config(tmp_path, "cluster.population.active_within_days=90").cluster.population
    assert sorted(r.user_key for r in population(df, chosen).collect()) == ["u1", "u2"]
    chosen = make_config(
        tmp_path, "cluster.population.where='days_since_last_event < 90 or user_key = \"u4\"'"
    ).cluster.population
    assert chosen.active_within_days == 90  # conf/base.yaml's
    assert sorted(r.user_key for r in population(df, chosen).collect()) == ["u1"]
    for where, message in [
        ("nope > 1", r"cluster.population.where 'nope > 1': .*nope"),
        ("days_since_last_event >", r"cluster.population.where 'days_since_last_event >'"),
    ]:
        chosen = make_config(tmp_path, f"cluster.population.where='{where}'").cluster.population
        with pytest.raises(ConfigError, match=message):
            population(df, chosen)
    with pytest.raises(ConfigError, match="needs days_since_last_event"):
        population(df.drop("days_since_last_event"), chosen)


def test_k_search_picks_the_three_groups(three_trainings):
    _, (v1, _, _) = three_trainings
    assert [s.k for s in v1.scores] == [2, 3, 4]
    best = max(v1.scores, key=lambda s: s.silhouette)
    assert (v1.k, best.k) == (3, 3)
    assert v1.scores[1].wcss < v1.scores[0].wcss
    assert v1.users == 30 and v1.sample_rows == 30


def test_profiles_in_original_units_and_names(three_trainings):
    _, (v1, _, _) = three_trainings
    by_id = {p["stable_id"]: p for p in v1.profiles}
    assert {i: (p["name"], p["size"], p["segment_id"]) for i, p in by_id.items()} == {
        "c01": ("High-value frequent buyers", 12, "cluster_behavior_c01"),
        "c02": ("Window shoppers", 10, "cluster_behavior_c02"),
        "c03": ("New visitors", 8, "cluster_behavior_c03"),
    }
    buyers_profile = by_id["c01"]
    assert buyers_profile["share"] == pytest.approx(0.4)
    assert buyers_profile["mean"]["orders_lifetime"] == pytest.approx(9.0)
    assert buyers_profile["mean"]["revenue_lifetime"] == pytest.approx(855.0)
    assert buyers_profile["median"]["orders_lifetime"] == 9.0
    # never-buyers' days_since_last_purchase is their tenure: n: (1 + 1 + 3 + 2 + 1 + 1 + 2 + 1) / 8
    assert by_id["c03"]["mean"]["days_since_last_purchase"] == pytest.approx(12 / 8)
    assert by_id["c02"]["mean"]["days_since_last_purchase"] == pytest.approx(47.0)
    top = by_id["c03"]["top_features"]
    assert len(top) == 3 and top[0]["direction"] == "low"
    assert {t["feature"] for t in top} <= set(FEATURES)


def test_retrain_on_shuffled_rows_with_another_seed_keeps_every_stable_id(spark, three_trainings):
    cfg, (v1, v2, _) = three_trainings
    rows = buyers() + shoppers() + newcomers()
    first = model_assignments(spark, cfg, v1, T1, rows)
    second = model_assignments(spark, cfg, v2, T2, rows)
    assert first == second
    assert groups(first) == {"b": {"c01"}, "w": {"c02"}, "n": {"c03"}}
    assert v2.matching["previous_version"] == v1.version
    assert sorted(m["stable_id"] for m in v2.matching["matched"]) == ["c01", "c02", "c03"]
    assert all(m["distance"] < 1e-6 for m in v2.matching["matched"])
    assert (v2.matching["appeared"], v2.matching["vanished"]) == ([], [])
    assert [p["name"] for p in sorted(v2.profiles, key=lambda p: p["stable_id"])] == [
        "High-value frequent buyers",
        "Window shoppers",
        "New visitors",
    ]
    # the same rows in another order: the same training data hash
    assert v2.training_data_hash == v1.training_data_hash


def test_vanished_and_appeared_clusters_are_reported(spark, three_trainings):
    cfg, (_, v2, v3) = three_trainings
    assert v3.matching["previous_version"] == v2.version
    assert sorted(m["stable_id"] for m in v3.matching["matched"]) == ["c01", "c02"]
    assert [(a["stable_id"], a["name"]) for a in v3.matching["appeared"]] == [
        ("c04", next(p["name"] for p in v3.profiles if p["stable_id"] == "c04"))
    ]
    assert [(v["stable_id"], v["name"]) for v in v3.matching["vanished"]] == [
        ("c03", "New visitors")
    ]
    got = model_assignments(spark, cfg, v3, T3, buyers() + shoppers() + lapsed())
    assert groups(got) == {"b": {"c01"}, "w": {"c02"}, "d": {"c04"}}
    assert v3.training_data_hash != v2.training_data_hash


def test_registry_rows(spark, three_trainings):
    cfg, (v1, v2, v3) = three_trainings
    rows = registry_rows(spark, cfg)
    assert sorted(rows) == [v1.version, v2.version, v3.version]
    assert v1.version < v2.version < v3.version
    row = rows[v1.version]
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", row.version)
    assert (row.model_name, row.kind, row.training_as_of, row.evaluation_as_of) == (
        "behavior",
        "cluster",
        [T1],
        None,
    )
    assert row.path == lake.model_path(cfg.lake.root, "behavior", v1.version)
    assert os.path.isdir(row.path.removeprefix("file:"))
    assert re.fullmatch(r"[0-9a-f]{64}", row.training_data_hash)
    assert set(row.metrics) == {"k", "silhouette", "wcss", "users", "training_seconds"}
    assert (row.metrics["k"], row.metrics["users"]) == (3.0, 30.0)
    assert row.metrics["silhouette"] == pytest.approx(v1.silhouette)
    params = json.loads(row.params)
    assert (params["k"], params["features"], params["log_features"]) == (
        3,
        list(FEATURES),
        ["revenue_lifetime"],
    )
    details = json.loads(row.details)
    assert [s["k"] for s in details["search"]] == [2, 3, 4]
    assert all(s["silhouette"] is not None and s["wcss"] > 0 for s in details["search"])
    assert details["sizes"] == {"c01": 12, "c02": 10, "c03": 8}
    assert sorted(details["mapping"].values()) == ["c01", "c02", "c03"]
    assert details["fill"]["days_since_last_purchase"] == {"from": "tenure_days", "value": 365.0}
    assert details["fill"]["orders_lifetime"] == {"from": None, "value": 0.0}
    assert details["matching"] == {
        "previous_version": None,
        "matched": [],
        "appeared": [],
        "vanished": [],
    }
    assert details["ari"] is None
    assert json.loads(rows[v3.version].params)["k_max"] == 3


@pytest.fixture(scope="module")
def first_assignment(spark, three_trainings):
    cfg, (v1, _, _) = three_trainings
    return assign_clusters(spark, cfg, as_of=T1, version=v1.version)


def test_assign_writes_cluster_membership(spark, three_trainings, first_assignment):
    cfg, (v1, _, _) = three_trainings
    assert (first_assignment.version, first_assignment.users) == (v1.version, 30)
    assert {(c.segment_id, c.name, c.size, c.entered) for c in first_assignment.clusters} == {
        ("cluster_behavior_c01", "High-value frequent buyers", 12, 12),
        ("cluster_behavior_c02", "Window shoppers", 10, 10),
        ("cluster_behavior_c03", "New visitors", 8, 8),
    }
    members = (
        lake.read_table(spark, cfg.lake.root, lake.SEGMENT_MEMBERSHIP)
        .filter(F.col("valid_from") == T1)
        .collect()
    )
    assert {(m.source, m.definition_version) for m in members} == {("cluster", v1.version)}
    assert groups({m.user_key: m.segment_id for m in members}) == {
        "b": {"cluster_behavior_c01"},
        "w": {"cluster_behavior_c02"},
        "n": {"cluster_behavior_c03"},
    }
    assert all(m.score is not None and 0 <= m.score < 3 for m in members)
    catalog = lake.read_table(spark, cfg.lake.root, lake.SEGMENT_CATALOG).filter(
        F.col("as_of") == T1
    )
    assert {
        (r.segment_id, r.source, r.name, r.status, r.size, r.definition_version)
        for r in catalog.collect()
    } == {
        ("cluster_behavior_c01", "cluster", "High-value frequent buyers", "active", 12, v1.version),
        ("cluster_behavior_c02", "cluster", "Window shoppers", "active", 10, v1.version),
        ("cluster_behavior_c03", "cluster", "New visitors", "active", 8, v1.version),
    }


@pytest.mark.slow
def test_assign_with_a_retrained_model_retires_the_vanished_cluster(
    spark, three_trainings, first_assignment
):
    """The latest version at T3: d enters the new c04, n leaves the vanished c03, b and w
    stay (a new interval under the new version, no change row)."""
    cfg, (_, _, v3) = three_trainings
    third = assign_clusters(spark, cfg, as_of=T3)
    assert third.version == v3.version
    changes = lake.read_table(spark, cfg.lake.root, lake.SEGMENT_CHANGES).filter(
        F.col("changed_at") == T3
    )
    got = {(r.user_key[0], r.segment_id, r.change, r.reason) for r in changes.collect()}
    assert got == {
        ("d", "cluster_behavior_c04", "enter", "cluster_assigned"),
        ("n", "cluster_behavior_c03", "exit", "segment_retired"),
    }
    current = lake.read_table(spark, cfg.lake.root, lake.SEGMENT_MEMBERSHIP).filter("is_current")
    assert {r.definition_version for r in current.collect()} == {v3.version}
    catalog = lake.read_table(spark, cfg.lake.root, lake.SEGMENT_CATALOG).filter(
        F.col("as_of") == T3
    )
    assert {(r.segment_id, r.status, r.size, r.entered, r.exited) for r in catalog.collect()} == {
        ("cluster_behavior_c01", "active", 12, 0, 0),
        ("cluster_behavior_c02", "active", 10, 0, 0),
        ("cluster_behavior_c04", "active", 8, 8, 0),
        ("cluster_behavior_c03", "retired", 0, 0, 8),
    }
