"""`ich schedule --address` from an installed wheel ships only the project's packages (issue 24 item 8).

From a clone the job's working dir is the clone; from a wheel the folder above `sweeps` is site-packages, which
Ray would have zipped and uploaded whole. The wheel is built from this tree and installed into a fresh venv
(no pip, no index: the wheel's files plus a path to this venv's dependencies), and the job command is made there,
in a folder outside the project.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sweeps import schedule

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from pathlib import Path
import sweeps
from sweeps import schedule
from sweeps.config import load_config
spec = schedule.JobSpec(name="nightly", data="/srv/ich17-ds", num_samples=4, home=Path("home"),
                        config="sweeps/configs/gpu.yaml", address="http://10.0.0.1:8265", token_path=Path("t"))
load_config("sweeps/configs/gpu.yaml")  # the relative config resolves inside the installed package
print(json.dumps({"sweeps": sweeps.__file__, "root": str(schedule.ROOT), "cmd": schedule.job_command(spec)}))
"""


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv holding the project only as the wheel built from this tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # built from a copy: a build leaves build/ and *.egg-info behind
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", ".ich*", "tests", "bench", "docs",
                                                            "__pycache__", "*.egg-info", "build", "test-artifacts"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp / "dist").glob("ich_soups-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    # The dependencies from this venv, after the venv's own site-packages (a bare path: its .pth files, among
    # them this checkout's editable install, are not run).
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_a_wheel_install_ships_only_the_projects_packages(wheel_venv, tmp_path):
    out = subprocess.run([str(wheel_venv), "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.splitlines()[-1])
    site = Path(probe["root"])
    assert Path(probe["sweeps"]).parent == site / "sweeps" and str(site).startswith(str(wheel_venv.parent.parent))
    assert not schedule.is_source_checkout(site)  # the folder the old command shipped: site-packages
    cmd = probe["cmd"]
    assert "--working-dir" not in cmd, cmd
    env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert env["py_modules"] == [str(site / p) for p in ("ich", "soups", "sweeps")]
    assert all((Path(m) / "__init__.py").is_file() or Path(m).name == "ich" for m in env["py_modules"])
    shipped = sum(f.stat().st_size for m in env["py_modules"] for f in Path(m).rglob("*") if f.is_file())
    assert shipped < 5e6, shipped  # the packages and the configs, not site-packages
    assert (site / "sweeps" / "configs" / "gpu.yaml").is_file()  # configs travel as package data
    entry = cmd[cmd.index("--") + 1:]
    assert entry[:3] == ["python", "-m", "sweeps.coatnet"]
    assert entry[entry.index("--config") + 1] == "sweeps/configs/gpu.yaml"
    # The entrypoint runs from the wheel, outside any clone: `python -m sweeps.coatnet --version`.
    version = subprocess.run([str(wheel_venv), "-m", "sweeps.coatnet", "--version"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert version.returncode == 0 and version.stdout.startswith("ich-soups "), version.stderr[-2000:]


def test_a_clone_still_ships_itself_as_the_working_dir():
    """The control: in this clone the command keeps --working-dir (the wheel case differs by the install only)."""
    spec = schedule.JobSpec(name="nightly", data="/srv/ich17-ds", num_samples=4, home=Path("home"),
                            address="http://10.0.0.1:8265", token_path=Path("t"))
    assert schedule.is_source_checkout(ROOT)
    cmd = schedule.job_command(spec)
    assert cmd[cmd.index("--working-dir") + 1] == str(ROOT) and "py_modules" not in " ".join(cmd)
