"""Ingest throughput: generate N synthetic events (Parquet or JSON lines), ingest them into a
fresh lake with the local config, then ingest them again with --reprocess (all present).

    python bench/ingest_throughput.py --events 5000000 --format parquet

Prints seconds and events/s per phase and writes bench/results/ingest-<format>-<N>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

from microseg.core.config import GenerateConfig, load_config
from microseg.core.spark import build_spark
from microseg.ingest.files import run_ingest
from microseg.ingest.generate import estimate_users_for_events, generate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--format", choices=("parquet", "json"), default="parquet")
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"))
    parser.add_argument("--driver-memory", default="8g")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("MICROSEG_PSEUDONYMIZATION_KEY", "bench-only-key")

    work = Path(args.work)
    data = work / f"data-{args.format}-{args.events}"
    lake_root = work / f"lake-{args.format}-{args.events}"
    settings = GenerateConfig(
        users=estimate_users_for_events(args.events), format=args.format, output=str(data)
    )
    started = time.monotonic()
    if not (data / "manifest.json").is_file():
        generate(settings, data)
    generate_s = time.monotonic() - started
    manifest = json.loads((data / "manifest.json").read_text())
    records = (
        manifest["counts"]["total_records"] if "counts" in manifest else manifest["total_records"]
    )

    shutil.rmtree(lake_root, ignore_errors=True)
    cfg = load_config(
        ROOT / "conf" / "local.yaml",
        [f"lake.root={lake_root}", f"spark.conf.spark.driver.memory={args.driver_memory}"],
    )
    spark = build_spark(cfg.spark, app_name="bench-ingest")
    results = {"events_generated": records, "format": args.format}
    for phase, reprocess in (("first ingest", False), ("re-ingest (all present)", True)):
        t0 = time.monotonic()
        report = run_ingest(
            spark,
            cfg,
            source="synthetic",
            path=str(data / "events"),
            fmt=args.format,
            reprocess=reprocess,
        )
        seconds = time.monotonic() - t0
        results[phase] = {
            "seconds": round(seconds, 1),
            "records": report.records,
            "events_added": report.events_added,
            "already_present": report.already_present,
            "quarantined": report.quarantined,
            "records_per_second": round(report.records / seconds),
        }
        print(
            f"{phase}: {report.records:,} records in {seconds:.1f} s = "
            f"{report.records / seconds:,.0f} records/s"
        )
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "generate_seconds_if_generated_now": round(generate_s, 1),
    }
    out = ROOT / "bench" / "results" / f"ingest-{args.format}-{args.events}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
