"""Soup families as Ray tasks (issue 14, item 3): `ich soup --parallel N` builds the same soups as the serial
path, same ingredients and weights bitwise equal. Real Ray + MLflow, a tiny sweep of its own."""
from __future__ import annotations

import re

import pytest
import torch

from ich.checkpoint import load_checkpoint
from ich.errors import ConfigError
from soups.store import registry
from soups.orchestrate import SoupError, SoupOptions, run_soups
from sweeps.config import load_config
from tests.fixtures_sweep import sweep_args, write_sweep_config

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
def small_sweep(ray_local, mlflow_server, digits_dataset, ich_home):
    from sweeps.job import run_sweep
    config = write_sweep_config(ich_home, EXPERIMENT, **{
        "num_samples: 4": "num_samples: 2", "epochs: 3": "epochs: 2", "warm_start: {epochs: 4": "warm_start: {epochs: 2",
        "grace_period: 1": "grace_period: 2"})  # no ASHA stop: both trials give a within soup
    run_sweep(sweep_args(config, digits_dataset), ich_home)
    return mlflow_server


def _weights(client, model_id: str, folder) -> dict[str, torch.Tensor]:
    record = registry.get_model_record(client, model_id)
    state_dict, _ = load_checkpoint(registry.download_checkpoint(client, record, folder), expected_sha256=record.sha256)
    return state_dict


def test_parallel_and_serial_soups_are_identical(small_sweep, mlflow_client, tmp_path):
    common = dict(experiment=EXPERIMENT, tracking_uri=small_sweep, n_resamples=100, device="cpu")
    serial = run_soups(SoupOptions(**common, registered_model="par-serial"))
    parallel = run_soups(SoupOptions(**common, registered_model="par-parallel", parallel=2))

    names = [s["name"] for s in serial["soups"]]
    assert names == [s["name"] for s in parallel["soups"]]
    # 2 trials x 5 recipes: the sweep's warm start is logged as its init, so model_stock and wise_ft are cooked, in
    # the Ray tasks too
    assert sum(n.startswith("within-") for n in names) == 10 and "across-all-greedy" in names
    assert sorted(n for n in names if n.endswith(("-model_stock", "-wise_ft")) and not n.startswith("within-")) == [
        "across-best-model_stock", "across-best-wise_ft"]
    note = [n for n in parallel["notes"] if "Ray tasks" in n]
    assert len(note) == 1 and re.match(r"4 soup families built as Ray tasks, up to 2 at once", note[0]), note
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
