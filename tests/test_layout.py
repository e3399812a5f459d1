"""Imports only point down: ich/ (the task) knows neither soups/, sweeps/, Ray nor MLflow; soups/ does not
import sweeps/. Read from every module's own imports (top level and inside functions)."""
from __future__ import annotations

import ast
import subprocess
import sys
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


def test_ich_help_imports_no_mlflow_or_ray():
    """`ich --help` (and each command's --help) builds its parser from argparse-only modules."""
    code = ("import sys\nfrom sweeps.cli import build_parser\np = build_parser()\n"
            "for argv in (['--help'], ['soup', '--help'], ['report', '--help'], ['gc', '--help'], ['sweep', '--help'],"
            " ['schedule', '--help']):\n"
            "    try:\n        p.parse_args(argv)\n    except SystemExit:\n        pass\n"
            "print('LOADED', sorted(m for m in ('mlflow', 'ray') if m in sys.modules), file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stderr, out.stderr[-2000:]
