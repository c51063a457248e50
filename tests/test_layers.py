"""The package's layers, read from its imports: no cycle, and core stays a library.

Every import counts, a function-level one too; only those under
``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "dynupdate"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str | None = None) -> set[str]:
    """Every module ``path`` imports at run time, as dotted names."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            # `from dynupdate.core import db` imports the module dynupdate.core.db
            found.update(f"{name}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


GRAPH = _graph()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, or None."""
    done: set[str] = set()
    for start in sorted(graph):
        stack: list[tuple[str, list[str]]] = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for target in sorted(graph[node]):
                if target == start:
                    return [*path, start]
                if target not in path and target not in done:
                    stack.append((target, [*path, target]))
        done.add(start)
    return None


def test_the_import_graph_is_read():
    # The checks below mean something only if the graph has the known edges.
    assert "dynupdate.core.db" in GRAPH["dynupdate.core.packages"]
    assert "dynupdate.core.versions" in GRAPH["dynupdate.core.decision"]


def test_cycle_finder_finds_a_function_level_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert _cycle(GRAPH) is None


def test_type_checking_imports_do_not_count(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import dynupdate.serve\n"
        "def f():\n    import dynupdate.core.db\n"
    )
    names = _imports(source, "dynupdate.m")
    assert "dynupdate.core.db" in names and "dynupdate.serve" not in names


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("dynupdate.core")))
def test_core_imports_only_core(module):
    outside = {m for m in GRAPH[module] if not m.startswith("dynupdate.core") and m != "dynupdate"}
    assert not outside, f"{module} imports {sorted(outside)}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("dynupdate.core")))
def test_core_never_imports_cli_or_http_libraries(module):
    path = next(p for p in PACKAGE.rglob("*.py") if _module_name(p) == module)
    tops = {name.split(".")[0] for name in _imports(path)}
    assert not tops & {"typer", "rich", "click", "httptools", "ssl", "uvloop"}, module


def test_the_decision_is_a_leaf():
    assert GRAPH["dynupdate.core.decision"] <= {
        "dynupdate.core",
        "dynupdate.core.versions",
        "dynupdate.core.vocabulary",
        "dynupdate.core.waves",
        "dynupdate.core.windows",
    }
    # ... and those are leaves too: nothing of the package but errors and each other.
    for leaf in ("versions", "vocabulary", "waves", "windows"):
        assert GRAPH[f"dynupdate.core.{leaf}"] <= {
            "dynupdate.core",
            "dynupdate.core.errors",
            "dynupdate.core.versions",
            "dynupdate.core.durations",
        }, leaf


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("dynupdate.endpoint")))
def test_the_endpoint_never_loads_the_server(module):
    # A device-side client compares fingerprints (dynupdate.fingerprints); the
    # server's certificate factory and HTTP machinery are none of its business.
    server = {
        m
        for m in _reachable(GRAPH, module)
        if m == "dynupdate.serve" or m.startswith("dynupdate.server")
    }
    assert not server, f"{module} imports {sorted(server)}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "server").glob("*.py")), ids=lambda p: p.name)
def test_server_modules_stay_one_concern_each(path):
    # The HTTP/TLS machinery was one 1,633-line module; one concern a module keeps it readable.
    assert len(path.read_text().splitlines()) <= 600, path.name
