"""The package's shape (DESIGN.md, rules of the house), read from the source with ``ast``.

- no import circles among the modules of ``src/losslab``: a module that imports another, at the top or
  inside a function, is an edge; any strongly connected component of two or more modules is a circle;
- the kind of a task is decided in ``tasks`` and ``models`` only: comparisons with a task or model kind
  written as a string literal elsewhere are counted (at most 2, issue #22's bar);
- ``engine`` and ``losses`` never import ``mlflow``; ``models`` never imports ``data``;
- no function in ``src/`` is 60 lines or longer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "losslab"
KINDS = ("mil", "slices25d", "volume3d", "multimodal", "image", "segmentation", "multitask",
         "bag_classification", "image_classification", "volume_classification")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.Module, known: set[str], is_package: bool) -> set[str]:
    """Modules of the package that ``module`` imports (``from pkg import submodule`` counts the submodule)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, is_package)
            names = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            names = names or [target]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("losslab"):
                out.add(name)
    return out


def import_graph() -> nx.DiGraph:
    modules = _modules()
    known = set(modules)
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for module, tree in modules.items():
        is_package = (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").is_file()
        for target in _imports(module, tree, known, is_package):
            # a package's __init__ re-exporting its own submodules is not a circle with them
            if not (target.startswith(module + ".") or module.startswith(target + ".")):
                graph.add_edge(module, target)
    return graph


def import_circles() -> list[list[str]]:
    return sorted(sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1)


def test_the_checker_finds_a_circle():
    graph = nx.DiGraph([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])
    assert [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1] == [["a", "b", "c"]]
    tree = ast.parse("from losslab.engine import loop\nimport losslab.stats\n")
    known = {"losslab.engine", "losslab.engine.loop", "losslab.stats", "losslab.x"}
    assert _imports("losslab.x", tree, known, False) == {"losslab.engine.loop", "losslab.stats"}


def test_no_import_circles():
    assert import_circles() == []


_KIND_COMPARISON = re.compile(r"""(==|!=)\s*["'](%s)["']|["'](%s)["']\s*(==|!=)"""
                              r"|\b(model|task)\w*[._](kind|name)\s+(not\s+)?in\s*[(\[{]"
                              % ("|".join(KINDS), "|".join(KINDS)))


def kind_comparisons() -> list[str]:
    """``path:line`` of each comparison with a kind string outside ``tasks`` and ``models``."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("tasks", "models")):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _KIND_COMPARISON.search(line) or re.search(r"\bmodel\.kind\s*(==|!=|in\b)", line):
                hits.append(f"{rel}:{number}: {line.strip()}")
    return hits


def test_kind_comparisons_counter_counts():
    assert _KIND_COMPARISON.search('if cfg.model.kind == "segmentation":')
    assert _KIND_COMPARISON.search("if name != 'volume3d'")
    assert _KIND_COMPARISON.search('if model_kind in ("mil", "slices25d"):')
    assert not _KIND_COMPARISON.search('kind: Literal["mil", "segmentation"] = "mil"')
    assert not _KIND_COMPARISON.search('if key in ("image", "mask"):')
    assert not _KIND_COMPARISON.search("if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)")


def test_the_kind_is_decided_in_tasks_and_models():
    hits = kind_comparisons()
    assert len(hits) <= 2, "\n".join(hits)


@pytest.mark.parametrize("layer, forbidden", [("engine", "mlflow"), ("losses", "mlflow"), ("models", "losslab.data")])
def test_layers_do_not_import_upwards(layer, forbidden):
    offenders = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == forbidden or n.startswith(forbidden + ".")]
    assert offenders == []


def test_functions_are_short():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 >= 60:
                long.append(f"{path.relative_to(PACKAGE)}::{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
