"""One environment: pyproject's dependency ranges, constraints.txt and the installed packages agree, every
third-party import of the project is declared, and the APIs that set the floors exist at the installed versions.

No network and no services: reads pyproject.toml, constraints.txt and the installed distributions' metadata.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("ich", "soups", "sweeps", "bench")
LOCAL_TOPS = {*PROJECT_PACKAGES, "tests"}
# Declared but never imported by the project, each for a reason: torch's and timm's companions come in as
# dependencies; these are used by tools or other packages on our behalf.
IMPORTED_ELSEWHERE = {
    "boto3": "the Ray autoscaler's AWS API and MLflow's S3 artifact store (head)",
    "psycopg2-binary": "MLflow's PostgreSQL backend store (head); imported by tests/test_load.py (dev)",
    "pytest-timeout": "a pytest plugin (pyproject's timeout setting)",
    "psutil": "MLflow's system-metrics monitor on trial runs (sweeps/trainable.system_monitor; the system extra)",
    "nvidia-ml-py": "MLflow's GPU monitor (pynvml) when system metrics are on (the system extra)",
}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(extras: bool = True) -> list[Requirement]:
    project = pyproject()
    reqs = [Requirement(r) for r in project["dependencies"]]
    if extras:
        reqs += [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def constraints() -> dict[str, Version]:
    pins = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line)
        assert m, f"constraints.txt line {n}: {line!r} is not name==version"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"constraints.txt line {n}: {name} pinned twice"
        pins[name] = Version(m.group(2))
    return pins


def installed(name: str) -> Version:
    return Version(metadata.version(name))


def declared(name: str) -> str:
    """pyproject's range for a runtime dependency, normalized (">=1.8", "<3,>=2.52")."""
    specs = [r.specifier for r in requirements(extras=False) if canonicalize_name(r.name) == canonicalize_name(name)]
    assert len(specs) == 1, f"{name} is declared {len(specs)} times in dependencies"
    return str(specs[0])


def test_every_declared_dependency_is_installed_within_its_range():
    """(a) What `make install` put in this venv satisfies pyproject (dependencies and the dev/head extras)."""
    bad = []
    for req in requirements():
        try:
            have = installed(req.name)
        except metadata.PackageNotFoundError:
            bad.append(f"{req}: not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            bad.append(f"{req}: installed {have}")
        for extra in req.extras:  # e.g. ray[default,tune], mlflow[auth]: the extra's own requirements too
            for sub in map(Requirement, metadata.requires(req.name) or []):
                if sub.marker is None or not sub.marker.evaluate({"extra": extra}):
                    continue
                try:
                    if not sub.specifier.contains(installed(sub.name), prereleases=True):
                        bad.append(f"{req.name}[{extra}] needs {sub}: installed {installed(sub.name)}")
                except metadata.PackageNotFoundError:
                    bad.append(f"{req.name}[{extra}] needs {sub}: not installed")
    assert not bad, "installed packages outside pyproject's ranges (run `make install`):\n" + "\n".join(bad)


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _third_party_imports(folders) -> dict[str, set[str]]:
    """{top-level module: {files importing it}} over every import statement (lazy ones inside functions too)."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in _top_level_imports(path):
                if name not in sys.stdlib_module_names and name not in LOCAL_TOPS:
                    found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared_and_every_dependency_is_used():
    """(b) An AST scan: the project's modules import only what pyproject declares, and declare nothing unused."""
    dists_of = metadata.packages_distributions()
    runtime = {canonicalize_name(r.name) for r in requirements(extras=False)}
    dev = {canonicalize_name(r.name) for r in requirements()}
    project_imports = _third_party_imports(PROJECT_PACKAGES)
    test_imports = _third_party_imports(["tests"])
    assert {"torch", "mlflow", "ray", "sklearn", "requests"} <= set(project_imports)  # the scan sees lazy imports

    def undeclared(imports, declared):
        return {f"{mod} (in {', '.join(sorted(files)[:3])})" for mod, files in imports.items()
                if not {canonicalize_name(d) for d in dists_of.get(mod, [mod])} & declared}
    assert not undeclared(project_imports, runtime), "imported by the project but not in dependencies"
    assert not undeclared(test_imports, dev), "imported by the tests but not declared (dependencies or extras)"

    used = {canonicalize_name(d) for mod in {**project_imports, **test_imports} for d in dists_of.get(mod, [mod])}
    unused = sorted(n for n in dev if n not in used and n not in IMPORTED_ELSEWHERE)
    assert not unused, f"declared but imported nowhere (drop them or say why in IMPORTED_ELSEWHERE): {unused}"


def test_every_module_imports():
    """The whole project imports at the installed versions (an API removed in a dependency fails here)."""
    failed = []
    for folder in PROJECT_PACKAGES:
        for path in sorted((ROOT / folder).glob("*.py")):
            name = folder if path.stem == "__init__" else f"{folder}.{path.stem}"
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - report every module that fails, not only the first
                failed.append(f"{name}: {type(e).__name__}: {e}")
    assert not failed, "\n".join(failed)


# (c) The calls that set pyproject's floors and ceilings, at the installed versions. Each names the floor it
# justifies; a failure here means the range in pyproject.toml is wrong.

def test_scikit_learn_mds_api_floor_1_8():
    """scikit-learn>=1.8: soups/analysis.py calls MDS(metric_mds=True, metric="precomputed", init="classical_mds")
    (1.8 renamed metric -> metric_mds and added init)."""
    from sklearn.manifold import MDS
    params = inspect.signature(MDS).parameters
    assert {"metric_mds", "metric", "init", "normalized_stress"} <= set(params)
    MDS(n_components=2, metric_mds=True, metric="precomputed", init="classical_mds")._validate_params()
    assert declared("scikit-learn") == ">=1.8"


def test_ray_token_auth_floor_2_52():
    """ray>=2.52: every node and client runs with RAY_AUTH_MODE=token (cluster.yaml, tests/test_multinode.py)."""
    from ray._raylet import AuthenticationMode
    assert AuthenticationMode.TOKEN != AuthenticationMode.DISABLED
    from ray.tune.search.optuna import OptunaSearch
    assert "storage" in inspect.signature(OptunaSearch).parameters  # sweeps/coatnet.py continues the study
    assert declared("ray") == "<3,>=2.52"


def test_mlflow_logged_model_api_floor_3_17():
    """mlflow>=3.17,<4: checkpoints are LoggedModels (initialize/finalize, search, linked metrics); the exact
    version tested (and the UI the browser test reads) is constraints.txt's pin."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus
    for name in ("create_logged_model", "finalize_logged_model", "search_logged_models", "set_logged_model_tags",
                 "log_model_artifacts", "log_outputs"):
        assert callable(getattr(MlflowClient, name, None)), name
    assert {"READY", "FAILED", "PENDING"} <= {s.name for s in LoggedModelStatus}
    assert "model_id" in inspect.signature(MlflowClient.log_metric).parameters
    assert declared("mlflow") == "<4,>=3.17"


def test_timm_model_registration_ceiling_2():
    """timm>=1.0.15,<2: ich/models.py registers its tiny models through timm's public builder and registry names."""
    from timm.data import resolve_model_data_config
    from timm.models import build_model_with_cfg, generate_default_cfgs, maxxvit, register_model
    assert callable(build_model_with_cfg) and callable(generate_default_cfgs) and callable(register_model)
    assert callable(resolve_model_data_config) and hasattr(maxxvit, "MaxxVit")
    assert declared("timm") == "<2,>=1.0.15"


def test_torch_and_other_floors():
    """torch>=2.4 (torch.amp.GradScaler("cuda"), torch.compile); pillow>=10 (Image.Resampling); scipy>=1.11
    (stats.binomtest); safetensors>=0.4 (safetensors.torch save/load)."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from scipy.stats import binomtest
    assert not torch.amp.GradScaler("cuda", enabled=False).is_enabled()
    assert callable(torch.compile) and callable(load_file) and callable(save_file) and callable(binomtest)
    assert Image.Resampling.BICUBIC is not None
    assert (declared("torch"), declared("pillow"), declared("scipy"), declared("safetensors")) == (
        ">=2.4", ">=10", ">=1.11", ">=0.4")


def test_constraints_pin_versions_inside_pyproject_ranges_and_this_venv_has_them():
    """(d) constraints.txt agrees with pyproject (every pin inside the declared range) and with this venv (built
    through it): one environment on every machine. Local build labels (+cu130, +cpu) do not count."""
    pins = constraints()
    for must in ("torch", "torchvision", "ray", "mlflow"):
        assert must in pins, f"constraints.txt does not pin {must}"
    bad = []
    for req in requirements():
        name = canonicalize_name(req.name)
        if name in pins and not req.specifier.contains(pins[name], prereleases=True):
            bad.append(f"constraints.txt pins {name}=={pins[name]} outside pyproject's {req}")
    declared = {canonicalize_name(r.name) for r in requirements()}
    for name in ("torch", "ray", "mlflow", "timm", "numpy", "scikit-learn"):
        assert name in declared, f"{name} is pinned but not declared"
    for name, pin in pins.items():
        try:
            have = installed(name)
        except metadata.PackageNotFoundError:
            bad.append(f"constraints.txt pins {name}=={pin}, not installed here")
            continue
        if Version(have.public) != pin:
            bad.append(f"constraints.txt pins {name}=={pin}, installed {have} (run `make install`)")
    assert not bad, "\n".join(bad)


def test_installs_go_through_the_constraints():
    """The Makefile's and cluster.yaml's pip installs all pass the constraints file."""
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS \?= constraints\.txt$", make, re.M)
    make_installs = re.findall(r"pip install (?!-q --upgrade pip)[^\n]*", make)
    assert len(make_installs) >= 2 and all("-c $(CONSTRAINTS)" in line for line in make_installs), make_installs
    assert re.search(r"^EXTRAS := dev,head,system$", make, re.M) and "-e '.[$(EXTRAS)]'" in make
    import yaml
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    commands = "\n".join(cluster["setup_commands"] + cluster["head_setup_commands"])
    cluster_installs = re.findall(r"pip install (?!-q --upgrade pip)[^\n]*", commands)
    assert len(cluster_installs) >= 3, cluster_installs
    assert all("-c ~/ich-soups/constraints.txt" in line for line in cluster_installs), cluster_installs


@pytest.mark.parametrize("spec, ok", [("torch==2.14.1", "2.14.1+cu130"), ("torch==2.14.1", "2.14.1+cpu"),
                                      ("torch==2.14.1", "2.14.1")])
def test_a_pin_without_local_label_accepts_every_torch_build(spec, ok):
    """Why one torch line serves every CUDA build: PEP 440 ignores a candidate's +local label for == pins."""
    assert Requirement(spec).specifier.contains(Version(ok))
    assert not Requirement(spec).specifier.contains(Version("2.14.0+cu130"))
