"""Provenance: which code and which packages made a run (docs/design.md#4 for code: every record traceable).

Every sweep, trial, soup and report run carries these tags:

    mlflow.source.name        the entry module that created the run (sweeps/coatnet.py, sweeps/trainable.py, ...)
    mlflow.source.git.commit  HEAD of the project's git checkout (only when the code runs from one)
    mlflow.source.git.branch  its branch (when on one)
    mlflow.source.git.dirty   "true" when tracked files differ from HEAD (MLflow's own tag and meaning)
    ich.version               the installed ich-soups package version
    ich.source.hash           sha256 over the project's Python sources (ich/, soups/, sweeps/): always set, so
                              runs from a git checkout and from a synced copy without .git (cluster nodes:
                              `ray up` rsyncs the repo without .git) compare on one key
    ich.env                   JSON of the resolved versions of the packages that shape results

A soup run also carries the distinct code versions of its ingredients' trial runs:

    ich.ingredients.git_commits    comma-separated distinct mlflow.source.git.commit values ("" when none)
    ich.ingredients.source_hashes  comma-separated distinct ich.source.hash values

Everything is computed once per process (functools.cache). No Ray and no MLflow import at module level.
"""
from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable

from soups.store.tags import TAG_ENV, TAG_INGREDIENT_COMMITS, TAG_INGREDIENT_HASHES, TAG_SOURCE_HASH, TAG_VERSION

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SOURCE_PACKAGES = ("ich", "soups", "sweeps")
DIST_NAME = "ich-soups"
# Packages whose versions change numbers (weights, metrics, timings) or records (MLflow, Ray).
KEY_PACKAGES = ("torch", "torchvision", "timm", "ray", "mlflow", "numpy", "safetensors", "optuna", "scikit-learn")

TAG_SOURCE_NAME = "mlflow.source.name"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_BRANCH = "mlflow.source.git.branch"
TAG_GIT_DIRTY = "mlflow.source.git.dirty"
UNRECORDED = "unrecorded"  # an ingredient run without the tag (logged before provenance existed)
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value


@dataclass(frozen=True)
class CodeVersion:
    version: str  # installed package version ("unknown" when not installed)
    source_hash: str  # sha256 hex over the sources
    commit: str | None = None  # None outside a git checkout (or without a git binary)
    branch: str | None = None
    dirty: bool | None = None


def source_hash(root: Path = PROJECT_ROOT) -> str:
    """sha256 over (relative path, content) of every *.py under root/{ich,soups,sweeps}, in path order."""
    h = hashlib.sha256()
    files = sorted(p for pkg in SOURCE_PACKAGES for p in (root / pkg).rglob("*.py") if p.is_file())
    for p in files:
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode("utf-8") + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):  # no git binary, or it hung
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _installed_version() -> str:
    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def code_version(root: Path = PROJECT_ROOT) -> CodeVersion:
    """The code version of the project at root: git commit when root is the top of a git checkout."""
    root = Path(root).resolve()
    version, digest = _installed_version(), source_hash(root)
    # Only root's own checkout counts: an installed copy under some other repository is not that repository.
    top = _git(root, "rev-parse", "--show-toplevel") if (root / ".git").exists() else None
    if top is None or Path(top).resolve() != root:
        return CodeVersion(version, digest)
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:  # a repository without commits
        return CodeVersion(version, digest)
    branch = _git(root, "symbolic-ref", "--short", "-q", "HEAD") or None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return CodeVersion(version, digest, commit, branch, None if status is None else bool(status))


@functools.cache
def package_versions() -> dict[str, str]:
    """Resolved versions of the key packages (and Python, and torch's CUDA build) in this process."""
    env = {"python": platform.python_version()}
    for name in KEY_PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "missing"
    import torch  # a dependency every caller has loaded already; the wheel's CUDA version is not in its metadata
    env["torch.cuda"] = torch.version.cuda or "none"
    return env


def run_tags(source_name: str, root: Path = PROJECT_ROOT) -> dict[str, str]:
    """The provenance tags of a run created by `source_name` (a path relative to the project root)."""
    code = code_version(root)
    tags = {TAG_SOURCE_NAME: source_name, TAG_VERSION: code.version, TAG_SOURCE_HASH: code.source_hash,
            TAG_ENV: json.dumps(package_versions(), sort_keys=True, separators=(",", ":"))}
    if code.commit:
        tags[TAG_GIT_COMMIT] = code.commit
        if code.branch:
            tags[TAG_GIT_BRANCH] = code.branch
        if code.dirty is not None:
            tags[TAG_GIT_DIRTY] = str(code.dirty).lower()
    return tags


def _joined(values: set[str]) -> str:
    """Sorted, comma-separated; cut to MLflow's tag limit with a count of what was left out."""
    out, items = "", sorted(values)
    for i, v in enumerate(items):
        more = f",... {len(items) - i} more"
        candidate = f"{out},{v}" if out else v
        if len(candidate) + len(more) > MAX_TAG_CHARS:
            return out + more
        out = candidate
    return out


def summarize_ingredients(run_tags_list: Iterable[dict[str, str]]) -> dict[str, str]:
    """The soup's ingredient provenance tags from the tags of its ingredients' trial runs (pure)."""
    commits, hashes = set(), set()
    for tags in run_tags_list:
        if tags.get(TAG_GIT_COMMIT):
            commits.add(tags[TAG_GIT_COMMIT])
        hashes.add(tags.get(TAG_SOURCE_HASH) or UNRECORDED)
    return {TAG_INGREDIENT_COMMITS: _joined(commits), TAG_INGREDIENT_HASHES: _joined(hashes)}


def ingredient_tags(client, experiment_id: str, run_ids: Iterable[str]) -> dict[str, str]:
    """summarize_ingredients over the given trial runs, read from MLflow (one search per 100 runs)."""
    from mlflow.entities import ViewType

    from soups.store import retry

    ids = sorted(set(run_ids))
    found: list[dict[str, str]] = []
    for start in range(0, len(ids), 100):
        chunk = ids[start:start + 100]
        quoted = ", ".join(f"'{i}'" for i in chunk)
        runs = retry.call_with_retry("search ingredient runs", client.search_runs, [experiment_id],
                                        filter_string=f"attributes.run_id IN ({quoted})",
                                        run_view_type=ViewType.ALL, max_results=len(chunk))
        found += [dict(r.data.tags) for r in runs]
    found += [{}] * (len(ids) - len(found))  # a run that is gone counts as unrecorded
    return summarize_ingredients(found)
