"""Schema error reports: bounded work, no echo of large input, the field at fault named."""

import pytest

from tunnel_telemetry.protocol import schema
from tunnel_telemetry.testing.reports import make_report


def test_schema_errors_stop_early_on_thousands_of_bad_keys(monkeypatch):
    """A 64 KiB body can hold 8,000 config keys: errors are collected lazily and capped."""
    pulled = []
    real = schema.validator()

    class Counting:
        def iter_errors(self, instance):
            for error in real.iter_errors(instance):
                pulled.append(error)
                yield error

    monkeypatch.setattr(schema, "validator", lambda name="report.schema.json": Counting())
    report = make_report(config={f"k{i}": i for i in range(8000)})
    errors = schema.schema_errors(report)
    assert len(errors) == 20
    assert len(pulled) == schema.MAX_COLLECTED
    assert {"path": "$.config", "message": "has more than 64 keys"} in errors


@pytest.mark.parametrize("config, message", [
    ({f"k{i}": "" for i in range(5000)}, "has more than 64 keys"),
    ({"k": "x" * 1_000_000}, "is longer than 1024 characters"),
    ({"k" * 100_000: "x"}, "is longer than 64 characters"),
    ({"k" * 100_000: 1}, "must be of type string"),
])
def test_schema_messages_do_not_echo_input(config, message):
    errors = schema.schema_errors(make_report(config=config))
    assert message in {e["message"] for e in errors}
    assert all(len(e["message"]) < 100 and len(e["path"]) < 200 for e in errors)


@pytest.mark.parametrize("failure, path, message", [
    ({"op": "x", "msg": "m" * 3000}, "$.failure.msg", "is longer than 2048 characters"),
    ({"msg": "no op"}, "$.failure.op", "is required"),
    ({"op": 5}, "$.failure.op", "must be of type string"),
    ("refused", "$.failure", "must be of type ['object', 'null']"),
])
def test_failure_errors_name_the_field_at_fault(failure, path, message):
    assert schema.schema_errors(make_report(failure=failure)) == [{"path": path,
                                                                   "message": message}]


def test_failure_null_is_valid():
    assert schema.schema_errors(make_report(failure=None) | {"failure": None}) == []
