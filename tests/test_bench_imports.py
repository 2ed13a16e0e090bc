"""Every bench stands on the public surface: no entry script, no test module, no underscore name of ours."""

import ast

import pytest
from conftest import ROOT

BENCHES = sorted((ROOT / "bench").glob("*.py"))
FIRST_PARTY = {"bench", "dataloaders", "engine", "errors", "metrics", "modules", "search", "util"}
FIRST_PARTY |= {path.stem for path in BENCHES}
FORBIDDEN = {"main_task_retrieval", "retrieve", "conftest"}


def imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every import statement, nested ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            found.append((node.module or "", [alias.name for alias in node.names]))
    return found


def first_party_aliases(tree: ast.Module) -> set[str]:
    """Names bound to one of our modules (``from engine import evaluate as mtr`` binds ``mtr``)."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                root = (module or alias.name).split(".")[0]
                if root in FIRST_PARTY:
                    bound.add(alias.asname or alias.name.split(".")[0])
    return bound


@pytest.mark.parametrize("path", BENCHES, ids=lambda p: p.name)
def test_bench_imports_only_public_names(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for module, names in imports(tree):
        root = module.split(".")[0]
        assert root not in FORBIDDEN and not root.startswith("test"), f"{path.name} imports {module}"
        if root in FIRST_PARTY:
            private = [n for n in names + module.split(".")[1:] if n.startswith("_")]
            assert not private, f"{path.name} imports {private} from {module}"
    ours = first_party_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ours:
            assert not node.attr.startswith("_"), f"{path.name}:{node.lineno} reads {node.value.id}.{node.attr}"


def test_the_checker_sees_a_private_import():
    tree = ast.parse("from modules.optimization import BertAdam, _scheduled_lr\nimport main_task_retrieval as d\n")
    assert imports(tree) == [("modules.optimization", ["BertAdam", "_scheduled_lr"]), ("main_task_retrieval", [])]
    assert first_party_aliases(tree) == {"BertAdam", "_scheduled_lr"}
