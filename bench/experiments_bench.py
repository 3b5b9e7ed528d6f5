"""Experiments: the Thompson-sampling bandit's regret in simulation, and the speed of variant
assignment in Spark with SQL functions against the same hash as a Python UDF.

    .venv/bin/python bench/experiments_bench.py                    # both
    .venv/bin/python bench/experiments_bench.py --only bandit --runs 200
    .venv/bin/python bench/experiments_bench.py --only assign --users 2000000

Bandit: arms convert at --rates; each round --round-size users are split by the current
weights (microseg.experiments.stats.thompson_weights, floor --floor), their conversions
drawn, the weights updated. Regret: conversions lost against always showing the best arm,
in expectation (users x (best rate - their arm's rate)). Yardsticks in the same run: an even
split (a fixed A/B/n test) and the oracle (regret 0).

Assignment: --users user keys hashed with GrowthBook's v2 hash and bucketed into 2 variants,
once with microseg.experiments.hashing's Column expressions and once with a pandas UDF and a
plain Python UDF computing the same; the three results must agree row for row.

Writes bench/results/experiments.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from microseg.experiments import hashing, stats  # noqa: E402


def bandit(rates, rounds, round_size, floor, runs, draws):
    best = max(rates)
    regrets, even, picked_best, final_weight = [], [], 0, []
    for run in range(runs):
        rng = np.random.default_rng(run)
        exposed, conversions = [0] * len(rates), [0] * len(rates)
        weights = [1 / len(rates)] * len(rates)
        regret = 0.0
        for round_ in range(rounds):
            counts = rng.multinomial(round_size, weights)
            for arm, n in enumerate(counts):
                exposed[arm] += int(n)
                conversions[arm] += int(rng.binomial(n, rates[arm]))
                regret += n * (best - rates[arm])
            weights, _ = stats.thompson_weights(
                exposed, conversions, floor=floor, draws=draws, seed=run * 1000 + round_
            )
        regrets.append(regret)
        even.append(rounds * round_size * (best - sum(rates) / len(rates)))
        picked_best += int(int(np.argmax(weights)) == int(np.argmax(rates)))
        final_weight.append(weights[int(np.argmax(rates))])
    return {
        "rates": rates,
        "rounds": rounds,
        "round_size": round_size,
        "users": rounds * round_size,
        "floor": floor,
        "runs": runs,
        "regret_mean": float(np.mean(regrets)),
        "regret_p90": float(np.percentile(regrets, 90)),
        "even_split_regret": float(np.mean(even)),
        "regret_share_of_even_split": float(np.mean(regrets) / np.mean(even)),
        "best_arm_found_share": picked_best / runs,
        "best_arm_final_weight_mean": float(np.mean(final_weight)),
    }


def assign(users: int):
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers import microseg from here
    os.environ["PYTHONPATH"] = str(ROOT / "lib")
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    ranges = hashing.bucket_ranges(2, 1.0, [0.5, 0.5])
    keys = spark.range(users).select(F.concat(F.lit("u-"), F.col("id").cast("string")).alias("k"))
    keys = keys.repartition(4).cache()
    keys.count()

    def py_variant(k: str) -> int:
        return hashing.choose_variation(hashing.gb_hash("exp", k, 2), ranges)

    @F.pandas_udf("int")
    def pandas_variant(k: pd.Series) -> pd.Series:
        return k.map(py_variant)

    plain_udf = F.udf(py_variant, "int")
    sql = hashing.choose_variation_col(hashing.gb_hash_col("exp", F.col("k"), 2), ranges)
    out = {"users": users}
    frames = {}
    for name, column in (
        ("sql_functions", sql),
        ("pandas_udf", pandas_variant("k")),
        ("python_udf", plain_udf("k")),
    ):
        frame = keys.select("k", column.alias("v"))
        started = time.perf_counter()
        counts = {r.v: r["count"] for r in frame.groupBy("v").count().collect()}
        seconds = time.perf_counter() - started
        out[name] = {
            "seconds": round(seconds, 2),
            "keys_per_s": round(users / seconds),
            "counts": counts,
        }
        frames[name] = frame
    base = frames["sql_functions"]
    out["disagreements_pandas"] = (
        base.join(frames["pandas_udf"], "k").filter(base.v != frames["pandas_udf"].v).count()
    )
    out["disagreements_python"] = (
        base.join(frames["python_udf"], "k").filter(base.v != frames["python_udf"].v).count()
    )
    spark.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", choices=("bandit", "assign"))
    parser.add_argument("--rates", type=float, nargs="+", default=[0.04, 0.05, 0.07])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--round-size", type=int, default=300)
    parser.add_argument("--floor", type=float, default=0.05)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--users", type=int, default=1_000_000)
    args = parser.parse_args()
    result = {"load_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    if args.only in (None, "bandit"):
        result["bandit"] = bandit(
            args.rates, args.rounds, args.round_size, args.floor, args.runs, args.draws
        )
        print(json.dumps(result["bandit"], indent=2))
    if args.only in (None, "assign"):
        result["assign"] = assign(args.users)
        print(json.dumps(result["assign"], indent=2))
    result["load_after"] = os.getloadavg()[0]
    path = ROOT / "bench" / "results" / "experiments.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
