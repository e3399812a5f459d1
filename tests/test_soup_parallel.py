"""Soup families as Ray tasks (issue 14, item 3): `ich soup --parallel N` builds the same soups as the serial
path, same ingredients and weights bitwise equal. Real Ray + MLflow; no sweep of its own: the first two epochs'
checkpoints (trained weights) of the two trials of the session's tiny sweep with the most checkpoints, and its
logged init, copied into an experiment of their own (as tests/test_report_reuse.py does), so nobody else's view of
`tiny-sweep` changes."""
from __future__ import annotations

import re

import pytest
import torch

from ich.checkpoint import load_checkpoint
from ich.errors import ConfigError
from soups import recipes
from soups.store import registry
from soups.orchestrate import SoupError, SoupOptions, run_soups
from sweeps.config import load_config
from tests.fixtures_sweep import write_sweep_config
from tests.logged_sweep import copy_sweep

EXPERIMENT = "soup-parallel"


def test_parallel_option_is_checked(tmp_path):
    with pytest.raises(SoupError, match="parallel=0: must be a whole number >= 1"):
        SoupOptions(experiment="x", parallel=0).validate()
    bad = write_sweep_config(tmp_path, "par-bad", **{"init:\n": "soups:\n  parallel: 0\ninit:\n"})
    with pytest.raises(ConfigError, match=r"par-bad.yaml: soups.parallel must be a whole number >= 1, not 0"):
        load_config(bad)
    good = write_sweep_config(tmp_path, "par-ok", **{"init:\n": "soups:\n  parallel: 3\ninit:\n"})
    assert load_config(good).soups.parallel == 3


@pytest.fixture(scope="module")
def small_sweep(tiny_sweep, ray_local, mlflow_server, tmp_path_factory) -> dict:
    """The tiny sweep's two trials with the most checkpoints (ties: the trial's name), the checkpoints of their
    first two epochs with their val metrics (the trajectories a 2-epoch sweep records; the soups' cost of the
    2 x 2-epoch sweep this test ran before), and the sweep's init (the anchor of model_stock and wise_ft), logged
    again under EXPERIMENT as a sweep logs them. ASHA decided how many epochs each trial has: the test counts from
    this record. Returns the tracking URI and {trial: number of checkpoints copied}."""
    from mlflow import MlflowClient
    client = MlflowClient(mlflow_server)
    records = registry.search_checkpoints(client, [tiny_sweep["experiment_id"]], sweep=tiny_sweep["experiment"])
    epochs = {t: sum(r.trial == t for r in records) for t in {r.trial for r in records}}
    trials = sorted(epochs, key=lambda t: (-epochs[t], t))[:2]
    copied = copy_sweep(client, tiny_sweep, EXPERIMENT, tmp_path_factory.mktemp("soup-parallel-pulled"), init=True,
                        keep=lambda r: r.trial in trials and r.epoch <= 2)
    copied.finish(client)
    return {"uri": mlflow_server, "epochs": {t: sum(r.trial == t for r in copied.records) for t in trials}}


def _weights(client, model_id: str, folder) -> dict[str, torch.Tensor]:
    record = registry.get_model_record(client, model_id)
    state_dict, _ = load_checkpoint(registry.download_checkpoint(client, record, folder), expected_sha256=record.sha256)
    return state_dict


def test_parallel_and_serial_soups_are_identical(small_sweep, mlflow_client, tmp_path):
    common = dict(experiment=EXPERIMENT, tracking_uri=small_sweep["uri"], n_resamples=100, device="cpu")
    serial = run_soups(SoupOptions(**common, registered_model="par-serial"))
    parallel = run_soups(SoupOptions(**common, registered_model="par-parallel", parallel=2))

    names = [s["name"] for s in serial["soups"]]
    assert names == [s["name"] for s in parallel["soups"]]
    # every recipe per trial with 2 checkpoints (counted from the record: ASHA decided; the first trial at each rung goes
    # on, so one trial has them), the sweep's warm start logged as the init, so model_stock and wise_ft are cooked,
    # in the Ray tasks too; across both trials' bests as well
    souped = sorted(t for t, n in small_sweep["epochs"].items() if n == 2)
    assert len(small_sweep["epochs"]) == 2 and souped
    assert sorted(n for n in names if n.startswith("within-")) == sorted(
        f"within-{t}-{r}" for t in souped for r in recipes.names())  # every registered recipe
    assert "across-all-greedy" in names
    assert sorted(n for n in names if n.endswith(("-model_stock", "-wise_ft")) and not n.startswith("within-")) == [
        "across-best-model_stock", "across-best-wise_ft"]
    note = [n for n in parallel["notes"] if "Ray tasks" in n]
    families = len(souped) + 2  # each souped trial, across-best, across-all
    assert len(note) == 1 and re.match(rf"{families} soup families built as Ray tasks, up to 2 at once", note[0]), note
    assert not any("Ray tasks" in n for n in serial["notes"])
    for a, b in zip(serial["soups"], parallel["soups"]):
        assert a["ingredients"] == b["ingredients"] and a["bn_mode"] == b["bn_mode"], a["name"]
        # the learned soup's gradient steps round differently in a Ray task's process (CPU kernels chosen for its
        # thread layout): equal to float32 rounding there, bitwise for every other recipe
        fitted = a["recipe"] == "learned"
        if fitted:
            for split in ("val", "test"):
                assert a[split].keys() == b[split].keys(), a["name"]
                for k, v in a[split].items():
                    assert v == pytest.approx(b[split][k], rel=1e-5), (a["name"], split, k)
        else:
            assert a["val"] == b["val"] and a["test"] == b["test"], a["name"]
        assert a["model_id"] != b["model_id"]  # two separate soups, logged twice
        wa = _weights(mlflow_client, a["model_id"], tmp_path / "serial")
        wb = _weights(mlflow_client, b["model_id"], tmp_path / "parallel")
        assert set(wa) == set(wb)
        for k in wa:
            same = torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) if fitted and wa[k].is_floating_point() \
                else torch.equal(wa[k], wb[k])
            assert wa[k].dtype == wb[k].dtype and same, (a["name"], k)
