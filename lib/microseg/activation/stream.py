"""`microseg activate --stream`: triggers decided and destinations served as events arrive.

A Structured Streaming query reads bronze/events as a Delta stream (from its first version,
`skipChangeCommits` on) only to move a clock: after each micro-batch the clock is the latest
event time read minus stream.watermark_delay (it never goes back). When the clock moves, the
micro-batch

1. decides the triggers as of the clock (activation.fire.run_triggers, source `stream`: the
   same function as `microseg triggers run`, so a batch run at the same as-of decides the same
   rows; each candidate is decided once, by whichever comes first), then
2. runs the destinations (activation.deliver.run_activate) when gold/segment_changes or
   gold/trigger_firings has a new version since it last did, or a delivery failed: new
   segment changes (of the batch job and of `microseg stream`) and new firings go out
   through the delivery ledger, exactly once per destination and change.

Checkpoint: `<stream.checkpoint>_activation`. The clock starts from the latest `decided_at` of
the stream's own rows in gold/trigger_firings, so a restart does not move it back. A replayed
micro-batch decides nothing new (the firings are insert-once and the ledger knows what it
sent).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.activation.deliver import ActivateReport, run_activate
from microseg.activation.fire import TriggerReport, run_triggers
from microseg.core import lake, progress
from microseg.core.clock import naive_utc
from microseg.core.config import Config
from microseg.streaming.checkpoint import checkpoint_path
from microseg.streaming.kafka import with_trigger
from microseg.streaming.lifecycle import BatchGate, stop_between_batches
from microseg.streaming.query import await_any, await_query, delta_events

QUERY_NAME = "microseg-activation"


def activation_checkpoint_path(cfg: Config) -> str:
    return checkpoint_path(cfg).rstrip("/") + "_activation"


@dataclass
class ActivationStreamReport:
    batches: int = 0
    clock: datetime | None = None
    fired: int = 0
    delivered: int = 0
    no_consent: int = 0
    failed: int = 0
    triggers: list[TriggerReport] = field(default_factory=list)


def _start_clock(spark: SparkSession, root: str) -> datetime | None:
    if not lake.table_exists(spark, root, lake.TRIGGER_FIRINGS):
        return None
    row = (
        lake.read_table(spark, root, lake.TRIGGER_FIRINGS)
        .filter(F.col("source") == "stream")
        .agg(F.max("decided_at").alias("clock"))
        .first()
    )
    return row.clock if row else None


def run_activation_stream(
    spark: SparkSession,
    cfg: Config,
    *,
    run_id: str,
    available_now: bool = False,
    timeout: float | None = None,
    triggers_path: str | None = None,
    destinations_path: str | None = None,
) -> ActivationStreamReport:
    """Run the activation query until the source is drained (available_now), the timeout
    passes, or a stop is requested; then stop it between micro-batches."""
    root = cfg.lake.root
    report = ActivationStreamReport(clock=_start_clock(spark, root))
    has_triggers = Path(triggers_path or cfg.triggers.file).is_file()
    has_destinations = Path(destinations_path or cfg.destinations.file).is_file()
    sent_versions: list[tuple | None] = [None]  # of the change tables at the last delivery

    def write(batch_df: DataFrame, batch_id: int) -> None:
        latest = batch_df.agg(F.max("event_time").alias("t")).first().t
        if latest is None:
            return
        clock = naive_utc(latest) - cfg.stream.watermark_delay
        if report.clock is not None and clock <= report.clock:
            return
        report.batches += 1
        if has_triggers:
            decided = run_triggers(
                spark, cfg, as_of=clock, run_id=run_id, source="stream", path=triggers_path
            )
            report.triggers.append(decided)
            report.fired += decided.fired
        # the destinations only when there can be something new to send
        versions = tuple(
            lake.table_version(spark, root, t) for t in (lake.SEGMENT_CHANGES, lake.TRIGGER_FIRINGS)
        )
        if has_destinations and versions != sent_versions[0]:
            sent_versions[0] = versions
            sent: ActivateReport = run_activate(
                spark, cfg, run_id=f"{run_id}-{batch_id}", path=destinations_path
            )
            report.delivered += sum(d.delivered for d in sent.destinations)
            report.no_consent += sum(d.no_consent for d in sent.destinations)
            failed = sum(d.failed for d in sent.destinations)
            report.failed += failed
            if failed:  # sent again at the next micro-batch
                sent_versions[0] = None
        report.clock = clock

    gate = BatchGate()
    query = None
    try:
        events = delta_events(spark, cfg).select("event_time")
        writer = (
            events.writeStream.queryName(QUERY_NAME)
            .option("checkpointLocation", activation_checkpoint_path(cfg))
            .foreachBatch(gate.wrap(write))
        )
        progress.step("starting the activation query")
        query = with_trigger(writer, cfg, available_now).start()
        deadline = None if timeout is None else time.monotonic() + timeout
        if available_now:
            progress.step("processing what bronze/events holds")
            await_query(query, deadline)
        else:
            with contextlib.suppress(KeyboardInterrupt):
                await_any(spark, [query], deadline, status_of=query)
    finally:
        if query is not None:
            stop_between_batches([query], gate)
    return report
