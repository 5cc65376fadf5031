"""The layering of docs/architecture.md, checked from the source: arrows point down, no circles,
ray and mlflow where they belong, and the tables that must agree do."""

from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fsmeta"

# Bottom to top. A module may import modules of its own layer or below, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("fsmeta", "fsmeta.errors", "fsmeta.atomic", "fsmeta.progress", "fsmeta.data.catalogue")),
    ("configuration", ("fsmeta.config",)),
    ("data, models, maths", ("fsmeta.data", "fsmeta.data.*", "fsmeta.models", "fsmeta.models.*", "fsmeta.losses", "fsmeta.metrics")),
    ("device and records", ("fsmeta.compute", "fsmeta.step", "fsmeta.augment", "fsmeta.checkpoint", "fsmeta.tracking", "fsmeta.report")),
    ("algorithms", ("fsmeta.meta", "fsmeta.meta.reptile", "fsmeta.meta.sources", "fsmeta.meta.sequential", "fsmeta.meta.resources",
                    "fsmeta.graph", "fsmeta.finetune", "fsmeta.evaluate", "fsmeta.select", "fsmeta.select.*", "fsmeta.predict",
                    "fsmeta.rois", "fsmeta.large")),
    ("execution on Ray", ("fsmeta.meta.driver", "fsmeta.meta.workers")),
    ("workflows", ("fsmeta.train", "fsmeta.study", "fsmeta.benchmark", "fsmeta.workflows", "fsmeta.tuning", "fsmeta.tuning.*",
                   "fsmeta.export")),
    ("interface", ("fsmeta.cli",)),
]
# Who may import ray (at all, also inside a function) and mlflow.
RAY = ("fsmeta.meta.driver", "fsmeta.meta.workers", "fsmeta.benchmark", "fsmeta.tuning.*")
MLFLOW = ("fsmeta.tracking",)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(fsmeta modules, top-level external packages) imported anywhere in the file, functions included."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "fsmeta":
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    ours.add(full if full in MODULES else _resolve(node.module))
            else:
                theirs.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fsmeta":
                    ours.add(_resolve(alias.name))
                else:
                    theirs.add(alias.name.split(".")[0])
    return ours, theirs


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return rank
    raise AssertionError(f"{name} is in no layer of docs/architecture.md; add it to LAYERS")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_arrows_point_down():
    upward = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
              for a, (ours, _) in GRAPH.items() for b in ours if b != a and _layer(b) > _layer(a)]
    assert upward == []


def test_no_import_circles():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(GRAPH[node][0] - {node}):
            if seen.get(nxt) == 1:
                circles.append(" → ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for name in sorted(GRAPH):
        if name not in seen:
            visit(name, [name])
    assert circles == []


def test_models_losses_and_metrics_import_nothing_of_fsmeta_but_the_models():
    for name in MODULES:
        if _matches(name, ("fsmeta.models", "fsmeta.models.*", "fsmeta.losses", "fsmeta.metrics")):
            stray = {m for m in GRAPH[name][0] if not _matches(m, ("fsmeta.models", "fsmeta.models.*"))}
            assert stray == set(), f"{name} imports {stray}"


def test_ray_and_mlflow_only_where_they_belong():
    for name, (_, external) in GRAPH.items():
        if "ray" in external:
            assert _matches(name, RAY), f"{name} imports ray"
        if "mlflow" in external:
            assert _matches(name, MLFLOW), f"{name} imports mlflow"


@pytest.mark.parametrize("module", ["fsmeta.config", "fsmeta.cli"])
def test_reading_a_configuration_imports_neither_torch_nor_ray(module):
    code = (f"import sys, {module}; from fsmeta.config import load_config; load_config(None, ['arch=unet']); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_tables_that_must_agree_do():
    from fsmeta import config, models
    from fsmeta.data import catalogue, prepare, synth
    from fsmeta.select.scorers import SCORERS
    from fsmeta.select.selection import SET_METHODS

    assert set(config.ARCHITECTURES) == set(models.ARCHITECTURES)
    assert set(config.SELECT_METHODS) == set(SCORERS) | set(SET_METHODS) and not set(SCORERS) & set(SET_METHODS)
    assert set(prepare.READERS) == set(catalogue.PUBLIC_NAMES) == set(prepare.PUBLIC)
    assert catalogue.SYNTHETIC_NAMES == synth.DOMAINS
