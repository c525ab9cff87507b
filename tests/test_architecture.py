"""The package's shape (DESIGN.md, rules of the house), read from the source with ``ast``.

- no import circles among the modules of ``src/losslab``: a module that imports another, at the top or
  inside a function, is an edge; any strongly connected component of two or more modules is a circle;
- the kind of a task is decided in ``tasks`` and ``models`` only: comparisons with a task or model kind
  written as a string literal elsewhere are counted (at most 2, issue #22's bar);
- ``engine`` and ``losses`` never import ``mlflow``; ``models`` never imports ``data``;
- no function in ``src/`` is 60 lines or longer;
- the names that only tests used (issue #30) stay out of ``src/``, and a loss's named terms are
  recorded by one mechanism, in ``losses/base.py``.
- one cache module: no ``seg_cache`` module, and one module defines a ``build_*cache`` function.
- the kind is the task's: no ``isinstance`` on dataset or task classes and no task-kind flag read outside
  ``tasks`` and ``models``; one loader builder: only ``data/loaders.py`` constructs a ``DataLoader``.
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


def package_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """The module graph folded onto losslab's sub-packages (``losslab.config.loading`` -> ``config``);
    a top-level module (``losslab.stats``, ``losslab.schema``) is a package of its own."""
    folded = nx.DiGraph()
    for source, target in graph.edges:
        a, b = source.split(".")[1:2], target.split(".")[1:2]
        if a and b and a != b:
            folded.add_edge(a[0], b[0])
    return folded


def test_the_package_checker_finds_a_cycle_through_lazy_imports():
    modules = nx.DiGraph([("losslab.config.loading", "losslab.tasks.base"), ("losslab.tasks.base", "losslab.models"),
                          ("losslab.models", "losslab.config.schema")])
    assert [sorted(c) for c in nx.strongly_connected_components(package_graph(modules)) if len(c) > 1] == \
        [["config", "models", "tasks"]]


def test_no_package_level_import_cycle():
    """Sub-packages import each other one way only, lazy imports included (issue #30: config -> tasks ->
    models -> config through config/loading.py's lazy imports, gone since the schema is losslab.schema)."""
    folded = package_graph(import_graph())
    assert [sorted(c) for c in nx.strongly_connected_components(folded) if len(c) > 1] == []


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


# ------------------------------------------------------------------- names only tests used (issue #30)
#: Names that were in ``src/`` only for the tests (or for nothing); none may come back where it was.
TEST_ONLY_NAMES = {
    "losslab.losses.base": {"TASKS"},
    "losslab.data.normalization": {"MODES"},
    "losslab.engine.calibration": {"Calibrator.from_dict"},
    "losslab.models.multimodal": {"MultiModalClassifier.tokenize"},
    "losslab.data.dicom.window": {"apply_window"},
    "losslab.data.dicom": {"apply_window"},
    "losslab.data.sources.base": {"Task"},  # a source's unit of reading is a ReadJob; Task is tasks/'s
    "losslab.data.sources": {"Task"},
}


def defined_names(tree: ast.Module) -> set[str]:
    """What a module defines or re-exports: top-level functions, classes, assigned and imported names,
    ``__all__`` entries, and ``Class.member`` for the functions and attributes of its classes."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                names |= set(ast.literal_eval(node.value))
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{member.name}")
                elif isinstance(member, (ast.Assign, ast.AnnAssign)):
                    targets = member.targets if isinstance(member, ast.Assign) else [member.target]
                    names |= {f"{node.name}.{t.id}" for t in targets if isinstance(t, ast.Name)}
    return names


def test_the_name_checker_sees_definitions_and_re_exports():
    tree = ast.parse("from .window import apply_window as apply_window\n__all__ = ['MODES']\n"
                     "TASKS: tuple = ()\nclass Calibrator:\n    method = 'none'\n    def from_dict(cls): ...\n")
    assert defined_names(tree) == {"apply_window", "MODES", "TASKS", "__all__", "Calibrator",
                                   "Calibrator.method", "Calibrator.from_dict"}


def test_no_test_only_names_in_src():
    modules = _modules()
    found = {module: sorted(names & defined_names(modules[module])) for module, names in TEST_ONLY_NAMES.items()}
    assert {module: names for module, names in found.items() if names} == {}


# ------------------------------------------------------------------- loss terms are recorded in one place
#: the members that keep a loss's named terms (``train/loss_<term>``): defined in ``losses/base.py`` only
TERM_RECORDING = {"record_terms", "terms", "term_tensors", "_terms"}


def term_recording_sites(tree: ast.Module) -> list[str]:
    """``Class.member`` for each method named in :data:`TERM_RECORDING`, and ``line N`` for each
    assignment to ``self.<one of them>`` (a private copy of the mechanism)."""
    sites = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            sites += [f"{node.name}.{m.name}" for m in node.body
                      if isinstance(m, ast.FunctionDef) and m.name in TERM_RECORDING]
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                while isinstance(target, ast.Subscript):
                    target = target.value
                if isinstance(target, ast.Attribute) and target.attr in TERM_RECORDING:
                    sites.append(f"line {node.lineno}")
    return sites


def test_the_term_recording_checker_finds_a_copy():
    copy = ast.parse("class L:\n    def __init__(self):\n        self._terms = {}\n"
                     "    def forward(self, x):\n        self._terms['a'] = x\n    def terms(self):\n        return {}\n")
    assert term_recording_sites(copy) == ["L.terms", "line 3", "line 5"]


def test_loss_terms_are_recorded_only_in_the_loss_base():
    copies = {}
    for path in sorted((PACKAGE / "losses").glob("*.py")):
        tree = ast.parse(path.read_text())
        if path.name != "base.py" and term_recording_sites(tree):
            copies[path.name] = term_recording_sites(tree)
    assert copies == {}
    base = term_recording_sites(ast.parse((PACKAGE / "losses" / "base.py").read_text()))
    assert {"TermRecorder.record_terms", "TermRecorder.terms", "TermRecorder.term_tensors"} <= set(base)
    # and every module with a composite loss records through it
    for name in ("compound.py", "distillation.py", "segmentation.py", "multitask.py"):
        assert "self.record_terms(" in (PACKAGE / "losses" / name).read_text(), name


# ------------------------------------------------------------------- one cache module (issue #30)
def cache_builders(tree: ast.Module) -> list[str]:
    """The module-level functions named ``build_*cache`` (a method of a task that calls the builder is
    not one)."""
    return [node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and re.fullmatch(r"build_\w*cache", node.name)]


def test_the_cache_builder_checker_finds_a_second_builder():
    tree = ast.parse("def build_seg_cache(cfg): ...\ndef build_cache(cfg): ...\ndef build_model(cfg): ...\n"
                     "class Task:\n    def build_cache(self, cfg): ...\n")
    assert cache_builders(tree) == ["build_seg_cache", "build_cache"]


def test_one_cache_module():
    modules = _modules()
    assert [m for m in modules if m.rpartition(".")[2] == "seg_cache"] == []
    builders = {module: names for module, tree in modules.items() if (names := cache_builders(tree))}
    assert builders == {"losslab.data.cache.build": ["build_cache"]}


# ------------------------------------------- the kind is the task's: hooks, not flags (issue #30)
#: attributes that say what kind a task is; read outside ``tasks/`` and ``models/`` they decide by kind
TASK_KIND_FLAGS = {"per_case_probabilities", "loss_takes_class_counts", "distributed", "device_batch_kinds"}


def kind_decisions(tree: ast.Module) -> list[str]:
    """``isinstance(x, C)`` where ``C`` names a dataset or a task class (``*Dataset``, ``*Task``, ``BagItems``
    aside: a batch container), and reads of :data:`TASK_KIND_FLAGS` (``distributed`` only off a name that
    says task: ``task.distributed``, ``loaded.task.distributed``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            for cls in classes:
                name = cls.attr if isinstance(cls, ast.Attribute) else getattr(cls, "id", "")
                if name.endswith(("Dataset", "Task")):
                    found.append(f"isinstance {name}")
        if isinstance(node, ast.Attribute) and node.attr in TASK_KIND_FLAGS:
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            if node.attr != "distributed" or "task" in owner.lower():
                found.append(node.attr)
    return found


def test_the_kind_decision_checker_finds_isinstance_and_flags():
    tree = ast.parse("if isinstance(ds, (BagDataset, data.ImageDataset)): pass\n"
                     "if isinstance(t, SegmentationTask) or task.per_case_probabilities: pass\n"
                     "if not loaded.task.distributed: pass\n"
                     "if run.distributed and isinstance(x, dict): pass\n"
                     "n = t.loss_takes_class_counts\n")
    assert sorted(kind_decisions(tree)) == ["distributed", "isinstance BagDataset", "isinstance ImageDataset",
                                            "isinstance SegmentationTask", "loss_takes_class_counts",
                                            "per_case_probabilities"]


def test_no_isinstance_on_datasets_or_tasks_and_no_kind_flag_outside_tasks_and_models():
    found = {module: names for module, tree in _modules().items()
             if not module.startswith(("losslab.tasks", "losslab.models")) and (names := kind_decisions(tree))}
    assert found == {}


# --------------------------------------------------------------------- one loader builder (issue #30)
def loader_constructions(tree: ast.Module) -> int:
    """Calls that construct a loader class named ``*DataLoader`` (torch's, MONAI's, any alias of them)."""
    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.Call)
               and (getattr(node.func, "id", None) or getattr(node.func, "attr", "")).endswith("DataLoader"))


def test_the_loader_checker_counts_constructions():
    tree = ast.parse("from monai.data import DataLoader\nfrom torch.utils import data\n"
                     "a = DataLoader(ds)\nb = data.DataLoader(ds, batch_size=2)\nc = build_loader(ds, cfg, True)\n"
                     "d = loader_class(ds)\n")
    assert loader_constructions(tree) == 2


def test_one_loader_builder():
    builders = {module for module, tree in _modules().items() if loader_constructions(tree)}
    assert builders == {"losslab.data.loaders"}


# ----------------------------------------------------------------------------- distill is train runs
MAX_DISTILL_MODULES = 2  # issue #30: the orchestration (and at most one helper); the teacher and students are train runs


def distill_modules(folder: Path) -> list[str]:
    """The ``distill`` modules of a pipelines folder: ``distill.py`` and every ``distill_*.py``."""
    return sorted(p.name for p in folder.glob("*.py") if p.stem == "distill" or p.stem.startswith("distill_"))


def test_the_distill_module_checker_counts_them(tmp_path):
    for name in ("distill.py", "distill_fit.py", "distill_data.py", "train.py", "distillery.py"):
        (tmp_path / name).write_text("")
    assert distill_modules(tmp_path) == ["distill.py", "distill_data.py", "distill_fit.py"]
    assert len(distill_modules(tmp_path)) > MAX_DISTILL_MODULES  # the bar below fails on such a folder


def test_at_most_two_distill_modules_in_pipelines():
    assert len(distill_modules(PACKAGE / "pipelines")) <= MAX_DISTILL_MODULES, distill_modules(PACKAGE / "pipelines")
