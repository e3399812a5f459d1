"""`ich soup` reads and hashes each ingredient file once (issue 20): the pull's one read (registry.verify_pulled:
sha256, safetensors, finite weights, tags against checkpoint.json) hands its verified tensors to every soup that
uses the checkpoint (within-trial, across-best, across-all; uniform and greedy).

The spy watches, by path, every way the process reads a weights file (open/io.open for reading, safetensors'
load_file, which reads in Rust) and every sha256 the process computes (a digest equal to an ingredient's is a
hash of that file). Control: with no room for verified tensors (ICH_SOUP_CACHE_MB=0, memory flat as on a large
sweep) the soups read the verified files again, and the same spy counts those second reads.
Real MLflow server, the real orchestrator; tiny checkpoints logged as the trainable logs them.
"""
from __future__ import annotations

import builtins
import hashlib
import io
from collections import Counter
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import ich.checkpoint
from ich.checkpoint import WEIGHTS
from ich.models import create_model
from soups.orchestrate import SoupOptions, run_soups
from tests.logged_sweep import ARCH, log_sweep

EXPERIMENT = "read-once"
SCORES = {"a": [0.50, 0.70, 0.60], "b": [0.40, 0.45, 0.80]}  # val_macro_f1 per epoch


@pytest.fixture(scope="module")
def logged(mlflow_server, digits_data, digits_dataset, tmp_path_factory) -> dict[str, str]:
    """Two trials x three epochs of tiny checkpoints near one init; returns {sha256: model id}."""
    torch.manual_seed(0)
    base = create_model(ARCH, digits_data.num_classes, 32).state_dict()
    _, logged = log_sweep(MlflowClient(mlflow_server), EXPERIMENT, digits_dataset, digits_data,
                          tmp_path_factory.mktemp("read-once"), base, SCORES, "read-once-init", scale=1e-3)
    return {sha: model_id for sha, (model_id, _) in logged.items()}


class Spy:
    """Reads of weights files by path (Python's open for reading, safetensors' load_file) and sha256 digests."""

    def __init__(self, monkeypatch):
        self.reads: Counter[str] = Counter()
        self.digests: Counter[str] = Counter()
        real_open, real_load_file, real_sha256 = builtins.open, ich.checkpoint.load_file, hashlib.sha256
        spy = self

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, Path)) and Path(file).name == WEIGHTS and not set(mode) & set("wax+"):
                spy.reads[str(file)] += 1
            return real_open(file, mode, *args, **kwargs)

        def load_file(filename, *args, **kwargs):
            spy.reads[str(filename)] += 1
            return real_load_file(filename, *args, **kwargs)

        class Sha256:
            def __init__(self, data=b"", **kwargs):
                self._h = real_sha256(data, **kwargs)

            def update(self, data):
                self._h.update(data)

            def digest(self):
                return self._h.digest()

            def hexdigest(self):
                out = self._h.hexdigest()
                spy.digests[out] += 1
                return out

            def __getattr__(self, name):  # copy, name, digest_size...
                return getattr(self._h, name)

        for target in (builtins, io):
            monkeypatch.setattr(target, "open", open_)
        monkeypatch.setattr(ich.checkpoint, "load_file", load_file)
        monkeypatch.setattr(hashlib, "sha256", Sha256)

    def reads_of(self, model_id: str) -> int:
        """Reads of the pulled copy of one checkpoint (the pool's folder is <cache>/<model id>/...)."""
        return sum(n for path, n in self.reads.items() if model_id in Path(path).parts)


def _soups(mlflow_server, name: str) -> dict:
    return run_soups(SoupOptions(experiment=EXPERIMENT, tracking_uri=mlflow_server, bn="average", n_resamples=100,
                                 registered_model=f"{EXPERIMENT}-{name}"))


def _uses(summary: dict) -> Counter[str]:
    """How many soups offered each checkpoint (by model id) as an ingredient."""
    return Counter(i["model_id"] for soup in summary["soups"] for i in soup["ingredients"])


@pytest.mark.integration
def test_each_ingredient_file_is_read_once_and_hashed_once(mlflow_server, logged, monkeypatch):
    spy = Spy(monkeypatch)
    summary = _soups(mlflow_server, "once")
    uses = _uses(summary)
    assert set(uses) == set(logged.values()) and summary["skipped"] == []
    assert max(uses.values()) >= 3  # within, across-best/all, uniform and greedy: many uses of one file
    for sha, model_id in logged.items():
        assert spy.reads_of(model_id) == 1, f"{model_id} (used by {uses[model_id]} soups) read {spy.reads_of(model_id)}x"
        assert spy.digests[sha] == 1, f"{model_id} hashed {spy.digests[sha]} times"


def _copies(artifacts: Path) -> Counter[str]:
    """Weights files in the server's artifact store by the sha256 of their bytes: one per upload of those weights."""
    import ich.checkpoint
    return Counter(ich.checkpoint.sha256_file(f) for f in artifacts.rglob(WEIGHTS))


@pytest.mark.integration
def test_each_soup_is_uploaded_once_registration_included(mlflow_server, mlflow_server_handle, logged, tmp_path):
    """Issue 20's "each soup uploaded once": one `ich soup` adds each soup's weights to the artifact store once, the
    registered champion included (its version is the soup's own LoggedModel). CONTROL: logging the champion as a
    separate pyfunc model, as registration did before (soups.serve.log.log_pyfunc), adds a second copy and the
    count sees it."""
    import mlflow

    from soups.serve.log import log_pyfunc
    from soups.store import registry
    client = MlflowClient(mlflow_server)
    artifacts = Path(mlflow_server_handle.data_dir) / "mlflow" / "artifacts"
    before = _copies(artifacts)
    summary = _soups(mlflow_server, "uploads")
    added = _copies(artifacts) - before
    champion = summary["champion"]
    version = client.get_model_version(champion["registered_model"], champion["version"])
    assert version.source == f"models:/{champion['model_id']}"  # the registered version is the soup's record itself
    shas = {s["model_id"]: client.get_logged_model(s["model_id"]).tags[registry.TAG_SHA256] for s in summary["soups"]}
    assert len(shas) == len(summary["soups"]) >= 4 and champion["model_id"] in shas
    soups_of = Counter(shas.values())  # two recipes may land on the same weights: two soups, one upload each
    for model_id, sha in shas.items():
        assert added[sha] == soups_of[sha], f"soup {model_id}: {added[sha]} uploads for {soups_of[sha]} soups"

    record = registry.get_model_record(client, champion["model_id"])
    ckpt = registry.download_checkpoint(client, record, tmp_path)
    mlflow.set_tracking_uri(mlflow_server)
    with mlflow.start_run(run_id=champion["run_id"]):
        log_pyfunc(ckpt, name="pyfunc", example_pixels=None)
    sha = shas[champion["model_id"]]
    assert (_copies(artifacts) - before)[sha] == soups_of[sha] + 1  # CONTROL: a second upload is counted


@pytest.mark.integration
def test_control_the_spy_sees_second_reads_when_no_tensors_are_kept(mlflow_server, logged, monkeypatch):
    monkeypatch.setenv("ICH_SOUP_CACHE_MB", "0")
    spy = Spy(monkeypatch)
    summary = _soups(mlflow_server, "control")
    uses = _uses(summary)
    # Every soup that uses a checkpoint reads its file again (verified on pull, unchanged since: not hashed again).
    for sha, model_id in logged.items():
        assert spy.reads_of(model_id) > 1 and spy.reads_of(model_id) >= uses[model_id], (model_id, uses[model_id])
        assert spy.digests[sha] == 1
