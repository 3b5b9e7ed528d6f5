"""What an erasure request costs: `microseg forget` of three people on a lake of N events.

    .venv/bin/python bench/forget_cost.py --events 5000000

Generates N synthetic events (seeded, Parquet, reused under bench/work while the manifest
matches), ingests them into a fresh lake and runs sessionize, features and rule segments as
of the last midnight (timed, but not the subject), then forgets three people as the demo
does (an anonymous id that logged in, a user with a quarantined record where there is one, a
member of a segment: so the online store is touched) with privacy.erasure_retention=0h, and
reads every file of the lake for their ids (`forget --verify`). It prints the seconds of each
part, the rows removed per table and the files rewritten, and writes
bench/results/forget-<N>.json. Run it alone: the load average is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2026, 9, 1, tzinfo=timezone.utc)
DAYS = 60
log = logging.getLogger("bench")


def prepare_data(work: Path, events: int) -> tuple[Path, dict]:
    from microseg.core.config import GenerateConfig
    from microseg.ingest.generate import estimate_users_for_events, generate

    out = work / f"forget-data-{events}"
    users = estimate_users_for_events(events)
    manifest = out / "manifest.json"
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found.get("settings", {}).get("users") == users:
            return out, found
    shutil.rmtree(out, ignore_errors=True)
    settings = GenerateConfig(
        users=users,
        days=DAYS,
        start=START,
        format="parquet",
        output=str(out),
        invalid_share=0.001,
    )
    return out, generate(settings, out)


def timed(label: str, timings: dict, fn, *args, **kwargs):
    t0 = time.monotonic()
    result = fn(*args, **kwargs)
    timings[label] = round(time.monotonic() - t0, 2)
    log.info("%-24s %8.2f s", label, timings[label])
    return result


def three_people(spark, root: str) -> list[str]:
    """An anonymous id stitched to a user, a user with a quarantined record (if any), and a
    current member of a segment: ids as the lake stores them."""
    from pyspark.sql import functions as F

    from microseg.core import lake

    stitched = (
        lake.read_table(spark, root, lake.IDENTITY_MAP)
        .filter(~F.col("is_conflict"))
        .orderBy("anonymous_id")
        .first()
    )
    quarantined = (  # a user id quoted in a quarantined record's raw text
        lake.read_table(spark, root, lake.QUARANTINE)
        .select(F.regexp_extract("raw", r"\b(u[0-9]{7})\b", 1).alias("user_id"))
        .filter(F.col("user_id") != "")
        .orderBy("user_id")
        .first()
    )
    member = (
        lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP)
        .filter("is_current AND user_key NOT LIKE 'anon:%'")
        .filter(F.col("user_key") != stitched.user_key)
        .orderBy("user_key")
        .select("user_key")
        .first()
    )
    people = [stitched.anonymous_id, member.user_key]
    if quarantined is not None:
        people.append(quarantined.user_id)
    return list(dict.fromkeys(people))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"))
    parser.add_argument("--conf", default=str(ROOT / "conf" / "local.yaml"))
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument(
        "--reuse-lake",
        action="store_true",
        help="keep a lake a previous run built and did not get to forget in (no build times)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.chdir(ROOT)
    os.environ.setdefault("MICROSEG_PSEUDONYMIZATION_KEY", "bench-only-key")

    from rich.console import Console
    from rich.table import Table

    from microseg.core import lake
    from microseg.core.config import load_config
    from microseg.core.spark import build_spark
    from microseg.features.job import run_features
    from microseg.ingest.files import run_ingest
    from microseg.ops.forget import record_erasure, run_forget
    from microseg.ops.verify import scan_lake
    from microseg.segments.evaluate import run_segments
    from microseg.silver.sessions import run_sessionize

    work = Path(args.work)
    data, manifest = prepare_data(work, args.events)
    root = work / f"forget-lake-{args.events}"
    reuse = args.reuse_lake and (root / "gold" / "segment_catalog").is_dir()
    if not reuse:
        shutil.rmtree(root, ignore_errors=True)
    cfg = load_config(args.conf, [f"lake.root={root}", "privacy.erasure_retention=0h", *args.sets])
    load_before = os.getloadavg()
    spark = build_spark(cfg.spark, app_name="bench-forget")
    as_of = START.replace(tzinfo=None) + timedelta(days=DAYS)
    building: dict[str, float] = {}
    if not reuse:
        ingest_args = {"source": "synthetic", "path": str(data / "events"), "fmt": "parquet"}
        timed("ingest", building, run_ingest, spark, cfg, **ingest_args)
        timed("sessionize", building, run_sessionize, spark, cfg)
        timed("features", building, run_features, spark, cfg, as_of=as_of, refresh_silver=False)
        timed("segments", building, run_segments, spark, cfg, as_of=as_of)
    events = lake.read_table(spark, str(root), lake.EVENTS).count()
    files_before = sum(1 for p in root.rglob("*") if p.is_file())
    people = three_people(spark, str(root))
    log.info("forgetting %s", people)

    forget: dict[str, float] = {}
    load_at_forget = os.getloadavg()
    report = timed("forget", forget, run_forget, spark, cfg, people, request_id="bench")
    verification = timed("verify", forget, scan_lake, str(root), report.subjects.keys)
    timed("audit row", forget, record_erasure, spark, cfg, report, verification=verification)
    load_after = os.getloadavg()

    console = Console()
    table = Table(title=f"forget 3 people on {events:,} events (seconds)")
    for column in ("step", "seconds"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for name, seconds in {**building, **forget}.items():
        table.add_row(name, f"{seconds:.1f}")
    console.print(table)
    console.print(
        f"rows removed: {sum(report.rows_removed.values()):,} in "
        f"{sum(1 for v in report.rows_removed.values() if v)} tables; store entries "
        f"{report.store_entries_removed}; files vacuumed {report.vacuumed_files}; verify read "
        f"{verification.files:,} files, clean: {verification.clean}"
    )
    out = ROOT / "bench" / "results" / f"forget-{args.events}.json"
    out.write_text(
        json.dumps(
            {
                "command": "bench/forget_cost.py",
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "load_average_before": load_before,
                "load_average_at_forget": load_at_forget,
                "load_average_after": load_after,
                "events": events,
                "users": manifest.get("users"),
                "files_before": files_before,
                "people": len(people),
                "subjects": {
                    "user_ids": len(report.subjects.user_ids),
                    "anonymous_ids": len(report.subjects.anonymous_ids),
                },
                "building_seconds": building,
                "forget_seconds": forget,
                "rows_removed": report.rows_removed,
                "store_entries_removed": report.store_entries_removed,
                "vacuumed_files": report.vacuumed_files,
                "verify": {
                    "files": verification.files,
                    "bytes": verification.bytes,
                    "clean": verification.clean,
                },
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")
    spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
