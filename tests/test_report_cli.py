"""tt-report through click's CliRunner: usage errors, exit codes, stdout/stderr, spool, flush."""

import json
import logging

import pytest
from click.testing import CliRunner

from tunnel_telemetry.client import Spool
from tunnel_telemetry.client.cli import main
from tunnel_telemetry.testing.listeners import Listener
from tunnel_telemetry.testing.scripted import Reply, ScriptedCollector, closed_port_url

REPORT = {
    "report-type": "tunnel-telemetry",
    "time": "2024-04-12T00:00:00Z",
    "endpoint": "ss://192.0.2.1:443",
    "config": {"prefix": "xx"},
}


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.delenv("TT_COLLECTORS", raising=False)
    monkeypatch.setenv("TT_SPOOL_DIR", str(tmp_path / "spool"))
    return CliRunner()


@pytest.fixture
def spool(tmp_path):
    return Spool(tmp_path / "spool")


@pytest.fixture
def server():
    with ScriptedCollector() as s:
        yield s


def run(runner, *args, input=None):
    result = runner.invoke(main, list(args), input=input)
    assert "Traceback" not in result.output, result.output
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


FAST = ("--backoff", "0", "--timeout", "2")


def test_help_lists_commands_and_exit_codes(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for word in ("probe", "send", "flush", "0 delivered", "3 not delivered"):
        assert word in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["send"], "give a report FILE"),
        (["send", "-", "--endpoint", "ss://1.2.3.4:1"], "not both"),
        (["send", "-", "--failure-op", "tcp.connect"], "not both"),
        (["send", "--endpoint", "ss://1.2.3.4:1", "--failure-msg", "x"], "need --failure-op"),
        (["send", "--endpoint", "ss://1.2.3.4:1", "--config", "novalue"], "key=value"),
        (["send", "--endpoint", "ss://1.2.3.4:1"], "no collector"),
        (["send", "--endpoint", "ss://1.2.3.4:1", "--collector", "ftp://x"], "not an http"),
        (["send", "--endpoint", "ss://1.2.3.4:1", "--success-fraction", "2"], "0<=x<=1"),
        (["flush", "--no-spool"], "makes no sense"),
        (["probe"], "Missing argument"),
        (["nope"], "No such command"),
    ],
)
def test_usage_errors_exit_2(runner, args, message):
    result = run(runner, *args, input="{}")
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "text,message",
    [
        ("not json", "not JSON"),
        ("[1, 2]", "one JSON object"),
        (json.dumps({**REPORT, "endpoint": "ss://user:pw@1.2.3.4:443"}), "credentials"),
        (json.dumps({**REPORT, "time": "yesterday"}), "$.time: 'yesterday' is not an RFC 3339"),
        (json.dumps({k: v for k, v in REPORT.items() if k != "time"}), "$.time: is required"),
    ],
)
def test_invalid_report_exit_2_without_sending(runner, server, text, message):
    result = run(runner, "send", "-", "--collector", server.url, *FAST, input=text)
    assert result.exit_code == 2
    assert message in result.stderr
    assert server.requests == []


def test_send_stdin_delivered(runner, server, spool):
    result = run(runner, "send", "-", "--collector", server.url, *FAST, input=json.dumps(REPORT))
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    [req] = server.requests
    assert answer["uuid"] == req.json["uuid"]
    assert answer["config"] == {"prefix": "xx"}
    assert f"delivered to {server.url} (201)" in result.stderr
    assert len(spool) == 0


def test_send_file(runner, server, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(REPORT))
    result = run(runner, "send", str(path), "--collector", server.url)
    assert result.exit_code == 0
    assert server.requests[0].json["endpoint"] == REPORT["endpoint"]


def test_send_built_from_flags(runner, server):
    result = run(
        runner, "send",
        "--endpoint", "obfs4://[2001:db8::1]:9001",
        "--time", "2024-04-12T00:00:00Z",
        "--duration-ms", "120",
        "--failure-op", "tcp.connect",
        "--failure-msg", "connection refused",
        "--posix-error", "ECONNREFUSED",
        "--config", "prefix=xx", "--config", "cipher=chacha20",
        "--client-asn", "AS64500", "--client-cc", "NO",
        "--collector", server.url,
    )
    assert result.exit_code == 0, result.stderr
    sent = server.requests[0].json
    assert sent["failure"] == {
        "op": "tcp.connect", "msg": "connection refused", "posix_error": "ECONNREFUSED"
    }
    assert sent["config"] == {"prefix": "xx", "cipher": "chacha20"}
    assert (sent["duration_ms"], sent["client_asn"], sent["client_cc"]) == (120, "AS64500", "NO")
    assert sent["time"] == "2024-04-12T00:00:00Z"


def test_dry_run_prints_the_report_only(runner):
    result = run(runner, "send", "--endpoint", "ss://1.2.3.4:443", "--dry-run")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["endpoint"] == "ss://1.2.3.4:443" and report["failure"] is None


def test_rejected_exit_1_with_answer_on_stdout(runner, server, spool):
    answer = {"ok": False, "msg": "report too old",
              "errors": [{"path": "/time", "message": "older than 7 days"}]}
    server.push(Reply(400, answer))
    result = run(runner, "send", "-", "--collector", server.url, *FAST, input=json.dumps(REPORT))
    assert result.exit_code == 1
    assert json.loads(result.stdout) == answer
    assert "rejected the report (400): report too old" in result.stderr
    assert "/time: older than 7 days" in result.stderr
    assert len(spool) == 0


def test_collector_fault_is_not_delivered_exit_3(runner, server, spool):
    server.default = Reply(404, {"msg": "not found"})
    result = run(runner, "send", "-", "--collector", server.url, *FAST, input=json.dumps(REPORT))
    assert result.exit_code == 3
    assert len(server.requests) == 1
    assert len(spool) == 1


def test_all_down_spools_exit_3_then_flush(runner, spool):
    dead = closed_port_url()
    result = run(runner, "send", "-", "--collector", dead, *FAST, "--attempts", "2",
                 input=json.dumps(REPORT))
    assert result.exit_code == 3
    assert result.stdout == ""
    [path] = spool.paths()
    assert f"spooled as {path}" in result.stderr
    assert "tt-report flush" in result.stderr
    assert "ECONNREFUSED" in result.stderr

    # still down: flush keeps it
    result = run(runner, "flush", "--collector", dead, *FAST, "--attempts", "1")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["remaining"] == 1
    assert spool.paths() == [path]

    dry = run(runner, "flush", "--dry-run")
    assert dry.exit_code == 0 and json.loads(dry.stdout)["reports"] == [path.name]

    with ScriptedCollector() as live:
        result = run(runner, "flush", "--collector", live.url, *FAST)
        assert result.exit_code == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["remaining"] == 0
        [delivered] = summary["delivered"]
        assert delivered["uuid"] == path.stem == live.requests[0].json["uuid"]
    assert spool.paths() == []

    result = run(runner, "flush", "--collector", dead)
    assert result.exit_code == 0 and "nothing to flush" in result.stderr


def test_flush_rejected_exit_1(runner, server, spool):
    spool.put({**REPORT, "uuid": "00000000-0000-4000-8000-000000000001"})
    server.push(Reply(400, {"ok": False, "msg": "bad"}))
    result = run(runner, "flush", "--collector", server.url, *FAST)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["rejected"][0]["file"].startswith("00000000-")
    assert len(spool) == 0 and len(list(spool.rejected_dir.glob("*.json"))) == 1


def test_no_spool_exit_3(runner, spool):
    result = run(runner, "send", "-", "--collector", closed_port_url(), "--no-spool", *FAST,
                 "--attempts", "1", input=json.dumps(REPORT))
    assert result.exit_code == 3
    assert "not spooled" in result.stderr
    assert len(spool) == 0


def test_collectors_from_environment_with_fallback(runner, server, monkeypatch):
    monkeypatch.setenv("TT_COLLECTORS", f"{closed_port_url()}, {server.url}")
    result = run(runner, "send", "-", *FAST, input=json.dumps(REPORT))
    assert result.exit_code == 0, result.stderr
    assert "ECONNREFUSED" in result.stderr
    assert f"delivered to {server.url}" in result.stderr


def test_spool_dir_option_overrides_environment(runner, tmp_path):
    other = tmp_path / "other"
    result = run(runner, "send", "-", "--collector", closed_port_url(), "--spool-dir", str(other),
                 *FAST, "--attempts", "1", input=json.dumps(REPORT))
    assert result.exit_code == 3
    assert len(Spool(other)) == 1


def test_sampled_out_exit_0_not_sent(runner, server):
    result = run(runner, "send", "-", "--collector", server.url, "--success-fraction", "0",
                 input=json.dumps(REPORT))
    assert result.exit_code == 0
    assert "sampled out" in result.stderr
    assert server.requests == [] and result.stdout == ""


def test_sampled_report_carries_rate(runner, server):
    report = {**REPORT, "failure": {"op": "tcp.connect"}}
    for seed in range(10):
        run(runner, "send", "-", "--collector", server.url, "--failure-fraction", "0.5",
            "--seed", str(seed), input=json.dumps(report))
    assert 0 < len(server.requests) < 10
    assert {r.json["sampling_rate"] for r in server.requests} == {0.5}


def test_quiet_and_verbose(runner, server):
    quiet = run(runner, "send", "-", "--collector", server.url, "-q", input=json.dumps(REPORT))
    assert quiet.exit_code == 0 and quiet.stderr.count("\n") == 1  # only the outcome line
    server.push(Reply(503))
    loud = run(runner, "send", "-", "--collector", server.url, "-v", *FAST,
               input=json.dumps(REPORT))
    assert "HTTP 503 -> transient" in loud.stderr and "retrying in" in loud.stderr


def test_logger_is_restored_after_a_command(runner, server):
    logger = logging.getLogger("tunnel_telemetry")
    before = (logger.level, logger.propagate, list(logger.handlers))
    run(runner, "send", "-", "--collector", server.url, input=json.dumps(REPORT))
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_probe_dry_run_closed_port(runner):
    endpoint = closed_port_url().replace("http://", "ss://")
    result = run(runner, "probe", endpoint, "--dry-run", "--config", "prefix=xx")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["failure"]["posix_error"] == "ECONNREFUSED"
    assert report["config"] == {"prefix": "xx"}
    assert "probe: failed: tcp.connect ECONNREFUSED" in result.stderr


def test_probe_and_send(runner, server):
    with Listener("hold") as lst:
        result = run(runner, "probe", f"ss://127.0.0.1:{lst.port}", "--collector", server.url)
    assert result.exit_code == 0, result.stderr
    assert "probe: ok" in result.stderr
    sent = server.requests[0].json
    assert sent["failure"] is None and sent["endpoint"] == f"ss://127.0.0.1:{lst.port}"
    assert json.loads(result.stdout)["uuid"] == sent["uuid"]


def test_probe_tls_failure_options(runner):
    with Listener("garbage") as lst:
        result = run(runner, "probe", f"ss://127.0.0.1:{lst.port}", "--tls", "--sni",
                     "front.example", "--dry-run", "--probe-timeout", "2")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["failure"]["op"] == "tls.handshake"


def test_probe_bad_endpoint_exit_2(runner):
    result = run(runner, "probe", "ss://user:secret@1.2.3.4:443", "--dry-run")
    assert result.exit_code == 2
    assert "credentials" in result.stderr
    assert "secret" not in result.stdout


@pytest.mark.parametrize("order", ["before", "after"])
def test_delivery_options_before_or_after_the_subcommand(runner, server, order):
    """The README's `tt-report --collector URL send FILE` and `send --collector URL FILE`."""
    options = ["--collector", server.url, *FAST]
    args = ([*options, "send", "-"] if order == "before" else ["send", *options, "-"])
    result = run(runner, *args, input=json.dumps(REPORT))
    assert result.exit_code == 0, result.stderr
    assert len(server.requests) == 1


def test_after_the_subcommand_wins(runner, server):
    with ScriptedCollector() as other:
        result = run(runner, "--collector", other.url, "send", "--collector", server.url,
                     *FAST, "-", input=json.dumps(REPORT))
        assert result.exit_code == 0, result.stderr
        assert len(server.requests) == 1 and not other.requests


def test_flush_needs_a_collector_only_when_something_waits(runner, spool):
    result = run(runner, "flush")
    assert result.exit_code == 0 and "nothing to flush" in result.stderr
    spool.put({**REPORT, "uuid": "123e4567-e89b-42d3-a456-426614174000"})
    result = run(runner, "flush")
    assert result.exit_code == 2 and "no collector" in result.stderr
