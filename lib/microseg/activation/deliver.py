"""`microseg activate`: segment changes (gold/segment_changes) to destinations, through the
delivery ledger gold/deliveries.

Exactly-once, in three steps per destination:

1. **Plan**: every change of the destination's segments that the ledger does not hold yet gets
   a ledger row, one Delta commit: its idempotency key (a hash of destination and change, the
   same on every run), the batch it goes in, its payload, and status `pending` (or
   `no_consent` where the destination is marketing-gated and the user's marketing consent
   does not hold at the change's time: it is never sent).
2. **Send** each batch of `pending` and `failed` rows, in order: a webhook gets one POST per
   batch (header `Idempotency-Key`: the batch id; each change carries its own key), retried
   with doubling backoff on a connection error, a timeout, 408, 429 or 5xx, up to
   `max_attempts` (a 4xx other than those is not retried); a Kafka topic gets one message per
   change (key: its idempotency key); a file destination gets one file per batch.
3. **Record** each batch's outcome in the ledger (`delivered`, or `failed` with the error and
   attempt count) right after it, one commit per batch.

A process killed between 2 and 3 leaves the batch `pending` in the ledger; the next run sends
it again with the same keys, so a receiver that keeps the keys it has seen (as a webhook
receiver must) applies every change once, and the ledger and the receiver agree. A `failed`
batch is visible in the ledger and is sent again by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from microseg.activation.fire import FIRED, hash_key
from microseg.activation.model import (
    CHANGE_FIELDS,
    Destination,
    FileExport,
    KafkaTopic,
    Webhook,
    load_destinations,
)
from microseg.core import lake, progress
from microseg.core.config import Config
from microseg.core.failpoints import durable
from microseg.silver.consent import consent_at_points, read_history

PENDING, DELIVERED, FAILED, NO_CONSENT = "pending", "delivered", "failed", "no_consent"
TRIGGER = "trigger"  # the change of a trigger firing
_RETRY_STATUS = {408, 425, 429}


def plan_rows(
    changes: DataFrame,
    consent_history: DataFrame | None,
    destination: Destination,
    *,
    marketing_default: bool,
    known_keys: DataFrame | None,
    run_id: str,
    now: datetime,
) -> DataFrame:
    """Ledger rows (gold/deliveries) for the destination's changes not in `known_keys`."""
    wanted = (F.col("change") != TRIGGER) & F.col("segment_id").isin(list(destination.segments))
    wanted = wanted | (F.col("change") == TRIGGER) & F.col("segment_id").isin(
        list(destination.triggers)
    )
    rows = changes.filter(wanted).withColumn(
        "idempotency_key",
        hash_key(
            F.lit(destination.id),
            "user_key",
            "segment_id",
            "source",
            "scope",
            "change",
            F.date_format("changed_at", "yyyy-MM-dd'T'HH:mm:ss.SSSSSS"),
        ),
    )
    if known_keys is not None:
        rows = rows.join(known_keys, "idempotency_key", "left_anti")
    if destination.consent == "marketing":
        points = rows.select("idempotency_key", "user_key", F.col("changed_at").alias("as_of"))
        gate = consent_at_points(points, consent_history, "marketing", marketing_default)
        rows = rows.join(gate.select("idempotency_key", "consent_ok"), "idempotency_key")
    else:
        rows = rows.withColumn("consent_ok", F.lit(True))
    order = Window.partitionBy("consent_ok").orderBy("changed_at", "idempotency_key")
    batch = getattr(destination, "batch_size", 1 << 30)  # a file destination: one per run
    number = F.floor((F.row_number().over(order) - 1) / batch)
    payload = F.to_json(
        F.struct(
            F.col("idempotency_key"),
            *[
                F.date_format(f, "yyyy-MM-dd'T'HH:mm:ss.SSSSSS'Z'").alias(f)
                if f == "changed_at"
                else F.col(f)
                for f in destination.fields
            ],
        )
    )
    return rows.select(
        F.lit(destination.id).alias("destination_id"),
        "idempotency_key",
        "user_key",
        "segment_id",
        "change",
        "changed_at",
        F.when(F.col("consent_ok"), hash_key(F.lit(destination.id), F.lit(run_id), number))
        .otherwise(F.lit(None))
        .alias("batch_id"),
        F.when(F.col("consent_ok"), payload).alias("payload"),
        F.when(F.col("consent_ok"), F.lit(PENDING)).otherwise(F.lit(NO_CONSENT)).alias("status"),
        F.lit(0).alias("attempts"),
        F.lit(None).cast("timestamp").alias("first_attempt_at"),
        F.lit(None).cast("timestamp").alias("delivered_at"),
        F.lit(None).cast("string").alias("last_error"),
        F.lit(run_id).alias("run_id"),
        F.lit(now).cast("timestamp").alias("updated_at"),
    )


@dataclass
class Outcome:
    ok: bool
    attempts: int
    first_attempt_at: datetime
    error: str | None = None


def _headers(destination: Webhook, batch_id: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Idempotency-Key": batch_id}
    for name, value in destination.headers.items():
        if value.startswith("env:"):
            value = os.environ.get(value[4:], "")
        headers[name] = value
    return headers


def post_with_retries(destination: Webhook, batch_id: str, body: bytes) -> Outcome:
    """POST one batch; retry a connection error, a timeout, 408/425/429 and 5xx with doubling
    backoff up to max_attempts; another status is final."""
    first = datetime.now(timezone.utc)
    wait = destination.backoff.total_seconds()
    error = None
    for attempt in range(1, destination.max_attempts + 1):
        request = urllib.request.Request(
            destination.url, data=body, headers=_headers(destination, batch_id), method="POST"
        )
        try:
            with urllib.request.urlopen(
                request, timeout=destination.timeout.total_seconds()
            ) as response:
                response.read()
            return Outcome(True, attempt, first)
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code} {exc.reason}"
            if exc.code < 500 and exc.code not in _RETRY_STATUS:
                return Outcome(False, attempt, first, error)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            error = f"{type(exc).__name__}: {reason}"
        if attempt < destination.max_attempts:
            time.sleep(wait)
            wait = min(wait * 2, destination.max_backoff.total_seconds())
    return Outcome(False, destination.max_attempts, first, error)


def _record(spark: SparkSession, root: str, updates: list[dict]) -> None:
    """Set the outcome of a batch's rows (one commit)."""
    schema = (
        "destination_id string, idempotency_key string, status string, attempts int, "
        "first_attempt_at timestamp, delivered_at timestamp, last_error string, "
        "updated_at timestamp"
    )
    frame = spark.createDataFrame(updates, schema)
    target = lake.ensure_table(spark, root, lake.DELIVERIES)
    (
        target.alias("t")
        .merge(
            frame.alias("s"),
            "t.destination_id = s.destination_id AND t.idempotency_key = s.idempotency_key",
        )
        .whenMatchedUpdate(
            set={
                "status": "s.status",
                "attempts": "t.attempts + s.attempts",
                "first_attempt_at": "coalesce(t.first_attempt_at, s.first_attempt_at)",
                "delivered_at": "s.delivered_at",
                "last_error": "s.last_error",
                "updated_at": "s.updated_at",
            }
        )
        .execute()
    )
    durable(lake.DELIVERIES.name)


def _save(frame: DataFrame, destination: FileExport, target: str) -> None:
    """One file of `frame` at `target` in the destination's format (replacing what is there)."""
    writer = frame.coalesce(1).write.mode("overwrite")
    if destination.format == "csv":
        writer.option("header", True).csv(target)
    else:
        writer.parquet(target)


def _write_file(spark: SparkSession, destination: FileExport, batch_id: str, rows) -> None:
    """One export file of a batch: `<path>/<destination>/changes-<batch id>` (a rerun of the
    batch replaces it)."""
    frame = spark.createDataFrame([(r.payload,) for r in rows], "payload string")
    fields = ["idempotency_key", *destination.fields]
    schema = ", ".join(f"{f} {'timestamp' if f == 'changed_at' else 'string'}" for f in fields)
    parsed = frame.select(F.from_json("payload", schema).alias("c")).select("c.*")
    _save(
        parsed, destination, f"{destination.path.rstrip('/')}/{destination.id}/changes-{batch_id}"
    )


def _write_kafka(spark: SparkSession, destination: KafkaTopic, rows) -> None:
    """One message per change: key the idempotency key, value the payload (JSON)."""
    frame = spark.createDataFrame(
        [(r.idempotency_key, r.payload) for r in rows], "key string, value string"
    )
    writer = (
        frame.coalesce(1)
        .write.format("kafka")
        .option("kafka.bootstrap.servers", destination.bootstrap_servers)
        .option("topic", destination.topic)
    )
    for name, value in destination.options.items():
        writer = writer.option(name, value)
    writer.save()


@dataclass
class DestinationReport:
    destination_id: str
    kind: str
    planned: int = 0
    no_consent: int = 0
    batches_sent: int = 0
    delivered: int = 0
    failed: int = 0
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    snapshot_rows: int | None = None  # a file destination with snapshot: true


@dataclass
class ActivateReport:
    run_id: str
    destinations: list[DestinationReport] = field(default_factory=list)


def activation_changes(spark: SparkSession, root: str) -> DataFrame | None:
    """What destinations can get: gold/segment_changes, and the fired rows of
    gold/trigger_firings as changes `trigger` (segment_id: the trigger id; changed_at: the fire
    time); None when neither table exists."""
    parts = []
    if lake.table_exists(spark, root, lake.SEGMENT_CHANGES):
        parts.append(lake.read_table(spark, root, lake.SEGMENT_CHANGES).select(*CHANGE_FIELDS))
    if lake.table_exists(spark, root, lake.TRIGGER_FIRINGS):
        fired = lake.read_table(spark, root, lake.TRIGGER_FIRINGS).filter(F.col("status") == FIRED)
        parts.append(
            fired.select(
                "user_key",
                F.col("trigger_id").alias("segment_id"),
                "source",
                F.lit("triggers").alias("scope"),
                F.lit(TRIGGER).alias("change"),
                F.col("trigger_id").alias("reason"),
                F.col("fire_at").alias("changed_at"),
                "definition_version",
            )
        )
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])


def run_activate(
    spark: SparkSession,
    cfg: Config,
    *,
    run_id: str,
    destination_ids: list[str] | None = None,
    path: str | None = None,
) -> ActivateReport:
    root = cfg.lake.root
    destinations = load_destinations(cfg, path).chosen(destination_ids)
    report = ActivateReport(run_id)
    changes = activation_changes(spark, root)
    if changes is None:
        return report
    history = read_history(spark, root)
    default = cfg.privacy.consent.marketing_unknown == "granted"
    for destination in destinations:
        result = DestinationReport(destination.id, destination.type)
        report.destinations.append(result)
        progress.step(f"planning {destination.id}")
        known = None
        if lake.table_exists(spark, root, lake.DELIVERIES):
            known = (
                lake.read_table(spark, root, lake.DELIVERIES)
                .filter(F.col("destination_id") == destination.id)
                .select("idempotency_key")
            )
        now = datetime.now(timezone.utc)
        planned = plan_rows(
            changes,
            history,
            destination,
            marketing_default=default,
            known_keys=known,
            run_id=run_id,
            now=now,
        )
        planned = lake.conform(planned, lake.DELIVERIES).persist()
        try:
            counts = {r.status: r["count"] for r in planned.groupBy("status").count().collect()}
            if counts:  # one commit of the new rows (each key inserted once)
                lake.insert_new(
                    spark, root, lake.DELIVERIES, planned, ("destination_id", "idempotency_key")
                )
        finally:
            planned.unpersist()
        result.planned = counts.get(PENDING, 0)
        result.no_consent = counts.get(NO_CONSENT, 0)
        _send(spark, root, destination, result)
        if isinstance(destination, FileExport) and destination.snapshot:
            result.snapshot_rows = _write_snapshot(
                spark, root, destination, run_id, history, default, now
            )
    return report


def _write_snapshot(
    spark: SparkSession,
    root: str,
    destination: FileExport,
    run_id: str,
    history: DataFrame | None,
    marketing_default: bool,
    now: datetime,
) -> int:
    """The current members of the destination's segments, one file:
    `<path>/<id>/snapshot-<run_id>/` (user_key, segment_id, entered_at), with the consent gate
    of the changes at `now`. Rows written."""
    if not lake.table_exists(spark, root, lake.SEGMENT_MEMBERSHIP) or not destination.segments:
        return 0
    members = (
        lake.read_table(spark, root, lake.SEGMENT_MEMBERSHIP)
        .filter(F.col("is_current") & F.col("segment_id").isin(list(destination.segments)))
        .select("user_key", "segment_id", F.col("valid_from").alias("entered_at"))
    )
    if destination.consent == "marketing":
        points = members.select(
            "user_key", "segment_id", F.lit(now).cast("timestamp").alias("as_of")
        )
        gate = consent_at_points(points, history, "marketing", marketing_default)
        members = members.join(
            gate.filter("consent_ok").select("user_key", "segment_id"), ["user_key", "segment_id"]
        )
    members = members.orderBy("segment_id", "user_key").persist()
    try:
        rows = members.count()
        _save(
            members,
            destination,
            f"{destination.path.rstrip('/')}/{destination.id}/snapshot-{run_id}",
        )
    finally:
        members.unpersist()
    return rows


def _send(spark: SparkSession, root: str, destination, result: DestinationReport) -> None:
    todo = (
        lake.read_table(spark, root, lake.DELIVERIES)
        .filter((F.col("destination_id") == destination.id) & F.col("status").isin(PENDING, FAILED))
        .select("idempotency_key", "batch_id", "payload", "changed_at")
        .orderBy("changed_at", "idempotency_key")
        .collect()
    )
    grouped: dict[str, list] = {}
    for row in todo:
        grouped.setdefault(row.batch_id, []).append(row)
    # in the order of their changes (a user's enter goes before their exit): batch ids are
    # hashes, so order by each batch's first change
    batches = sorted(grouped.items(), key=lambda kv: (kv[1][0].changed_at, kv[0]))
    for number, (batch_id, rows) in enumerate(batches, 1):
        progress.step(f"{destination.id}: batch {number} of {len(batches)} ({len(rows)} changes)")
        if isinstance(destination, Webhook):
            body = (
                '{"destination":'
                + json.dumps(destination.id)
                + ',"batch_id":'
                + json.dumps(batch_id)
                + ',"changes":['
                + ",".join(r.payload for r in rows)
                + "]}"
            ).encode()
            outcome = post_with_retries(destination, batch_id, body)
        else:
            started = datetime.now(timezone.utc)
            try:
                if isinstance(destination, KafkaTopic):
                    _write_kafka(spark, destination, rows)
                else:
                    _write_file(spark, destination, batch_id, rows)
                outcome = Outcome(True, 1, started)
            except Exception as exc:  # noqa: BLE001 - recorded in the ledger as the failure
                outcome = Outcome(False, 1, started, f"{type(exc).__name__}: {exc}"[:500])
        durable(f"sent {destination.id}")
        now = datetime.now(timezone.utc)
        _record(
            spark,
            root,
            [
                {
                    "destination_id": destination.id,
                    "idempotency_key": r.idempotency_key,
                    "status": DELIVERED if outcome.ok else FAILED,
                    "attempts": outcome.attempts,
                    "first_attempt_at": outcome.first_attempt_at,
                    "delivered_at": now if outcome.ok else None,
                    "last_error": outcome.error,
                    "updated_at": now,
                }
                for r in rows
            ],
        )
        result.batches_sent += 1
        result.attempts += outcome.attempts
        if outcome.ok:
            result.delivered += len(rows)
        else:
            result.failed += len(rows)
            result.errors.append(f"batch {batch_id}: {outcome.error}")


@dataclass(frozen=True)
class _Message:
    idempotency_key: str
    payload: str


def _erase_key(destination_id: str, user_key: str) -> str:
    return hashlib.sha256(f"{destination_id}|erase|{user_key}".encode()).hexdigest()[:32]


def export_folders(cfg: Config) -> list[str]:
    """The folders the file destinations write (`<path>/<id>`), for `forget --verify`."""
    try:
        destinations = load_destinations(cfg).destinations
    except FileNotFoundError:
        return []
    return [f"{d.path.rstrip('/')}/{d.id}" for d in destinations if isinstance(d, FileExport)]


def _erase_from_files(spark: SparkSession, destination: FileExport, user_keys: set[str]) -> int:
    """Rewrite every export file (changes and snapshots) of the destination that holds one of
    the people, without their rows. The people found."""
    base = f"{destination.path.rstrip('/')}/{destination.id}"

    def read(path: str) -> DataFrame:
        reader = spark.read.option("recursiveFileLookup", True)
        if destination.format == "csv":  # every column as the text it was written as
            return reader.option("header", True).csv(path)
        return reader.parquet(path)

    try:
        frame = read(base)
    except AnalysisException:  # nothing exported yet
        return 0
    if "user_key" not in frame.columns:
        return 0
    wanted = F.col("user_key").isin(sorted(user_keys))
    hits = frame.filter(wanted).select(F.input_file_name().alias("file"), "user_key").collect()
    for folder in sorted({h.file.rsplit("/", 1)[0] for h in hits}):
        # materialized apart from its files, which the overwrite deletes
        _save(read(folder).filter(~wanted).localCheckpoint(eager=True), destination, folder)
    return len({h.user_key for h in hits})


def notify_erasure(spark: SparkSession, cfg: Config, user_keys: set[str]) -> dict[str, int]:
    """Before `microseg forget` erases the ledger, every destination that had these people
    hears of it: a webhook that was sent changes of them gets a POST of `removes` (one per
    person; the batch id is a hash of the destination and the people, so a rerun of the
    forget sends the same batch); a Kafka topic gets a message `{"remove": {"user_key"}}` per
    person (key: a hash of destination and person); a file destination's export files that
    hold them are rewritten without them. Raises when a destination cannot be reached, so the
    forget stops before erasing and can be re-run. Destination id -> people removed."""
    root = cfg.lake.root
    if not user_keys:
        return {}
    try:
        destinations = {d.id: d for d in load_destinations(cfg).destinations}
    except FileNotFoundError:
        return {}
    sent = {}
    for destination in destinations.values():  # every export, whatever the ledger says
        if isinstance(destination, FileExport):
            erased = _erase_from_files(spark, destination, user_keys)
            if erased:
                sent[destination.id] = erased
    if not lake.table_exists(spark, root, lake.DELIVERIES):
        return sent
    had = (
        lake.read_table(spark, root, lake.DELIVERIES)
        .filter(F.col("user_key").isin(sorted(user_keys)) & (F.col("status") == DELIVERED))
        .select("destination_id", "user_key")
        .distinct()
        .collect()
    )
    per_destination: dict[str, set[str]] = {}
    for row in had:
        per_destination.setdefault(row.destination_id, set()).add(row.user_key)
    for destination_id, keys in sorted(per_destination.items()):
        destination = destinations.get(destination_id)
        if isinstance(destination, KafkaTopic):
            removes = [
                _Message(_erase_key(destination_id, k), json.dumps({"remove": {"user_key": k}}))
                for k in sorted(keys)
            ]
            _write_kafka(spark, destination, removes)
            sent[destination_id] = len(keys)
        if not isinstance(destination, Webhook):
            continue
        batch_id = hashlib.sha256(
            "|".join([destination_id, "erase", *sorted(keys)]).encode()
        ).hexdigest()[:32]
        body = json.dumps(
            {
                "destination": destination_id,
                "batch_id": batch_id,
                "removes": [{"user_key": k} for k in sorted(keys)],
            }
        ).encode()
        outcome = post_with_retries(destination, batch_id, body)
        if not outcome.ok:
            raise RuntimeError(
                f"could not send the removal to destination {destination_id}: {outcome.error}"
                " (nothing was erased yet; run the forget again)"
            )
        sent[destination_id] = len(keys)
    return sent
