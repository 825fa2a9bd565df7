import json

import pytest

from tunnel_telemetry.cli import main
from tunnel_telemetry.config import OPTIONS


def test_help_lists_every_option(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for opt in OPTIONS:
        assert f"--{opt.name}" in result.output
    text = " ".join(result.output.split())
    assert "[env: TT_AUTOTLS, AUTOTLS]" in text


@pytest.mark.parametrize("option, shown", [
    ("relay-max-age", "[default: 7d]"), ("relay-timeout", "[default: 5s]"),
    ("max-clock-skew", "[default: 5m]"), ("header-timeout", "[default: 10s]"),
    ("access-log", "[default: true]"),
])
def test_help_shows_defaults_as_written_in_config(runner, option, shown):
    result = runner.invoke(main, ["--help"])
    text = " ".join(result.output.split())
    after = text[text.index(f"--{option}"):]
    assert shown in after[:after.index("[env:")]


def test_version(runner):
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and "0.1.0" in result.output


@pytest.mark.parametrize("args, env, message", [
    (["--proxy-hops", "x"], {}, "proxy-hops"),
    (["--autotls"], {}, "hostname"),
    ([], {"LISTEN": "bad"}, "listen"),
    (["--database-url", "sqlite:////proc/nope/x.db"], {}, "database-url"),
    (["--database-url", "redis://x"], {}, "database-url"),
])
def test_bad_options_exit_2_with_one_line(runner, tmp_path, args, env, message):
    result = runner.invoke(main, args, env={**env, "TT_CONFIG": ""})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("tt-server: error:") and message in lines[0]


def test_unknown_yaml_key_exits_2(runner, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("autotls: true\nhostnme: typo.example\n")
    result = runner.invoke(main, ["--config", str(path)])
    assert result.exit_code == 2
    assert "unknown option 'hostnme'" in result.output


@pytest.mark.parametrize("args, in_document", [
    (["export"], False),
    (["export", "--format", "csv"], False),
    (["aggregate", "--format", "json"], True),
    (["aggregate", "--format", "jsonl"], False),
    (["aggregate", "--format", "csv"], False),
])
def test_output_with_geo_data_names_its_attribution(runner, tmp_path, geo_dbs, args,
                                                    in_document):
    """export and aggregate print what the geo databases' licences ask to be credited with
    (GeoLite2 here): in the JSON document as GET /aggregates has it, else on standard error."""
    country, asn = geo_dbs
    common = ["--database-url", f"sqlite:///{tmp_path}/r.db", "--geoip-country-db",
              str(country), "--geoip-asn-db", str(asn)]
    result = runner.invoke(main, [*common, *args])
    assert result.exit_code == 0, result.output
    credit = "This product includes GeoLite2 data created by MaxMind"
    if in_document:
        assert credit in json.loads(result.stdout)["attribution"][0]
        assert result.stderr == ""
    else:
        assert credit not in result.stdout
        assert result.stderr.startswith("attribution: " + credit)


def test_output_without_geo_data_names_none(runner, tmp_path):
    result = runner.invoke(main, ["--database-url", f"sqlite:///{tmp_path}/r.db",
                                  "--geo-dir", str(tmp_path / "none"), "aggregate"])
    assert result.exit_code == 0 and result.stderr == ""
