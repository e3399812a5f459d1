"""The soup orchestrator end to end on the session's tiny sweep: checkpoints come back from MLflow alone,
soups go back into it, the best is registered and served, `champion` moves only when beaten, and broken
checkpoints are skipped by name. Real MLflow server, real Ray sweep; no mocks.
"""
from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from ich.checkpoint import META, CheckpointMeta, load_checkpoint, read_meta, save_checkpoint
from ich.decode import decode_file
from ich.models import create_model
from soups.store import registry
from soups.orchestrate import SoupError, SoupOptions, add_soup_args, cmd_soup, run_soups
from soups.serve.inputs import decode_image
from soups.serve.model import SoupClassifier
from tests.imagegen import class_image, save_as

MODEL_NAME = "tiny-sweep-soup-orchestrator-test"  # its own registered model: other tests may soup tiny-sweep too
FIGURES = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "loss")


@pytest.fixture(scope="module")
def first_run(tiny_sweep, mlflow_server, tmp_path_factory):
    """All scopes and recipes once; the JSON summary as written to disk. Souping adds no checkpoint record."""
    json_path = tmp_path_factory.mktemp("soups") / "summary.json"
    client = MlflowClient(mlflow_server)
    checkpoints_before = len(registry.search_checkpoints(client, [tiny_sweep["experiment_id"]]))
    summary = run_soups(SoupOptions(experiment=tiny_sweep["experiment"], tracking_uri=mlflow_server,
                                    registered_model=MODEL_NAME, json_path=str(json_path)))
    assert len(registry.search_checkpoints(client, [tiny_sweep["experiment_id"]])) == checkpoints_before
    return summary, json.loads(json_path.read_text())


def _checkpoints_per_trial(client: MlflowClient, tiny_sweep) -> dict[str, list[registry.CheckpointRecord]]:
    records = registry.search_checkpoints(client, [tiny_sweep["experiment_id"]], sweep=tiny_sweep["experiment"])
    trials: dict[str, list] = {}
    for r in records:
        trials.setdefault(r.trial, []).append(r)
    return trials


@pytest.mark.integration
def test_soups_within_and_across_come_from_mlflow_with_all_figures(first_run, tiny_sweep, mlflow_client):
    summary, from_disk = first_run
    assert from_disk == json.loads(json.dumps(summary))
    assert (summary["experiment"], summary["sweep"], summary["metric"]) == ("tiny-sweep", "tiny-sweep", "macro_f1")
    assert summary["skipped"] == []
    trials = _checkpoints_per_trial(mlflow_client, tiny_sweep)
    by_id = {r.model_id: r for records in trials.values() for r in records}
    names = {s["name"] for s in summary["soups"]}

    souped = [t for t, records in trials.items() if len(records) >= 2]
    assert souped, "the tiny sweep should leave trials with several epochs"
    for trial in souped:
        assert {f"within-{trial}-uniform", f"within-{trial}-greedy"} <= names
        within = [s for s in summary["soups"] if s["trial"] == trial]
        assert {s["scope"] for s in within} == {"within"}
        assert all(i["trial"] == trial for s in within for i in s["ingredients"])
        assert {i["epoch"] for i in within[0]["ingredients"]} == {r.epoch for r in trials[trial]}
    assert {"across-best-uniform", "across-best-greedy", "across-all-greedy"} <= names
    across_best = next(s for s in summary["soups"] if s["name"] == "across-best-uniform")
    assert sorted(i["trial"] for i in across_best["ingredients"]) == sorted(trials)  # one per trial
    across_all = next(s for s in summary["soups"] if s["name"] == "across-all-greedy")
    assert len(across_all["ingredients"]) == len(by_id)

    for soup in summary["soups"]:
        # ingredients: registry records, verified by sha256, ranked best val first
        for i in soup["ingredients"]:
            assert set(i) >= {"trial", "epoch", "model_id", "sha256", "val_score", "accepted"}
            assert i["sha256"] == by_id[i["model_id"]].sha256
            assert i["val_score"] == pytest.approx(by_id[i["model_id"]].metrics["val_macro_f1"])
        scores = [i["val_score"] for i in soup["ingredients"]]
        assert scores == sorted(scores, reverse=True)
        assert soup["ingredients"][0]["accepted"]  # greedy starts from the best
        if soup["recipe"] == "uniform":
            assert all(i["accepted"] for i in soup["ingredients"])
        for part in (soup, soup["best_single"], soup["uniform"], soup["soft_vote"]):
            for split in ("val", "test"):
                assert set(part[split]) >= set(FIGURES)
                assert 0.0 <= part[split]["accuracy"] <= 1.0 and 0.0 <= part[split]["macro_f1"] <= 1.0
        assert soup["best_single"]["model_id"] == soup["ingredients"][0]["model_id"]
        for metric in ("accuracy", "macro_f1"):
            low, high = soup["test"][f"{metric}_ci"]
            assert low <= soup["test"][metric] <= high
        for key in ("vs_best_single", "soft_vote_vs_best_single"):
            assert set(soup[key]) >= {"acc_diff", "acc_diff_low", "acc_diff_high", "f1_diff", "mcnemar_p"}
            assert 0.0 <= soup[key]["mcnemar_p"] <= 1.0
        assert soup["bn_mode"] in ("average", "recalibrate")  # CoAtNet has BatchNorm
        assert soup["run_id"] and soup["model_id"]


@pytest.mark.integration
def test_soup_runs_sit_under_the_sweep_with_tags_metrics_artifacts_and_weights(first_run, tiny_sweep, mlflow_client):
    summary, _ = first_run
    for soup in summary["soups"]:
        run = mlflow_client.get_run(soup["run_id"])
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["mlflow.parentRunId"] == tiny_sweep["parent_run_id"]
        assert tags["ich.kind"] == "soup" and tags["ich.sweep"] == "tiny-sweep"
        assert (tags["ich.recipe"], tags["ich.scope"], tags["ich.bn_mode"]) == (soup["recipe"], soup["scope"],
                                                                                 soup["bn_mode"])
        assert (tags["ich.metric"], tags["ich.tie_rule"], tags["ich.group"]) == ("macro_f1", "accept", soup["group"])
        assert tags.get("ich.trial") == soup["trial"]
        assert metrics["val_macro_f1"] == pytest.approx(soup["val"]["macro_f1"])
        assert metrics["test_accuracy"] == pytest.approx(soup["test"]["accuracy"])
        for key in ("test_accuracy_low", "test_accuracy_high", "test_macro_f1_low", "best_single_test_accuracy",
                    "uniform_test_accuracy", "soft_vote_test_accuracy", "vs_best_acc_diff", "vs_best_mcnemar_p",
                    "soft_vote_vs_best_acc_diff"):
            assert key in metrics, key
        artifacts = {a.path for a in mlflow_client.list_artifacts(soup["run_id"])}
        assert {"ingredients.csv", "ingredients.json", "ingredient_curve.png"} <= artifacts
        model = mlflow_client.get_logged_model(soup["model_id"])
        assert model.source_run_id == soup["run_id"] and model.tags["ich.kind"] == "soup"


@pytest.mark.integration
def test_best_soup_is_the_champion_and_serves_class_names(first_run, tiny_sweep, mlflow_client, monkeypatch,
                                                          tmp_path):
    import mlflow.pyfunc

    from soups.serve.verify import fetch_verified

    summary, _ = first_run
    champion = summary["champion"]
    best = max(summary["soups"], key=lambda s: s["val"]["macro_f1"])
    assert champion["soup"] == best["name"] and champion["moved"] and champion["reason"] == "no champion yet"
    version = mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.version == champion["version"] and version.run_id == best["run_id"]
    assert version.tags["ich.champion_decision"] == "moved"

    images = Path(tiny_sweep["data"]).parent / "images"
    paths = [sorted((images / c).glob("*.png"))[0] for c in sorted(p.name for p in images.iterdir())]
    monkeypatch.setenv("ICH_SERVE_PATH_ROOT", str(images))  # the path column is off unless a root is given
    # The version is the soup's own LoggedModel (logged once); what ich serve hands MLflow's scoring server is the
    # pyfunc folder written around its verified copy. MLflow's loader runs it (Models-from-Code: no pickle).
    assert version.source == f"models:/{champion['model_id']}" and champion["model_id"] == best["model_id"]
    _, folder, _ = fetch_verified(f"models:/{MODEL_NAME}@champion", tmp_path)
    model = mlflow.pyfunc.load_model(str(folder))
    out = model.predict(pd.DataFrame({"path": [str(p) for p in paths]}))
    classes = [p.parent.name for p in paths]
    assert set(out["class"]) <= set(classes)
    assert sum(out["class"] == classes) >= len(classes) // 2
    assert all(len(p) == len(classes) and abs(sum(p) - 1) < 1e-4 for p in out["probabilities"])
    encoded = base64.b64encode(paths[0].read_bytes()).decode()
    again = model.predict(pd.DataFrame({"image": [encoded]}))
    assert again["class"][0] == out["class"][0]


@pytest.mark.integration
def test_recipe_all_makes_one_soup_per_recipe_and_family_all_in_the_report(first_run, tiny_sweep, mlflow_server,
                                                                          mlflow_client, tmp_path):
    """Issue 21's tournament on the shared tiny sweep (which logged its warm-start init, so the anchored recipes
    cook too): `ich soup` with the default `--recipe all` made exactly one soup per registered recipe in every
    family (across-all: the recipes that choose among every checkpoint), each a LoggedModel tagged with its recipe
    and its parameters; the report built from MLflow has a soup row, a soft-vote row and a forest row for every
    recipe; the champion is the val-best of them all."""
    from soups import recipes
    from soups.report.build import build_report
    summary, _ = first_run
    names = recipes.names()
    assert {"uniform", "greedy", "model_stock", "wise_ft", "learned"} <= set(names)
    by_family: dict[str, list[str]] = {}
    for soup in summary["soups"]:
        family, recipe = soup["name"].rsplit("-", 1) if soup["name"].rsplit("-", 1)[1] in names else (None, None)
        assert recipe == soup["recipe"], soup["name"]
        by_family.setdefault(family, []).append(recipe)
    souped = [t for t, rs in _checkpoints_per_trial(mlflow_client, tiny_sweep).items() if len(rs) >= 2]
    every = [r for r in names if recipes.get(r).every_checkpoint]
    assert set(by_family) == {f"within-{t}" for t in souped} | {"across-best", "across-all"}
    for family, cooked in by_family.items():
        assert sorted(cooked) == sorted(every if family == "across-all" else names), family
    for soup in summary["soups"]:
        model = mlflow_client.get_logged_model(soup["model_id"])
        assert model.tags["ich.recipe"] == soup["recipe"] and model.tags["ich.kind"] == "soup"
        params = {k for k in model.tags if k.startswith(f"ich.{soup['recipe']}.")}
        if soup["recipe"] in ("model_stock", "wise_ft", "learned"):  # t per layer, alpha, the coefficients
            assert params, (soup["name"], sorted(model.tags))

    best = max(summary["soups"], key=lambda s: s["val"]["macro_f1"])
    assert summary["champion"]["soup"] == best["name"]  # chosen on val among every recipe's soups
    report = build_report(tiny_sweep["experiment"], str(tmp_path / "report"), tracking_uri=mlflow_server,
                          n_resamples=100, registered_model=MODEL_NAME)
    arch = "coatnet_tiny_ich"
    rows = {r["key"] for r in report["table"]}
    forest = {r["key"] for r in report["forest"]}
    for recipe in names:
        assert {f"{arch}_{recipe}_soup", f"{arch}_{recipe}_vote"} <= rows & forest, (recipe, sorted(rows))
    assert report["champion"]["model_id"] == best["model_id"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert all(recipe in md for recipe in names)

    # The logits `ich soup` computed are where the report looks first: every soup's val/test logits, equal to those
    # of its weights as pulled back from MLflow (computed here from the download), and the report ran fewer models.
    from ich.data import load_dataset
    from ich.home import ich_home
    from soups.evaluate import EvalSpec, Evaluator
    from soups.logit_store import cached_logits_path, prediction_cache
    dataset = load_dataset(tiny_sweep["data"])
    cache = prediction_cache(ich_home(), dataset.fingerprint)
    for soup in summary["soups"]:
        assert all(cached_logits_path(cache, soup["model_id"], s).is_file() for s in ("val", "test")), soup["name"]
    record = registry.get_model_record(mlflow_client, best["model_id"])
    weights, meta = load_checkpoint(registry.download_checkpoint(mlflow_client, record, tmp_path / "champion"),
                                    expected_sha256=record.sha256)
    ev = Evaluator(dataset, EvalSpec.of(meta), device="cpu")
    ev.load(weights)
    for split in ("val", "test"):
        assert np.array_equal(np.load(cached_logits_path(cache, best["model_id"], split)), ev.logits(None, split))
    assert report["counts"]["from_cache"] > 0, report["counts"]
    print("report models:", report["counts"])


@pytest.mark.integration
def test_champion_stays_unless_beaten_and_the_decision_is_recorded(first_run, tiny_sweep, mlflow_server, mlflow_client):
    summary, _ = first_run
    first_version = summary["champion"]["version"]
    # A subset of the first call's soups, built the same way: its best cannot beat the champion.
    second = run_soups(SoupOptions(experiment="tiny-sweep", tracking_uri=mlflow_server, registered_model=MODEL_NAME,
                                   scope="across", recipe="greedy", champion_rule="significant"))
    decision = second["champion"]
    assert not decision["moved"]
    assert decision["previous_version"] == first_version and decision["version"] != first_version
    assert decision["p_value"] is not None and decision["champion_val"] is not None
    assert mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion").version == first_version
    new_version = mlflow_client.get_model_version(MODEL_NAME, decision["version"])
    assert new_version.tags["ich.champion_decision"] == "kept"
    assert "McNemar" in new_version.tags["ich.champion_reason"]
    assert mlflow_client.get_run(decision["run_id"]).data.tags["ich.champion_decision"] == "kept"


def _copy_trial_into_new_experiment(client: MlflowClient, tiny_sweep, name: str, tmp: Path) -> list[str]:
    """The tiny sweep's longest trial logged again under experiment `name`, plus one NaN checkpoint.
    Returns the model ids: epochs 1..n, then the NaN one."""
    trials = _checkpoints_per_trial(client, tiny_sweep)
    records = max(trials.values(), key=len)
    experiment_id = registry.get_or_create_experiment(client, name)
    sweep_run = client.create_run(experiment_id, run_name=name, tags={
        "ich.kind": "sweep", "ich.sweep": name, "ich.data": str(tiny_sweep["data"])})
    trial_run = client.create_run(experiment_id, run_name="copy", tags={
        "ich.kind": "trial", "ich.sweep": name, "ich.trial": "copy", "mlflow.parentRunId": sweep_run.info.run_id})
    ids = []

    def log(folder: Path, record) -> str:
        """The copy as trial "copy" of sweep `name`, with the record's val metrics: what log_checkpoint reads."""
        meta = read_meta(folder)
        meta.extra.update(sweep=name, trial="copy")
        meta.metrics = {k: v for k, v in record.metrics.items() if k.startswith("val_")}
        (folder / META).write_text(meta.to_json(), encoding="utf-8")
        return registry.log_checkpoint(client, trial_run, folder)

    for record in records:
        folder = registry.download_checkpoint(client, record, tmp / "pulled")
        ids.append(log(folder, record))
    state, meta = load_checkpoint(folder)
    first_float = next(k for k, v in state.items() if v.is_floating_point())
    state[first_float] = torch.full_like(state[first_float], float("nan"))
    meta.epoch = records[-1].epoch + 1
    save_checkpoint(tmp / "nan", state, meta)
    ids.append(log(tmp / "nan", records[0]))
    return ids


@pytest.mark.integration
def test_altered_and_nan_checkpoints_are_skipped_by_name(tiny_sweep, mlflow_server, mlflow_server_handle,
                                                         mlflow_client, tmp_path):
    ids = _copy_trial_into_new_experiment(mlflow_client, tiny_sweep, "soup-broken-checkpoints", tmp_path)
    altered, nan = ids[1], ids[-1]
    stored = next((mlflow_server_handle.data_dir / "mlflow" / "artifacts").rglob(f"{altered}/**/model.safetensors"))
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # still valid safetensors, other weights
    stored.write_bytes(bytes(data))

    with pytest.warns(RuntimeWarning) as caught:
        summary = run_soups(SoupOptions(experiment="soup-broken-checkpoints", tracking_uri=mlflow_server,
                                        scope="within", bn="average"))
    messages = [str(w.message) for w in caught]
    assert any(altered in m and "sha256 mismatch" in m for m in messages), messages
    assert any(nan in m and "NaN/Inf" in m for m in messages), messages
    reasons = {s["model_id"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {altered, nan}
    assert "sha256 mismatch" in reasons[altered] and "NaN/Inf" in reasons[nan]
    built = {s["name"]: s for s in summary["soups"]}
    assert set(built) == {"within-copy-uniform", "within-copy-greedy", "within-copy-learned"}  # learned needs no init
    for soup in built.values():
        used = {i["model_id"] for i in soup["ingredients"]}
        assert used == set(ids) - {altered, nan}
        assert soup["bn_mode"] == "average"
    assert summary["champion"]["registered_model"] == "soup-broken-checkpoints-soup"


@pytest.mark.integration
def test_unknown_or_empty_experiment_is_one_line_error(mlflow_server, mlflow_client, capsys):
    with pytest.raises(SoupError, match="'no-such-sweep'.*not found"):
        run_soups(SoupOptions(experiment="no-such-sweep", tracking_uri=mlflow_server))
    registry.get_or_create_experiment(mlflow_client, "soup-empty-experiment")
    with pytest.raises(SoupError, match="'soup-empty-experiment': no checkpoints"):
        run_soups(SoupOptions(experiment="soup-empty-experiment", tracking_uri=mlflow_server))
    with pytest.raises(SoupError, match="scope='sideways'"):
        run_soups(SoupOptions(experiment="x", scope="sideways"))

    parser = argparse.ArgumentParser()
    add_soup_args(parser)
    args = parser.parse_args(["--experiment", "no-such-sweep", "--tie-rule", "strict", "--resamples", "200",
                              "--json", "out.json", "--champion-rule", "significant"])
    assert (args.tie_rule, args.n_resamples, args.json_path, args.champion_rule) == ("strict", 200, "out.json",
                                                                                      "significant")
    with pytest.raises(SystemExit) as exit_info:
        cmd_soup(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ich soup: error:") and "no-such-sweep" in err[0]


# ---------------------------------------------------------------------------------------------- pyfunc, no server

@pytest.mark.parametrize("fmt", ["png", "jpeg", "rgba_png", "grey_png", "palette_png", "cmyk_jpeg", "png16",
                                 "exif_jpeg"])
def test_serving_decodes_images_exactly_like_ingest(fmt, tmp_path):
    path = tmp_path / f"image.{fmt}"
    save_as(class_image(3, 48, np.random.default_rng(0))[:, :40], path, fmt)  # not square: resize and crop
    expected = np.frombuffer(decode_file(str(path), 24).pixels, dtype=np.uint8).reshape(24, 24, 3)
    assert np.array_equal(decode_image(path.read_bytes(), 24, str(path)), expected)


def test_soup_classifier_predicts_from_paths_and_base64_and_names_bad_rows(tmp_path, monkeypatch):
    classes = ["Đờn ca tài tử", "Lễ hội Óc Om Bóc", "Múa Rom Vong"]
    model = create_model("coatnet_tiny_ich", len(classes), 32)
    meta = CheckpointMeta(architecture="coatnet_tiny_ich", img_size=32, num_classes=3, class_names=classes,
                          dataset_fingerprint="d", init_fingerprint="i", epoch=0,
                          extra={"image_size": 36, "eval_crop_pct": 0.875})
    save_checkpoint(tmp_path / "soup", model.state_dict(), meta)
    monkeypatch.setenv("ICH_SERVE_PATH_ROOT", str(tmp_path))  # the path column is off unless a root is given
    served = SoupClassifier()
    served.load_context(SimpleNamespace(artifacts={"soup": str(tmp_path / "soup")}))
    paths = []
    for c, fmt in enumerate(["png", "jpeg", "rgba_png"]):
        paths.append(tmp_path / f"{c}.{fmt}")
        save_as(class_image(c, 50, np.random.default_rng(c)), paths[-1], fmt)
    by_path = served.predict(None, pd.DataFrame({"path": [str(p) for p in paths]}))
    assert list(by_path.columns) == ["class", "confidence", "probabilities"]
    assert set(by_path["class"]) <= set(classes)
    assert all(len(p) == 3 and abs(sum(p) - 1) < 1e-5 for p in by_path["probabilities"])
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    by_bytes = served.predict(None, pd.DataFrame({"image": encoded}))
    assert np.allclose(np.stack(by_bytes["probabilities"]), np.stack(by_path["probabilities"]))
    mixed = served.predict(None, pd.DataFrame({"path": [str(paths[0]), None], "image": [None, encoded[1]]}))
    assert list(mixed["class"]) == list(by_path["class"][:2])

    with pytest.raises(ValueError, match="row 1: column 'image' is not valid base64"):
        served.predict(None, pd.DataFrame({"image": [encoded[0], "not base64!"]}))
    with pytest.raises(ValueError, match="row 0: not a readable image"):
        served.predict(None, pd.DataFrame({"image": [base64.b64encode(b"plain text").decode()]}))
    with pytest.raises(ValueError, match="missing.png"):
        served.predict(None, pd.DataFrame({"path": [str(tmp_path / "missing.png")]}))
    with pytest.raises(ValueError, match="'path' or an 'image' column"):
        served.predict(None, pd.DataFrame({"file": ["x"]}))


# ---------------------------------------------------------------------------------------------- ingredient pools

POOL_MODEL = "tiny-sweep-pool-test"  # its own registered model: the champion tests above keep theirs


@pytest.mark.integration
def test_top_k_pool_soups_each_trials_best_epochs_and_records_the_pool(tiny_sweep, mlflow_server, mlflow_client,
                                                                        capsys):
    trials = _checkpoints_per_trial(mlflow_client, tiny_sweep)
    # expected by hand from MLflow's recorded val figures: the 2 best epochs (ties to the later epoch)
    expected = {t: {r.epoch for r in sorted(records, key=lambda r: (-r.metrics["val_macro_f1"], -r.epoch))[:2]}
                for t, records in trials.items() if len(records) >= 2}
    full = [t for t, records in trials.items() if len(records) == 3]
    assert full, "the tiny sweep should leave a trial with all 3 epochs"
    common = dict(experiment=tiny_sweep["experiment"], tracking_uri=mlflow_server, registered_model=POOL_MODEL,
                  scope="within", n_resamples=200, bn="average")
    capsys.readouterr()
    summary = run_soups(SoupOptions(**common, ingredients="top_k", k=2))
    table = capsys.readouterr().out
    assert summary["ingredients"] == "top_k:2"
    built = {s["trial"] for s in summary["soups"]}
    assert built == set(expected)
    for soup in summary["soups"]:
        assert {i["epoch"] for i in soup["ingredients"]} == expected[soup["trial"]], soup["name"]
        size = len(trials[soup["trial"]])
        assert soup["pool"] == {"rule": "top_k:2", "size": 2, "family_size": size}
        row = next(line for line in table.splitlines() if line.startswith(soup["name"]))
        assert row.endswith(f"top_k:2 2/{size}"), row
        run = mlflow_client.get_run(soup["run_id"])
        assert (run.data.tags["ich.ingredients"], run.data.tags["ich.pool"]) == ("top_k:2", f"2/{size}")
        assert run.data.metrics["n_ingredients"] == 2 and run.data.metrics["family_size"] == size
        model = mlflow_client.get_logged_model(soup["model_id"])
        assert (model.tags["ich.ingredients"], model.tags["ich.pool"]) == ("top_k:2", f"2/{size}")

    # control: the default pool offers a 3-epoch trial's every epoch
    summary = run_soups(SoupOptions(**common, recipe="uniform"))
    table = capsys.readouterr().out
    soup = next(s for s in summary["soups"] if s["trial"] == full[0])
    assert {i["epoch"] for i in soup["ingredients"]} == {1, 2, 3}
    assert soup["pool"] == {"rule": "all", "size": 3, "family_size": 3}
    assert next(line for line in table.splitlines() if line.startswith(soup["name"])).endswith("all 3/3")
    assert mlflow_client.get_run(soup["run_id"]).data.tags["ich.ingredients"] == "all"


@pytest.mark.integration
def test_cycle_end_pool_keeps_epoch_2_of_the_tiny_sweep(tiny_sweep, mlflow_server, mlflow_client):
    trials = _checkpoints_per_trial(mlflow_client, tiny_sweep)  # restart_period 2, 3 epochs: epoch 2 only
    at_2 = {t: next(r.model_id for r in records if r.epoch == 2) for t, records in trials.items()
            if any(r.epoch == 2 for r in records)}
    summary = run_soups(SoupOptions(experiment=tiny_sweep["experiment"], tracking_uri=mlflow_server,
                                    registered_model=POOL_MODEL, recipe="uniform", n_resamples=200, bn="average",
                                    ingredients="cycle_end"))
    assert [s for s in summary["soups"] if s["scope"] == "within"] == []  # one cycle end each: nothing to average
    for t in at_2:
        assert f"trial {t}: pool cycle_end holds 1 of its {len(trials[t])} usable checkpoint(s) (epoch 2), " \
               "no within-trial soup" in summary["notes"]
    across = [s for s in summary["soups"] if s["name"] == "across-best-uniform"]
    if len(at_2) >= 2:  # each trial's candidate is its epoch 2, not its best epoch
        assert {i["model_id"] for i in across[0]["ingredients"]} == set(at_2.values())
        assert across[0]["pool"] == {"rule": "cycle_end", "size": len(at_2), "family_size": len(trials)}
    else:
        assert across == []
    for t in set(trials) - set(at_2):
        assert f"trial {t}: no cycle-end epoch yet, left out of the cycle_end across-run soups" in summary["notes"]


@pytest.mark.integration
def test_within_soups_built_while_the_sweep_runs_use_the_sweeps_pool(tiny_sweep, mlflow_client, mlflow_server):
    """The sweep's `soups: {ingredients: top_k, k: 2}` reaches the within-soup task (SoupSoFar -> cook_within)."""
    import ray

    from sweeps.soup_callback import SoupSoFar
    trials = _checkpoints_per_trial(mlflow_client, tiny_sweep)
    trial, records = next((t, r) for t, r in trials.items() if len(r) == 3)
    best_2 = {r.epoch for r in sorted(records, key=lambda r: (-r.metrics["val_macro_f1"], -r.epoch))[:2]}
    results = {}
    for name, soups in (("top_k", {"ingredients": "top_k", "k": 2, "recipe": "uniform"}),
                        ("control", {"recipe": "uniform"})):
        cb = SoupSoFar(tracking_uri=mlflow_server, experiment_id=tiny_sweep["experiment_id"],
                       sweep=tiny_sweep["experiment"], parent_run_id="unused", data=str(tiny_sweep["data"]),
                       soups=soups)
        cb._submit_within(trial)
        (results[name],) = ray.get(cb._refs[trial], timeout=600)["soups"]
    assert {i["epoch"] for i in results["top_k"]["ingredients"]} == best_2
    assert results["top_k"]["pool"] == {"rule": "top_k:2", "size": 2, "family_size": 3}
    assert {i["epoch"] for i in results["control"]["ingredients"]} == {1, 2, 3}
    assert results["control"]["pool"] == {"rule": "all", "size": 3, "family_size": 3}
