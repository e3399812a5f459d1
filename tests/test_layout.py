"""Imports only point down: ich/ (the task) knows neither soups/, sweeps/, Ray nor MLflow; soups/ does not
import sweeps/. Read from every module's own imports (top level and inside functions)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"ich": {"soups", "sweeps", "ray", "mlflow"}, "soups": {"sweeps"}}


def imported_roots(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def upward_imports(package: str) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in sorted((ROOT / package).rglob("*.py"))
            for line, mod in imported_roots(p) if mod in FORBIDDEN[package]]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_point_down(package):
    assert upward_imports(package) == []


def test_the_check_sees_an_upward_import(tmp_path):
    planted = tmp_path / "m.py"
    planted.write_text("def f():\n    from sweeps.mlflow_server import x\n    import mlflow\n")
    assert imported_roots(planted) == [(2, "sweeps"), (3, "mlflow")]
