"""A full lock (issue 24 item 6): constraints.txt pins every distribution this venv holds, at the installed version,
so CI installs exactly what was tested; `make lock` (tools/lock.py) writes it and keeps the file's comments and the
label-free torch line.

No network: reads constraints.txt and the venv's installed distributions; tools/lock.py runs on temp files."""
from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "ich-soups"
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)")


def pins(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = PIN.fullmatch(line)
            assert m, f"not name==version: {line!r}"
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def venv_distributions() -> dict[str, str]:
    """{name: version} of every distribution installed in this venv's site-packages (the project excluded)."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    found = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=paths)}
    found.pop(PROJECT, None)
    return found


def uncovered(lock_text: str, installed: dict[str, str]) -> list[str]:
    """What the lock misses: an installed distribution with no pin, or pinned at another version (a +local build
    label, torch's 2.14.1+cpu say, does not count)."""
    locked, out = pins(lock_text), []
    for name, version in sorted(installed.items()):
        if name not in locked:
            out.append(f"{name}=={version} is installed but not pinned in constraints.txt")
        elif Version(Version(version).public) != Version(locked[name]):
            out.append(f"{name}: installed {version}, constraints.txt pins {locked[name]}")
    return out


def test_the_lock_pins_every_distribution_of_this_venv_at_its_installed_version():
    installed = venv_distributions()
    assert {"torch", "mlflow", "ray", "pip", "setuptools", "optuna-dashboard", "bottle"} <= set(installed)
    assert len(installed) > 100
    missing = uncovered((ROOT / "constraints.txt").read_text(), installed)
    assert not missing, ("this venv and constraints.txt differ (`make install` builds the venv from the lock; "
                         "`make lock` rewrites the lock):\n" + "\n".join(missing))


def test_the_check_reports_a_planted_missing_or_different_distribution():
    """Control: against a venv holding exactly what the lock pins (torch as a +cpu build), a copy of the lock
    without one line, a planted distribution the lock lacks, and another installed version are each reported."""
    text = (ROOT / "constraints.txt").read_text()
    as_locked = dict(pins(text))
    as_locked["torch"] += "+cpu"  # a build label is not a difference
    assert uncovered(text, as_locked) == []
    without = "\n".join(line for line in text.splitlines() if not re.match(r"(?i)bottle==", line))
    assert without != text
    assert uncovered(without, as_locked) == [f"bottle=={as_locked['bottle']} is installed but not pinned in "
                                             "constraints.txt"]
    assert uncovered(text, {**as_locked, "ich-planted-dist": "1.0"}) == [
        "ich-planted-dist==1.0 is installed but not pinned in constraints.txt"]
    assert uncovered(text, {**as_locked, "bottle": "0.12.0"}) == [
        f"bottle: installed 0.12.0, constraints.txt pins {as_locked['bottle']}"]


def test_the_lock_keeps_its_header_and_torch_line_and_make_lock_writes_it():
    text = (ROOT / "constraints.txt").read_text()
    assert text.startswith("# One environment for every machine: `pip install -c constraints.txt ...`")
    assert "a pin without a +local label matches every build" in text
    assert re.search(r"^torch==\d+\.\d+\.\d+$", text, re.M)  # no +cu130/+cpu: the index picks the build
    assert "# Everything else `make install` puts in the venv" in text
    make = (ROOT / "Makefile").read_text()
    target = make.split("\nlock:\n", 1)[1].split("\n\n", 1)[0]
    assert "pip freeze --all --exclude-editable" in target and "tools/lock.py $(LOCK_FILE)" in target
    assert re.search(r"^LOCK_FILE \?= \$\(CONSTRAINTS\)$", make, re.M)
    assert "pip check" in target and "-e '.[$(EXTRAS)]'" in target
    assert all("-c $(CONSTRAINTS)" in line for line in target.splitlines() if "pip install" in line)


def test_tools_lock_keeps_comments_drops_gone_pins_and_appends_the_rest_sorted(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("# header\n#\n# torch: the build comes from the index\ntorch==2.14.1\n"
                    "Gone-Package==1.0  # no longer installed\n# grouped\nmlflow==3.17.1  # why\n")
    frozen = ("torch==2.14.1+cu130\nmlflow==3.17.2\nZeta_pkg==2.0\nalpha.pkg==1.1\nich-soups==0.1.0\n"
              "# Editable install with no version control (ich-soups==0.1.0)\n")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "lock.py"), str(lock)], input=frozen, text=True,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert lock.read_text().splitlines() == [
        "# header", "#", "# torch: the build comes from the index", "torch==2.14.1", "# grouped",
        "mlflow==3.17.2  # why",
        "# Everything else `make install` puts in the venv (what the above need), pinned by `make lock`:",
        "alpha.pkg==1.1", "Zeta_pkg==2.0"]
    again = subprocess.run([sys.executable, str(ROOT / "tools" / "lock.py"), str(lock)], input=frozen, text=True,
                           capture_output=True, timeout=60)
    assert again.returncode == 0 and lock.read_text().count("alpha.pkg") == 1  # the tail is rewritten, not doubled
    no_torch = subprocess.run([sys.executable, str(ROOT / "tools" / "lock.py"), str(lock)], input="numpy==2.0\n",
                              text=True, capture_output=True, timeout=60)
    assert no_torch.returncode != 0 and "no torch" in no_torch.stderr
