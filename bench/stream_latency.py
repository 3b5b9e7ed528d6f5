"""Streaming latency: from an event's commit into bronze/events to the user's segment being
visible in the online store, in gold/segment_changes and in gold/segment_membership.

    .venv/bin/python bench/stream_latency.py --rates 200 1000 5000 --seconds 60

For each rate: a fresh lake under bench/work/stream-latency/, the stream (segment query and
history query) started on the default segment catalog (conf/segments.yaml), and a producer
thread that appends `rate x append_every` add_to_cart events of new users into bronze/events
every `append_every` seconds with the `deltalake` package (a writer outside Spark, as an
ingest job would be; event_time = wall clock, so the watermark moves). Every such user
enters cart_abandoners_24h: each event is a transition (the worst case for the sink).

* commit -> store: when a poller (every 20 ms) sees the stream's batch marker in the online
  store move to the batch whose change rows carry the user's enter, minus the commit time of
  the bronze append that carried the event (Delta history);
* commit -> changes: recorded_at of the user's change row (the append's start) - commit;
* commit -> history: commit time of the history query's MERGE that opened the user's interval
  in gold/segment_membership (Change Data Feed `_commit_timestamp`) - commit;
* keeping up: p95 commit -> store per fifth of the run (growing = falling behind), and the
  seconds after the producer stops until every user's interval is in the history;
* per micro-batch: Spark's durationMs parts and microseg's own steps (state_s: the stateful
  operator, the rules and the collect; transitions_s; store_s: the store transaction;
  changes_s: the Delta append).

Writes bench/results/stream-latency.json (and prints a summary).
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
from microseg.core.online_store import open_store
from microseg.core.spark import build_spark
from microseg.segments.parse import load_segments
from microseg.streaming import query as streaming
from microseg.streaming import sink as stream_sink
from microseg.streaming import state as stream_state
from microseg.streaming.lifecycle import BatchGate, stop_between_batches

ROOT = Path(__file__).resolve().parents[1]
SEGMENT = "cart_abandoners_24h"  # every generated user enters it with their one add_to_cart


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


class StorePoller(threading.Thread):
    """Polls the online store's batch marker of the stream every `every` seconds; when it
    moves, the users whose enter rides in the marker's payload became visible now."""

    def __init__(self, cfg, writer: str, segment: str, every: float = 0.02):
        super().__init__(daemon=True)
        self.store = open_store(cfg)
        self.writer, self.segment, self.every = writer, segment, every
        self.visible_ms: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        last = None
        while not self.stop.is_set():
            marker = self.store.marker(self.writer)
            if marker is not None and marker.batch != last:
                now_ms = time.time() * 1000
                last = marker.batch
                for user, segment, change, *_ in json.loads(marker.payload or "[]"):
                    if segment == self.segment and change == "enter":
                        self.visible_ms.setdefault(user, now_ms)
            time.sleep(self.every)
        self.store.close()


def run_one(spark, args, rate: float, trigger_s: float) -> dict:
    work = Path(args.work) / f"rate-{rate:g}-trigger-{trigger_s:g}s"
    shutil.rmtree(work, ignore_errors=True)
    cfg = load_config(
        ROOT / "conf" / "local.yaml",
        [
            f"lake.root={work / 'lake'}",
            f"stream.trigger_interval={trigger_s}s",
            f"stream.state_partitions={args.state_partitions}",
            f"stream.history_interval={args.history_interval}s",
            *args.set,
        ],
    )
    events_path = lake.table_path(cfg.lake.root, lake.EVENTS)
    lake.ensure_table(spark, cfg.lake.root, lake.EVENTS)
    catalog = load_segments(cfg)
    sink = stream_sink.stream_sink(
        spark, cfg, catalog, stream_state.streamed_segments(catalog, cfg.stream.segments)
    )
    gate = BatchGate()
    query = streaming.start_stream(spark, cfg, sink=sink, gate=gate)
    history = streaming.start_history(spark, cfg, sink, available_now=False, gate=gate)
    poller = StorePoller(cfg, sink.writer, SEGMENT)
    poller.start()
    producer = Producer(
        events_path,
        per_append=max(1, round(rate * args.append_every)),
        every=args.append_every,
        seconds=args.seconds,
        tag=f"r{rate:g}",
    )
    load_before = [round(x, 2) for x in os.getloadavg()]
    producer.start()
    producer.join()
    if producer.error is not None:
        stop_between_batches([query, history], gate)
        raise producer.error
    users = {u: c["commit_ms"] for c in producer.commits for u in c["users"]}
    membership_path = lake.table_path(cfg.lake.root, lake.SEGMENT_MEMBERSHIP)
    deadline = time.monotonic() + args.drain_seconds
    drained_s = None
    while time.monotonic() < deadline and query.isActive and history.isActive:
        seen = (
            spark.read.format("delta")
            .load(membership_path)
            .filter(f"source = 'stream' AND segment_id = '{SEGMENT}'")
            .count()
        )
        if seen >= len(users):
            drained_s = round(time.monotonic() - (deadline - args.drain_seconds), 1)
            break
        time.sleep(1)
    load_after = [round(x, 2) for x in os.getloadavg()]
    stop_between_batches([query, history], gate)
    poller.stop.set()
    poller.join()
    sink.close()

    history_ms = {
        r.user_key: r.visible_ms
        for r in spark.read.format("delta")
        .option("readChangeFeed", "true")
        .option("startingVersion", 0)
        .load(membership_path)
        .filter(f"_change_type = 'insert' AND source = 'stream' AND segment_id = '{SEGMENT}'")
        .select("user_key", F.unix_millis("_commit_timestamp").alias("visible_ms"))
        .collect()
    }
    changes_ms = {
        r.user_key: r.recorded_ms
        for r in lake.read_table(spark, cfg.lake.root, lake.SEGMENT_CHANGES)
        .filter(f"source = 'stream' AND segment_id = '{SEGMENT}' AND change = 'enter'")
        .select("user_key", F.unix_millis("recorded_at").alias("recorded_ms"))
        .collect()
    }

    def lags(visible: dict[str, float]) -> list[tuple[float, float]]:
        return sorted((users[u], (visible[u] - users[u]) / 1000) for u in users if u in visible)

    store_lags = lags(poller.visible_ms)
    fifths = [
        percentiles(
            [
                lag
                for _, lag in store_lags[i * len(store_lags) // 5 : (i + 1) * len(store_lags) // 5]
            ]
        )["p95"]
        for i in range(5)
    ]
    progress = [p if isinstance(p, dict) else json.loads(p.json) for p in query.recentProgress]
    data_batches = [p for p in progress if p.get("numInputRows")]
    parts = sorted({k for p in data_batches for k in p.get("durationMs", {})})
    spark_parts = {
        k: round(statistics.median(p["durationMs"].get(k, 0) for p in data_batches) / 1000, 3)
        for k in parts
    }
    steps = ("state_s", "transitions_s", "store_s", "changes_s")
    timed = [t for t in sink.stats.timings if t.get("changes")]
    own_steps = {
        k: round(statistics.median(t.get(k, 0.0) for t in timed), 3) if timed else None
        for k in steps
    }
    return {
        "rate_per_s": rate,
        "trigger_s": trigger_s,
        "store": cfg.serving.store,
        "events_appended": len(users),
        "appends": len(producer.commits),
        "in_store": len(poller.visible_ms),
        "in_history": len(history_ms),
        "drained_after_producer_s": drained_s,
        "micro_batches_with_data": len(data_batches),
        "events_per_batch_median": statistics.median(p["numInputRows"] for p in data_batches)
        if data_batches
        else None,
        "commit_to_store_s": percentiles([lag for _, lag in store_lags]),
        "commit_to_store_p95_by_fifth_of_run_s": fifths,
        "commit_to_changes_s": percentiles([lag for _, lag in lags(changes_ms)]),
        "commit_to_history_s": percentiles([lag for _, lag in lags(history_ms)]),
        "batch_spark_duration_median_s": spark_parts,
        "batch_microseg_steps_median_s": own_steps,
        "load_before": load_before,
        "load_after": load_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[200.0, 1000.0, 5000.0], help="events per second"
    )
    parser.add_argument("--append-every", type=float, default=1.0, help="seconds per append")
    parser.add_argument("--seconds", type=float, default=60.0, help="producer run time")
    parser.add_argument("--trigger", type=float, default=0.5, help="trigger interval (s)")
    parser.add_argument("--history-interval", type=float, default=5.0)
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
            "trigger_s": args.trigger,
            "history_interval_s": args.history_interval,
            "append_every_s": args.append_every,
            "seconds": args.seconds,
            "state_partitions": args.state_partitions,
            "overrides": args.set,
        },
        "runs": [],
    }
    for rate in args.rates:
        result = run_one(spark, args, rate, args.trigger)
        results["runs"].append(result)
        print(json.dumps(result, indent=2), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
