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
