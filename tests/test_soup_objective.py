"""`objective: trajectory_soup` (issue 14, item 2): each epoch a trial reports its running uniform soup's
val_soup_<metric>, and that is what Optuna and ASHA rank by. Real Ray + MLflow for the sweep."""
from __future__ import annotations

import math

import optuna
import pytest
import torch

from ich.checkpoint import CheckpointError, load_checkpoint
from ich.data import load_dataset
from ich.errors import ConfigError
from soups import registry
from soups.average import RunningSum, uniform_soup
from soups.evaluate import EvalSpec, Evaluator
from sweeps.config import SweepConfig, load_config
from sweeps.soup_objective import TrajectorySoup, objective_metric
from tests.fixtures_sweep import sweep_args, write_sweep_config


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g).half(),
            "n": torch.tensor(seed, dtype=torch.int64)}


def test_running_sum_restored_goes_on_bitwise():
    full, half = RunningSum(threads=1), RunningSum(threads=1)
    for i in range(4):
        full.add(_sd(i))
        if i < 2:
            half.add(_sd(i))
    restored = RunningSum.restore(*half.export())
    for i in range(2, 4):
        restored.add(_sd(i))
    a, b = full.mean(), restored.mean()
    assert restored.count == 4 and set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="do not fit"):
        RunningSum.restore(half.export()[0], {"w": "float32"}, 2)


def test_trajectory_soup_saved_and_loaded(tmp_path):
    class FakeTrainer:  # save/load touch neither the model nor the data
        pass
    soup = TrajectorySoup(FakeTrainer())
    soup.add(_sd(0), 1)
    soup.add(_sd(1), 2)
    soup.save(tmp_path)
    again = TrajectorySoup(FakeTrainer())
    assert again.load(tmp_path) and again.epochs == [1, 2]
    expected = uniform_soup([_sd(0), _sd(1)])
    assert all(torch.equal(again.state_dict()[k], expected[k]) for k in expected)
    assert not TrajectorySoup(FakeTrainer()).load(tmp_path / "none")
    (tmp_path / "soup_sum.json").write_text("{}")
    with pytest.raises(CheckpointError, match="soup_sum.safetensors: cannot restore"):
        again.load(tmp_path)


def test_objective_config(tmp_path):
    assert SweepConfig().objective == "single" and SweepConfig().tune_metric == "val_macro_f1"
    assert objective_metric("val_accuracy", "trajectory_soup") == "val_soup_accuracy"
    cfg = load_config(write_sweep_config(tmp_path, "obj-ok", **{"mode: max\n": "mode: max\nobjective: trajectory_soup\n"}))
    assert cfg.tune_metric == "val_soup_macro_f1"
    bad = write_sweep_config(tmp_path, "obj-bad", **{"mode: max\n": "mode: max\nobjective: soup\n"})
    with pytest.raises(ConfigError, match=r"obj-bad.yaml: objective must be single or trajectory_soup, not 'soup'"):
        load_config(bad)


def test_trajectory_soup_sweep_reports_and_selects_on_the_soup(ray_local, mlflow_client, digits_dataset, ich_home,
                                                                tmp_path):
    from sweeps.coatnet import run_sweep
    config = write_sweep_config(ich_home, "soup-objective", **{
        "mode: max\n": "mode: max\nobjective: trajectory_soup\nsoup_so_far: true\n", "num_samples: 4": "num_samples: 2",
        "epochs: 3": "epochs: 2", "warm_start: {epochs: 4": "warm_start: {epochs: 2"})
    summary = run_sweep(sweep_args(config, digits_dataset), ich_home)
    rows = summary["trials"]
    assert len(rows) == 2 and all(r["status"] in ("FINISHED", "KILLED") for r in rows)

    # Optuna ranked the trials by the soup: each trial's value is its last val_soup_macro_f1.
    study = optuna.load_study(study_name="soup-objective", storage=f"sqlite:///{ich_home / 'optuna.db'}")
    values = sorted(t.value for t in study.trials if t.value is not None)
    assert values == pytest.approx(sorted(r["val_soup_macro_f1"] for r in rows), abs=1e-12)

    exp = mlflow_client.get_experiment_by_name("soup-objective").experiment_id
    records = registry.search_checkpoints(mlflow_client, [exp], sweep="soup-objective")

    # The soup so far (item 1): one step per trial done, never worse, the first is one trial's best checkpoint.
    so_far = sorted(mlflow_client.get_metric_history(summary["parent_run_id"], "soup_so_far_val_macro_f1"),
                    key=lambda m: m.step)
    sizes = sorted(mlflow_client.get_metric_history(summary["parent_run_id"], "soup_so_far_size"), key=lambda m: m.step)
    assert [m.step for m in so_far] == [1, 2] and [m.step for m in sizes] == [1, 2]
    assert sizes[0].value == 1 and sizes[1].value in (1, 2) and so_far[1].value >= so_far[0].value - 1e-7
    bests = [max(r.metrics["val_macro_f1"] for r in records if r.trial == row["trial"]) for row in rows]
    assert any(math.isclose(so_far[0].value, b, abs_tol=1e-9) for b in bests), (so_far[0].value, bests)
    for row in rows:
        mine = sorted((r for r in records if r.trial == row["trial"]), key=lambda r: r.epoch)
        history = sorted(mlflow_client.get_metric_history(row["run_id"], "val_soup_macro_f1"), key=lambda m: m.step)
        assert [m.step for m in history] == [r.epoch for r in mine] and len(mine) == row["epochs"] >= 1
        # epoch 1: the soup of one checkpoint is that checkpoint
        assert history[0].value == pytest.approx(mine[0].metrics["val_macro_f1"], abs=1e-12)
        # every epoch: the soup equals a post-hoc uniform soup of the trial's checkpoints so far
        folders = [registry.download_checkpoint(mlflow_client, r, tmp_path / row["trial"]) for r in mine]
        weights = [load_checkpoint(f, expected_sha256=r.sha256) for f, r in zip(folders, mine)]
        ev = Evaluator(load_dataset(digits_dataset), EvalSpec.of(weights[0][1]), device="cpu")
        for n, m in enumerate(history, start=1):
            score = ev.score(ev.logits(uniform_soup([w for w, _ in weights[:n]]), "val"), "val", "macro_f1")
            assert math.isclose(score, m.value, abs_tol=1e-9), (row["trial"], n, score, m.value)
