"""Layers only import downward: walk every package's AST and fail on an upward import.

Bottom to top: ``memory`` (pool, pages, attention, plans, policies) knows nothing of models;
``engine`` (models, runner, the in-process engine, calibration) builds on it; ``training``
(data, classifier, recipes, evaluation) and ``workers`` (the Ray actor) build on the engine;
``scheduler`` on the workers; ``benchmarks`` on all of those; ``scalekv`` (the command line)
sits on top. Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ALLOWED: dict[str, set[str]] = {
    "memory": set(),
    "engine": {"memory"},
    "training": {"engine", "memory"},
    "workers": {"engine", "memory"},
    "scheduler": {"workers", "engine", "memory"},
    "benchmarks": {"scheduler", "workers", "training", "engine", "memory"},
    "scalekv": {"benchmarks", "scheduler", "workers", "training", "engine", "memory"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """Top-level project packages imported by a file, with the line of each import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in ALLOWED:
                out.add((top, node.lineno))
    return out


def upward_imports(package: str, root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for top, line in sorted(imported_packages(path)):
            if top != package and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(root)}:{line} imports {top}")
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_downward(package):
    assert (ROOT / package).is_dir()
    assert upward_imports(package) == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk is not vacuous: a lazy upward import inside a function is reported."""
    pkg = tmp_path / "memory"
    pkg.mkdir()
    (pkg / "bad.py").write_text("import torch\n\n\ndef f():\n    from engine.api import ImageEngine\n")
    assert upward_imports("memory", tmp_path) == ["memory/bad.py:5 imports engine"]
