"""gold/model_registry: the typed entry, its one writer and reader, versions and the training
data hash. Expected values are written out by hand."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime

import pytest
from tests.conftest import make_config

from microseg.core import schemas
from microseg.ml import registry
from microseg.ml.registry import ModelNotFoundError, RegistryEntry


def entry(model_name: str, version: str, kind: str = "cluster", **changes) -> RegistryEntry:
    values = {
        "model_name": model_name,
        "version": version,
        "kind": kind,
        "trained_at": datetime(2026, 11, 24, 5, 15),
        "training_as_of": (datetime(2026, 10, 1),),
        "evaluation_as_of": None,
        "params": {"k": 3},
        "metrics": {"k": 3.0, "silhouette": float("nan")},
        "details": {"profiles": []},
        "training_data_hash": "h",
        "path": f"/lake/models/{model_name}/{version}",
        "run_id": "r1",
    }
    return RegistryEntry(**{**values, **changes})


def test_entry_mirrors_the_table_columns():
    assert [f.name for f in fields(RegistryEntry)] == schemas.MODEL_REGISTRY.names


def test_version_ids_sort_by_time():
    # the microseconds 999999 = 0xf423f, as six hex digits
    early = registry.new_version(datetime(2026, 11, 24, 5, 15, 0, 999_999))
    late = registry.new_version(datetime(2026, 11, 24, 5, 15, 1, 0))
    assert early == "20261124T051500Z-0f423f"
    assert late == "20261124T051501Z-000000"
    assert early < late


def test_training_data_hash_is_pinned_and_ignores_row_order(spark):
    rows = [("a", 1, None, datetime(2026, 1, 1)), ("b", 2, 0.5, datetime(2026, 1, 1))]
    schema = "user_key string, n int, x double, t timestamp"
    # row texts "a|1.0|\N|1767225600000000" and "b|2.0|0.5|1767225600000000" (| = U+001F);
    # sha256 of {"columns": [...], "rows": 2, "sums": [the four 60-bit slice sums]}, worked
    # out with hashlib alone
    expected = "3c970bbca7dbd883040c01f78795d6abe4b3e716765d5d49e49d5b11a39a09a8"
    columns = ["user_key", "n", "x", "t"]
    assert registry.training_data_hash(spark.createDataFrame(rows, schema), columns) == expected
    reversed_df = spark.createDataFrame(rows[::-1], schema).repartition(3)
    assert registry.training_data_hash(reversed_df, columns) == expected


def test_one_writer_and_one_reader(spark, tmp_path):
    root = make_config(tmp_path).lake.root
    assert registry.entries(spark, root, kind="cluster") == []
    assert not registry.exists(spark, root, "behavior", kind="cluster")
    with pytest.raises(
        ModelNotFoundError,
        match=r"no cluster model 'behavior' in gold/model_registry under .*: run "
        r"`microseg cluster train --as-of T` first",
    ):
        registry.get(spark, root, "behavior", kind="cluster")

    first = entry("behavior", "20261124T051500Z-000001")
    second = entry("behavior", "20261201T000000Z-000002", trained_at=datetime(2026, 12, 1))
    target = entry(
        "purchase_7d",
        "20261124T051500Z-000003",
        kind="propensity",
        evaluation_as_of=datetime(2026, 10, 8),
        details=None,
    )
    for written in (second, first, target, first):  # a second write of `first` adds nothing
        registry.register(spark, root, written)

    nan_dropped = {"k": 3.0}
    assert registry.entries(spark, root, kind="cluster") == [
        entry("behavior", "20261124T051500Z-000001", metrics=nan_dropped),
        entry(
            "behavior",
            "20261201T000000Z-000002",
            trained_at=datetime(2026, 12, 1),
            metrics=nan_dropped,
        ),
    ]
    assert registry.get(spark, root, "behavior", kind="cluster").version == (
        "20261201T000000Z-000002"
    )
    assert registry.get(
        spark, root, "behavior", kind="cluster", version="20261124T051500Z-000001"
    ) == entry("behavior", "20261124T051500Z-000001", metrics=nan_dropped)
    got = registry.get(spark, root, "purchase_7d", kind="propensity")
    assert (got.version, got.evaluation_as_of, got.details) == (
        "20261124T051500Z-000003",
        datetime(2026, 10, 8),
        None,
    )
    assert registry.exists(spark, root, "purchase_7d", kind="propensity")
    assert not registry.exists(spark, root, "purchase_7d", kind="cluster")
    with pytest.raises(
        ModelNotFoundError,
        match=r"^no propensity model 'purchase_7d' version 20990101T000000Z-000000 in "
        r"gold/model_registry under \S+$",
    ):
        registry.get(
            spark, root, "purchase_7d", kind="propensity", version="20990101T000000Z-000000"
        )
