"""The stream in a process of its own, for the kill -9 test in test_streaming.py.

    python -m tests.streaming_child TMP_PATH SEGMENTS_FILE PAUSE_FROM MARKER

Runs microseg.streaming.query with a processing-time trigger on the lake of make_config(TMP_PATH).
In the first micro-batch with a transition at or after PAUSE_FROM (ISO time), after the
change rows are committed and before the membership MERGE, it writes MARKER and sleeps, so
the test can kill -9 it mid-batch at a known point.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

from pyspark.sql import functions as F
from tests.conftest import make_config

from microseg.core.spark import build_spark
from microseg.segments import membership
from microseg.streaming import query as streaming

STREAM_SETTINGS = (
    "stream.state_partitions=2",
    "stream.trigger_interval=1s",
    "stream.watermark_delay=1h",
)


def main() -> None:
    tmp_path, segments_file, pause_from, marker = sys.argv[1:5]
    cfg = make_config(Path(tmp_path), *STREAM_SETTINGS)
    spark = build_spark(cfg.spark, app_name="microseg-stream-child")
    threshold = datetime.fromisoformat(pause_from)
    merge_intervals = membership.merge_intervals

    def pausing_merge(spark, root, scope, diff, *, run_id):
        if diff.changes.filter(F.col("changed_at") >= F.lit(threshold)).limit(1).count():
            Path(marker).write_text(run_id)
            time.sleep(3600)  # the test kills the process here
        merge_intervals(spark, root, scope, diff, run_id=run_id)

    membership.merge_intervals = pausing_merge
    streaming.run_stream(spark, cfg, path=segments_file)


if __name__ == "__main__":
    main()
