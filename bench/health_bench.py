"""Segment size anomaly detection (`microseg health`) on generated size histories with
injected drops and spikes: recall and false alerts per 100 segment-runs, beside a naive
yardstick (mean +- 3 standard deviations of the same window).

    .venv/bin/python bench/health_bench.py                      # 300 segments x 40 runs
    .venv/bin/python bench/health_bench.py --segments 1000 --seed 7

Each segment's true size follows its own level (log-normal around 400 users), trend (-1% to
+2% a run) and weekly cycle (0-10%); the observed size is Poisson around it times 1 + 3%
Gaussian noise. From run 4 on, each run is replaced with probability --rate by an injected
anomaly: a drop to 20-60% (or, in the "small" bucket, 60-75%) of the true size, or a spike to
1.6-3x. Anomalies last one run, and later baselines see them. The detector is the one the job
runs (microseg.segments.health.anomaly, with the default health.* settings and the 10-user
minimum change for sizes). Writes bench/results/health-anomalies.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

from microseg.core.config import HealthConfig
from microseg.segments.health import anomaly

RESULTS = Path(__file__).resolve().parent / "results"


def generate(rng: random.Random, runs: int, rate: float):
    """(observed sizes, {run: (kind, bucket)} of the injected anomalies) of one segment."""
    level = math.exp(rng.gauss(math.log(400), 1.0))
    trend = rng.uniform(-0.01, 0.02)
    cycle = rng.uniform(0.0, 0.10)
    phase = rng.uniform(0, 2 * math.pi)
    sizes, injected = [], {}
    for r in range(runs):
        true = level * (1 + trend) ** r * (1 + cycle * math.sin(2 * math.pi * r / 7 + phase))
        observed = _poisson(rng, true) * (1 + rng.gauss(0, 0.03))
        if r >= 4 and rng.random() < rate:
            kind = rng.choice(("drop", "drop", "spike", "small_drop"))
            if kind == "drop":
                observed = true * rng.uniform(0.2, 0.6)
            elif kind == "small_drop":
                observed = true * rng.uniform(0.6, 0.75)
            else:
                observed = true * rng.uniform(1.6, 3.0)
            injected[r] = kind
        sizes.append(max(0.0, round(observed)))
    return sizes, injected


def _poisson(rng: random.Random, mean: float) -> float:
    if mean > 50:
        return max(0.0, rng.gauss(mean, math.sqrt(mean)))
    threshold, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= threshold:
            return float(k)
        k += 1


def naive(history: list[float], value: float, window: int, min_history: int) -> bool:
    recent = history[-window:]
    if len(recent) < min_history:
        return False
    mean, std = statistics.fmean(recent), statistics.pstdev(recent)
    return abs(value - mean) > 3 * std if std > 0 else value != mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=300)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--rate", type=float, default=0.03, help="anomaly rate per run")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    settings = HealthConfig()
    rng = random.Random(args.seed)
    started = time.monotonic()
    counts = {
        name: {"found": {}, "injected": {}, "false": 0, "evaluated": 0}
        for name in ("microseg", "naive_3sd")
    }
    for _ in range(args.segments):
        sizes, injected = generate(rng, args.runs, args.rate)
        for r in range(1, args.runs):
            history = [(float(t), sizes[t]) for t in range(r)]
            flags = {
                "microseg": anomaly(
                    history, float(r), sizes[r], settings, min_change=settings.min_size_change
                )
                is not None,
                "naive_3sd": naive(sizes[:r], sizes[r], settings.window, settings.min_history),
            }
            for name, flagged in flags.items():
                c = counts[name]
                if r >= settings.min_history:
                    c["evaluated"] += 1
                kind = injected.get(r)
                if kind is not None:
                    c["injected"][kind] = c["injected"].get(kind, 0) + 1
                    c["found"][kind] = c["found"].get(kind, 0) + int(flagged)
                elif flagged:
                    c["false"] += 1
    seconds = time.monotonic() - started
    results = {}
    print(
        f"{args.segments} segments x {args.runs} runs, anomaly rate {args.rate}, seed "
        f"{args.seed} ({seconds:.1f} s)"
    )
    print(f"{'detector':<10} {'kind':<11} {'injected':>8} {'found':>6} {'recall':>7}")
    for name, c in counts.items():
        main_kinds = ("drop", "spike")
        injected = sum(c["injected"].get(k, 0) for k in main_kinds)
        found = sum(c["found"].get(k, 0) for k in main_kinds)
        per_kind = {
            k: {
                "injected": c["injected"].get(k, 0),
                "found": c["found"].get(k, 0),
                "recall": c["found"].get(k, 0) / max(1, c["injected"].get(k, 0)),
            }
            for k in ("drop", "spike", "small_drop")
        }
        for k, v in per_kind.items():
            print(f"{name:<10} {k:<11} {v['injected']:>8} {v['found']:>6} {v['recall']:>7.3f}")
        false_per_100 = 100 * c["false"] / max(1, c["evaluated"])
        print(
            f"{name:<10} recall (drops 40-80%, spikes 1.6-3x) {found / max(1, injected):.3f}; "
            f"false alerts {c['false']} in {c['evaluated']} segment-runs = "
            f"{false_per_100:.2f} per 100"
        )
        results[name] = {
            "recall": found / max(1, injected),
            "per_kind": per_kind,
            "false_alerts": c["false"],
            "segment_runs": c["evaluated"],
            "false_alerts_per_100_segment_runs": false_per_100,
        }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "health-anomalies.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "settings": settings.model_dump(),
                "results": results,
                "seconds": seconds,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average": os.getloadavg(),
                },
            },
            indent=2,
        )
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
