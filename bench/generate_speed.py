"""Throughput of the synthetic event generator (no Spark).

    python bench/generate_speed.py                         # 1M and 5M events, json and parquet
    python bench/generate_speed.py --events 20000000 --formats parquet
    python bench/generate_speed.py --faults                 # with 1 % of every fault kind

Each (format, size) runs in its own subprocess so its peak memory is measured alone; the
output goes to a temporary folder that is removed afterwards (or --output DIR, kept).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_one(events: int, fmt: str, output: Path, faults: bool, seed: int) -> dict:
    from microseg.core.config import GenerateConfig
    from microseg.ingest.generate import estimate_users_for_events, generate

    share = 0.01 if faults else 0.0
    settings = GenerateConfig(
        seed=seed,
        users=estimate_users_for_events(events),
        format=fmt,
        output=str(output),
        malformed_share=share,
        duplicate_share=share,
        late_share=share,
        invalid_share=share,
    )
    started = time.perf_counter()
    manifest = generate(settings)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "format": fmt,
        "requested_events": events,
        "users": settings.users,
        "clean_events": manifest["clean_events"],
        "total_records": manifest["total_records"],
        "files": len(manifest["files"]),
        "seconds": round(seconds, 2),
        "events_per_second": round(manifest["total_records"] / seconds),
        "peak_rss_mb": round(peak_kib / 1024),
        "output_mb": round(_dir_size(output) / 2**20),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument(
        "--formats", nargs="+", default=["json", "parquet"], choices=["json", "parquet"]
    )
    parser.add_argument("--faults", action="store_true", help="inject 1 %% of every fault kind")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", help="keep the output in this folder (one subfolder a run)")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.single:  # child process: one format, one size, print one JSON line
        result = run_one(args.events[0], args.formats[0], Path(args.output), args.faults, args.seed)
        print(json.dumps(result))
        return 0

    base = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="microseg-bench-"))
    try:
        for events in args.events:
            for fmt in args.formats:
                out = base / f"{fmt}-{events}"
                cmd = [
                    sys.executable,
                    __file__,
                    "--single",
                    "--events",
                    str(events),
                    "--formats",
                    fmt,
                    "--output",
                    str(out),
                    "--seed",
                    str(args.seed),
                ]
                if args.faults:
                    cmd.append("--faults")
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"{r['format']:8s} {r['total_records']:>11,d} records  "
                    f"{r['seconds']:8.1f} s  {r['events_per_second']:>10,d} events/s  "
                    f"peak {r['peak_rss_mb']:,d} MB  output {r['output_mb']:,d} MB  "
                    f"({r['users']:,d} users, {r['files']} files)",
                    flush=True,
                )
                if not args.output:
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.output:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
