"""The package's layers point one way and hold no import cycle (an AST check: nothing is imported).

core (array contract, operators, degradations, metrics, models, inference) < data < training <
evaluation < registry < apps (the CLI, ``serving/``, ``flows/``). A module may import its own
layer or a lower one, never a higher one; inside a layer the imports form no cycle. Imports
inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medsr.provenance import REPO_ROOT, project_imports

LAYERS: tuple[str, ...] = ("core", "data", "training", "evaluation", "registry", "apps")

# Module (or package prefix) -> layer; the longest matching prefix decides, so `medsr.data` (the
# array contract in medsr/data/__init__.py) is core while `medsr.data.loading` is data.
LAYER_OF: dict[str, str] = {
    "medsr": "core", "medsr.scale": "core", "medsr.atomic": "core", "medsr.params": "core",
    "medsr.provenance": "core", "medsr.dvc_stages": "core", "medsr.dicom_log": "core",
    "medsr.data": "core", "medsr.ops": "core", "medsr.degradations": "core", "medsr.metrics": "core",
    "medsr.perceptual": "core", "medsr.models": "core", "medsr.losses": "core", "medsr.consistency": "core",
    "medsr.inference": "core",
    "medsr.data.": "data", "medsr.pipeline": "data", "medsr.stage_entry": "data",
    "medsr.training": "training", "medsr.tracking": "training", "medsr.pretrained": "training",
    "medsr.evaluation": "evaluation", "medsr.benchmark": "evaluation", "medsr.reporting": "evaluation",
    "medsr.finetune": "evaluation",
    "medsr.registry": "registry",
    "medsr.cli": "apps", "medsr.registry_cli": "apps", "serving": "apps", "flows": "apps",
}


def all_modules(root: Path = REPO_ROOT) -> list[str]:
    names = []
    for package in ("medsr", "serving", "flows"):
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


def layer_of(module: str) -> str | None:
    """The layer of ``module``: its longest prefix in LAYER_OF (``medsr.data.`` matches submodules only)."""
    best: tuple[int, str] | None = None
    for prefix, layer in LAYER_OF.items():
        matches = module.startswith(prefix) if prefix.endswith(".") else (module == prefix or module.startswith(prefix + "."))
        if matches and (best is None or len(prefix) > best[0]):
            best = (len(prefix), layer)
    return None if best is None else best[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``importer (layer) -> imported (higher layer)`` for every import that points up."""
    found = []
    for module, imports in sorted(graph.items()):
        rank = LAYERS.index(layer_of(module) or "apps")
        for target in sorted(imports):
            target_layer = layer_of(target) or "apps"
            if LAYERS.index(target_layer) > rank:
                found.append(f"{module} ({layer_of(module)}) imports {target} ({target_layer})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def import_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    return {module: project_imports(module, root) for module in all_modules(root)}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_module_has_a_layer(graph: dict[str, set[str]]) -> None:
    unplaced = [m for m in graph if layer_of(m) is None]
    assert not unplaced, f"add these modules to LAYER_OF in tests/test_layers.py: {unplaced}"


def test_no_module_imports_a_higher_layer(graph: dict[str, set[str]]) -> None:
    assert upward_imports(graph) == []


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_the_check_sees_a_planted_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The same check on a copy of the tree with one bad import added fails it."""
    import shutil

    for package in ("medsr", "serving", "flows"):
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    evaluation = tmp_path / "medsr" / "evaluation.py"
    evaluation.write_text(evaluation.read_text() + "\n\ndef _planted() -> None:\n    from medsr.benchmark import RAW_SUFFIX\n")
    metrics = tmp_path / "medsr" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n\ndef _planted() -> None:\n    import serving.web\n")
    planted = import_graph(tmp_path)
    assert ["medsr.benchmark", "medsr.evaluation"] in cycles(planted)
    assert "medsr.metrics (core) imports serving.web (apps)" in upward_imports(planted)


def test_no_sys_path_edits_in_the_code() -> None:
    """The CLI imports serving/ and flows/ as installed packages, never through sys.path."""
    offenders = [str(path.relative_to(REPO_ROOT)) for package in ("medsr", "serving", "flows", "stages")
                 for path in (REPO_ROOT / package).rglob("*.py") if "sys.path" in path.read_text()]
    assert offenders == []
