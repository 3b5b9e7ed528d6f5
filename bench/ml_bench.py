"""Spark ML training time against scikit-learn, on the same data in the same run.

    .venv/bin/python bench/ml_bench.py                                 # 100k and 1M users
    .venv/bin/python bench/ml_bench.py --users 100000 --repeat 3
    .venv/bin/python bench/ml_bench.py --users 100000 --variants kmeans-plain gbt-cached-2p

microseg trains two kinds of model with Spark ML: KMeans on behavioral features
(lib/microseg/ml/clustering/) and a GBTClassifier for propensity (lib/microseg/ml/propensity/).
For each size in --users this script

1. generates two synthetic tables with numpy (seeded, so every run gets the same rows) and
   writes them once as Parquet under bench/work/ml-<users>/ (reused while its manifest.json
   matches):
   * clustering: 10 standardized features drawn from 8 Gaussian blobs of different sizes
     and spreads; three of them are log1p of log-normal, money-like amounts that are zero for
     non-buyers, so they stay skewed, as behavioral features do after microseg's transform;
   * propensity: 15 behavior-like features (recency, counts, amounts, rates, noise) and a
     binary label, about 10 % positives, drawn from a nonlinear function of a few features
     plus noise, with an 80/20 train/test column;
2. times scikit-learn's fit on the same rows, already in memory as numpy arrays (the
   yardstick): KMeans (reports inertia) and HistGradientBoostingClassifier (reports the test
   ROC AUC);
3. times Spark ML's fit in a local[2] session, in variants that each change one lever
   (VARIANTS): no cache, cached vectors, 2 partitions, fewer k-means|| steps, random init,
   cached node ids, more aggregation memory. It reports the KMeans WSSSE
   (summary.trainingCost) and the GBT's test ROC AUC (BinaryClassificationEvaluator);
4. writes bench/results/ml-<users>.json per size and bench/results/ml.md, and prints a table.

Only fit() is timed. For the "plain" variants the Parquet read and the VectorAssembler run
inside fit(), because Spark is lazy; for the cached ones the vectors are cached and counted
before the clock starts. ratio = Spark seconds / scikit-learn seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
LOG4J = ROOT / "conf" / "log4j2.properties"

# bump when the generated data changes, so older bench/work/ml-* folders are regenerated
GENERATOR_VERSION = 1

# the models, the same for both libraries
K = 8
KMEANS_MAX_ITER = 20
KMEANS_TOL = 1e-4
GBT_TREES = 20
GBT_DEPTH = 5
GBT_STEP = 0.1
GBT_BINS = 32  # Spark's maxBins; scikit-learn keeps its default of 255 bins

# the data
BLOBS = 8
BLOB_WEIGHTS = [0.26, 0.19, 0.15, 0.12, 0.10, 0.08, 0.06, 0.04]
BLOB_SPREADS = [0.35, 0.5, 0.7, 0.9, 1.1, 0.6, 1.4, 0.8]  # standard deviation per blob
GAUSS_COLUMNS = [f"gauss_{i}" for i in range(7)]
MONEY_COLUMNS = [f"money_{i}" for i in range(3)]
CLUSTER_COLUMNS = GAUSS_COLUMNS + MONEY_COLUMNS
PROPENSITY_COLUMNS = [
    "days_since_last_event",
    "days_since_first_event",
    "orders_lifetime",
    "revenue_lifetime",
    "sessions_30d",
    "bounce_rate_30d",
    "cart_adds_90d",
    "cart_abandoned_sessions_7d",
    "distinct_categories",
    "max_views_one_product_unbought_7d",
    "avg_session_minutes",
    "discount_share",
    "noise_0",
    "noise_1",
    "noise_2",
]
POSITIVE_SHARE = 0.10
TEST_SHARE = 0.20

log = logging.getLogger("ml_bench")


# --------------------------------------------------------------------------------------
# the Spark variants


@dataclass(frozen=True)
class Variant:
    name: str  # what --variants takes
    model: str  # "kmeans" or "gbt"
    label: str  # what the tables show
    cached: bool  # assembled vectors cached and counted before the clock starts
    partitions: int | None  # coalesce/repartition the vectors to this many; None: as read
    params: dict = field(default_factory=dict)  # estimator settings over the common ones
    note: str = ""
    # assembled vectors materialized with localCheckpoint before the clock starts: not in
    # the cache, so the estimator persists its own converted input (as microseg fits KMeans)
    checkpointed: bool = False


VARIANTS = [
    Variant(
        "kmeans-plain",
        "kmeans",
        "plain",
        cached=False,
        partitions=None,
        note="read Parquet -> VectorAssembler -> fit; KMeans persists its own input RDD "
        "when the DataFrame is not cached",
    ),
    Variant("kmeans-cached", "kmeans", "cached", cached=True, partitions=None),
    Variant(
        "kmeans-checkpointed",
        "kmeans",
        "local checkpoint",
        cached=False,
        partitions=None,
        checkpointed=True,
        note="materialized but not cached: KMeans persists its own RDD of vectors once, "
        "where a cached DataFrame is converted to vectors again on every pass",
    ),
    Variant("kmeans-cached-2p", "kmeans", "cached+2 partitions", cached=True, partitions=2),
    Variant(
        "kmeans-cached-2p-initsteps1",
        "kmeans",
        "cached+2p+initSteps=1",
        cached=True,
        partitions=2,
        params={"initSteps": 1},
        note="microseg's default is cluster.init_steps=2, Spark's too",
    ),
    Variant(
        "kmeans-random-init",
        "kmeans",
        "cached+2p+random init",
        cached=True,
        partitions=2,
        params={"initMode": "random"},
        note="k random rows as centres instead of k-means||",
    ),
    Variant(
        "gbt-plain",
        "gbt",
        "plain",
        cached=False,
        partitions=None,
        note="read Parquet -> filter train rows -> VectorAssembler -> fit",
    ),
    Variant("gbt-cached", "gbt", "cached", cached=True, partitions=None),
    Variant(
        "gbt-checkpointed",
        "gbt",
        "local checkpoint",
        cached=False,
        partitions=None,
        checkpointed=True,
        note="materialized but not cached: GBT persists its own converted input",
    ),
    Variant("gbt-cached-2p", "gbt", "cached+2 partitions", cached=True, partitions=2),
    Variant(
        "gbt-cached-2p-nodeids",
        "gbt",
        "cached+2p+cacheNodeIds=True",
        cached=True,
        partitions=2,
        params={"cacheNodeIds": True},
        note="microseg sets cacheNodeIds=False (Spark's default)",
    ),
    Variant(
        "gbt-cached-2p-mem512",
        "gbt",
        "cached+2p+maxMemoryInMB=512",
        cached=True,
        partitions=2,
        params={"maxMemoryInMB": 512},
        note="Spark's default is 256 MB for the per-level split statistics",
    ),
]
BY_NAME = {v.name: v for v in VARIANTS}
MODELS = ["kmeans", "gbt"]


# --------------------------------------------------------------------------------------
# data: generated once per size


@dataclass
class Dataset:
    users: int
    folder: Path
    manifest: dict
    generated_now: bool
    generate_seconds: float | None

    @property
    def clustering(self) -> Path:
        return self.folder / "clustering"

    @property
    def propensity(self) -> Path:
        return self.folder / "propensity"


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=0)) / x.std(axis=0)


def make_clustering(users: int, seed: int) -> dict[str, np.ndarray]:
    """10 standardized features from 8 blobs; money_* are log1p of log-normal amounts that
    are zero for the blob's non-buyers, so they stay skewed with a spike at the minimum."""
    rng = np.random.default_rng([seed, 1])
    dims = len(CLUSTER_COLUMNS)
    centres = rng.uniform(-3.0, 3.0, size=(BLOBS, dims))
    # each blob is stretched differently along each axis
    spreads = np.asarray(BLOB_SPREADS)[:, None] * rng.uniform(0.6, 1.4, size=(BLOBS, dims))
    buyer_share = rng.uniform(0.15, 0.95, size=BLOBS)
    blob = rng.choice(BLOBS, size=users, p=BLOB_WEIGHTS)
    x = centres[blob] + rng.standard_normal((users, dims)) * spreads[blob]
    money = slice(len(GAUSS_COLUMNS), dims)
    # log-normal amounts around e^(3 + centre): tens to a few thousand
    amounts = np.exp(3.0 + x[:, money])
    buyer = rng.random((users, len(MONEY_COLUMNS))) < buyer_share[blob, None]
    x[:, money] = np.log1p(np.where(buyer, amounts, 0.0))
    x = _standardize(x)
    columns = {name: x[:, i].copy() for i, name in enumerate(CLUSTER_COLUMNS)}
    columns["blob"] = blob.astype(np.int8)
    return columns


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def make_propensity(users: int, seed: int) -> dict[str, np.ndarray]:
    """15 behavior-like features; the label is a Bernoulli draw of a logistic function of a
    nonlinear score of six of them plus noise, shifted to about POSITIVE_SHARE positives."""
    rng = np.random.default_rng([seed, 2])
    activity = rng.gamma(0.8, 1.5, size=users)  # a latent per-user activity level
    recency = rng.exponential(25.0, size=users) / (0.3 + activity)
    tenure = recency + rng.uniform(0.0, 365.0, size=users)
    orders = rng.poisson(activity * 1.2).astype(float)
    revenue = np.where(orders > 0, orders * rng.lognormal(3.5, 0.8, size=users), 0.0)
    sessions = rng.poisson(activity * 4.0).astype(float)
    bounce = rng.beta(2.0, 5.0, size=users)
    cart_adds = rng.poisson(activity * 2.0).astype(float)
    abandoned = rng.poisson(0.1 + 0.3 * activity).astype(float)
    categories = 1.0 + rng.poisson(1.0 + 2.0 * activity).astype(float)
    views_unbought = rng.poisson(0.5 + activity).astype(float)
    minutes = rng.lognormal(1.5, 0.7, size=users)
    discount = rng.beta(1.0, 3.0, size=users)
    noise = rng.standard_normal((users, 3))

    score = (
        2.5 * np.exp(-recency / 10.0)  # recent users buy, decaying
        + 0.8 * np.log1p(orders)
        + 1.2 * ((abandoned > 0) & (views_unbought >= 2))  # an open cart and a product viewed
        - 6.0 * (bounce - 0.25) ** 2
        + 0.6 * np.sin(minutes)
        + 0.3 * np.minimum(cart_adds, 5.0) * (discount > 0.4)
        + rng.normal(0.0, 0.7, size=users)
    )
    low, high = -30.0, 30.0  # the shift that gives POSITIVE_SHARE expected positives
    for _ in range(60):
        mid = (low + high) / 2.0
        if _sigmoid(score + mid).mean() < POSITIVE_SHARE:
            low = mid
        else:
            high = mid
    label = (rng.random(users) < _sigmoid(score + (low + high) / 2.0)).astype(np.int8)
    values = [
        recency,
        tenure,
        orders,
        revenue,
        sessions,
        bounce,
        cart_adds,
        abandoned,
        categories,
        views_unbought,
        minutes,
        discount,
        noise[:, 0],
        noise[:, 1],
        noise[:, 2],
    ]
    columns = dict(zip(PROPENSITY_COLUMNS, values, strict=True))
    columns["label"] = label
    columns["is_test"] = rng.random(users) < TEST_SHARE
    return columns


def write_parts(columns: dict[str, np.ndarray], folder: Path, files: int) -> None:
    """The table as `files` Parquet files of consecutive rows (microseg's tables come from
    Spark writes with spark.shuffle_partitions = 8 files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    folder.mkdir(parents=True)
    bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
    for i in range(files):
        part = table.slice(bounds[i], bounds[i + 1] - bounds[i])
        pq.write_table(part, folder / f"part-{i:05d}.parquet", compression="snappy")


def read_parts(folder: Path, columns: list[str]) -> dict[str, np.ndarray]:
    """The columns of every part file, in file order, as numpy arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = sorted(folder.glob("part-*.parquet"))
    table = pa.concat_tables(pq.read_table(p, columns=columns) for p in parts)
    return {name: table.column(name).to_numpy() for name in columns}


def prepare(args, users: int) -> Dataset:
    """The two tables for `users`, generated unless a matching manifest.json is there."""
    folder = Path(args.work) / f"ml-{users}"
    wanted = {
        "generator_version": GENERATOR_VERSION,
        "users": users,
        "seed": args.seed,
        "files": args.files,
    }
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if all(manifest.get(k) == v for k, v in wanted.items()):
            log.info("reusing %s", folder)
            return Dataset(users, folder, manifest, False, None)
        log.info("%s was generated with other settings; generating it again", folder)
    shutil.rmtree(folder, ignore_errors=True)
    log.info("generating %s users into %s", f"{users:,}", folder)
    t0 = time.perf_counter()
    clustering = make_clustering(users, args.seed)
    write_parts(clustering, folder / "clustering", args.files)
    propensity = make_propensity(users, args.seed)
    write_parts(propensity, folder / "propensity", args.files)
    seconds = round(time.perf_counter() - t0, 1)
    test = int(propensity["is_test"].sum())
    manifest = {
        **wanted,
        "clustering": {
            "rows": users,
            "features": CLUSTER_COLUMNS,
            "blob_sizes": np.bincount(clustering["blob"], minlength=BLOBS).tolist(),
        },
        "propensity": {
            "rows": users,
            "features": PROPENSITY_COLUMNS,
            "positives": int(propensity["label"].sum()),
            "train_rows": users - test,
            "test_rows": test,
        },
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return Dataset(users, folder, manifest, True, seconds)


# --------------------------------------------------------------------------------------
# timing helpers


def _sig(value: float | None, digits: int = 6) -> float | None:
    """`value` rounded to `digits` significant digits (None and non-finite stay as they are)."""
    if value is None or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def best_of(repeat: int, run) -> tuple[float, list[float], Any]:
    """Calls run() `repeat` times; run returns (seconds, details). Keeps the fastest run's
    details."""
    times, best = [], None
    for _ in range(repeat):
        seconds, details = run()
        times.append(round(seconds, 3))
        if best is None or seconds < best[0]:
            best = (seconds, details)
    return round(best[0], 3), times, best[1]


# --------------------------------------------------------------------------------------
# scikit-learn: the yardstick


def sklearn_kmeans(data: Dataset, args) -> dict:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    columns = read_parts(data.clustering, CLUSTER_COLUMNS)
    x = np.ascontiguousarray(np.column_stack([columns[c] for c in CLUSTER_COLUMNS]))

    def estimator():
        return KMeans(n_clusters=K, n_init=1, max_iter=KMEANS_MAX_ITER, random_state=args.seed)

    estimator().fit(x[:2000])  # warm-up: imports and thread pools, untimed

    def run():
        model = estimator()
        with threadpool_limits(limits=args.sklearn_threads):
            t0 = time.perf_counter()
            model.fit(x)
            return time.perf_counter() - t0, model

    seconds, times, model = best_of(args.repeat, run)
    return {
        "seconds": seconds,
        "all_seconds": times,
        "quality": _sig(float(model.inertia_)),
        "quality_name": "inertia",
        "threads": args.sklearn_threads,
        "iterations": int(model.n_iter_),
        "params": {k: str(v) for k, v in model.get_params().items()},
    }


def sklearn_gbt(data: Dataset, args) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    columns = read_parts(data.propensity, [*PROPENSITY_COLUMNS, "label", "is_test"])
    x = np.ascontiguousarray(np.column_stack([columns[c] for c in PROPENSITY_COLUMNS]))
    y = columns["label"].astype(np.int64)
    test = columns["is_test"].astype(bool)
    x_train, y_train, x_test, y_test = x[~test], y[~test], x[test], y[test]

    def estimator():
        return HistGradientBoostingClassifier(
            max_iter=GBT_TREES,
            max_depth=GBT_DEPTH,
            learning_rate=GBT_STEP,
            early_stopping=False,
            random_state=args.seed,
        )

    estimator().fit(x_train[:2000], y_train[:2000])  # warm-up, untimed

    def run():
        model = estimator()
        with threadpool_limits(limits=args.sklearn_threads):
            t0 = time.perf_counter()
            model.fit(x_train, y_train)
            return time.perf_counter() - t0, model

    seconds, times, model = best_of(args.repeat, run)
    auc = roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])
    return {
        "seconds": seconds,
        "all_seconds": times,
        "quality": round(float(auc), 4),
        "quality_name": "test ROC AUC",
        "threads": args.sklearn_threads,
        "iterations": int(model.n_iter_),
        "train_rows": int(len(y_train)),
        "test_rows": int(len(y_test)),
        "params": {k: str(v) for k, v in model.get_params().items()},
    }


# --------------------------------------------------------------------------------------
# Spark ML


def spark_session(args):
    """A plain local session (no Delta): local[2], no UI, 8 GB driver heap by default."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName("bench-ml")
        .master(args.master)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", args.driver_memory)
        .config("spark.sql.session.timeZone", "UTC")
    )
    if LOG4J.is_file():
        builder = builder.config(
            "spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={LOG4J}"
        )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def warm_up(spark, data: Dataset, args) -> None:
    """One small fit of each model, untimed, so the first timed variant does not pay for
    loading the classes of the Parquet reader, the assembler and the estimators."""
    t0 = time.perf_counter()
    small = Variant("warm-up", "kmeans", "warm-up", cached=False, partitions=None)
    spark_kmeans(spark, data, small, args, limit=5000)
    spark_gbt(spark, data, replace(small, model="gbt"), args, limit=5000)
    log.info("Spark started and warmed up in %.1f s", time.perf_counter() - t0)


def _to_partitions(df, wanted: int | None):
    if wanted is None:
        return df
    have = df.rdd.getNumPartitions()
    if have > wanted:
        return df.coalesce(wanted)  # no shuffle
    if have < wanted:
        return df.repartition(wanted)
    return df


def _prepared(df, variant: Variant):
    """The vectors as the variant wants them: as read, or coalesced, cached and counted."""
    df = _to_partitions(df, variant.partitions)
    if variant.cached:
        df = df.cache()  # MEMORY_AND_DISK_DESER, columnar in memory
        df.count()
    elif variant.checkpointed:
        df = df.localCheckpoint(eager=True)
    return df


def spark_kmeans(spark, data: Dataset, variant: Variant, args, limit: int | None = None) -> dict:
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.feature import VectorAssembler

    assembler = VectorAssembler(inputCols=CLUSTER_COLUMNS, outputCol="features")
    settings = {
        "k": K,
        "maxIter": KMEANS_MAX_ITER,
        "tol": KMEANS_TOL,
        "seed": args.seed,
        "initMode": "k-means||",  # as microseg builds it
        "initSteps": 2,  # microseg's cluster.init_steps default
        **variant.params,
    }
    facts: dict = {}

    def run():
        spark.catalog.clearCache()
        raw = spark.read.parquet(str(data.clustering))
        if limit:
            raw = raw.limit(limit)
        facts["partitions_read"] = raw.rdd.getNumPartitions()
        vectors = _prepared(assembler.transform(raw).select("features"), variant)
        facts["partitions"] = vectors.rdd.getNumPartitions()
        estimator = KMeans(featuresCol="features", **settings)
        t0 = time.perf_counter()
        model = estimator.fit(vectors)
        seconds = time.perf_counter() - t0
        summary = model.summary
        details = {
            "quality": _sig(float(summary.trainingCost)),
            "iterations": int(summary.numIter),
        }
        if variant.cached:
            vectors.unpersist()
        return seconds, details

    seconds, times, details = best_of(1 if limit else args.repeat, run)
    return {
        "seconds": seconds,
        "all_seconds": times,
        **details,
        "quality_name": "WSSSE (summary.trainingCost)",
        **facts,
        "params": settings,
    }


def spark_gbt(spark, data: Dataset, variant: Variant, args, limit: int | None = None) -> dict:
    from pyspark.ml.classification import GBTClassifier
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.feature import VectorAssembler
    from pyspark.sql import functions as F

    assembler = VectorAssembler(inputCols=PROPENSITY_COLUMNS, outputCol="features")
    settings = {
        "maxIter": GBT_TREES,
        "maxDepth": GBT_DEPTH,
        "stepSize": GBT_STEP,
        "maxBins": GBT_BINS,
        "seed": args.seed,
        "cacheNodeIds": False,  # as microseg builds it
        **variant.params,
    }
    facts: dict = {}
    label = F.col("label").cast("double").alias("label")

    def run():
        spark.catalog.clearCache()
        raw = spark.read.parquet(str(data.propensity))
        if limit:
            raw = raw.limit(limit)
        facts["partitions_read"] = raw.rdd.getNumPartitions()
        train = assembler.transform(raw.filter(~F.col("is_test"))).select("features", label)
        train = _prepared(train, variant)
        facts["partitions"] = train.rdd.getNumPartitions()
        estimator = GBTClassifier(featuresCol="features", labelCol="label", **settings)
        t0 = time.perf_counter()
        model = estimator.fit(train)
        seconds = time.perf_counter() - t0
        if variant.cached:
            train.unpersist()
        return seconds, model

    seconds, times, model = best_of(1 if limit else args.repeat, run)
    raw = spark.read.parquet(str(data.propensity))
    if limit:
        raw = raw.limit(limit)
    test = assembler.transform(raw.filter(F.col("is_test"))).select("features", label)
    evaluator = BinaryClassificationEvaluator(
        labelCol="label", rawPredictionCol="rawPrediction", metricName="areaUnderROC"
    )
    auc = evaluator.evaluate(model.transform(test))
    return {
        "seconds": seconds,
        "all_seconds": times,
        "quality": round(float(auc), 4),
        "quality_name": "test ROC AUC (BinaryClassificationEvaluator)",
        "trees": int(model.getNumTrees),
        "nodes": int(model.totalNumNodes),
        **facts,
        "params": settings,
    }


# --------------------------------------------------------------------------------------
# one size


SKLEARN = {"kmeans": sklearn_kmeans, "gbt": sklearn_gbt}
SPARK = {"kmeans": spark_kmeans, "gbt": spark_gbt}
QUALITY = {"kmeans": ("WSSSE", "inertia"), "gbt": ("AUC", "sk AUC")}


def run_size(args, data: Dataset, spark, variants: list[Variant]) -> tuple[dict, bool]:
    ok = True
    result: dict = {
        "users": data.users,
        "data": {
            "folder": str(data.folder),
            "generated_now": data.generated_now,
            "generate_seconds": data.generate_seconds,
            "manifest": data.manifest,
        },
        "load_average": {},
        "models": {},
    }
    for model in MODELS:
        chosen = [v for v in variants if v.model == model]
        if not chosen:
            continue
        result["load_average"][f"before_{model}"] = load_average()
        log.info("%s, %s users: scikit-learn", model, f"{data.users:,}")
        try:
            yardstick = SKLEARN[model](data, args)
        except Exception:  # noqa: BLE001 - record it and carry on with Spark
            ok = False
            yardstick = {"seconds": None, "quality": None, "error": traceback.format_exc()}
            log.error("scikit-learn %s failed:\n%s", model, yardstick["error"])
        runs = {}
        for variant in chosen:
            log.info("%s, %s users: Spark %s", model, f"{data.users:,}", variant.label)
            try:
                run = SPARK[model](spark, data, variant, args)
            except Exception:  # noqa: BLE001 - one failed variant does not stop the others
                ok = False
                run = {"seconds": None, "quality": None, "error": traceback.format_exc()}
                log.error("Spark %s failed:\n%s", variant.name, run["error"])
            spark.catalog.clearCache()
            run["label"] = variant.label
            run["note"] = variant.note
            run["ratio_to_sklearn"] = _ratio(run["seconds"], yardstick["seconds"])
            if model == "kmeans":
                run["quality_over_sklearn"] = _ratio(run["quality"], yardstick["quality"], 4)
            else:
                run["quality_minus_sklearn"] = _diff(run["quality"], yardstick["quality"])
            runs[variant.name] = run
        result["models"][model] = {"sklearn": yardstick, "spark": runs}
    result["load_average"]["end"] = load_average()
    return result, ok


def _ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, digits)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


# --------------------------------------------------------------------------------------
# reporting


def machine_facts(args, spark) -> dict:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        with open("/proc/meminfo") as fh:
            mem_kb = int(next(line for line in fh if line.startswith("MemTotal")).split()[1])
        memory_gb = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        memory_gb = None
    facts: dict = {
        "cpus": os.cpu_count(),
        "memory_gb": memory_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyspark": version("pyspark"),
        "scikit-learn": version("scikit-learn"),
        "numpy": version("numpy"),
        "pyarrow": version("pyarrow"),
        "niceness": os.nice(0),
        "sklearn_threads": args.sklearn_threads,
    }
    try:
        from threadpoolctl import threadpool_info

        facts["sklearn_thread_pools"] = sorted(
            {f"{p['internal_api']}:{p['num_threads']}" for p in threadpool_info()}
        )
    except ImportError:
        pass
    if spark is not None:
        conf = spark.sparkContext.getConf()
        facts["spark_master"] = conf.get("spark.master", None)
        facts["spark_driver_memory"] = conf.get("spark.driver.memory", None)
        facts["spark_default_parallelism"] = spark.sparkContext.defaultParallelism
        facts["spark_shuffle_partitions"] = spark.conf.get("spark.sql.shuffle.partitions")
        facts["java"] = spark.sparkContext._jvm.System.getProperty("java.version")
    return facts


def _cell(value, fmt: str = "{:,.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _quality_fmt(model: str) -> str:
    return "{:,.6g}" if model == "kmeans" else "{:.4f}"


def table_rows(result: dict, model: str) -> list[list[str]]:
    """users, variant, partitions, seconds, sklearn seconds, ratio, quality, sklearn quality,
    iterations or trees."""
    entry = result["models"].get(model)
    if entry is None:
        return []
    sk = entry["sklearn"]
    qf = _quality_fmt(model)
    rows = []
    for run in entry["spark"].values():
        spark_extra = run.get("iterations") if model == "kmeans" else run.get("trees")
        rows.append(
            [
                f"{result['users']:,}",
                run["label"] + (" (FAILED)" if run.get("error") else ""),
                _cell(run.get("partitions"), "{}"),
                _cell(run["seconds"], "{:,.2f}"),
                _cell(sk["seconds"]),
                _cell(run["ratio_to_sklearn"], "{:.2f}x"),
                _cell(run["quality"], qf),
                _cell(sk["quality"], qf),
                f"{_cell(spark_extra, '{}')} / {_cell(sk.get('iterations'), '{}')}",
            ]
        )
    return rows


HEADERS = {
    "kmeans": [
        "users",
        "variant",
        "partitions",
        "Spark s",
        "sklearn s",
        "ratio",
        "WSSSE",
        "sklearn inertia",
        "iterations Spark / sklearn",
    ],
    "gbt": [
        "users",
        "variant",
        "partitions",
        "Spark s",
        "sklearn s",
        "ratio",
        "test AUC",
        "sklearn test AUC",
        "trees Spark / sklearn",
    ],
}
TITLES = {
    "kmeans": f"KMeans, k={K}, maxIter={KMEANS_MAX_ITER}, 10 features "
    "(sklearn: KMeans n_init=1, k-means++, lloyd)",
    "gbt": f"GBTClassifier, {GBT_TREES} trees, depth {GBT_DEPTH}, step {GBT_STEP}, "
    f"maxBins {GBT_BINS}, 15 features (sklearn: HistGradientBoostingClassifier, "
    "255 bins, no early stopping)",
}


def print_result(result: dict) -> None:
    print()
    print(f"== {result['users']:,} users; load average (1, 5, 15 min) ==")
    for when, value in result["load_average"].items():
        print(f"   {when:14s} {value}")
    for model in MODELS:
        rows = table_rows(result, model)
        if not rows:
            continue
        print()
        print(f"-- {TITLES[model]}")
        headers = HEADERS[model][1:]
        body = [row[1:] for row in rows]
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
        print(
            "  ".join(
                h.ljust(w) if i == 0 else h.rjust(w)
                for i, (h, w) in enumerate(zip(headers, widths, strict=True))
            )
        )
        for row in body:
            print(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
        for run in result["models"][model]["spark"].values():
            if run.get("error"):
                print(f"   {run['label']}: {run['error'].strip().splitlines()[-1]}")


def write_markdown(path: Path, results: list[dict], machine: dict, started: str, args) -> None:
    command = f"bench/ml_bench.py --users {' '.join(str(r['users']) for r in results)}"
    command += f" --repeat {args.repeat} --sklearn-threads {args.sklearn_threads}"
    lines = [
        "# Spark ML against scikit-learn",
        "",
        f"Run of {started} by `{command}` (see bench/README.md). Seconds are wall-clock "
        f"fit() only, the best of {args.repeat}; ratio = Spark s / sklearn s. sklearn fits "
        f"numpy arrays already in memory with {args.sklearn_threads} threads; Spark's plain "
        "variants read the Parquet files inside fit(). partitions: of the vectors Spark "
        "fits. Quality: KMeans WSSSE (summary.trainingCost) against sklearn's inertia, both "
        "the sum of squared distances to the nearest centre; GBT ROC AUC on the same 20 % "
        "test rows.",
    ]
    for model in MODELS:
        rows = [row for result in results for row in table_rows(result, model)]
        if not rows:
            continue
        lines += [
            "",
            f"## {TITLES[model]}",
            "",
            "| " + " | ".join(HEADERS[model]) + " |",
            "|---:|:---|" + "---:|" * (len(HEADERS[model]) - 2),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        "## Run",
        "",
        "Load average (1, 5, 15 min): "
        + "; ".join(
            f"{r['users']:,} users {when} {value}"
            for r in results
            for when, value in r["load_average"].items()
        ),
        "",
        "Machine:",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--users", type=int, nargs="+", default=[100_000, 1_000_000], help="sizes (rows)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["all"],
        choices=["all", *MODELS, *BY_NAME],
        metavar="NAME",
        help="Spark variants to run: all (the default), kmeans or gbt (all of that model's), "
        "or names: " + ", ".join(BY_NAME),
    )
    parser.add_argument("--repeat", type=int, default=1, help="fits per system; best is kept")
    parser.add_argument("--seed", type=int, default=42, help="data and model seed")
    parser.add_argument("--files", type=int, default=8, help="Parquet files per table")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument(
        "--sklearn-threads",
        type=int,
        default=2,
        help="OpenMP/BLAS threads for scikit-learn's fits (default 2, as Spark's local[2]); "
        "on a busy machine 2 threads can be several times slower than 1",
    )
    parser.add_argument("--driver-memory", default="8g")
    parser.add_argument("--work", default=str(BENCH / "work"), help="where the data goes")
    parser.add_argument("--results", default=str(BENCH / "results"), help="JSON and markdown")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if min(args.users) < 5000:
        parser.error("--users must be at least 5000 (the warm-up fits 5000 rows)")
    names = set()
    for choice in args.variants:
        if choice == "all":
            names.update(BY_NAME)
        elif choice in MODELS:
            names.update(v.name for v in VARIANTS if v.model == choice)
        else:
            names.add(choice)
    args.variant_list = [v for v in VARIANTS if v.name in names]
    args.users = sorted(set(args.users))
    args.work = str(Path(args.work).resolve())
    args.results = str(Path(args.results).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    spark = None
    results, ok = [], True
    machine: dict = {}
    for users in args.users:
        data = prepare(args, users)
        if spark is None:
            spark = spark_session(args)
            warm_up(spark, data, args)
        result, size_ok = run_size(args, data, spark, args.variant_list)
        ok &= size_ok
        machine = machine_facts(args, spark)
        result["run_started"] = started
        result["repeat"] = args.repeat
        result["machine"] = machine
        results.append(result)
        print_result(result)
        out = results_dir / f"ml-{users}.json"
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {out}")
    summary = results_dir / "ml.md"
    write_markdown(summary, results, machine, started, args)
    print(f"wrote {summary}")
    if spark is not None:
        spark.stop()
    print("DONE" if ok else "SOME FITS FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
