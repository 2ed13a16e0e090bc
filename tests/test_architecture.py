"""The house rules that code review would otherwise have to remember: which way imports point, no cycle, small files
and functions. Read from the source with ``ast``; nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

# eval_report.py is both the report library (imported by the engine when asked) and its own small command line.
ENTRY_SCRIPTS = {"main_task_retrieval", "retrieve", "export_model"}
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def source_files() -> list[Path]:
    """Every Python file of the project outside tests/ (benches and preprocess tools included)."""
    return sorted(p for p in ROOT.rglob("*.py") if "tests" not in p.relative_to(ROOT).parts and ".git" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path) -> set[str]:
    """First-party modules a file imports when it is loaded (imports inside functions are deferred, not edges of a
    load-time cycle)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def first_party_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in source_files()}
    return {
        name: {m for m in module_level_imports(path) if m in modules and m != name} for name, path in modules.items()
    }


def all_imports(path: Path) -> set[str]:
    """Every module a file names in an import, wherever the import stands."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_import_cycle():
    graph = first_party_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_imports_point_down():
    for path in source_files():
        name = module_name(path)
        top = name.split(".")[0]
        imported = {m.split(".")[0] for m in all_imports(path)}
        assert not imported & ENTRY_SCRIPTS - {top}, f"{name} imports an entry script"
        assert not any(m.startswith("tests") or m == "conftest" for m in imported), f"{name} imports a test module"
        if top == "engine":
            assert "search" not in imported, f"{name}: the engine and the search package do not import each other"
        if top == "search":
            assert "engine" not in imported, f"{name}: the engine and the search package do not import each other"
        if top == "modules":
            assert not imported & {"dataloaders", "engine", "search"}, f"{name}: modules/ sits below them"
        if top in ("dataloaders", "util", "metrics", "errors"):
            assert not imported & {"engine", "search"}, f"{name} imports a package above it"


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for path in source_files():
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    assert not long_files + long_functions, long_files + long_functions


def test_only_the_command_lines_see_argparse():
    """The libraries take typed configs and plain values: argparse stays in the entry scripts, the preprocess and
    bench tools, and engine/flags.py (the driver's parser, kept torch-free so --help answers at once)."""
    libraries = ("engine", "search", "modules", "dataloaders", "util", "metrics", "errors")
    offenders = [
        module_name(path)
        for path in source_files()
        if module_name(path).split(".")[0] in libraries
        and module_name(path) != "engine.flags"
        and "argparse" in all_imports(path)
    ]
    assert offenders == []
