"""The report end to end: the tiny CoAtNet sweep (copied into its own experiment, so other modules' view of
`tiny-sweep` stays as it was), a tiny baseline sweep through the same entry, a second CoAtNet architecture (two
short trials trained here, logged as the sweep logs checkpoints), soups from the orchestrator, then `build_report`
from MLflow records alone. Plus cheap unit checks of the pieces. Real MLflow, real Ray; no mocks.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.fixtures_sweep import sweep_args
from tests.logged_sweep import copy_sweep

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "report-sweep"  # the tiny sweep's checkpoints, the baselines and the soups, all in one experiment
REGISTERED = "report-sweep-champions"
SHALLOW = "coatnet_shallow_ich"  # a second CoAtNet architecture (registered below): the table's second block
PNGS = ("forest.png", "val_test.png", "learning_curves.png", "optuna_history.png", "optuna_importances.png", "mds.png",
        "bias_variance.png", "champion.png")


# ---------------------------------------------------------------------------------------------- unit checks

def test_baseline_configs_load_and_their_seeds_give_every_family_a_trial():
    """The seeded TPE start hands each family a trial (CPU: 3 of 3, GPU: 2 of 6 each; the test's 2-trial CPU
    variant: two families), so a baseline sweep always fills the table's rows."""
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    from ich.models import family
    from sweeps.config import load_config, tune_space

    for name, n, expected in (("baselines-cpu", 3, {"resnet": 1, "densenet": 1, "vit": 1}),
                              ("baselines-cpu", 2, {"resnet": 1, "densenet": 1}),
                              ("baselines-gpu", 6, {"resnet": 2, "densenet": 2, "vit": 2})):
        cfg = load_config(ROOT / "sweeps" / "configs" / f"{name}.yaml")
        assert cfg.sweep and cfg.sweep != cfg.experiment and cfg.max_epochs == cfg.asha.grace_period
        assert cfg.soups.registered_model and not cfg.soups.registered_model.startswith(f"{cfg.experiment}-soup")
        searcher = OptunaSearch(metric=cfg.metric, mode=cfg.mode, sampler=TPESampler(seed=cfg.seed))
        searcher.set_search_properties(cfg.metric, cfg.mode, tune_space(cfg))
        models = [searcher.suggest(f"t{i}")["model"] for i in range(n)]
        assert Counter(family(m) for m in models) == expected, (name, models)
    gpu = load_config(ROOT / "sweeps" / "configs" / "baselines-gpu.yaml")
    assert set(gpu.search["model"]["choice"]) == {"resnet50", "densenet121", "vit_base_patch16_224"}
    assert (gpu.train["img_size"], gpu.train["lr"], gpu.train["restart_period"]) == (224, 1e-4, 3)


def test_selection_rows_and_tables_without_mlflow(tmp_path):
    from soups.plots import plot_bias_variance, plot_champion, plot_mds
    from soups.store.registry import CheckpointRecord
    from soups.report.sections import md_table, table_lines, table_row
    from soups.report.snapshot import Candidate, _best

    def cand(trial, epoch, score):
        return Candidate(CheckpointRecord(f"m-{trial}{epoch}", "r", "1", "n", "s", trial, epoch, "sha", "d", "i",
                                          "coatnet_tiny_ich"), "checkpoint", score)

    cands = [cand("b", 2, 0.9), cand("a", 3, 0.9), cand("a", 1, 0.5)]
    assert _best(cands, "macro_f1").id == "m-a3"  # ties: the earlier trial
    assert _best(cands, "loss").id == "m-a1"  # lower is better
    assert _best([], "accuracy") is None

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    good = np.eye(4)[np.where(rng.random(300) < 0.8, y, (y + 1) % 4)] * 3
    bad = np.eye(4)[np.where(rng.random(300) < 0.6, y, (y + 1) % 4)] * 3
    ref = table_row("best_single", "single", "single", bad, y, 4, n_resamples=200)
    row = table_row("soup", "soup | x", "soup", good, y, 4, n_resamples=200, reference=bad)
    assert ref["vs_best_single"] is None
    for r in (ref, row):
        for m in ("accuracy", "macro_f1"):
            assert r[f"{m}_ci"][0] <= r[m] <= r[f"{m}_ci"][1]
    vs = row["vs_best_single"]
    assert vs["acc_diff"] == pytest.approx(row["accuracy"] - ref["accuracy"])
    assert vs["acc_diff_low"] > 0 and vs["mcnemar_p"] < 0.01  # 80% vs 60% on 300 images is no accident
    header, lines = table_lines([ref, row], "macro_f1")
    text = md_table(header, lines)
    assert text.count("\n") == 3 and "soup \\| x" in text  # a | in a label does not break the table

    points = [{"kind": k, "val_accuracy": 0.5, "epoch": 1} for k in ("ingredient", "ingredient", "greedy", "soft_vote")]
    groups = [{"label": g, "ce": {"bias2": 0.3, "variance": 0.1, "expected_loss": 0.4},
               "zero_one": {"bias": 0.1, "variance": 0.05, "net_variance": 0.04, "expected_loss": 0.14}}
              for g in ("single", "uniform")]
    for path in (plot_mds(tmp_path / "m.png", rng.random((4, 2)), points, "t"),
                 plot_bias_variance(tmp_path / "b.png", groups),
                 plot_champion(tmp_path / "c.png", np.eye(4, dtype=int) * 5, np.ones(4), list("abcd"), "t")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- end to end

def _copy_tiny_sweep(client, tiny_sweep, tmp: Path) -> dict:
    """The tiny sweep's checkpoints logged again (same weights, sha256, val metrics) under EXPERIMENT, its trial
    runs' final status (stopped by ASHA or not), and its Optuna study copied to a study named after EXPERIMENT.
    The sweep run also gets a soup-so-far series as a `soup_so_far: true` sweep records it (input of the report:
    the running best of the trials' best val, step = trials done)."""
    import optuna
    from mlflow.entities import Metric

    copied = copy_sweep(client, tiny_sweep, EXPERIMENT, tmp)  # the copies belong to this sweep, with val metrics
    records, runs, experiment_id = copied.records, copied.runs, copied.experiment_id
    status = {t["trial"]: t["status"] for t in tiny_sweep["trials"] if t["trial"] in runs}
    for trial, run_id in runs.items():
        client.set_tag(run_id, "ich.status", "stopped by ASHA" if status[trial] == "KILLED" else status[trial].lower())
    best = {}
    for r in records:
        best[r.trial] = max(best.get(r.trial, 0.0), r.metrics["val_macro_f1"])
    so_far = np.maximum.accumulate(list(best.values()))
    client.log_batch(copied.sweep_run_id, metrics=[Metric("soup_so_far_val_macro_f1", float(v), 0, i + 1)
                                                   for i, v in enumerate(so_far)])
    copied.finish(client, status)
    storage = f"sqlite:///{tiny_sweep['home'] / 'optuna.db'}"
    optuna.copy_study(from_study_name=tiny_sweep["experiment"], from_storage=storage, to_storage=storage,
                      to_study_name=EXPERIMENT)
    return {"experiment_id": experiment_id, "sweep_run_id": copied.sweep_run_id, "records": records,
            "status": status, "so_far": so_far.tolist(), "optuna_storage": storage}


def _register_shallow() -> None:
    """coatnet_tiny_ich with one block per stage, registered with timm as ich/models.py registers its own models
    (architecture only). In this process only: the report and the serial soups build it here, never on Ray."""
    import dataclasses

    import timm
    from timm.models import build_model_with_cfg, get_pretrained_cfg, maxxvit, register_model

    import ich.models  # noqa: F401  (registers coatnet_tiny_ich)

    if timm.is_model(SHALLOW):
        return
    from ich.checkpoint import ARCHITECTURES_ENV
    os.environ[ARCHITECTURES_ENV] = ",".join(filter(None, [os.environ.get(ARCHITECTURES_ENV), SHALLOW]))  # readable
    maxxvit.model_cfgs[SHALLOW] = dataclasses.replace(maxxvit.model_cfgs["coatnet_tiny_ich"], depths=(1, 1, 1, 1))

    def coatnet_shallow_ich(pretrained: bool = False, **kwargs):
        kwargs.setdefault("img_size", 32)
        kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or get_pretrained_cfg("coatnet_tiny_ich")  # no weights
        return build_model_with_cfg(maxxvit.MaxxVit, SHALLOW, pretrained=False, model_cfg=maxxvit.model_cfgs[SHALLOW],
                                    feature_cfg=dict(flatten_sequential=True), **kwargs)
    register_model(coatnet_shallow_ich)


def _log_shallow_trials(client, experiment_id: str, data_path: Path, tmp: Path) -> list:
    """Two trials x 2 epochs of the second architecture from one random init (so they soup), trained by ich's Trainer
    and logged as the sweep logs checkpoints (registry.log_checkpoint: LoggedModel, sha256, val metrics), in the
    report's sweep. Their runs are not children of the sweep run: its learning curves stay the tiny sweep's."""
    from ich.checkpoint import CheckpointMeta, save_checkpoint
    from ich.data import load_dataset
    from ich.train import TrainConfig, Trainer
    from soups.store import registry

    _register_shallow()
    data = load_dataset(data_path)
    for t in range(2):
        trial = f"shallow_{t}"
        cfg = TrainConfig(model=SHALLOW, img_size=32, epochs=2, lr=2e-3, seed=t, hflip=0.0, rand_augment_n=1,
                          random_erasing=0.0, scale_min=0.5, eval_crop_pct=1.0, device="cpu")
        trainer = Trainer(cfg, data)  # init_seed 0 in both trials: the same random init
        run_id = client.create_run(experiment_id, run_name=trial, tags={
            "ich.kind": "trial", "ich.sweep": EXPERIMENT, "ich.trial": trial}).info.run_id
        for r in trainer.fit():
            meta = CheckpointMeta(architecture=SHALLOW, img_size=cfg.img_size, num_classes=data.num_classes,
                                  class_names=data.classes, dataset_fingerprint=data.fingerprint,
                                  init_fingerprint=trainer.init_fingerprint, epoch=r.epoch,
                                  metrics={k: float(v) for k, v in r.metrics.items() if k.startswith("val_")},
                                  extra={"sweep": EXPERIMENT, "trial": trial}, preprocess=trainer.preprocess)
            folder = tmp / trial / f"e{r.epoch}"
            save_checkpoint(folder, r.weights(), meta)
            registry.log_checkpoint(client, (experiment_id, run_id), folder)
        client.set_terminated(run_id, "FINISHED")
    return [r for r in registry.search_checkpoints(client, [experiment_id], sweep=EXPERIMENT) if r.architecture == SHALLOW]


@pytest.fixture(scope="module")
def report_setup(tiny_sweep, ray_local, mlflow_server, digits_dataset, ich_home, tmp_path_factory):
    from mlflow import MlflowClient

    from soups.orchestrate import SoupOptions, run_soups
    from sweeps.job import run_sweep

    tmp = tmp_path_factory.mktemp("report")
    client = MlflowClient(mlflow_server)
    copied = _copy_tiny_sweep(client, tiny_sweep, tmp / "pulled")

    # The baselines through the same entry, into the same experiment (--experiment), 2 trials x 2 epochs.
    cfg = yaml.safe_load((ROOT / "sweeps" / "configs" / "baselines-cpu.yaml").read_text())
    cfg["num_samples"], cfg["train"]["epochs"], cfg["asha"]["grace_period"] = 2, 2, 2
    cfg["init"]["warm_start"]["epochs"] = 1  # a warm start per model of the search (vit too): none need be good
    config = tmp / "baselines.yaml"
    config.write_text(yaml.safe_dump(cfg))
    baselines = run_sweep(sweep_args(config, digits_dataset, "--experiment", EXPERIMENT), ich_home)
    shallow = _log_shallow_trials(client, copied["experiment_id"], digits_dataset, tmp / "shallow")

    # Registered under a name of its own: the report must find the champion there, not under "<experiment>-soup".
    soups = run_soups(SoupOptions(experiment=EXPERIMENT, sweep=EXPERIMENT, tracking_uri=mlflow_server,
                                  n_resamples=200, registered_model=REGISTERED))
    return {**copied, "baselines": baselines, "shallow": shallow, "soups": soups, "client": client, "tmp": tmp}


@pytest.mark.integration
def test_report_table_figures_and_report_run_in_mlflow(report_setup, mlflow_server, digits_data, tmp_path):
    from ich.models import family
    from soups.report.build import build_report

    out = tmp_path / "report"
    summary = build_report(EXPERIMENT, str(out), tracking_uri=mlflow_server, n_resamples=200,
                           optuna_storage=report_setup["optuna_storage"])
    client = report_setup["client"]

    # The paper's table: the best of each baseline family, then one block per CoAtNet architecture (the tiny sweep's
    # and the second one logged above), each with its best single, uniform and greedy soups and soft voting.
    rows = {r["key"]: r for r in summary["table"]}
    from_disk = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in from_disk["rows"]] == list(rows) and from_disk["split"] == "test"
    trials_run = [t for t in report_setup["baselines"]["trials"]]
    families = {family(t["config"]["model"]) for t in trials_run}
    assert families == {"resnet", "densenet"}
    records = {"coatnet_tiny_ich": report_setup["records"], SHALLOW: report_setup["shallow"]}
    assert {r.architecture for r in report_setup["records"]} == {"coatnet_tiny_ich"} and len(records[SHALLOW]) == 4
    layout = ("single", "uniform_soup", "greedy_soup", "learned_soup", "uniform_vote", "greedy_vote", "learned_vote")
    assert [b["architecture"] for b in summary["blocks"]] == sorted(records)
    assert list(rows) == [f"baseline_{f}" for f in sorted(families)] + [
        f"{arch}_{k}" for arch in sorted(records) for k in layout], list(rows)

    def is_best(row: dict, candidates: list) -> bool:  # the best recorded val (the tiny sweep's copies have new ids)
        top = max(r.metrics["val_macro_f1"] for r in candidates)
        return row["val_score"] == pytest.approx(top) and (row["trial"], row["epoch"]) in {
            (r.trial, r.epoch) for r in candidates if r.metrics["val_macro_f1"] == top}

    for arch, mine in records.items():  # each block's best single: the best recorded val of its architecture
        assert is_best(rows[f"{arch}_single"], mine) and rows[f"{arch}_single"]["architecture"] == arch
    assert is_best(rows[summary["best_single"]], report_setup["records"] + report_setup["shallow"])
    n_test = len(digits_data.splits["test"])
    for row in rows.values():
        for m in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
            assert 0.0 <= row[m] <= 1.0
        for m in ("accuracy", "macro_f1"):
            low, high = row[f"{m}_ci"]
            assert low <= row[m] <= high
        vs = row["vs_best_single"]
        if row["kind"] in ("soup", "soft_vote"):
            assert vs["acc_diff_low"] <= vs["acc_diff"] <= vs["acc_diff_high"]
            assert vs["f1_diff_low"] <= vs["f1_diff"] <= vs["f1_diff_high"]
            assert 0.0 <= vs["mcnemar_p"] <= 1.0 and vs["mcnemar_b"] + vs["mcnemar_c"] <= n_test
            assert vs["acc_diff"] == pytest.approx(row["accuracy"] - rows[f"{row['block']}_single"]["accuracy"])
        else:
            assert vs is None
    soups = {s["model_id"]: s for s in report_setup["soups"]["soups"]}

    def arch_of(entry: dict) -> str:  # a soup's architecture: that of its ingredients' trials
        return SHALLOW if entry["ingredients"][0]["trial"].startswith("shallow_") else "coatnet_tiny_ich"

    accepted = {mid: [i["model_id"] for i in s["ingredients"] if i["accepted"]] for mid, s in soups.items()}
    for arch in records:
        # The block's soups compete by val: the within soups of its best single's trial (of the best souped trial
        # when that one has none) and the across-run soups.
        mine = [e for e in soups.values() if arch_of(e) == arch]
        within = [e for e in mine if e["scope"] == "within"]
        trial = rows[f"{arch}_single"]["trial"]
        if not any(e["trial"] == trial for e in within):
            trial = max(within, key=lambda e: e["val"]["macro_f1"])["trial"]
        for recipe in ("uniform", "greedy"):
            soup_row, vote_row = rows[f"{arch}_{recipe}_soup"], rows[f"{arch}_{recipe}_vote"]
            entry = soups[soup_row["model_id"]]
            competing = [e for e in mine if e["recipe"] == recipe and (e["scope"] == "across" or e["trial"] == trial)]
            assert entry in competing and entry["val"]["macro_f1"] == max(e["val"]["macro_f1"] for e in competing)
            # The soup's own test accuracy agrees with the orchestrator's, and voting uses exactly its ingredients.
            assert soup_row["accuracy"] == pytest.approx(entry["test"]["accuracy"])
            assert vote_row["ingredients"] == accepted[entry["model_id"]]
            assert vote_row["n_ingredients"] == len(accepted[entry["model_id"]]) == soup_row["n_ingredients"]

    # Every figure exists, is named by report.md and report.html, and the report run holds everything.
    pngs = set(PNGS)
    assert all((out / png).read_bytes()[:4] == b"\x89PNG" for png in pngs)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert set(re.findall(r"[\w.-]+\.png", md)) == pngs == {p.name for p in out.glob("*.png")}
    assert all(f'href="{png}"' in page for png in pngs) and page.count("data:image/png;base64,") == len(pngs)
    run = client.get_run(summary["run_id"])
    assert run.data.tags["ich.kind"] == "report" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == report_setup["sweep_run_id"]
    assert run.info.experiment_id == report_setup["experiment_id"]
    from soups.store import provenance  # the report run carries the code and packages that made it, as every run does
    assert run.data.tags["mlflow.source.name"] == "soups/report/build.py"
    assert run.data.tags["ich.source.hash"] == provenance.source_hash(ROOT)  # the code on disk, hashed now
    assert json.loads(run.data.tags["ich.env"]) == provenance.package_versions()
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert set(summary["files"]) <= artifacts and {"report.md", "report.html", "results.json", *pngs} <= artifacts
    assert run.data.metrics["best_single_test_accuracy"] == pytest.approx(rows[summary["best_single"]]["accuracy"])
    assert run.data.metrics[f"{SHALLOW}_single_test_accuracy"] == pytest.approx(rows[f"{SHALLOW}_single"]["accuracy"])

    # MDS on val (the paper's figure): the best soup's recorded ingredients, its block's greedy and uniform soups,
    # soft voting of those ingredients; distances symmetric with a zero diagonal.
    mds = summary["mds"]
    soup_rows = {r["model_id"]: r for r in summary["table"] if r["kind"] == "soup"}
    best_soup = soup_rows[mds["soup"]["model_id"]]  # one of the table's soups, the best by val
    assert best_soup["val_score"] == max(r["val_score"] for r in soup_rows.values())
    assert mds["ingredients"] == accepted[best_soup["model_id"]]
    points = {(p["kind"], p.get("model_id")) for p in mds["points"]}
    block = best_soup["block"]
    assert points == {("ingredient", i) for i in accepted[best_soup["model_id"]]} | {
        ("greedy", rows[f"{block}_greedy_soup"]["model_id"]), ("uniform", rows[f"{block}_uniform_soup"]["model_id"]),
        ("learned", rows[f"{block}_learned_soup"]["model_id"]), ("soft_vote", None)} and len(mds["points"]) == len(points)
    D = np.array(mds["matrix"])
    off = ~np.eye(len(D), dtype=bool)
    assert np.allclose(D, D.T) and np.all(np.diag(D) == 0) and np.all(D[off] >= 0) and D[off].max() > 0
    # Two points coincide only when they are the same weights (a greedy soup that kept one ingredient is that
    # ingredient; two recipes may land on the same soup; soft voting of one ingredient is that ingredient): a zero
    # off the diagonal is checked, not assumed away.
    sha = [client.get_logged_model(p["model_id"]).tags["ich.sha256"] if p.get("model_id") else None
           for p in mds["points"]]
    if len(mds["ingredients"]) == 1:
        sha = [client.get_logged_model(mds["ingredients"][0]).tags["ich.sha256"] if p["kind"] == "soft_vote" else h
               for p, h in zip(mds["points"], sha)]
    for i, j in zip(*np.nonzero(off & (D == 0))):
        assert sha[i] is not None and sha[i] == sha[j], (mds["points"][i], mds["points"][j])
    assert all(0 <= p["val_accuracy"] <= 1 and len(p["mds"]) == 2 for p in mds["points"])

    # The forest plot's numbers are the table's: every soup and soft-voting row, Δ accuracy and its paired CI.
    compared = [r for r in summary["table"] if r["vs_best_single"]]
    assert [f["key"] for f in summary["forest"]] == [r["key"] for r in compared] and len(compared) == 12  # 2 blocks x 3 recipes x (soup, vote)
    for f in summary["forest"]:
        vs = rows[f["key"]]["vs_best_single"]
        assert (f["delta"], f["lo"], f["hi"]) == (vs["acc_diff"], vs["acc_diff_low"], vs["acc_diff_high"])
        assert f"{100 * f['delta']:+.2f} [{100 * f['lo']:+.2f}, {100 * f['hi']:+.2f}]" in md

    # Val vs test: every checkpoint of the best soup's architecture, test accuracy as the table computes it.
    vt = summary["val_test"]
    assert vt["architecture"] == block and len(vt["checkpoints"]) == len(records[block])
    marked = {m["kind"]: m for m in vt["marked"]}
    assert marked["best_single"]["test"] == pytest.approx(rows[f"{block}_single"]["accuracy"])
    assert marked["greedy"]["test"] == pytest.approx(rows[f"{block}_greedy_soup"]["accuracy"])

    # Learning curves: one per trial run of the sweep run, its val curve as recorded, ASHA stops as Tune decided;
    # the soup-so-far history as the sweep run holds it.
    lc = summary["learning_curves"]
    status = report_setup["status"]
    assert {t["trial"] for t in lc["trials"]} == set(status) and lc["key"] == "val_macro_f1"
    for t in lc["trials"]:
        mine = sorted((r.epoch, r.metrics["val_macro_f1"]) for r in report_setup["records"] if r.trial == t["trial"])
        assert [tuple(h) for h in t["history"]] == [(e, pytest.approx(v)) for e, v in mine]
        assert (t["status"] == "stopped by ASHA") == (status[t["trial"]] == "KILLED")
    assert [v for _, v in lc["soup_so_far"]] == pytest.approx(report_setup["so_far"])
    assert len({t["label"] for t in lc["trials"]}) == len(status)  # labels unique

    # Optuna: the sweep's study (copied under this sweep's name) read from the database the test names.
    assert summary["optuna"]["study"] == EXPERIMENT and summary["optuna"]["trials"] >= len(status)
    assert summary["optuna"]["figures"] == ["optuna_history.png", "optuna_importances.png"]

    # The champion: the alias set by the orchestrator on the registered model it was given (found from the soup
    # run's ich.registered_model tag; nobody told the report the name).
    champion = summary["champion"]
    version = client.get_model_version_by_alias(REGISTERED, "champion")
    assert champion["model_id"] == version.tags["ich.soup_model_id"] and summary["registered_model"] == REGISTERED
    assert f"alias champion of {REGISTERED}" in champion["source"]
    cm = np.array(champion["confusion_matrix"])
    assert cm.sum() == n_test and len(champion["per_class"]) == digits_data.num_classes
    assert champion["metrics"]["accuracy"] == pytest.approx(np.trace(cm) / n_test)

    # A second report runs no model again (predictions cached per model id and split) and agrees.
    # Without the Optuna storage it has no Optuna figures and says why.
    again = build_report(EXPERIMENT, str(tmp_path / "again"), tracking_uri=mlflow_server, n_resamples=200)
    assert again["optuna"] is None and not (tmp_path / "again" / "optuna_history.png").exists()
    assert any(n.startswith("no Optuna figures: the study's storage is unknown") for n in again["notes"])
    assert again["counts"]["computed"] == 0 and again["counts"]["from_cache"] == summary["counts"]["computed"] + \
        summary["counts"]["from_cache"]
    assert [r["accuracy"] for r in again["table"]] == [r["accuracy"] for r in summary["table"]]
    assert again["run_id"] != summary["run_id"]

    # Bias-variance within one trajectory (whatever ASHA left souped): the checkpoints the soup trial's uniform soup
    # averaged are its models; across trials only when 2 or more trials of that architecture were souped.
    bv = summary["bias_variance"]
    groups = {g["key"]: g for g in bv["groups"]}
    trajectory = bv["trajectory"]
    within_uniform = next(e for e in soups.values() if e["model_id"] == trajectory["soup"])
    assert (within_uniform["scope"], within_uniform["recipe"], within_uniform["trial"]) == (
        "within", "uniform", trajectory["trial"])
    assert groups["trajectory"]["models"] == trajectory["ingredients"] == accepted[trajectory["soup"]]
    assert len(groups["trajectory"]["models"]) >= 2 and groups["trajectory"]["ce"]["variance"] > 0
    souped_trials = {e["trial"] for e in soups.values() if e["scope"] == "within" and arch_of(e) == bv["architecture"]}
    epochs = Counter(r.trial for r in records[bv["architecture"]])
    assert souped_trials == {t for t, n in epochs.items() if n >= 2}
    if len(souped_trials) < 2:
        assert bv["trials"] == [] and set(groups) == {"trajectory", "trajectory_uniform", "trajectory_greedy"}
        assert any(n.startswith("no bias-variance study across trials") for n in summary["notes"])
    else:
        assert sorted(bv["trials"]) == sorted(souped_trials)
        assert [g["key"] for g in bv["groups"]][:3] == ["single", "uniform", "greedy"]
    for g in bv["groups"]:
        assert g["ce"]["bias2"] + g["ce"]["variance"] == pytest.approx(g["ce"]["expected_loss"], rel=1e-6)
        assert 0 <= g["zero_one"]["bias"] <= 1 and 0 <= g["zero_one"]["variance"] <= 1


@pytest.mark.integration
def test_unknown_or_empty_experiment_is_one_line_error(mlflow_server, mlflow_client, capsys):
    import argparse

    from soups.store import registry
    from soups.options import add_report_args
    from soups.report.build import build_report
    from soups.report.cli import cmd_report
    from soups.report.snapshot import ReportError

    with pytest.raises(ReportError, match="'no-such-report'.*not found"):
        build_report("no-such-report", tracking_uri=mlflow_server)
    registry.get_or_create_experiment(mlflow_client, "report-empty")
    with pytest.raises(ReportError, match="'report-empty': no checkpoints"):
        build_report("report-empty", tracking_uri=mlflow_server)
    with pytest.raises(ReportError, match="split_for_table='train'"):
        build_report("report-empty", tracking_uri=mlflow_server, split_for_table="train")

    parser = argparse.ArgumentParser()
    add_report_args(parser)
    args = parser.parse_args(["--experiment", "no-such-report", "--out", "x", "--resamples", "200", "--split", "val"])
    assert (args.out, args.n_resamples, args.split_for_table) == ("x", 200, "val")
    with pytest.raises(SystemExit) as exit_info:
        cmd_report(args)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("ich report: error:") and "no-such-report" in err[0]
