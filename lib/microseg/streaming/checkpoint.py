"""The stream's checkpoint: where it lives, and the segment versions its state was built for."""

from __future__ import annotations

import json

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


SEGMENTS_FILE = "microseg-segments.json"


def check_checkpoint(
    spark: SparkSession, checkpoint: str, catalog: SegmentCatalog, segment_ids: list[str]
) -> None:
    """Record the streamed segments' versions in a new checkpoint; refuse one that was made
    for other versions (its state holds the facts of those rules)."""
    wanted = {sid: catalog.version(sid) for sid in segment_ids}
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(f"{checkpoint}/{SEGMENTS_FILE}")
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if fs.exists(path):
        text = spark.read.text(str(path), wholetext=True).first()[0]
        recorded = json.loads(text)["segments"]
        if recorded != wanted:
            raise ConfigError(
                f"stream checkpoint {checkpoint} was made for other segments or rules "
                f"({_describe(recorded, wanted)}): its state does not fit them. Start on a new "
                "stream.checkpoint (see microseg.streaming.query on the stream's rows to delete "
                "first)"
            )
        return
    out = fs.create(path, False)
    try:
        out.write(bytearray(json.dumps({"segments": wanted}, indent=2).encode()))
    finally:
        out.close()


def _describe(recorded: dict[str, str], wanted: dict[str, str]) -> str:
    parts = [f"'{s}' added" for s in wanted if s not in recorded]
    parts += [f"'{s}' removed" for s in recorded if s not in wanted]
    parts += [f"'{s}' changed" for s in wanted if s in recorded and recorded[s] != wanted[s]]
    return ", ".join(parts)
