"""The stream in a process of its own, for the kill -9 test in test_streaming.py.

    python -m tests.streaming_child TMP_PATH SEGMENTS_FILE PAUSE_FROM MARKER [KEY=VALUE ...]

Runs microseg.streaming.query with a processing-time trigger on the lake of make_config(TMP_PATH).
In the first micro-batch with a transition at or after PAUSE_FROM (ISO time), after the
online store's transaction and before the change rows are appended to Delta, it writes MARKER
and sleeps, so the test can kill -9 it mid-batch at a known point.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from tests.conftest import make_config

from microseg.core.spark import build_spark
from microseg.streaming import query as streaming
from microseg.streaming import sink as stream_sink

STREAM_SETTINGS = (
    "stream.state_partitions=2",
    "stream.trigger_interval=1s",
    "stream.watermark_delay=1h",
)


def main() -> None:
    tmp_path, segments_file, pause_from, marker = sys.argv[1:5]
    cfg = make_config(Path(tmp_path), *STREAM_SETTINGS, *sys.argv[5:])
    spark = build_spark(cfg.spark, app_name="microseg-stream-child")
    threshold = (datetime.fromisoformat(pause_from) - datetime(1970, 1, 1)) // timedelta(
        microseconds=1
    )
    append_changes = stream_sink._append_changes

    def pausing_append(spark, sink, rows, batch_id):
        if any(row[4] >= threshold for row in rows):
            Path(marker).write_text(str(batch_id))
            time.sleep(3600)  # the test kills the process here
        append_changes(spark, sink, rows, batch_id)

    stream_sink._append_changes = pausing_append
    streaming.run_stream(spark, cfg, path=segments_file)


if __name__ == "__main__":
    main()
