"""Provenance: every sweep, trial and soup run records the code version and the package versions that made it,
and a soup records those of its ingredients.

Unit tests build small project copies in temporary folders (with and without git). The integration test reads
the session's tiny sweep (tests/fixtures_sweep.py) from the real MLflow server and builds one soup from it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from soups.store import provenance
from soups.store.provenance import (TAG_ENV, TAG_GIT_BRANCH, TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_INGREDIENT_COMMITS,
                                    TAG_INGREDIENT_HASHES, TAG_SOURCE_HASH, TAG_SOURCE_NAME, TAG_VERSION)

ROOT = Path(__file__).resolve().parents[1]
GIT_TAGS = (TAG_GIT_COMMIT, TAG_GIT_BRANCH, TAG_GIT_DIRTY)
PROVENANCE_MODEL = "tiny-sweep-provenance-test"  # its own registered model: other tests soup tiny-sweep too


def expected_hash(root: Path) -> str:
    """The documented algorithm, written out again: sha256 over (path, sha256 of content) of the sources."""
    h = hashlib.sha256()
    for path in sorted(p for pkg in ("ich", "soups", "sweeps") for p in (root / pkg).rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def project_copy(dest: Path) -> Path:
    """A few of the project's modules laid out like the project (what `ray up` syncs: no .git)."""
    for rel in ("ich/__init__.py", "ich/errors.py", "soups/__init__.py", "soups/store/provenance.py", "sweeps/__init__.py"):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def git_init(root: Path) -> None:
    git(root, "init", "-q", "-b", "main")
    git(root, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "init")


# ------------------------------------------------------------------------------------------------ unit

def test_without_git_the_package_version_and_a_source_hash(tmp_path):
    root = project_copy(tmp_path / "copy")
    code = provenance.code_version(root)
    assert code.commit is None and code.branch is None and code.dirty is None
    assert code.version == metadata.version("ich-soups")
    assert code.source_hash == expected_hash(root) != expected_hash(ROOT)
    tags = provenance.run_tags("sweeps/coatnet.py", root)
    assert not set(GIT_TAGS) & set(tags), tags
    assert tags[TAG_SOURCE_HASH] == code.source_hash and tags[TAG_VERSION] == code.version
    assert tags[TAG_SOURCE_NAME] == "sweeps/coatnet.py"
    assert provenance.code_version(root) is code  # computed once per process

    # Bytecode and non-Python files do not count; one changed byte of a source does.
    (root / "ich" / "__pycache__").mkdir()
    (root / "ich" / "__pycache__" / "errors.cpython-311.pyc").write_bytes(b"\0junk")
    (root / "soups" / "notes.txt").write_text("not code")
    assert provenance.source_hash(root) == code.source_hash
    (root / "ich" / "errors.py").write_text((root / "ich" / "errors.py").read_text() + "\n")
    assert provenance.source_hash(root) != code.source_hash


def test_a_copy_inside_another_repository_is_not_that_repository(tmp_path):
    """An installed copy under some unrelated checkout must not report that checkout's commit."""
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "README").write_text("another project")
    git_init(outer)
    root = project_copy(outer / "site-packages")
    (root / ".git").write_text("gitdir: nowhere\n")  # even a stray .git entry does not make it a checkout
    code = provenance.code_version(root)
    assert code.commit is None and code.source_hash == expected_hash(root)


def test_in_a_git_checkout_the_commit_branch_and_dirty_flag(tmp_path):
    root = project_copy(tmp_path / "repo")
    git_init(root)
    code = provenance.code_version(root)
    assert code.commit == git(root, "rev-parse", "HEAD") and len(code.commit) == 40
    assert (code.branch, code.dirty) == ("main", False)
    tags = provenance.run_tags("soups/orchestrate.py", root)
    assert (tags[TAG_GIT_COMMIT], tags[TAG_GIT_BRANCH], tags[TAG_GIT_DIRTY]) == (code.commit, "main", "false")

    (root / "soups" / "extra.py").write_text("x = 1\n")  # untracked: not dirty (MLflow's meaning)
    provenance.code_version.cache_clear()
    assert provenance.code_version(root).dirty is False
    (root / "ich" / "errors.py").write_text("changed = True\n")  # a tracked file changed: dirty
    provenance.code_version.cache_clear()
    assert provenance.code_version(root).dirty is True
    assert provenance.run_tags("x.py", root)[TAG_GIT_DIRTY] == "true"


def test_package_versions_are_the_installed_ones():
    env = provenance.package_versions()
    for name in ("torch", "torchvision", "timm", "ray", "mlflow", "numpy", "safetensors", "optuna"):
        assert env[name] == metadata.version(name), name
    import platform

    import torch
    assert env["python"] == platform.python_version() and env["torch.cuda"] == (torch.version.cuda or "none")
    assert json.loads(provenance.run_tags("x.py")[TAG_ENV]) == env


def test_ingredient_summary_is_the_sorted_distinct_versions():
    a, b = "a" * 40, "b" * 40
    runs = [{TAG_GIT_COMMIT: b, TAG_SOURCE_HASH: "h2"}, {TAG_GIT_COMMIT: a, TAG_SOURCE_HASH: "h1"},
            {TAG_GIT_COMMIT: a, TAG_SOURCE_HASH: "h1"}, {TAG_SOURCE_HASH: "h3"}, {}]
    assert provenance.summarize_ingredients(runs) == {TAG_INGREDIENT_COMMITS: f"{a},{b}",
                                                      TAG_INGREDIENT_HASHES: "h1,h2,h3,unrecorded"}
    assert provenance.summarize_ingredients([]) == {TAG_INGREDIENT_COMMITS: "", TAG_INGREDIENT_HASHES: ""}
    many = provenance.summarize_ingredients([{TAG_SOURCE_HASH: f"{i:064x}"} for i in range(300)])
    value = many[TAG_INGREDIENT_HASHES]
    assert len(value) <= provenance.MAX_TAG_CHARS and value.endswith(" more")  # fits MLflow's tag limit
    kept = value.rsplit(",", 1)[0].split(",")
    assert len(kept) + int(value.rsplit("... ", 1)[1].split()[0]) == 300


# ------------------------------------------------------------------------------------------- integration

def _assert_provenance(tags: dict, source_name: str, what: str) -> None:
    expected = provenance.run_tags(source_name)
    got = {k: tags.get(k) for k in expected}
    assert got == expected, f"{what}: {got} != {expected}"
    # And against what the test computes itself, so a wrong provenance function cannot agree with itself.
    assert tags[TAG_SOURCE_HASH] == expected_hash(ROOT), what
    if (ROOT / ".git").exists():
        assert tags[TAG_GIT_COMMIT] == git(ROOT, "rev-parse", "HEAD"), what
    else:
        assert TAG_GIT_COMMIT not in tags, what
    env = json.loads(tags[TAG_ENV])
    assert env["torch"] == metadata.version("torch") and env["mlflow"] == metadata.version("mlflow"), what


@pytest.mark.integration
def test_sweep_trial_and_soup_runs_carry_their_provenance(tiny_sweep, mlflow_server, mlflow_client):
    from soups.orchestrate import SoupOptions, run_soups

    exp = tiny_sweep["experiment_id"]
    sweep_run = mlflow_client.get_run(tiny_sweep["parent_run_id"])
    _assert_provenance(sweep_run.data.tags, "sweeps/coatnet.py", "sweep run")
    trials = mlflow_client.search_runs([exp], filter_string=f"tags.`ich.kind` = 'trial' AND "
                                                            f"tags.`ich.sweep` = '{tiny_sweep['experiment']}'")
    assert len(trials) == 4
    for run in trials:  # created in Ray worker processes: their own computation, the same checkout
        _assert_provenance(run.data.tags, "sweeps/trainable.py", f"trial run {run.info.run_name}")

    summary = run_soups(SoupOptions(experiment=tiny_sweep["experiment"], tracking_uri=mlflow_server,
                                    scope="across", recipe="uniform", registered_model=PROVENANCE_MODEL,
                                    n_resamples=100))
    assert summary["soups"]
    for soup in summary["soups"]:
        run = mlflow_client.get_run(soup["run_id"])
        _assert_provenance(run.data.tags, "soups/orchestrate.py", f"soup run {soup['name']}")
        ingredient_runs = {i["run_id"] for i in soup["ingredients"] if i["accepted"]}
        assert len(ingredient_runs) >= 2 and ingredient_runs <= {t.info.run_id for t in trials}
        tags = [mlflow_client.get_run(r).data.tags for r in ingredient_runs]
        commits = sorted({t[TAG_GIT_COMMIT] for t in tags if TAG_GIT_COMMIT in t})
        hashes = sorted({t[TAG_SOURCE_HASH] for t in tags})
        assert run.data.tags[TAG_INGREDIENT_COMMITS] == ",".join(commits)
        assert run.data.tags[TAG_INGREDIENT_HASHES] == ",".join(hashes) == expected_hash(ROOT)
