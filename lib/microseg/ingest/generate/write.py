"""`generate(settings)`: simulate, inject faults, write the day files, users.csv and the
manifest."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from microseg.core.config import GenerateConfig
from microseg.ingest.generate.faults import check_shares, plan_faults
from microseg.ingest.generate.render import (
    PARQUET_SCHEMA,
    Tables,
    join_strings,
    prepared,
    render_json,
    render_parquet,
    string_array,
    string_bytes,
    ts_strings,
)
from microseg.ingest.generate.simulate import simulate_all
from microseg.ingest.generate.world import (
    CATEGORIES,
    DAY_MS,
    EVENT_TYPES,
    N_PRODUCTS,
    PERSONA_NAMES,
    PERSONAS,
    SALE_DISCOUNT,
    build_world,
)

GENERATOR_VERSION = 1
JSON_RENDER_ROWS = 200_000  # lines rendered at once (bounds the memory of a day)
PARQUET_ROW_GROUP = 500_000  # rows rendered at once, one row group each
WRITER_THREADS = 2


def _write_users_csv(path: Path, users: dict, tables: Tables) -> None:
    n = len(users["persona"])
    slot = users["slot_anon"]
    has_second = slot[:, 1] >= 0
    anon_list = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(1 + has_second)]).astype(np.int32)),
        tables.anon_id.take(pa.array(slot[slot >= 0].reshape(-1))),
    )
    # slot[slot >= 0] keeps row order: first, (second) per user
    shared = users["shared_anon"]
    shared_ids = pc.if_else(
        pa.array(shared >= 0),
        tables.anon_id.take(pa.array(np.maximum(shared, 0))),
        pa.scalar(""),
    )
    lines = join_strings(
        tables.user_id.slice(0, n),
        ",",
        string_array(PERSONA_NAMES).take(pa.array(users["persona"].astype(np.int64))),
        ",",
        ts_strings(users["first_seen"]),
        ",",
        ts_strings(users["last_seen"]),
        ",",
        pc.binary_join(anon_list, ";"),
        ",",
        shared_ids,
        "\n",
    )
    with open(path, "wb") as fh:
        fh.write(b"user_id,persona,first_seen,last_seen,anonymous_ids,shared_anonymous_id\n")
        fh.write(string_bytes(lines))


def generate(
    settings: GenerateConfig,
    output: str | Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Simulate the users and write events, ground truth and manifest; return the manifest.

    Files under `output` (default `settings.output`):

    * `events/events-YYYY-MM-DD.jsonl` (or `.parquet`): one file per UTC day of event time,
      rows sorted by ts. Earlier `events-*.jsonl|parquet` files there are removed first.
    * `users.csv`: user_id, persona, first_seen, last_seen, anonymous_ids (';'-joined),
      shared_anonymous_id (empty unless the user shares a cookie with another user).
    * `manifest.json`: the settings, counts and the exact number of injected faults.

    Faults (shares of the clean event count, rounded down, each on distinct records):
    `malformed` lines are cut in the middle (JSON only), `duplicate` records are exact copies
    in the same or the next day's file, `late` records sit in a file 1-3 days after their
    event day (valid data; only records at least two days before the end can be late), and
    `invalid` records replace clean ones with one of INVALID_KINDS.
    """
    check_shares(settings)
    out = Path(output if output is not None else settings.output)
    events_dir = out / "events"
    events_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*events_dir.glob("events-*.jsonl"), *events_dir.glob("events-*.parquet")]:
        stale.unlink()

    world = build_world(settings)
    events, users, anons = simulate_all(settings, world, progress)

    order = np.argsort(events["ts"], kind="stable")
    for key in list(events):
        events[key] = events[key][order]
    del order
    n_clean = len(events["ts"])
    # files are per UTC calendar day (the range need not start at midnight)
    first_day = world.start_ms // DAY_MS
    n_days = (world.start_ms + settings.days * DAY_MS - 1) // DAY_MS - first_day + 1
    day = (events["ts"] // DAY_MS - first_day).astype(np.int32)
    plan = plan_faults(settings, events, day, n_days)
    del day

    src = np.concatenate([np.arange(n_clean, dtype=np.int64), plan["duplicate"]])
    file_day = np.concatenate([plan["file_day"], plan["dup_day"]]).astype(np.int64)
    row_order = np.argsort(file_day * (n_clean + 1) + src, kind="stable")
    src = src[row_order]
    file_day = file_day[row_order]
    del row_order
    bounds = np.searchsorted(file_day, np.arange(n_days + 1))

    n_anon = len(anons["device"])
    tables = Tables(world, settings.seed, settings.users, n_anon, users, anons)
    ext = "jsonl" if settings.format == "json" else "parquet"
    start_date = datetime.fromtimestamp(first_day * DAY_MS / 1000, tz=timezone.utc).date()

    def write_day(d: int) -> dict | None:
        rows_all = src[bounds[d] : bounds[d + 1]]
        if len(rows_all) == 0:
            return None
        name = f"events-{start_date + timedelta(days=d)}.{ext}"
        path = events_dir / name
        if settings.format == "json":
            with open(path, "wb") as fh:
                for lo in range(0, len(rows_all), JSON_RENDER_ROWS):
                    rows = rows_all[lo : lo + JSON_RENDER_ROWS]
                    g = prepared(rows, events, plan["inv"], world)
                    fh.write(string_bytes(render_json(rows, g, tables, plan["malformed"])))
        else:
            with pq.ParquetWriter(path, PARQUET_SCHEMA, compression="zstd") as writer:
                for lo in range(0, len(rows_all), PARQUET_ROW_GROUP):
                    rows = rows_all[lo : lo + PARQUET_ROW_GROUP]
                    g = prepared(rows, events, plan["inv"], world)
                    writer.write_table(render_parquet(rows, g, tables), len(rows))
        return {"path": f"events/{name}", "records": int(len(rows_all))}

    # days are independent: render and write two at a time (numpy and pyarrow release the GIL)
    files = []
    with ThreadPoolExecutor(max_workers=WRITER_THREADS) as pool:
        for entry in pool.map(write_day, range(n_days)):
            if entry is None:
                continue
            files.append(entry)
            if progress:
                progress(f"wrote {entry['path']} ({entry['records']} records)")

    _write_users_csv(out / "users.csv", users, tables)

    start_utc = settings.start.astimezone(timezone.utc)
    type_counts = np.bincount(events["type"].astype(np.int64), minlength=len(EVENT_TYPES))
    persona_counts = np.bincount(users["persona"].astype(np.int64), minlength=len(PERSONAS))
    counts = plan["counts"]
    total_records = int(len(src))
    manifest = {
        "generator": {"name": "microseg.ingest.generate", "version": GENERATOR_VERSION},
        "settings": {**settings.model_dump(mode="json"), "output": str(out)},
        "format": settings.format,
        "users": settings.users,
        "anonymous_ids": n_anon,
        "shared_anonymous_ids": int((users["shared_anon"] >= 0).sum() // 2),
        "personas": {name: int(c) for name, c in zip(PERSONA_NAMES, persona_counts, strict=True)},
        "clean_events": n_clean,
        "events_per_type": {name: int(c) for name, c in zip(EVENT_TYPES, type_counts, strict=True)},
        "faults": counts,
        "faults_requested": plan["requested"],
        "valid_unique_events": n_clean - counts["malformed"] - counts["invalid_total"],
        "total_records": total_records,
        "files": files,
        "sale_windows": [
            {
                "campaign": name,
                "first_day": (start_utc + timedelta(days=first)).date().isoformat(),
                "last_day": (start_utc + timedelta(days=last)).date().isoformat(),
                "discount": round(1 - SALE_DISCOUNT, 2),
            }
            for name, first, last in world.sale_windows
        ],
        "products": N_PRODUCTS,
        "categories": [c[0] for c in CATEGORIES],
        "notes": [
            "clean_events counts simulated events; malformed and invalid records replace "
            "clean ones, duplicates add exact copies, late records are clean but sit in a "
            "later day's file.",
            "events_per_type counts the clean events (before any fault was injected).",
            "total_records = clean_events + faults.duplicate.",
            "faults_requested = floor(share * clean_events); faults may be fewer when records "
            "do not qualify (late records need an event day at least two days before the last "
            "file day).",
        ]
        + (
            ["malformed records are not applicable to parquet output: 0 were injected."]
            if settings.format == "parquet"
            else []
        ),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if progress:
        progress(f"done: {total_records} records in {len(files)} files under {out}")
    return manifest
