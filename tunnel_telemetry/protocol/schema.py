"""The report JSON Schema, loaded and compiled once per process."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from itertools import islice
from pathlib import Path
from typing import Any

import jsonschema

try:  # optional: a compiled yes/no check, ~25x faster than jsonschema on valid reports
    import fastjsonschema
except ImportError:  # pragma: no cover - exercised by monkeypatching fast_check
    fastjsonschema = None

MAX_COLLECTED = 100
MAX_PATH = 128

_HERE = Path(__file__).resolve().parent
_CANDIDATES = (_HERE.parent / "schemas", _HERE.parent.parent / "schemas")


def schema_path(name: str = "report.schema.json") -> Path:
    """Path of a shipped schema: inside the package, else the source checkout's schemas/."""
    for folder in _CANDIDATES:
        path = folder / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"schema {name} not found in {', '.join(map(str, _CANDIDATES))}")


@cache
def load_schema(name: str = "report.schema.json") -> dict[str, Any]:
    """The schema document (cached)."""
    with open(schema_path(name), encoding="utf-8") as fh:
        return json.load(fh)


def python_patterns(value: Any) -> Any:
    r"""A copy of a schema whose ``pattern``s end at the end of the string in Python too.

    JSON Schema patterns are ECMA-262 regular expressions, where ``$`` is the end of the
    string; in Python's ``re`` it also matches before a final newline, so ``"US\n"`` passed
    ``^[A-Z]{2}$`` (and a uuid with a newline became a 500). Both validators run the copy
    with ``\Z``; the published schema is unchanged.
    """
    if isinstance(value, dict):
        return {key: _end_anchor(item) if key == "pattern" and isinstance(item, str)
                else python_patterns(item) for key, item in value.items()}
    if isinstance(value, list):
        return [python_patterns(item) for item in value]
    return value


def _end_anchor(pattern: str) -> str:
    body = pattern[:-1]
    escaped = (len(body) - len(body.rstrip("\\"))) % 2 == 1  # "\\$" is a literal dollar
    return body + "\\Z" if pattern.endswith("$") and not escaped else pattern


@cache
def validator(name: str = "report.schema.json") -> jsonschema.protocols.Validator:
    """A compiled validator for the named schema (built once per process)."""
    document = load_schema(name)
    cls = jsonschema.validators.validator_for(document)
    cls.check_schema(document)
    return cls(python_patterns(document))


@cache
def fast_check(name: str = "report.schema.json") -> Callable[[Any], bool] | None:
    """A compiled yes/no check of the named schema (fastjsonschema), or None without it.

    fastjsonschema generates draft 7 code: the report schema uses only keywords that mean the
    same there as in draft 2020-12. Only "valid" answers are trusted (jsonschema still
    explains every rejection), and tests/test_schema.py checks both agree.
    """
    if fastjsonschema is None:
        return None
    compiled = fastjsonschema.compile(python_patterns(load_schema(name)))

    def check(instance: Any) -> bool:
        try:
            compiled(instance)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    return check


def prepare(name: str = "report.schema.json") -> None:
    """Build the validators now (at start-up, before gunicorn forks), not on a request."""
    validator(name)
    fast_check(name)


def schema_errors(instance: Any, name: str = "report.schema.json",
                  limit: int = 20) -> list[dict[str, str]]:
    """Schema violations as [{"path": "$.time", "message": ...}], best first, messages short."""
    check = fast_check(name)
    if check is not None and check(instance):
        return []
    # iter_errors is lazy: stop early so 8,000 bad config values cost 100 errors, not 16,000.
    found = islice(validator(name).iter_errors(instance), MAX_COLLECTED)
    errors = sorted(found, key=lambda e: (e.json_path, e.message))
    out = []
    for error in errors[:limit]:
        path = error.json_path
        if error.validator == "required":
            name = error.message.split("'")[1] if error.message.count("'") >= 2 else ""
            path += f".{name}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else f"['{name}']"
        # A path names the client's keys: bounded, like the messages, so nothing big echoes back.
        out.append({"path": path[:MAX_PATH], "message": _short_message(error)})
    return out


def _short_message(error: jsonschema.ValidationError) -> str:
    """A message that names the rule without echoing large or sensitive input back."""
    rule = error.validator
    value = error.validator_value
    messages = {
        "required": lambda: "is required",
        "type": lambda: f"must be of type {value}",
        "const": lambda: f"must be {json.dumps(value)}",
        "pattern": lambda: (f"must be {error.schema['x-expected']}" if "x-expected" in error.schema
                            else "has the wrong format"),
        "maxLength": lambda: f"is longer than {value} characters",
        "minLength": lambda: "is empty" if value == 1 else f"is shorter than {value} characters",
        "maximum": lambda: f"must be at most {value}",
        "minimum": lambda: f"must be at least {value}",
        "exclusiveMinimum": lambda: f"must be greater than {value}",
        "maxProperties": lambda: f"has more than {value} keys",
        "maxItems": lambda: f"has more than {value} items",
        "enum": lambda: "must be one of " + ", ".join(json.dumps(v) for v in value),
        "oneOf": lambda: "must be null or an object with at least op",
        "additionalProperties": lambda: _extra_fields(error) if value is False
        else "has a value of the wrong type",
    }
    make = messages.get(rule)
    if make is not None:
        return make()
    return error.message[:200]


def _extra_fields(error: jsonschema.ValidationError) -> str:
    """Name (a few of) the fields a closed schema does not allow, shortened."""
    allowed = error.schema.get("properties", {})
    extra = sorted(str(k)[:64] for k in error.instance if k not in allowed)
    return "has fields that are not allowed: " + ", ".join(extra[:5])
