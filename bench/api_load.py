"""Load test of `microseg serve` on loopback: a fixed number of requests at a fixed rate.

    .venv/bin/python bench/api_load.py --users 100000 --rate 500 --seconds 30

1. A lake under bench/work/api-load/: an online store (SQLite by default; `--set
   serving.store=redis ...` for Redis) holding `--users` users in 1-4 segments each, written
   through the store's own batch API; and gold/segment_membership with `--history-rows`
   intervals of the same users (written with the `deltalake` package), for as-of queries.
2. `microseg serve` in a process of its own (uvicorn, one worker), as a user would run it.
3. Current segments: an open-loop client (asyncio + httpx in this process) sends
   `rate x seconds` GET /users/{id}/segments for random users (10 % unknown ids), one every
   1/rate seconds on a fixed schedule; a request's latency runs from its scheduled time, so
   a server that falls behind is charged for the wait (no coordinated omission).
4. As-of: `--as-of-requests` GET /users/{id}/segments?as_of=... one after another.

Writes bench/results/api-load.json and prints a summary. The client shares the 2 cores with
the server: the latencies include that contention.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pyarrow as pa
from deltalake import write_deltalake

from microseg.core import lake
from microseg.core.config import load_config
from microseg.core.online_store import Member, open_store

ROOT = Path(__file__).resolve().parents[1]
SEGMENTS = ["cart_abandoners_24h", "recent_buyers", "high_intent", "lapsed", "vip"]
T0 = datetime(2026, 9, 1, tzinfo=timezone.utc)
US = timedelta(microseconds=1)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {
        "n": len(ordered),
        "p50_ms": pick(0.50),
        "p95_ms": pick(0.95),
        "p99_ms": pick(0.99),
        "max_ms": round(ordered[-1], 2),
        "mean_ms": round(statistics.fmean(ordered), 2),
    }


def fill(cfg, users: int, history_rows: int, seed: int) -> None:
    rng = random.Random(seed)
    store = open_store(cfg)
    members = []
    for i in range(users):
        for segment in rng.sample(SEGMENTS, rng.randint(1, 4)):
            entered = T0 + timedelta(minutes=rng.randint(0, 60 * 24 * 60))
            members.append(
                Member(f"u{i}", segment, "rule", "segments", "v1", None, (entered - EPOCH) // US)
            )
    for batch, start in enumerate(range(0, len(members), 50_000)):
        store.apply_batch(
            "bench:fill",
            batch,
            members[start : start + 50_000],
            [],
            source="rule",
            scope="segments",
        )
    store.close()
    n = history_rows
    valid_from = [T0 + timedelta(minutes=rng.randint(0, 60 * 24 * 60)) for _ in range(n)]
    closed = [rng.random() < 0.6 for _ in range(n)]
    table = pa.table(
        {
            "user_key": pa.array([f"u{rng.randrange(users)}" for _ in range(n)]),
            "segment_id": pa.array([rng.choice(SEGMENTS) for _ in range(n)]),
            "source": pa.array(["rule"] * n),
            "scope": pa.array(["segments"] * n),
            "definition_version": pa.array(["v1"] * n),
            "score": pa.nulls(n, pa.float64()),
            "valid_from": pa.array(valid_from, pa.timestamp("us", tz="UTC")),
            "valid_to": pa.array(
                [
                    f + timedelta(days=rng.randint(1, 30)) if c else None
                    for f, c in zip(valid_from, closed, strict=True)
                ],
                pa.timestamp("us", tz="UTC"),
            ),
            "is_current": pa.array([not c for c in closed]),
            "run_id": pa.array(["bench"] * n),
            "closed_by_run_id": pa.array([("bench" if c else None) for c in closed], pa.string()),
        }
    )
    path = lake.table_path(cfg.lake.root, lake.SEGMENT_MEMBERSHIP)
    for start in range(0, n, 250_000):  # a table of several files, as a lake has
        write_deltalake(path, table.slice(start, 250_000), mode="append")


async def open_loop(base: str, rate: float, seconds: float, users: int, seed: int) -> dict:
    rng = random.Random(seed + 1)
    total = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        await client.get("/health")
        start = time.perf_counter() + 0.5

        async def one(i: int) -> None:
            nonlocal errors
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            user = f"u{rng.randrange(users)}" if rng.random() < 0.9 else f"nobody{i}"
            response = await client.get(f"/users/{user}/segments")
            latencies.append((time.perf_counter() - scheduled) * 1000)
            if response.status_code != 200:
                errors += 1

        await asyncio.gather(*(one(i) for i in range(total)))
        elapsed = time.perf_counter() - start
    return {
        "requests": total,
        "errors": errors,
        "achieved_rate_per_s": round(total / elapsed, 1),
        "latency": percentiles(latencies),
    }


def as_of_queries(base: str, n: int, users: int, seed: int) -> dict:
    rng = random.Random(seed + 2)
    latencies = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for _ in range(n):
            at = (T0 + timedelta(days=rng.randint(0, 60))).isoformat()
            began = time.perf_counter()
            response = client.get(f"/users/u{rng.randrange(users)}/segments", params={"as_of": at})
            latencies.append((time.perf_counter() - began) * 1000)
            response.raise_for_status()
    return {"requests": n, "latency": percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--history-rows", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--as-of-requests", type=int, default=200)
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "api-load"))
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "api-load.json"))
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    overrides = [f"lake.root={Path(args.work) / 'lake'}", *args.set]
    cfg = load_config(ROOT / "conf" / "local.yaml", overrides)
    began = time.monotonic()
    fill(cfg, args.users, args.history_rows, args.seed)
    print(f"filled the store and the history in {time.monotonic() - began:.1f} s", flush=True)
    command = [sys.executable, "-m", "microseg", "serve", "--port", str(args.port)]
    for override in overrides:
        command += ["--set", override]
    server = subprocess.Popen(command, cwd=ROOT)
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        load_before = [round(x, 2) for x in os.getloadavg()]
        current = asyncio.run(open_loop(base, args.rate, args.seconds, args.users, args.seed))
        as_of = as_of_queries(base, args.as_of_requests, args.users, args.seed)
        load_after = [round(x, 2) for x in os.getloadavg()]
    finally:
        server.terminate()
        server.wait(timeout=30)
    results = {
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {
            "users": args.users,
            "history_rows": args.history_rows,
            "rate_per_s": args.rate,
            "seconds": args.seconds,
            "store": cfg.serving.store,
        },
        "current": current,
        "as_of": as_of,
        "load_before": load_before,
        "load_after": load_after,
    }
    print(json.dumps(results, indent=2))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
