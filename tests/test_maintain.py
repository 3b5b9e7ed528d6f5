"""`microseg maintain`: table settings, the retention policy, OPTIMIZE and VACUUM."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from delta.tables import DeltaTable
from tests.conftest import make_config
from tests.test_sessions import ev, write_bronze

from microseg.core import lake
from microseg.ops.maintain import run_maintain

DAY = 24 * 60  # minutes


def test_maintain_expires_old_events_compacts_and_vacuums(spark, tmp_path):
    cfg = make_config(
        tmp_path,
        "maintain.retention=10d",
        "maintain.log_retention=14d",
        "privacy.erasure_retention=0h",
    )
    root = cfg.lake.root
    write_bronze(spark, cfg, [ev("old", 0, user="u1")])  # 2026-09-01 10:00
    for i in range(3):  # three small files of 2026-09-21
        write_bronze(spark, cfg, [ev(f"new{i}", 20 * DAY + i, user="u1")])
    path = lake.table_path(root, lake.EVENTS)
    assert DeltaTable.forPath(spark, path).detail().first()["numFiles"] == 4

    report = run_maintain(spark, cfg, now=datetime(2026, 9, 25, 10, 0, tzinfo=timezone.utc))

    assert report.cutoff == datetime(2026, 9, 15, 10, 0, tzinfo=timezone.utc)
    upkeep = {t.table: t for t in report.tables}
    assert upkeep["bronze/events"].rows_expired == 1
    assert upkeep["bronze/events"].files_compacted == 3
    assert upkeep["bronze/events"].problem is None
    events = sorted(r.event_id for r in lake.read_table(spark, root, lake.EVENTS).collect())
    assert events == ["new0", "new1", "new2"]
    detail = DeltaTable.forPath(spark, path).detail().first()
    assert detail["numFiles"] == 1
    assert detail["properties"]["delta.logRetentionDuration"] == "interval 14 days"
    assert detail["properties"]["delta.deletedFileRetentionDuration"] == "interval 0 seconds"
    assert "user_id" not in detail["properties"]["delta.dataSkippingStatsColumns"].split(",")
    # VACUUM (retention 0) left the one file the table uses
    data_files = [p for p in Path(path).rglob("*.parquet") if "_delta_log" not in p.parts]
    assert len(data_files) == 1
