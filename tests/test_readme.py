"""The README is the user's manual: it must name every table column, reason and command."""

from __future__ import annotations

import re

from tests.conftest import ROOT

from microseg.cli import COMMANDS
from microseg.core.lake import ALL_TABLES
from microseg.ingest.canonical import REASONS

README = (ROOT / "README.md").read_text()


def test_every_table_column_is_documented():
    for table in ALL_TABLES:
        assert f"`{table.name}`" in README
        for column in table.schema.fields:
            assert re.search(
                rf"\| `{column.name}` \| {re.escape(column.dataType.simpleString())} \|", README
            ), f"{table.name}.{column.name} is missing from README"


def test_every_quarantine_reason_is_documented():
    for reason in REASONS:
        assert f"| `{reason}` |" in README


def test_every_command_is_documented():
    for name in COMMANDS:
        assert f"microseg {name}" in README


def test_quick_start_is_the_two_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^\./scripts/\w+", quick, flags=re.M)
    assert commands == ["./scripts/demo", "./scripts/test"]


def test_every_feature_is_documented():
    from microseg.features.user_features import FEATURES, WINDOWS

    for name in FEATURES:
        base = next((name[: -len(w) - 1] for w in WINDOWS if name.endswith("_" + w)), None)
        documented = f"`{name}`" in README or (
            base is not None and f"`{base}_{{7d,30d,90d,lifetime}}`" in README
        )
        assert documented, f"feature {name} is missing from README"
