"""The package boundaries of the design: edge_client and aggregator never import each other, only
export imports open_clip (the edge client has its own tokenizer), and every method has both halves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> set[str]:
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"), [("edge_client", "aggregator"), ("aggregator", "edge_client")]
)
def test_client_and_server_never_import_each_other(package: str, forbidden: str) -> None:
    offending = {m for m in imported_modules(package) if m == forbidden or m.startswith(forbidden + ".")}
    assert not offending, f"{package} imports {sorted(offending)}"


@pytest.mark.parametrize("package", ["edge_client", "aggregator", "protos", "fedprompt/common"])
def test_only_export_imports_open_clip(package: str) -> None:
    offending = {m for m in imported_modules(package) if m.split(".")[0] == "open_clip"}
    assert not offending, f"{package} imports open_clip: {sorted(offending)}"


def test_shared_place_imports_neither_half() -> None:
    used = {m.split(".")[0] for m in imported_modules("fedprompt/common")}
    assert not used & {"edge_client", "aggregator", "export"}


def test_every_method_has_a_client_and_a_server_half() -> None:
    import aggregator.strategies.registry  # noqa: F401  (registers the server halves)
    import edge_client.methods.registry  # noqa: F401  (registers the client halves)
    from aggregator.strategies import SERVER_STRATEGIES
    from edge_client.methods import CLIENT_METHODS
    from fedprompt.common.methods import METHOD_NAMES

    assert set(CLIENT_METHODS) == set(METHOD_NAMES) == set(SERVER_STRATEGIES)
