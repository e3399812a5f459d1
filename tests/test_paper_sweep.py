"""Acceptance of issue 22, item 2: the paper's config runs as users run it, at a tiny scale.

`ich sweep --config sweeps/configs/paper-coatnet0.yaml --set ...` through the function the CLI calls, on the real
local Ray and the session's real `mlflow server`, on the digits data: one trial per seed of the grid, every paper
value not overridden reaches the trials, within-trajectory soups from the top-k pool, and the report's results
table has the per-architecture block.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "paper-coatnet0.yaml"
EXPERIMENT = "paper-accept"
# The scale of a CPU test: the tiny CoAtNet at 32 px, 3 epochs, two seeds, fp32, a short warm start for the
# offline init. Everything else is the paper's.
SETS = {"train.model": "coatnet_tiny_ich", "train.img_size": "32", "train.epochs": "3", "train.batch_size": "64",
        "train.accum_steps": "1", "train.amp": "off", "train.eval_batch_size": "256", "asha.grace_period": "3",
        "grid.seed": "[0, 1]", "init.weights": "null", "init.warm_start": "{epochs: 1}", "soups.k": "2",
        "soups.n_resamples": "100", "cpus_per_trial": "1", "gpus_per_trial": "0", "max_concurrent": "2"}


def test_paper_config_runs_as_a_grid_with_soups_and_report(ray_local, mlflow_server, mlflow_client, digits_dataset,
                                                           ich_home, tmp_path):
    import yaml
    from sweeps.job import parse_args, run_sweep
    argv = ["--config", str(CONFIG), "--data", str(digits_dataset), "--experiment", EXPERIMENT]
    for k, v in SETS.items():
        argv += ["--set", f"{k}={v}"]
    summary = run_sweep(parse_args(argv), ich_home)

    # One trial per seed, each a full trajectory (grace period = epochs: ASHA stopped none)
    trials = summary["trials"]
    assert sorted(t["config"]["seed"] for t in trials) == [0, 1], trials
    assert {(t["status"], t["epochs"]) for t in trials} == {("FINISHED", 3)}, trials
    sweep_run = mlflow_client.get_run(summary["parent_run_id"])
    assert ast.literal_eval(sweep_run.data.params["grid"]) == {"seed": [0, 1]}

    # Every value of the paper's train section that the test did not override reached each trial's run as it is
    # written in the YAML (read here with yaml, not with the code under test)
    paper = yaml.safe_load(CONFIG.read_text())["train"]
    kept = {k: v for k, v in paper.items() if f"train.{k}" not in SETS}
    assert {"lr", "weight_decay", "decay_norm_and_bias", "mixup", "cutmix", "rand_augment_magnitude",
            "restart_period", "color_jitter", "random_erasing", "eval_crop_pct"} <= set(kept)
    runs = [mlflow_client.get_run(t["run_id"]) for t in trials]
    for run in runs:
        params = run.data.params
        assert params["model"] == "coatnet_tiny_ich" and params["epochs"] == "3" and params["amp"] == "off"
        for k, v in kept.items():
            got = params[k]
            if isinstance(v, bool):
                assert got == str(v), (k, got, v)
            elif isinstance(v, (int, float)) or _is_number(v):
                assert float(got) == float(v), (k, got, v)
            else:
                assert got == str(v), (k, got, v)

    # The paper's eval preprocessing (init.preprocess) travels in every checkpoint, not the dataset's defaults
    from soups.store.registry import download_checkpoint, search_checkpoints
    records = search_checkpoints(mlflow_client, [summary["experiment_id"]], sweep="paper-coatnet0")
    assert len(records) == 2 * 3  # one per trial and epoch
    meta = json.loads((download_checkpoint(mlflow_client, records[0], tmp_path) / "checkpoint.json").read_text())
    want = yaml.safe_load(CONFIG.read_text())["init"]["preprocess"]
    assert {k: meta["preprocess"][k] for k in want} == want, meta["preprocess"]
    assert meta["preprocess"]["source"].endswith("+ init.preprocess"), meta["preprocess"]  # the config's, applied

    # Soups within each trajectory, from the top-2 of its 3 checkpoints
    soups = summary["soups"]["soups"]
    # recipe all: the paper's two, model_stock and wise_ft (the warm start is logged as the sweep's init, their
    # anchor) and learned
    assert {(s["scope"], s["recipe"]) for s in soups} == {("within", "uniform"), ("within", "greedy"),
                                                          ("within", "model_stock"), ("within", "wise_ft"),
                                                          ("within", "learned")}, soups
    assert {s["trial"] for s in soups} == {t["trial"] for t in trials}
    for s in soups:
        assert s["pool"] == {"rule": "top_k:2", "size": 2, "family_size": 3}, s["pool"]
        assert len(s["ingredients"]) == 2

    # The report's results table: the per-architecture block of the swept CoAtNet (best single, uniform, greedy)
    out = ich_home / "reports" / EXPERIMENT
    rows = json.loads((out / "results.json").read_text())["rows"]
    kinds = {(r.get("kind"), r.get("recipe")) for r in rows if r.get("block") == "coatnet_tiny_ich"}
    assert {("single", None), ("soup", "uniform"), ("soup", "greedy")} <= kinds, kinds
    assert "CoAtNet-tiny" in (out / "results.md").read_text()


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True
