"""The stream's per-user state step under Spark's three Python state APIs, side by side:
applyInPandasWithState (microseg's default), transformWithStateInPandas and transformWithState
(state API v2; RocksDB state store with changelog checkpointing for all three).

    .venv/bin/python bench/state_api_bench.py --users-per-batch 1000 5000 --batches 6

For each batch size: bronze/events with `batches` commits of that many events, each of a
user seen before (half of them) or new, written once with `deltalake`; then, per API, the
stream's own facts query (microseg.streaming.state.live_facts, the default segment catalog's
fact plan) reads it with one commit per micro-batch (maxFilesPerTrigger 1, availableNow) into
a sink that runs the whole plan and writes nothing (noop). Reported per API: the median of
Spark's addBatch time over the micro-batches after the first (the first pays the cold
start), and that per event.

Writes bench/results/state-api.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable as RsDeltaTable
from deltalake import write_deltalake

from microseg.core import lake
from microseg.core.config import load_config
from microseg.core.spark import build_spark
from microseg.segments.parse import load_segments
from microseg.streaming import state as stream_state
from microseg.streaming.query import STATE_STORES

ROOT = Path(__file__).resolve().parents[1]
TYPES = ["page_view", "product_view", "add_to_cart", "purchase"]


def write_events(spark, cfg, per_batch: int, batches: int) -> str:
    lake.ensure_table(spark, cfg.lake.root, lake.EVENTS)
    path = lake.table_path(cfg.lake.root, lake.EVENTS)
    schema = pa.schema(RsDeltaTable(path).schema().to_arrow())
    start = datetime(2026, 10, 1, tzinfo=timezone.utc)
    for b in range(batches):
        n = per_batch
        # half the users are new in this batch, half were seen in the one before
        users = [f"u{b}-{i}" if i % 2 or b == 0 else f"u{b - 1}-{i + 1}" for i in range(n)]
        times = [start + timedelta(minutes=b, milliseconds=i) for i in range(n)]
        columns = {f.name: pa.nulls(n, f.type) for f in schema}
        columns.update(
            event_id=pa.array([f"e{b}-{i}" for i in range(n)]),
            event_time=pa.array(times, schema.field("event_time").type),
            event_type=pa.array([TYPES[i % len(TYPES)] for i in range(n)]),
            user_id=pa.array(users),
            event_date=pa.array([t.date() for t in times], pa.date32()),
            source=pa.array(["bench"] * n),
            source_file=pa.array([f"bench-{b}"] * n),
            source_line=pa.array(range(n), pa.int64()),
            ingested_at=pa.array(times, schema.field("ingested_at").type),
            ingest_run_id=pa.array(["bench"] * n),
        )
        write_deltalake(path, pa.table(columns, schema=schema), mode="append")
    return path


def run_api(spark, cfg, path: str, api: str, work: Path) -> dict:
    catalog = load_segments(cfg)
    plan = stream_state.fact_plan(catalog, stream_state.streamed_segments(catalog, None))
    events_df = spark.readStream.format("delta").option("maxFilesPerTrigger", 1).load(path)
    facts_df = stream_state.live_facts(
        stream_state.keyed_events(events_df, None),
        plan,
        watermark_delay_ms=600_000,
        state_api=api,
    )
    spark.conf.set("spark.sql.shuffle.partitions", "2")
    spark.conf.set("spark.sql.streaming.stateStore.providerClass", STATE_STORES["rocksdb"])
    spark.conf.set("spark.sql.streaming.stateStore.rocksdb.changelogCheckpointing.enabled", "true")
    rows = []

    def sink(batch_df, batch_id):
        began = time.perf_counter()
        rows.append(batch_df.count())
        sink.seconds.append(time.perf_counter() - began)

    sink.seconds = []
    began = time.perf_counter()
    query = (
        facts_df.writeStream.option("checkpointLocation", str(work / f"checkpoint-{api}"))
        .foreachBatch(sink)
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination()
    wall = time.perf_counter() - began
    progress = [json.loads(p.json) if not isinstance(p, dict) else p for p in query.recentProgress]
    data = [p for p in progress if p.get("numInputRows")]
    warm = data[1:] or data
    add_batch = [p["durationMs"]["addBatch"] / 1000 for p in warm]
    events = statistics.median(p["numInputRows"] for p in warm)
    return {
        "api": api,
        "micro_batches": len(data),
        "events_per_batch": events,
        "facts_rows": sum(rows),
        "add_batch_median_s": round(statistics.median(add_batch), 3),
        "per_event_ms": round(statistics.median(add_batch) / events * 1000, 4),
        "first_batch_s": round(data[0]["durationMs"]["addBatch"] / 1000, 3) if data else None,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users-per-batch", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--apis", nargs="+", default=list(stream_state.STATE_APIS))
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "state-api"))
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "state-api.json"))
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.chdir(ROOT)
    results = {
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "runs": [],
    }
    spark = None
    for per_batch in args.users_per_batch:
        work = Path(args.work) / f"n{per_batch}"
        shutil.rmtree(work, ignore_errors=True)
        cfg = load_config(ROOT / "conf" / "local.yaml", [f"lake.root={work / 'lake'}"])
        spark = spark or build_spark(cfg.spark, app_name="bench-state-api")
        path = write_events(spark, cfg, per_batch, args.batches)
        for api in args.apis:
            result = run_api(spark, cfg, path, api, work)
            result["users_per_batch"] = per_batch
            print(json.dumps(result), flush=True)
            results["runs"].append(result)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
