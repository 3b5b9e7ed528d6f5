"""The stream's checkpoint: where it lives, and the segment versions its state was built for."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from pyspark.sql import SparkSession

from microseg.core import lake
from microseg.core.config import Config, ConfigError
from microseg.segments.model import (
    SegmentCatalog,
)


def checkpoint_path(cfg: Config) -> str:
    """stream.checkpoint, else <lake root>/_checkpoints/stream."""
    if cfg.stream.checkpoint:
        return cfg.stream.checkpoint
    base = lake.table_path(cfg.lake.root, lake.EVENTS).rsplit("/bronze/", 1)[0]
    return f"{base}/_checkpoints/stream"


def history_checkpoint_path(cfg: Config) -> str:
    """The history query's checkpoint: <stream.checkpoint>_history."""
    return checkpoint_path(cfg).rstrip("/") + "_history"


SEGMENTS_FILE = "microseg-segments.json"


@dataclass(frozen=True)
class CheckpointInfo:
    writer: str  # the stream's writer id: online store batch marker and Delta txnAppId
    is_new: bool  # created now: the stream's rows are rebuilt from bronze/events
    state_api: str  # the per-user state's API, fixed by the checkpoint's first run


def check_checkpoint(
    spark: SparkSession,
    checkpoint: str,
    catalog: SegmentCatalog,
    segment_ids: list[str],
    *,
    state_api: str,
    source: str,
) -> CheckpointInfo:
    """Record the streamed segments' versions and a new writer id in a new checkpoint; refuse
    one that was made for other versions (its state holds the facts of those rules)."""
    wanted = {sid: catalog.version(sid) for sid in segment_ids}
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(f"{checkpoint}/{SEGMENTS_FILE}")
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if fs.exists(path):
        text = spark.read.text(str(path), wholetext=True).first()[0]
        recorded = json.loads(text)["segments"]
        writer = json.loads(text).get("writer", f"stream:{checkpoint}")
        # checkpoints from before the key was recorded used applyInPandasWithState
        recorded_api = json.loads(text).get("state_api", "apply_in_pandas_with_state")
        # before the key was recorded, the segment query read bronze/events in both cases
        recorded_source = json.loads(text).get("source", "delta")
        if recorded_source != source:
            raise ConfigError(
                f"stream checkpoint {checkpoint} reads stream.source {recorded_source}, not "
                f"{source}: start on a new stream.checkpoint"
            )
        if recorded != wanted:
            raise ConfigError(
                f"stream checkpoint {checkpoint} was made for other segments or rules "
                f"({_describe(recorded, wanted)}): its state does not fit them. Start on a new "
                "stream.checkpoint (see microseg.streaming.query on the stream's rows to delete "
                "first)"
            )
        return CheckpointInfo(writer, is_new=False, state_api=recorded_api)
    writer = f"stream:{catalog.name}:{uuid.uuid4()}"
    out = fs.create(path, False)
    try:
        record = {"segments": wanted, "writer": writer, "state_api": state_api, "source": source}
        out.write(bytearray(json.dumps(record, indent=2).encode()))
    finally:
        out.close()
    return CheckpointInfo(writer, is_new=True, state_api=state_api)


def _describe(recorded: dict[str, str], wanted: dict[str, str]) -> str:
    parts = [f"'{s}' added" for s in wanted if s not in recorded]
    parts += [f"'{s}' removed" for s in recorded if s not in wanted]
    parts += [f"'{s}' changed" for s in wanted if s in recorded and recorded[s] != wanted[s]]
    return ", ".join(parts)
