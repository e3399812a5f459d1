"""Imports only point down: ich/ (the task) knows neither soups/, sweeps/, Ray nor MLflow; soups/ does not
import sweeps/; no two modules import each other, however indirectly. Read from every module's own imports (top
level and inside functions, relative ones too). And the light paths stay light: `ich --help`, every subcommand's
--help and `ich ingest` import neither torch, timm, MLflow nor Ray (read from `python -X importtime`)."""
from __future__ import annotations

import argparse
import ast
import json
import re
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


# ---------------------------------------------------------------------------------------------- no import circle

PACKAGES = ("ich", "soups", "sweeps")


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages under root (a package is its __init__.py)."""
    found = {}
    for package in packages:
        for p in sorted((root / package).rglob("*.py")):
            parts = p.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return found


def _runtime_imports(tree: ast.AST):
    """Import nodes executed at some point (module level or in a function); `if TYPE_CHECKING:` bodies are not."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                yield from _runtime_imports(ast.Module(body=[child], type_ignores=[]))
            continue
        yield from _runtime_imports(node)


def import_edges(root: Path, packages=PACKAGES) -> dict[tuple[str, str], str]:
    """(importer, imported) between the packages' modules -> where the first such import is (file:line)."""
    modules = module_files(root, packages)

    def owner(name: str) -> str | None:  # the module a dotted name lives in: its longest prefix that is a module
        parts = name.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), None)

    edges: dict[tuple[str, str], str] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [owner(a.name) for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importer's package, one level up per extra dot
                    up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else owner(base) for a in node.names]
            for target in targets:
                if target and target != mod:
                    edges.setdefault((mod, target), f"{path.relative_to(root)}:{node.lineno}")
    return edges


def import_circles(root: Path, packages=PACKAGES) -> list[str]:
    """Every group of modules that import each other (a strongly connected component), as one circle through it
    with the line of each import: 'a -> b (a.py:3) -> a (b.py:7)'."""
    edges = import_edges(root, packages)
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph has a few hundred edges, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = []
    for group in sorted(groups):
        start, inside = group[0], set(group)
        paths = {start: [start]}  # breadth-first from start, inside the group, back to start
        frontier = [start]
        while frontier and start not in [w for v in frontier for w in graph[v]]:
            nxt = []
            for v in frontier:
                for w in graph[v]:
                    if w in inside and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in graph[v])
        path = paths[last] + [start]
        circles.append(path[0] + "".join(f" -> {b} ({edges[(a, b)]})" for a, b in zip(path, path[1:])))
    return circles


def test_no_import_circle():
    assert import_circles(ROOT) == []


def test_the_check_finds_a_planted_circle(tmp_path):
    """Control: a circle closed by a function-level relative import is found; a chain that only points one way,
    and a type-checking-only import back, are not circles."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import pkg.c\nfrom pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\n")
    assert import_circles(tmp_path, ("pkg",)) == ["pkg.a -> pkg.b (pkg/a.py:2) -> pkg.a (pkg/b.py:2)"]
    (pkg / "b.py").write_text("import pkg.c\n")
    assert import_circles(tmp_path, ("pkg",)) == []
    assert set(import_edges(tmp_path, ("pkg",))) == {("pkg.a", "pkg.c"), ("pkg.a", "pkg.b"), ("pkg.b", "pkg.c")}


def test_preprocessing_sits_below_checkpoints_and_models():
    """The one preprocessing contract imports no other room of ich/ but errors and the decoder (which serving
    shares with ingest): checkpoints record it, models and the init source use it, never the other way."""
    edges = import_edges(ROOT)
    assert {b for a, b in edges if a == "ich.preprocess"} == {"ich.errors", "ich.decode"}
    assert {b for a, b in edges if a == "ich.decode"} == {"ich.errors"}
    assert ("ich.checkpoint", "ich.preprocess") in edges and ("ich.init_source", "ich.checkpoint") in edges  # control


# ---------------------------------------------------------------------------------------------- light commands

HEAVY = ("torch", "timm", "mlflow", "ray")


def heavy_imports(argv: list[str], cwd: Path = ROOT, heavy=HEAVY) -> tuple[list[str], subprocess.CompletedProcess]:
    """Run `python -X importtime ARGV`; the modules of the `heavy` packages it imported (importtime's lines)."""
    out = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    names = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    return sorted(n for n in names if n.split(".")[0] in heavy), out


def test_importtime_reading_sees_torch():
    """Control for the two tests below: the same reading finds torch where a module imports it, and pandas where
    pyarrow's pa.array() pulls it in (what ich/ingest.py's columns avoid)."""
    heavy, out = heavy_imports(["-c", "import ich.preprocess"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch" in heavy and not any(n.startswith(("mlflow", "ray")) for n in heavy)
    heavy, out = heavy_imports(["-c", "import pyarrow as pa\npa.array([1])"], heavy=("pandas",))
    assert out.returncode == 0 and "pandas" in heavy, out.stderr[-2000:]


def test_every_help_imports_no_torch_timm_mlflow_or_ray():
    """`ich --help` and each subcommand's --help (the subcommands read from the parser itself) build the parser
    from argparse-only modules; each command imports its heavy modules in its handler."""
    from sweeps.cli import build_parser
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"ingest", "train", "sweep", "soup", "predict", "serve"} <= set(commands)
    found = {}
    for argv in [["--help"]] + [[c, "--help"] for c in sorted(commands)]:
        heavy, out = heavy_imports(["-m", "sweeps.cli", *argv])
        assert out.returncode == 0 and "usage: ich" in out.stdout, (argv, out.stderr[-2000:])
        if heavy:
            found[" ".join(argv)] = heavy[:5]
    assert found == {}


def test_ingest_imports_no_torch(tmp_path):
    """`ich ingest` of six small PNGs: decoding, splitting and Parquet need neither torch nor timm, MLflow or Ray,
    nor pandas (~50 MB of the ingest's peak)."""
    from tests.imagegen import make_simple_folder
    src = make_simple_folder(tmp_path / "src", {"a": 3, "b": 3}, size=40)
    heavy, out = heavy_imports(["-m", "sweeps.cli", "ingest", str(src), str(tmp_path / "out"), "--quiet",
                                "--size", "16", "--workers", "1"], heavy=HEAVY + ("pandas",))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_images"] == {"train": 2, "val": 2,
                                                                                          "test": 2}
    assert heavy == []


# ------------------------------------------------------------------------------------------ the drawing stays true

def drawing_rooms(text: str) -> dict[str, str]:
    """docs/design.md's drawing of the rooms, cut into each package's part (a line starting with `<package>/`)."""
    block = text.split("## The rooms and the one way data flows", 1)[1].split("```", 2)[1]
    rooms, current = {}, None
    for line in block.splitlines():
        head = line.split("/", 1)[0]
        if line[:1].isalpha() and head in FORBIDDEN.keys() | {"sweeps"}:
            current = head
        if current:
            rooms[current] = rooms.get(current, "") + line + "\n"
    return rooms


ROOMS_DRAWN_IN_FULL = ("soups/report", "soups/serve", "soups/store")  # subpackages whose every module the drawing names too


def unnamed_modules(text: str, root: Path = ROOT) -> list[str]:
    """Modules (and subpackages) of ich/, soups/, sweeps/, and the modules of ROOMS_DRAWN_IN_FULL, that their
    room's part of the drawing does not name."""
    rooms = drawing_rooms(text)
    missing = []
    for package in ("ich", "soups", "sweeps"):
        names = [p.stem for p in (root / package).glob("*.py") if p.stem != "__init__"]
        names += [p.name for p in (root / package).iterdir() if (p / "__init__.py").is_file()]
        names += [f"{p.parent.name}/{p.stem}" for sub in ROOMS_DRAWN_IN_FULL if sub.startswith(f"{package}/")
                  for p in sorted((root / sub).glob("*.py")) if p.stem != "__init__"]
        missing += [f"{package}/{n}" for n in sorted(names)
                    if not re.search(rf"(?<![\w.]){re.escape(n.rpartition('/')[2])}(?![\w])", rooms.get(package, ""))]
    return missing


def test_the_design_drawing_names_every_module_in_its_room():
    text = (ROOT / "docs" / "design.md").read_text()
    assert set(drawing_rooms(text)) == {"ich", "soups", "sweeps"}
    assert unnamed_modules(text) == []


def test_the_drawing_check_sees_a_module_it_does_not_name(tmp_path):
    """Control: a new module in a copy of the tree, absent from the drawing, is reported; so is one drawn in
    another room's part, and a new module of a room drawn in full (soups/serve/)."""
    for package in ("ich", "soups", "sweeps"):
        (tmp_path / package).mkdir()
        for p in (ROOT / package).glob("*.py"):
            (tmp_path / package / p.name).write_text("")
        (tmp_path / package / "recipes").mkdir()
    (tmp_path / "soups" / "recipes" / "__init__.py").write_text("")
    for sub in ROOMS_DRAWN_IN_FULL:
        (tmp_path / sub).mkdir()
        for p in (ROOT / sub).glob("*.py"):
            (tmp_path / sub / p.name).write_text("")
    text = (ROOT / "docs" / "design.md").read_text()
    assert unnamed_modules(text, tmp_path) == []
    (tmp_path / "soups" / "model_merge.py").write_text("")
    (tmp_path / "ich" / "job.py").write_text("")  # named in sweeps' part only
    (tmp_path / "soups" / "serve" / "grpc_gateway.py").write_text("")
    assert unnamed_modules(text, tmp_path) == ["ich/job", "soups/model_merge", "soups/serve/grpc_gateway"]
