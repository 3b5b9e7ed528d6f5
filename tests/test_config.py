"""Config loading: overlays, --set overrides, and errors that name the key and the file."""

from __future__ import annotations

from datetime import timedelta

import pytest
from tests.conftest import ROOT

from microseg.cli import main
from microseg.core.config import ConfigError, load_config
from microseg.ingest.sources import load_source


def write(path, text):
    path.write_text(text)
    return path


def test_local_overlay_extends_base():
    cfg = load_config(ROOT / "conf" / "local.yaml")
    assert cfg.spark.master == "local[*]"
    assert cfg.spark.shuffle_partitions == 8  # from base.yaml
    assert cfg.lake.root == "lake"
    assert cfg.ingest.max_future_skew == timedelta(hours=1)
    assert "purchase" in cfg.ingest.event_types


def test_cluster_overlay_leaves_master_to_spark_submit():
    cfg = load_config(ROOT / "conf" / "cluster.yaml")
    assert cfg.spark.master is None
    assert cfg.spark.delta_jars is None


def test_set_overrides_parse_values_and_reach_dict_keys():
    cfg = load_config(
        ROOT / "conf" / "local.yaml",
        [
            "spark.shuffle_partitions=3",
            "ingest.max_future_skew=30m",
            "spark.conf.spark.sql.ansi.enabled=false",
            "lake.root=/tmp/x",
        ],
    )
    assert cfg.spark.shuffle_partitions == 3
    assert cfg.ingest.max_future_skew == timedelta(minutes=30)
    assert cfg.spark.conf["spark.sql.ansi.enabled"] == "false"
    assert cfg.lake.root == "/tmp/x"


def test_unknown_key_names_key_and_file(tmp_path):
    conf = write(
        tmp_path / "env.yaml",
        "extends: %s\nspark:\n  shufle_partitions: 4\n" % (ROOT / "conf" / "base.yaml"),
    )
    with pytest.raises(ConfigError) as err:
        load_config(conf)
    assert str(err.value) == f"{conf}: unknown key 'spark.shufle_partitions'"


def test_wrong_type_names_key_and_file_it_came_from(tmp_path):
    base = write(tmp_path / "base.yaml", "spark:\n  shuffle_partitions: many\n")
    conf = write(tmp_path / "env.yaml", "extends: base.yaml\nlake:\n  root: /tmp/l\n")
    with pytest.raises(ConfigError) as err:
        load_config(conf)
    message = str(err.value)
    assert message.startswith(f"{base}: key 'spark.shuffle_partitions': ")
    assert "'many'" in message


def test_unknown_set_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown key 'shufle' under spark"):
        load_config(ROOT / "conf" / "local.yaml", ["spark.shufle=2"])


def test_set_without_value_is_an_error():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(ROOT / "conf" / "local.yaml", ["spark.master"])


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_config_error_exits_2_with_one_line(tmp_path, capsys):
    conf = write(tmp_path / "env.yaml", "lake:\n  roots: x\n")
    status = main(["ingest", "--conf", str(conf), "--source", "rees46", "--path", "x.csv"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == [f"microseg ingest: config error: {conf}: unknown key 'lake.roots'"]


def test_cli_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", "--source", "rees46"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "microseg ingest: error: the following arguments are required: --path (see --help)"
    ]


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    listed = out.split("COMMAND", 1)[1]
    for command in ("generate", "ingest", "sessionize", "features", "status"):
        assert command in listed


def test_unknown_source_lists_available(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown source 'nope'.*available: rees46, synthetic, taobao"
    ):
        load_source(ROOT / "conf" / "sources", "nope")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "name: s\nformat: json\nfields:\n  event_time: ts\n  event_type: t\n  user_id: u\n  colour: c\n",
            "unknown canonical field(s) ['colour']",
        ),
        (
            "name: s\nformat: json\nfields:\n  event_time: ts\n  user_id: u\n",
            "`fields` must map ['event_type']",
        ),
        (
            "name: s\nformat: csv\ncsv:\n  columns: [a, b]\nfields:\n  event_time: a\n  event_type: b\n  user_id: c\n",
            "column 'c' is not in csv.columns",
        ),
        (
            "name: s\nformat: xml\nfields: {}\n",
            "key 'format'",
        ),
        (
            "name: s\nformat: json\nfields:\n  event_time: ts\n  event_type: t\n  user_id: {column: u, colum: v}\n",
            "unknown key 'fields.user_id.colum'",
        ),
    ],
)
def test_bad_source_mapping_names_file_and_problem(tmp_path, body, expected):
    path = write(tmp_path / "s.yaml", body)
    with pytest.raises(ConfigError) as err:
        load_source(tmp_path, "s")
    assert str(err.value).startswith(str(path))
    assert expected in str(err.value)
