"""The arrows of docs/architecture.md, read from every import in the package (function-level and
TYPE_CHECKING imports included): a new import that runs the wrong way fails here."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tunnel_telemetry"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every tunnel_telemetry module (or package) that the file imports, absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {imp for imp in found if imp == "tunnel_telemetry" or
            imp.startswith("tunnel_telemetry.") or imp.split(".")[0] in ("flask", "werkzeug")}


GRAPH = {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def room(module: str) -> str:
    """A module's room: its subpackage, or the module itself at the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def in_room(module: str, name: str) -> bool:
    return module == f"tunnel_telemetry.{name}" or module.startswith(f"tunnel_telemetry.{name}.")


def arrows_into(target: str, sources: set[str]) -> list[tuple[str, str]]:
    return sorted((mod, imp) for mod, imps in GRAPH.items() for imp in imps
                  if room(mod) in sources and in_room(imp, target))


def test_the_graph_is_read():
    assert "tunnel_telemetry.web" in GRAPH and "tunnel_telemetry.pipeline.scrub" in GRAPH
    assert any(in_room(imp, "pipeline") for imp in GRAPH["tunnel_telemetry.web.views"])
    assert any(in_room(imp, "store") for imp in GRAPH["tunnel_telemetry.relay.relay"])


@pytest.mark.parametrize("target, forbidden_sources", [
    ("web", {"pipeline", "store", "relay", "protocol", "client", "tls"}),
    ("relay", {"pipeline", "store", "protocol", "client"}),
    ("store", {"pipeline", "protocol", "client"}),
    ("cli", {mod.split(".")[1] if "." in mod else mod for mod in GRAPH} - {"cli"}),
    ("config", {"pipeline", "protocol", "client", "store"}),
    ("server", {"web", "pipeline", "store", "relay", "client", "protocol"}),
])
def test_arrows_go_one_way(target, forbidden_sources):
    assert arrows_into(target, forbidden_sources) == []


def test_pipeline_never_imports_flask():
    assert sorted((mod, imp) for mod, imps in GRAPH.items() if room(mod) == "pipeline"
                  for imp in imps if imp.split(".")[0] in ("flask", "werkzeug")) == []


CLIENT_MAY_USE = {"client", "protocol", "httpclient", "files", "durations"}


def test_the_client_never_imports_server_code():
    used = {imp for mod, imps in GRAPH.items() if room(mod) == "client" for imp in imps
            if imp.startswith("tunnel_telemetry.") and not imp.startswith("tunnel_telemetry.__")}
    rooms = {imp.split(".")[1] for imp in used}
    assert rooms <= CLIENT_MAY_USE, rooms - CLIENT_MAY_USE
