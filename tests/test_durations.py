import pytest

from tunnel_telemetry.durations import format_duration, parse_duration


@pytest.mark.parametrize("seconds, text", [
    (604800.0, "7d"), (5.0, "5s"), (300.0, "5m"), (43200.0, "12h"), (0.25, "250ms"),
    (0.0, "0s"), (90.0, "90s"), (1.5, "1500ms"),
])
def test_format_duration_round_trips(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value, seconds", [
    (300, 300.0), ("300", 300.0), ("5m", 300.0), ("7d", 604800.0), ("250ms", 0.25),
    (" 1.5 s ", 1.5), (0, 0.0),
])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value, message", [
    ("soon", "expected a duration such as 30s, 5m or 7d"), (True, "expected a duration"),
    ("5w", "expected a duration"), (-1, "must not be negative"),
])
def test_parse_duration_refuses(value, message):
    with pytest.raises(ValueError, match=message):
        parse_duration(value)
