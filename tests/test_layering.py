"""The package boundaries of the design, checked on the imports of every module (including those
inside functions), parsed with ast: a rank table in which a package imports only packages of lower
rank (or itself), so the shared layer imports no higher one and edge_client and aggregator (peers)
never import each other nor the harness; only export imports open_clip (the edge client has its
own tokenizer); and every method has a spec and both halves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANKS = {  # docs/architecture.md shows the same table
    "protos": 0,
    "fedprompt.common": 1,
    "edge_client": 2,
    "aggregator": 2,
    "export": 3,
    "fedprompt.harness": 4,
    "fedprompt.cli": 4,
    "fedprompt": 4,  # the package's own __init__
}
EXTRA_FORBIDDEN = {("export", "aggregator")}  # export builds bundles; it has no use for the server


def package_of(module: str) -> str | None:
    """The entry of RANKS a dotted module name belongs to (the longest prefix), None if not ours."""
    matches = [name for name in RANKS if module == name or module.startswith(name + ".")]
    return max(matches, key=len) if matches else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, own: str | None = None) -> set[str]:
    """Every module `path` (module `own`, by default from its place) imports, anywhere in it;
    relative imports resolved."""
    own = own or module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base)
                names.add(f"{prefix}.{node.module}" if node.module else prefix)
            elif node.module:
                names.add(node.module)
    return names


def violations(path: Path, own: str | None = None) -> list[str]:
    """The imports of `path` that break the rank table."""
    importer = package_of(own or module_name(path))
    found = []
    for imported in sorted(imports_of(path, own)):
        target = package_of(imported)
        if target is None or target == importer:
            continue
        if RANKS[target] >= RANKS[importer] or (importer, target) in EXTRA_FORBIDDEN:
            found.append(f"{path.name} ({importer}) imports {imported} ({target})")
    return found


def our_modules() -> list[Path]:
    roots = ["protos", "fedprompt", "edge_client", "aggregator", "export"]
    return sorted(path for root in roots for path in (ROOT / root).rglob("*.py"))


def test_the_rank_table_covers_every_module() -> None:
    assert all(package_of(module_name(path)) is not None for path in our_modules())


def test_every_import_goes_to_a_lower_rank_or_the_same_package() -> None:
    assert [v for path in our_modules() for v in violations(path)] == []


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The failure this test exists for: a lazy import of the harness from the shared layer or the
    edge client, and the edge client importing the aggregator, inside a function."""
    probe = tmp_path / "probe.py"
    probe.write_text("def late():\n    from fedprompt.harness import demo\n    import aggregator.rounds\n")
    assert violations(probe, "fedprompt.common.probe") == [
        "probe.py (fedprompt.common) imports aggregator.rounds (aggregator)",
        "probe.py (fedprompt.common) imports fedprompt.harness (fedprompt.harness)",
    ]
    assert len(violations(probe, "edge_client.probe")) == 2
    assert violations(probe, "fedprompt.harness.probe") == []


@pytest.mark.parametrize("package", ["edge_client", "aggregator", "protos", "fedprompt/common"])
def test_only_export_imports_open_clip(package: str) -> None:
    offending = {
        m
        for path in (ROOT / package).rglob("*.py")
        for m in imports_of(path)
        if m.split(".")[0] == "open_clip"
    }
    assert not offending, f"{package} imports open_clip: {sorted(offending)}"


def test_every_method_has_a_spec_a_client_and_a_server_half() -> None:
    import aggregator.strategies.registry  # noqa: F401  (registers the server halves)
    import edge_client.methods.registry  # noqa: F401  (registers the client halves)
    from aggregator.strategies import SERVER_STRATEGIES
    from edge_client.methods import CLIENT_METHODS
    from fedprompt.common.methods import METHOD_NAMES, METHOD_SPECS

    assert set(CLIENT_METHODS) == set(METHOD_NAMES) == set(SERVER_STRATEGIES) == set(METHOD_SPECS)
