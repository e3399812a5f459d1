"""Metrics are data (issue 20, item 4): a metric registered in one place (here, from this test module: balanced
error, lower is better, with a bootstrap interval) reaches the bootstrap, a soup's val and test figures on its run and
LoggedModel (the real orchestrator against a real MLflow server) and the report's table; and the direction a metric
declares (log loss: lower is better) is the one selection follows.

The orchestrator (serial) and the report run in this process: a registry entry made here is not in Ray workers. The
sweep: 2 trials x 3 epochs of the tiny CoAtNet, a seeded init plus seeded perturbations (no training: seconds, not
minutes), each checkpoint evaluated by ich's Trainer and logged as the trainable logs it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ich.metrics import METRICS, Metric, classification_metrics, get_metric, register

EXPERIMENT = "metric-registry"
ARCHITECTURE = "coatnet_tiny_ich"
IMG_SIZE = 32
TRIALS, EPOCHS = ("t0", "t1"), 3
INIT_FINGERPRINT = "metric-registry-init-seed-0"


def balanced_error(cm: np.ndarray) -> np.ndarray:
    """(R, K, K) -> (R,): 1 - the mean recall over the classes present in the truth (1 - scikit-learn's
    balanced_accuracy_score)."""
    actual = cm.sum(axis=2)
    seen = actual > 0
    recall = np.diagonal(cm, axis1=1, axis2=2) / np.maximum(actual, 1)
    return 1.0 - (recall * seen).sum(axis=1) / np.maximum(seen.sum(axis=1), 1)


BALANCED_ERROR = Metric("balanced_error", higher_is_better=False, of_confusion=balanced_error, label="balanced error",
                        interval=True, short="BE")


@pytest.fixture(scope="module")
def registered():
    """The one place the new metric is added; taken out again after this module, so no other test sees it."""
    register(BALANCED_ERROR)
    yield BALANCED_ERROR
    METRICS.pop(BALANCED_ERROR.name, None)


# ---------------------------------------------------------------------------------------------- no server

def test_a_registered_metric_is_scored_and_bootstrapped_by_its_one_definition(registered):
    from sklearn.metrics import balanced_accuracy_score

    from soups.stats import bootstrap_ci, metric_on_resamples, paired_comparison, resample_indices

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(7), 30)
    pred = np.where(rng.random(len(y)) < 0.6, y, rng.integers(0, 7, len(y)))
    expected = 1.0 - balanced_accuracy_score(y, pred)
    assert get_metric("balanced_error").value(pred, y, 7) == pytest.approx(expected, abs=1e-12)
    assert classification_metrics(y, pred, 7)["balanced_error"] == pytest.approx(expected, abs=1e-12)
    # The bootstrap scores R resamples with the same function that scores one: each row equals the single score.
    idx = resample_indices(y, 50, np.random.default_rng(1), stratify=True)
    rows = metric_on_resamples(y, pred, idx, "balanced_error", 7)
    assert [float(v) for v in rows] == [get_metric("balanced_error").value(pred[i], y[i], 7) for i in idx]
    ci = bootstrap_ci(y, pred, "balanced_error", n_resamples=200, num_classes=7)
    assert ci.point == pytest.approx(expected, abs=1e-12) and ci.low < ci.point < ci.high
    out = paired_comparison(y, y, pred, n_resamples=200, num_classes=7)
    assert out["be_diff"] == pytest.approx(-expected, abs=1e-12) and out["be_diff_high"] < 0  # the truth errs less
    # Control: a name nobody registered is refused by the same path.
    with pytest.raises(ValueError, match="metric must be one of .*balanced_error.*, got 'top2'"):
        bootstrap_ci(y, pred, "top2")


def test_directions_come_from_the_registry():
    from soups.pool import best_first

    scores = {"a": 0.2, "b": 0.9, "c": 0.5}
    assert best_first(scores, "loss", score=scores.get) == ["a", "c", "b"]  # lower is better
    assert best_first(scores, "accuracy", score=scores.get) == ["b", "c", "a"]  # control: higher is better
    assert not get_metric("loss").higher_is_better and get_metric("macro_f1").higher_is_better


# ---------------------------------------------------------------------------------------------- the sweep

def log_sweep(client, dataset_folder, workdir) -> dict[str, dict]:
    """The sweep in MLflow (sweep run, trial runs, one checkpoint per epoch with ich's val metrics); returns each
    checkpoint's val metrics by model id. The one place that calls the checkpoint-writing API."""
    import torch

    from ich.checkpoint import CheckpointMeta, save_checkpoint
    from ich.data import load_dataset
    from ich.models import create_model
    from ich.train import TrainConfig, Trainer
    from soups.store import registry

    data = load_dataset(dataset_folder)
    torch.manual_seed(0)
    init = create_model(ARCHITECTURE, data.num_classes, IMG_SIZE).state_dict()
    trainer = Trainer(TrainConfig(model=ARCHITECTURE, img_size=IMG_SIZE, eval_crop_pct=1.0, device="cpu"), data,
                      init_state=init, init_fingerprint=INIT_FINGERPRINT)

    def weights(trial: int, epoch: int) -> dict:
        """The init moved along the trial's own direction (less each epoch), plus a little noise per epoch."""
        away = torch.Generator().manual_seed(1000 + trial)
        noise = torch.Generator().manual_seed(100 * trial + epoch)
        out = {}
        for k, v in init.items():
            if not v.is_floating_point() or v.numel() < 2:
                out[k] = v.clone()
                continue
            scale = v.abs().mean() + 1e-3
            out[k] = v + scale * (0.3 / epoch * torch.randn(v.shape, generator=away)
                                  + 0.05 * torch.randn(v.shape, generator=noise))
        return out

    experiment_id = registry.get_or_create_experiment(client, EXPERIMENT)
    sweep_run = client.create_run(experiment_id, run_name=EXPERIMENT, tags={
        "ich.kind": "sweep", "ich.sweep": EXPERIMENT, "ich.data": str(dataset_folder)})
    logged = {}
    for t, trial in enumerate(TRIALS):
        run_id = client.create_run(experiment_id, run_name=trial, tags={
            "ich.kind": "trial", "ich.sweep": EXPERIMENT, "ich.trial": trial,
            "mlflow.parentRunId": sweep_run.info.run_id}).info.run_id
        for epoch in range(1, EPOCHS + 1):
            w = weights(t, epoch)
            trainer.model.load_state_dict(w)
            metrics = {k: float(v) for k, v in trainer.evaluate("val").items()}
            meta = CheckpointMeta(architecture=ARCHITECTURE, img_size=IMG_SIZE, num_classes=data.num_classes,
                                  class_names=data.classes, dataset_fingerprint=data.fingerprint,
                                  init_fingerprint=INIT_FINGERPRINT, epoch=epoch, metrics=metrics,
                                  extra={"sweep": EXPERIMENT, "trial": trial}, preprocess=trainer.preprocess)
            folder = workdir / trial / f"e{epoch:03d}"
            save_checkpoint(folder, w, meta)
            model_id = registry.log_checkpoint(client, (experiment_id, run_id), folder)
            logged[model_id] = metrics
        client.set_terminated(run_id, "FINISHED")
    client.set_terminated(sweep_run.info.run_id, "FINISHED")
    return logged


@pytest.fixture(scope="module")
def sweep(registered, mlflow_server, digits_dataset, ich_home, tmp_path_factory):
    from mlflow import MlflowClient

    from soups.orchestrate import SoupOptions, run_soups

    client = MlflowClient(mlflow_server)
    checkpoints = log_sweep(client, digits_dataset, tmp_path_factory.mktemp("metric-registry"))
    by_f1 = run_soups(SoupOptions(experiment=EXPERIMENT, tracking_uri=mlflow_server, n_resamples=100,
                                  registered_model=f"{EXPERIMENT}-f1"))
    return {"client": client, "checkpoints": checkpoints, "by_f1": by_f1}


@pytest.mark.integration
def test_a_registered_metric_is_in_every_soups_figures_run_and_logged_model(sweep):
    client, soups = sweep["client"], sweep["by_f1"]["soups"]
    assert soups and all(len(s["ingredients"]) >= 2 for s in soups)
    assert all("val_balanced_error" in m for m in sweep["checkpoints"].values())  # ich's evaluation: the trainer's
    for s in soups:
        for split in ("val", "test"):
            figures = s[split]
            # digits' val and test hold every class, so macro recall averages the classes of the truth: 1 - it.
            assert figures["balanced_error"] == pytest.approx(1.0 - figures["macro_recall"], abs=1e-12)
            for ref in ("best_single", "uniform", "soft_vote"):
                assert "balanced_error" in s[ref][split]
        low, high = s["test"]["balanced_error_ci"]
        assert low <= s["test"]["balanced_error"] <= high
        vs = s["vs_best_single"]
        assert vs["be_diff_low"] <= vs["be_diff"] <= vs["be_diff_high"]

        run = client.get_run(s["run_id"]).data.metrics
        assert run["val_balanced_error"] == pytest.approx(s["val"]["balanced_error"])
        assert run["test_balanced_error"] == pytest.approx(s["test"]["balanced_error"])
        assert (run["test_balanced_error_low"], run["test_balanced_error_high"]) == pytest.approx((low, high))
        assert run["vs_best_be_diff"] == pytest.approx(vs["be_diff"])
        assert run["best_single_val_balanced_error"] == pytest.approx(s["best_single"]["val"]["balanced_error"])
        model = {m.key: m.value for m in client.get_logged_model(s["model_id"]).metrics or []}
        assert model["val_balanced_error"] == pytest.approx(s["val"]["balanced_error"])
        # Control: the figures a soup always had are there beside it, under their names of before.
        assert {"val_macro_f1", "val_loss", "test_accuracy_low", "vs_best_acc_diff", "vs_best_f1_diff"} <= set(run)
    champion = sweep["by_f1"]["champion"]
    tags = client.get_model_version(champion["registered_model"], champion["version"]).tags
    best = next(s for s in soups if s["name"] == champion["soup"])
    assert float(tags["ich.val_balanced_error"]) == pytest.approx(best["val"]["balanced_error"])


@pytest.mark.integration
def test_a_registered_metric_is_a_column_of_the_report(sweep, mlflow_server, tmp_path):
    from soups.report.build import build_report

    out = tmp_path / "report"
    summary = build_report(EXPERIMENT, str(out), tracking_uri=mlflow_server, n_resamples=100)
    orchestrated = {s["model_id"]: s for s in sweep["by_f1"]["soups"]}
    rows = summary["table"]
    assert rows
    for row in rows:
        low, high = row["balanced_error_ci"]
        assert low <= row["balanced_error"] <= high
        assert row["balanced_error"] == pytest.approx(1.0 - row["macro_recall"], abs=1e-12)
        if row.get("model_id") in orchestrated:  # a soup row: the orchestrator's own test figure
            assert row["balanced_error"] == pytest.approx(orchestrated[row["model_id"]]["test"]["balanced_error"])
        if row["vs_best_single"] is not None:
            assert "be_diff" in row["vs_best_single"]
    assert any(r["kind"] == "soup" for r in rows)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "balanced error % [95% CI]" in md and "ΔBE [95% CI]" in md
    assert "accuracy % [95% CI]" in md and "Δacc vs best single [95% CI]" in md  # control: the columns of before
    assert json.loads((out / "results.json").read_text())["rows"][0]["balanced_error"] == rows[0]["balanced_error"]


@pytest.mark.integration
def test_log_loss_selects_lowest_first(sweep, mlflow_server):
    """Selection by log loss: ingredients best (lowest) first, greedy keeps what lowers val loss, the champion
    candidate is the soup of lowest val loss. Control: by macro F1 (the first run), the highest comes first."""
    from soups.orchestrate import SoupOptions, run_soups

    checkpoints = sweep["checkpoints"]
    by_loss = run_soups(SoupOptions(experiment=EXPERIMENT, tracking_uri=mlflow_server, n_resamples=100,
                                    scope="within", metric="loss", registered_model=f"{EXPERIMENT}-loss"))
    assert by_loss["metric"] == "loss" and by_loss["soups"]
    for s in by_loss["soups"]:
        scores = [i["val_score"] for i in s["ingredients"]]
        assert scores == [checkpoints[i["model_id"]]["val_loss"] for i in s["ingredients"]]
        assert scores == sorted(scores) and scores[0] < scores[-1]  # lowest first
        if s["recipe"] == "greedy":
            best = s["ingredients"][0]["candidate_val"]
            for i in s["ingredients"][1:]:
                assert i["accepted"] == (i["candidate_val"] - 1e-7 < best), i  # tie rule accept, mirrored
                best = i["candidate_val"] if i["accepted"] else best
            if s["bn_mode"] == "average":  # the soup greedy scored (recalibrated BN would score anew)
                assert s["val"]["loss"] == pytest.approx(best)
    lowest = min(by_loss["soups"], key=lambda s: s["val"]["loss"])
    assert by_loss["champion"]["soup"] == lowest["name"]

    for s in sweep["by_f1"]["soups"]:  # control: the same checkpoints ranked by macro F1, highest first
        scores = [i["val_score"] for i in s["ingredients"]]
        assert scores == sorted(scores, reverse=True)
