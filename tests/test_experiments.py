"""Experiments: GrowthBook-compatible hashing, sticky assignment, exposures, the analysis
statistics against textbook values, and Thompson sampling.

Expected hash values are GrowthBook's published test cases (its SDKs' shared cases.json:
hash, getBucketRange, chooseVariation, inNamespace and experiment runs), and for the users of
the lake below they were computed with a separate JavaScript implementation of the SDK's
functions (Node.js), not with microseg's code.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from pyspark.sql import functions as F
from tests.conftest import make_config

from microseg.core import lake, schemas
from microseg.core.online_store import SqliteStore, Variant, sqlite_path
from microseg.experiments import hashing, stats
from microseg.experiments.analyze import run_analyze
from microseg.experiments.assign import run_assign
from microseg.experiments.model import load_experiments

# --------------------------------------------------------------------------------------
# GrowthBook's behaviour (no Spark)

# (seed, value, version, expected): GrowthBook's cases, then Node.js for UTF-16 strings
HASHES = [
    ("", "a", 1, 0.22),
    ("", "b", 1, 0.077),
    ("", "ab", 1, 0.946),
    ("", "def", 1, 0.652),
    ("", "8952klfjas09ujkasdf", 1, 0.549),
    ("", "123", 1, 0.011),
    ("", '___)((*":&', 1, 0.563),
    ("seed", "a", 2, 0.0505),
    ("feature-exp", "d123", 2, 0.6468),
    ("feature-exp", "i123", 2, 0.9943),
    ("feature", "123", 2, 0.5231),
    ("feature", "123", 1, 0.863),
    ("experiment", "1", 2, 0.4413),
    ("holdout", "1", 2, 0.8043),
    ("exp", "\U0001f600user", 2, 0.6373),  # outside the BMP: two UTF-16 code units
    ("exp", "\U0001f600user", 1, 0.914),
    ("", "é", 1, 0.94),
]


@pytest.mark.parametrize(("seed", "value", "version", "expected"), HASHES)
def test_hash_matches_growthbook(seed, value, version, expected):
    assert hashing.gb_hash(seed, value, version) == expected


def test_hash_of_an_unknown_version_is_none_and_fnv_counts_utf16_units():
    assert hashing.gb_hash("", "a", 3) is None
    assert hashing.fnv1a32("exp\U0001f600user") == 4046660778
    assert hashing.utf16_units("\U0001f600") == [0xD83D, 0xDE00]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((2, 1, None), [(0, 0.5), (0.5, 1)]),
        ((2, 0.5, None), [(0, 0.25), (0.5, 0.75)]),
        ((2, 0, None), [(0, 0), (0.5, 0.5)]),
        ((4, 1, None), [(0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1)]),
        ((2, 1, [0.4, 0.6]), [(0, 0.4), (0.4, 1)]),
        ((3, 1, [0.2, 0.3, 0.5]), [(0, 0.2), (0.2, 0.5), (0.5, 1)]),
        ((2, 1, [0.4, 0.1]), [(0, 0.5), (0.5, 1)]),  # does not add up to 1: equal
        ((3, 1, [0.5, 0.5]), [(0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1)]),  # wrong length
        ((2, -0.2, None), [(0, 0), (0.5, 0.5)]),  # coverage clamped to 0
        ((2, 1.5, None), [(0, 0.5), (0.5, 1)]),  # and to 1
    ],
)
def test_bucket_ranges_match_growthbook(args, expected):
    got = hashing.bucket_ranges(*args)
    assert len(got) == len(expected)
    assert [v for r in got for v in r] == pytest.approx([v for r in expected for v in r])


@pytest.mark.parametrize(
    ("n", "ranges", "expected"),
    [
        (0.2, [(0, 0.5), (0.5, 1)], 0),
        (0.6, [(0, 0.5), (0.5, 1)], 1),
        (0.5, [(0, 0.5), (0.5, 1)], 1),  # a range includes its start, not its end
        (0.25, [(0, 0.25), (0.5, 0.75)], -1),  # reduced coverage: not in the experiment
        (0.6, [(0, 0.25), (0.5, 0.75)], 1),
        (1.0, [(0, 0.5), (0.5, 1)], -1),
        (0.45, [(0, 0.2), (0.2, 0.5), (0.5, 1)], 1),
    ],
)
def test_choose_variation_matches_growthbook(n, ranges, expected):
    assert hashing.choose_variation(n, ranges) == expected


@pytest.mark.parametrize(
    ("user", "namespace", "expected"),
    [
        ("1", ("namespace1", 0, 0.4), False),
        ("1", ("namespace1", 0.4, 1), True),
        ("1", ("namespace2", 0, 0.4), False),
        ("2", ("namespace1", 0, 0.4), False),
        ("3", ("namespace2", 0, 0.4), True),
        ("4", ("namespace2", 0, 0.4), True),
    ],
)
def test_in_namespace_matches_growthbook(user, namespace, expected):
    assert hashing.in_namespace(user, namespace) is expected


def test_spark_columns_equal_the_sdk_functions(spark):
    one = spark.range(1)
    columns = [
        hashing.gb_hash_col(seed, F.lit(value), version) for seed, value, version, _ in HASHES
    ]
    assert list(one.select(*columns).first()) == [expected for *_, expected in HASHES]
    ranges = [(0, 0.2), (0.2, 0.5), (0.5, 1)]
    picks = spark.createDataFrame([(0.0,), (0.2,), (0.45,), (0.5,), (0.99,), (1.0,)], "n double")
    chosen = [
        r[0] for r in picks.select(hashing.choose_variation_col(F.col("n"), ranges)).collect()
    ]
    assert chosen == [0, 1, 1, 2, 2, -1]
    users = spark.createDataFrame([("1",), ("3",)], "u string")
    inside = users.select(hashing.in_namespace_col(F.col("u"), ("namespace2", 0, 0.4))).collect()
    assert [r[0] for r in inside] == [False, True]
    empty = spark.createDataFrame([("",)], "u string").select(hashing.fnv1a32_col(F.col("u")))
    assert empty.first()[0] == 0x811C9DC5


# --------------------------------------------------------------------------------------
# statistics: textbook values worked by hand


def test_two_proportion_z_test_by_hand():
    # control 200/1000, treatment 250/1000: pooled p = 0.225,
    # se = sqrt(0.225 * 0.775 * (1/1000 + 1/1000)) = 0.0186748, z = 0.05 / se = 2.67740,
    # p = 2 * (1 - Phi(2.67740)) = 0.007419
    z = stats.two_proportion_ztest(200, 1000, 250, 1000)
    assert z.z == pytest.approx(2.67740, abs=1e-4)
    assert z.p_value == pytest.approx(0.007419, abs=2e-5)
    # unpooled se = sqrt(0.2*0.8/1000 + 0.25*0.75/1000) = 0.0186414; 1.959964 * se = 0.036537
    assert z.diff == pytest.approx(0.05)
    assert z.diff_ci == pytest.approx((0.05 - 0.036537, 0.05 + 0.036537), abs=1e-5)
    # relative lift 0.25; delta method se = sqrt(0.0001875/0.04 + 0.0625*0.00016/0.0016)
    # = sqrt(0.0046875 + 0.00625) = 0.104583; 1.959964 * 0.104583 = 0.204978
    assert z.lift == pytest.approx(0.25)
    assert z.lift_ci == pytest.approx((0.25 - 0.204978, 0.25 + 0.204978), abs=1e-5)
    # the chi-square test of the same 2x2 table is z squared: 7.16848
    chi2, p = stats.chi_square_independence([[200, 800], [250, 750]])
    assert chi2 == pytest.approx(2.67740**2, abs=1e-3)
    assert p == pytest.approx(0.007419, abs=2e-5)


def test_sample_ratio_mismatch_by_hand():
    # 5060 / 4940 against 50/50: chi2 = (60^2 + 60^2) / 5000 = 1.44, p = 0.23014
    assert stats.sample_ratio_mismatch([5060, 4940], [0.5, 0.5]) == pytest.approx(0.23014, abs=1e-4)
    # 5200 / 4800: chi2 = 16, p = 6.334e-5 (flagged below 0.001)
    assert stats.sample_ratio_mismatch([5200, 4800], [0.5, 0.5]) == pytest.approx(
        6.334e-5, rel=1e-3
    )
    # 3 variants 20/30/50 with 1000 users: observed 200/300/500 is a perfect fit
    assert stats.sample_ratio_mismatch([200, 300, 500], [0.2, 0.3, 0.5]) == pytest.approx(1.0)


def test_sample_size_by_hand():
    # baseline 10%, +10% relative (to 11%), alpha 0.05 two-sided, power 0.8:
    # (1.959964 sqrt(2 * 0.105 * 0.895) + 0.841621 sqrt(0.09 + 0.0979))^2 / 0.01^2 = 14750.5
    assert stats.sample_size_per_variant(0.10, 0.10) == 14751
    assert stats.sample_size_per_variant(0.10, 0.01, relative=False) == 14751
    with pytest.raises(ValueError, match="distinct rates"):
        stats.sample_size_per_variant(0.6, 1.0)


def _moments(ys, xs):
    return stats.Moments(
        len(ys),
        sum(ys),
        sum(y * y for y in ys),
        sum(xs),
        sum(x * x for x in xs),
        sum(x * y for x, y in zip(xs, ys, strict=True)),
    )


def test_welch_and_cuped_by_hand():
    # control y = 1, 2, 3, 4 (mean 2.5, var 5/3); treatment y = 2, 4, 6, 8 (mean 5, var 20/3)
    control = _moments([1, 2, 3, 4], [1, 2, 3, 4])
    treated = _moments([3, 4, 5, 6], [1, 2, 3, 4])
    raw = stats.welch(control, _moments([2, 4, 6, 8], [0, 0, 0, 0]))
    # se = sqrt(5/12 + 20/12) = 1.443376; t = 2.5 / se = 1.732051; dof = 4.411765
    assert raw.diff == pytest.approx(2.5)
    # (scipy.stats.ttest_ind(equal_var=False) on the raw values gives the same: 0.15158)
    assert raw.p_value == pytest.approx(0.15158, abs=1e-5)
    # treatment = control + 2 per user, with the covariate explaining all within-group
    # variance: CUPED's theta is 1, the adjusted variance 0, the difference exactly 2
    result = stats.cuped(control, treated)
    assert result.theta == pytest.approx(1.0)
    assert result.test.diff == pytest.approx(2.0)
    assert result.variance_reduction == pytest.approx(1.0)


def test_thompson_sampling_prefers_the_better_arm_and_keeps_the_floor():
    weights, p_best = stats.thompson_weights(
        [1000, 1000, 1000], [50, 80, 40], floor=0.1, draws=20000, seed=1
    )
    assert sum(weights) == pytest.approx(1.0)
    assert min(weights) >= 0.1
    assert p_best[1] > 0.99  # 8% vs 5% and 4% over 1000 users each is decisive
    again, _ = stats.thompson_weights(
        [1000, 1000, 1000], [50, 80, 40], floor=0.1, draws=20000, seed=1
    )
    assert again == weights  # a fixed seed: the same counts give the same weights


def test_a_simulated_bandit_finds_the_best_arm():
    """Rounds of 300 users split by the current weights over arms converting at 4%, 5% and
    7%: after 30 rounds the best arm has most of the weight, and the regret (conversions lost
    against always showing the best arm) is far below an equal split's."""
    import numpy as np

    rates = [0.04, 0.05, 0.07]
    rng = np.random.default_rng(7)
    exposed, conversions = [0, 0, 0], [0, 0, 0]
    weights = [1 / 3] * 3
    regret = 0.0
    for round_ in range(30):
        counts = rng.multinomial(300, weights)
        for arm, n in enumerate(counts):
            exposed[arm] += int(n)
            conversions[arm] += int(rng.binomial(n, rates[arm]))
            regret += n * (max(rates) - rates[arm])
        weights, _ = stats.thompson_weights(
            exposed, conversions, floor=0.05, draws=4000, seed=round_
        )
    equal_split_regret = 30 * 300 * (0.07 - (0.04 + 0.05 + 0.07) / 3)
    assert weights.index(max(weights)) == 2
    assert weights[2] > 0.8
    assert regret < 0.6 * equal_split_regret


# --------------------------------------------------------------------------------------
# assignment and analysis on a hand-made lake

EXPERIMENTS = """
experiments:
  - id: welcome-back
    segment: repeat_visitors
    start: 2026-10-01T00:00:00Z
    end: 2026-11-30T00:00:00Z
    variants: [control, offer]
    holdout: 0.1
    metrics: {window: 7d, pre_period: 28d}
  - id: subject
    segment: repeat_visitors
    start: 2026-10-01T00:00:00Z
    variants: [plain, discount, scarcity]
    allocation: bandit
    bandit: {floor: 0.1, draws: 5000}
  - id: later
    segment: repeat_visitors
    start: 2026-12-01T00:00:00Z
    variants: [a, b]
"""

T = datetime(2026, 10, 10)
LATER = datetime(2026, 10, 20)
AS_OF = datetime(2026, 11, 1)


def _membership(user, valid_from, valid_to=None, segment="repeat_visitors"):
    return {
        "user_key": user,
        "segment_id": segment,
        "source": "rule",
        "scope": "conf/segments.yaml",
        "definition_version": "v1",
        "score": None,
        "valid_from": valid_from,
        "valid_to": valid_to,
        "is_current": valid_to is None,
        "run_id": "r",
        "closed_by_run_id": None,
    }


def _session(user, start, *, purchase=False, revenue=0.0):
    row = {f.name: None for f in schemas.SESSIONS.fields}
    counts = {
        f.name: 0
        for f in schemas.SESSIONS.fields
        if isinstance(f.dataType, type(schemas.INT)) or f.name == "visit_part"
    }
    row.update(counts)
    row.update(
        session_id=f"{user}-{start:%m%d%H}",
        user_key=user,
        session_start=start,
        session_end=start + timedelta(minutes=5),
        duration_seconds=300.0,
        events=1,
        purchase_events=int(purchase),
        has_cart_add=False,
        has_checkout=False,
        has_purchase=purchase,
        is_cart_abandoned=False,
        revenue=revenue,
        is_bounce=True,
        visit_start=start,
        first_event_id=f"e-{user}-{start:%m%d%H}",
        session_date=start.date(),
        anonymous_ids=[],
    )
    return row


MEMBERS = [
    *[_membership(f"u{i}", datetime(2026, 10, 5)) for i in (2, 3, 4, 5, 6, 7, 8, 9)],
    _membership("u1", datetime(2026, 10, 5), datetime(2026, 10, 15)),  # leaves after T
    _membership("u10", datetime(2026, 10, 5), datetime(2026, 10, 9)),  # left before T
    _membership("u11", datetime(2026, 10, 5), segment="new_visitors"),  # another segment
    _membership("u12", datetime(2026, 10, 18)),  # joins after T
]

SESSIONS = [
    _session("u1", datetime(2026, 10, 9, 10), purchase=True, revenue=20.0),  # pre-period
    _session("u1", datetime(2026, 10, 11, 10)),  # exposure
    _session("u1", datetime(2026, 10, 12, 10), purchase=True, revenue=50.0),
    _session("u2", datetime(2026, 10, 12, 10), purchase=True, revenue=30.0),
    _session("u3", datetime(2026, 10, 20, 10)),
    _session("u3", datetime(2026, 10, 28, 10), purchase=True, revenue=40.0),  # after 7 days
    _session("u4", datetime(2026, 10, 14, 10), purchase=True, revenue=25.0),
    _session("u6", datetime(2026, 10, 15, 10)),
    _session("u7", datetime(2026, 9, 1, 10), purchase=True, revenue=99.0),  # before pre-period
    _session("u7", datetime(2026, 10, 11, 10), purchase=True, revenue=10.0),
    _session("u9", datetime(2026, 10, 13, 10)),
]


@pytest.fixture(scope="module")
def experiment_lake(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experiments")
    (tmp / "experiments.yaml").write_text(EXPERIMENTS)
    cfg = make_config(tmp, f"experiments.file={tmp / 'experiments.yaml'}")
    root = cfg.lake.root
    members = spark.createDataFrame(MEMBERS, schema=schemas.SEGMENT_MEMBERSHIP)
    lake.overwrite(spark, root, lake.SEGMENT_MEMBERSHIP, members)
    lake.overwrite(spark, root, lake.SESSIONS, spark.createDataFrame(SESSIONS, schemas.SESSIONS))
    first = run_assign(spark, cfg, as_of=T, run_id="assign-1")
    analysis = run_analyze(spark, cfg, as_of=AS_OF, run_id="analyze-1")
    return cfg, first, analysis


def _assigned(spark, cfg, experiment_id):
    rows = (
        lake.read_table(spark, cfg.lake.root, lake.EXPERIMENT_ASSIGNMENTS)
        .filter(F.col("experiment_id") == experiment_id)
        .collect()
    )
    return {r.user_key: r for r in rows}


def test_members_at_the_time_get_growthbooks_variant_and_the_holdout(spark, experiment_lake):
    cfg, first, _ = experiment_lake
    got = {k: r.variant for k, r in _assigned(spark, cfg, "welcome-back").items()}
    # by Node.js: the holdout hash is below 0.1 for u4 and u8 only; buckets u1 0.5508, u2 0.3994,
    # u3 0.8194, u5 0.277, u6 0.6069, u7 0.9904, u9 0.4805 against [0, 0.5), [0.5, 1)
    assert got == {
        "u1": "offer",
        "u2": "control",
        "u3": "offer",
        "u4": "holdout",
        "u5": "control",
        "u6": "offer",
        "u7": "offer",
        "u8": "holdout",
        "u9": "control",
    }
    assert _assigned(spark, cfg, "welcome-back")["u1"].bucket == 0.5508
    # the bandit experiment before any allocation: equal thirds; u5's bucket 0.3346 is
    # just past 1/3
    bandit = {k: r.variant for k, r in _assigned(spark, cfg, "subject").items()}
    assert bandit == {
        "u1": "plain",
        "u2": "discount",
        "u3": "discount",
        "u4": "discount",
        "u5": "discount",
        "u6": "discount",
        "u7": "discount",
        "u8": "plain",
        "u9": "scarcity",
    }
    assert first.inactive == ["later"]
    assert first.added["welcome-back"] == {"control": 3, "offer": 4, "holdout": 2}
    assert first.store_synced == 18


def test_exposures_and_the_analysis_of_the_hand_made_lake(spark, experiment_lake):
    cfg, _, analysis = experiment_lake
    exposures = {
        (r.experiment_id, r.user_key): r.exposed_at
        for r in lake.read_table(spark, cfg.lake.root, lake.EXPOSURES).collect()
    }
    # first session at or after the assignment (2026-10-10); u1's of the 9th is before it
    assert exposures[("welcome-back", "u1")] == datetime(2026, 10, 11, 10)
    assert exposures[("welcome-back", "u3")] == datetime(2026, 10, 20, 10)
    assert ("welcome-back", "u5") not in exposures  # no session after the assignment
    assert len([k for k in exposures if k[0] == "welcome-back"]) == 7
    assert analysis.new_exposures == 14
    result = next(r for r in analysis.results if r.experiment.id == "welcome-back")
    by = {v.variant: v for v in result.variants}
    # control: u2 (bought 30), u9 (nothing); u5 never came back
    assert (by["control"].assigned, by["control"].exposed, by["control"].conversions) == (3, 2, 1)
    assert by["control"].revenue_per_user == 15.0
    # offer: u1 (50 within the window), u3 (bought after 7 days: not counted), u6, u7 (10)
    assert (by["offer"].assigned, by["offer"].exposed, by["offer"].conversions) == (4, 4, 2)
    assert by["offer"].revenue_per_user == 15.0
    assert by["offer"].z.lift == 0.0
    assert by["offer"].z.p_value == pytest.approx(1.0)
    assert (by["holdout"].assigned, by["holdout"].exposed, by["holdout"].conversions) == (2, 1, 1)
    # SRM: 3 vs 4 against 50/50: chi2 = 0.5^2 * 2 / 3.5 = 0.142857, p = 0.70546
    assert result.srm_p_value == pytest.approx(0.70546, abs=1e-4)
    assert result.srm_flag is False
    stored = lake.read_table(spark, cfg.lake.root, lake.EXPERIMENT_RESULTS)
    assert stored.filter("experiment_id = 'welcome-back'").count() == 3


def test_the_bandit_allocates_from_conversions_and_new_users_get_its_weights(
    spark, experiment_lake
):
    cfg, _, analysis = experiment_lake
    root = cfg.lake.root
    rows = {
        r.variant: r
        for r in lake.read_table(spark, root, lake.EXPERIMENT_ALLOCATIONS).collect()
        if r.version == 1
    }
    # exposed and converted (the default window of 14 days): plain u1 (bought); discount
    # u2 (bought), u3 (bought 8 days after exposure), u4 (bought), u6, u7 (bought); scarcity u9
    assert {v: (r.alpha, r.beta) for v, r in rows.items()} == {
        "plain": (2.0, 1.0),
        "discount": (5.0, 2.0),
        "scarcity": (1.0, 2.0),
    }
    assert sum(r.weight for r in rows.values()) == pytest.approx(1.0)
    assert min(r.weight for r in rows.values()) >= 0.1
    assert rows["scarcity"].weight == min(r.weight for r in rows.values())
    # a second analysis at the same as-of keeps version 1
    run_analyze(spark, cfg, as_of=AS_OF, run_id="analyze-2", experiment_id="subject")
    versions = lake.read_table(spark, root, lake.EXPERIMENT_ALLOCATIONS).select("version")
    assert {r.version for r in versions.collect()} == {1}

    # a later assignment: u12 joined, u1 left; u1 keeps its variants, u12 is assigned once
    second = run_assign(spark, cfg, as_of=LATER, run_id="assign-2")
    welcome = _assigned(spark, cfg, "welcome-back")
    assert welcome["u1"].variant == "offer" and welcome["u1"].run_id == "assign-1"
    assert welcome["u12"].variant == "control"  # Node.js: bucket 0.281, holdout hash 0.7666
    assert second.added["welcome-back"] == {"control": 1}
    subject = _assigned(spark, cfg, "subject")
    assert subject["u12"].allocation_version == 1
    order = ("plain", "discount", "scarcity")
    assert list(subject["u12"].weights) == pytest.approx([rows[v].weight for v in order])
    assert subject["u1"].allocation_version == 0
    again = run_assign(spark, cfg, as_of=LATER, run_id="assign-3")
    assert again.added == {}
    assert lake.read_table(spark, root, lake.EXPERIMENT_ASSIGNMENTS).count() == 20


def test_the_api_answers_which_experiments_a_user_is_in(spark, experiment_lake):
    cfg, _, _ = experiment_lake
    store = SqliteStore(sqlite_path(cfg), readonly=True)
    from microseg.serving.api import create_app

    client = TestClient(create_app(cfg, store))
    body = client.get("/users/u1/experiments").json()
    assert body["user_key"] == "u1"
    assert [(e["experiment_id"], e["variant"]) for e in body["experiments"]] == [
        ("subject", "plain"),
        ("welcome-back", "offer"),
    ]
    assert body["experiments"][0]["assigned_at"] == "2026-10-10T00:00:00Z"
    assert client.get("/users/nobody/experiments").json()["experiments"] == []
    detail = client.get("/experiments/welcome-back").json()
    assert [(r["variant"], r["exposed"]) for r in detail["results"]] == [
        ("control", 2),
        ("offer", 4),
        ("holdout", 1),
    ]
    assert detail["srm_flag"] is False
    bandit = client.get("/experiments/subject").json()
    assert bandit["allocation_version"] == 1
    assert sum(bandit["weights"].values()) == pytest.approx(1.0)
    assert client.get("/experiments/unknown").status_code == 404


def test_the_store_keeps_the_first_variant_and_forgets_people(tmp_path):
    store = SqliteStore(str(tmp_path / "s.sqlite"))
    assert store.add_variants("w", 1, [Variant("u1", "e", "a", 5), Variant("u2", "e", "b", 5)])
    assert store.add_variants("w", 2, [Variant("u1", "e", "b", 9)])
    assert store.user_variants("u1") == [Variant("u1", "e", "a", 5)]
    assert not store.add_variants("w", 2, [Variant("u3", "e", "a", 9)])  # batch already applied
    assert store.forget({"u1"}, set()) >= 1
    assert store.user_variants("u1") == []
    assert store.user_variants("u2") == [Variant("u2", "e", "b", 5)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    colour: red\n", "key 'experiments.0.colour'"),
        ("    weights: [0.9, 0.3]\n", "add up to 1"),
        ("    variants: [a, holdout]\n", "'holdout' is reserved"),
    ],
)
def test_a_bad_experiment_file_names_the_file_and_the_problem(tmp_path, extra, message):
    from microseg.core.config import ConfigError

    bad = tmp_path / "bad.yaml"
    base = "experiments:\n  - id: x\n    segment: s\n    start: 2026-10-01T00:00:00Z\n"
    bad.write_text(base + ("" if "variants" in extra else "    variants: [a, b]\n") + extra)
    cfg = make_config(tmp_path, f"experiments.file={bad}")
    with pytest.raises(ConfigError) as err:
        load_experiments(cfg)
    assert str(err.value).startswith(f"{bad}: ")
    assert message in str(err.value)
