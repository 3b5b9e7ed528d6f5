"""Streaming latency: from an event's commit into bronze/events to its segment membership
being visible in gold/segment_membership, at given processing-time triggers.

    .venv/bin/python bench/stream_latency.py --rate 20 --seconds 60 --triggers 1 5

For each trigger interval: a fresh lake under bench/work/stream-latency/, the stream started
on the default segment catalog (conf/segments.yaml), and a producer thread that appends
`rate x append_every` add_to_cart events of new users into bronze/events every
`append_every` seconds with the `deltalake` package (a writer outside Spark, as an ingest
job would be; event_time = wall clock, so the watermark moves). Every such user enters
cart_abandoners_24h. Afterwards:

* latency = commit time of the membership MERGE that opened the user's interval (Change Data
  Feed `_commit_timestamp`) - commit time of the bronze append that carried the event (Delta
  history), both in the Delta logs;
* pickup = start of the micro-batch that handled it (query progress `timestamp`) - append
  commit; processing = membership commit - micro-batch start;
* per micro-batch: Spark's durationMs parts and microseg's own steps (state_s: the stateful
  operator and the facts; transitions_s; changes_s: the change rows append; membership_s: the
  intervals MERGE).

Writes bench/results/stream-latency.json (and prints a summary). Needs the `deltalake`
package (dev or bench extra).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable as RsDeltaTable
from deltalake import write_deltalake
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.config import load_config
from microseg.core.spark import build_spark
from microseg.segments.parse import load_segments
from microseg.streaming import query as streaming
from microseg.streaming import sink as stream_sink
from microseg.streaming import state as stream_state

ROOT = Path(__file__).resolve().parents[1]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {
        "n": len(ordered),
        "p50": pick(0.50),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": round(ordered[-1], 3),
    }


class Producer(threading.Thread):
    """Appends add_to_cart events of new users at a steady rate; records each commit."""

    def __init__(self, path: str, *, per_append: int, every: float, seconds: float, tag: str):
        super().__init__(daemon=True)
        self.path, self.per_append, self.every, self.seconds, self.tag = (
            path,
            per_append,
            every,
            seconds,
            tag,
        )
        self.commits: list[dict] = []  # version, commit_ms, users
        self.error: BaseException | None = None

    def batch(self, number: int) -> tuple[pa.Table, list[str]]:
        schema = pa.schema(RsDeltaTable(self.path).schema().to_arrow())
        now = datetime.now(timezone.utc)
        n = self.per_append
        columns = {f.name: pa.nulls(n, f.type) for f in schema}
        users = [f"{self.tag}-{number}-{i}" for i in range(n)]
        columns.update(
            event_id=pa.array([f"e-{u}" for u in users]),
            event_time=pa.array([now] * n, schema.field("event_time").type),
            event_type=pa.array(["add_to_cart"] * n),
            user_id=pa.array(users),
            product_id=pa.array(["p1"] * n),
            event_date=pa.array([now.date()] * n, pa.date32()),
            source=pa.array(["bench"] * n),
            source_file=pa.array(["bench"] * n),
            source_line=pa.array(range(n), pa.int64()),
            ingested_at=pa.array([now] * n, schema.field("ingested_at").type),
            ingest_run_id=pa.array([f"bench-{number}"] * n),
        )
        return pa.table(columns, schema=schema), users

    def run(self) -> None:
        try:
            started = time.monotonic()
            number = 0
            while time.monotonic() - started < self.seconds:
                due = started + number * self.every
                time.sleep(max(0.0, due - time.monotonic()))
                table, users = self.batch(number)
                write_deltalake(self.path, table, mode="append")
                last = RsDeltaTable(self.path).history(1)[0]
                self.commits.append(
                    {"version": last["version"], "commit_ms": last["timestamp"], "users": users}
                )
                number += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc


def run_one(spark, args, trigger_s: float) -> dict:
    work = Path(args.work) / f"trigger-{trigger_s:g}s"
    shutil.rmtree(work, ignore_errors=True)
    cfg = load_config(
        ROOT / "conf" / "local.yaml",
        [
            f"lake.root={work / 'lake'}",
            f"stream.trigger_interval={trigger_s}s",
            f"stream.state_partitions={args.state_partitions}",
            *args.set,
        ],
    )
    events_path = lake.table_path(cfg.lake.root, lake.EVENTS)
    lake.ensure_table(spark, cfg.lake.root, lake.EVENTS)
    catalog = load_segments(cfg)
    sink = stream_sink.stream_sink(
        spark, cfg, catalog, stream_state.streamed_segments(catalog, cfg.stream.segments)
    )
    query = streaming.start_stream(spark, cfg, sink=sink)
    producer = Producer(
        events_path,
        per_append=max(1, round(args.rate * args.append_every)),
        every=args.append_every,
        seconds=args.seconds,
        tag=f"t{trigger_s:g}",
    )
    load_before = [round(x, 2) for x in os.getloadavg()]
    producer.start()
    producer.join()
    if producer.error is not None:
        query.stop()
        raise producer.error
    users = {u: c["commit_ms"] for c in producer.commits for u in c["users"]}
    membership_path = lake.table_path(cfg.lake.root, lake.SEGMENT_MEMBERSHIP)
    deadline = time.monotonic() + args.drain_seconds
    seen = 0
    while time.monotonic() < deadline and query.isActive:
        seen = (
            spark.read.format("delta")
            .load(membership_path)
            .filter("source = 'stream' AND segment_id = 'cart_abandoners_24h'")
            .count()
        )
        if seen >= len(users):
            break
        time.sleep(2)
    idle_deadline = time.monotonic() + 60
    while query.isActive and query.status["isTriggerActive"] and time.monotonic() < idle_deadline:
        time.sleep(0.5)  # stop between micro-batches, not in one
    query.stop()
    load_after = [round(x, 2) for x in os.getloadavg()]

    inserted = (
        spark.read.format("delta")
        .option("readChangeFeed", "true")
        .option("startingVersion", 0)
        .load(membership_path)
        .filter(
            "_change_type = 'insert' AND source = 'stream' AND segment_id = 'cart_abandoners_24h'"
        )
        .select("user_key", "run_id", F.unix_millis("_commit_timestamp").alias("visible_ms"))
        .collect()
    )
    progress = [p if isinstance(p, dict) else json.loads(p.json) for p in query.recentProgress]
    batch_start_ms = {
        p["batchId"]: datetime.fromisoformat(p["timestamp"].replace("Z", "+00:00")).timestamp()
        * 1000
        for p in progress
    }
    latency, pickup, processing = [], [], []
    for row in inserted:
        if row.user_key not in users:
            continue
        committed = users[row.user_key]
        latency.append((row.visible_ms - committed) / 1000)
        batch_id = int(row.run_id.rsplit("-", 1)[1])
        if batch_id in batch_start_ms:
            pickup.append((batch_start_ms[batch_id] - committed) / 1000)
            processing.append((row.visible_ms - batch_start_ms[batch_id]) / 1000)
    data_batches = [p for p in progress if p.get("numInputRows")]
    parts = sorted({k for p in data_batches for k in p.get("durationMs", {})})
    spark_parts = {
        k: round(statistics.median(p["durationMs"].get(k, 0) for p in data_batches) / 1000, 3)
        for k in parts
    }
    steps = ("state_s", "transitions_s", "changes_s", "membership_s")
    timed = [t for t in sink.stats.timings if t.get("changes")]
    own_steps = {
        k: round(statistics.median(t.get(k, 0.0) for t in timed), 3) if timed else None
        for k in steps
    }
    return {
        "trigger_s": trigger_s,
        "events_appended": len(users),
        "members_visible": seen,
        "appends": len(producer.commits),
        "micro_batches_with_data": len(data_batches),
        "events_per_batch_median": statistics.median(p["numInputRows"] for p in data_batches)
        if data_batches
        else None,
        "latency_s": percentiles(latency),
        "pickup_s": percentiles(pickup),
        "processing_s": percentiles(processing),
        "batch_spark_duration_median_s": spark_parts,
        "batch_microseg_steps_median_s": own_steps,
        "load_before": load_before,
        "load_after": load_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--append-every", type=float, default=1.0, help="seconds per append")
    parser.add_argument("--seconds", type=float, default=60.0, help="producer run time")
    parser.add_argument("--triggers", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--state-partitions", type=int, default=8)
    parser.add_argument("--drain-seconds", type=float, default=120.0)
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "stream-latency"))
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "stream-latency.json"))
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.chdir(ROOT)
    cfg = load_config(ROOT / "conf" / "local.yaml", args.set)
    spark = build_spark(cfg.spark, app_name="bench-stream-latency")
    results = {
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "spark_master": spark.sparkContext.master,
        },
        "settings": {
            "rate_per_s": args.rate,
            "append_every_s": args.append_every,
            "seconds": args.seconds,
            "state_partitions": args.state_partitions,
            "overrides": args.set,
        },
        "runs": [],
    }
    for trigger_s in args.triggers:
        result = run_one(spark, args, trigger_s)
        results["runs"].append(result)
        print(json.dumps(result, indent=2), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
