"""Lineage in MLflow (issue 24 item 1), read back from a real `mlflow server` after the session's tiny sweep and
its soups: trial runs list the dataset's train/val/test splits and the shared init as their input model; soup runs
list val/test (train where BN was recalibrated) and exactly their accepted ingredients; a soup run's val/test
metrics name their split's dataset; the registered version carries a model card; the sweep run a note."""
from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from soups.store.lineage import model_card, split_dataset_name, split_digest, split_of, sweep_note
from tests.test_serving import champion  # noqa: F401  (the tiny sweep's champion soup, built there if need be)

EXPERIMENT = "tiny-sweep"


def test_split_names_digests_and_keys():
    fp = "f" * 64
    assert split_dataset_name(fp, "val") == "val@ffffffffffff" and len(split_digest(fp)) == 36
    assert [split_of(k) for k in ("val_accuracy", "test_macro_f1_low", "uniform_val_accuracy", "vs_best_acc_diff",
                                  "val")] == ["val", "test", None, None, None]


_CARD = dict(name="across-best-greedy", recipe="greedy", scope="across", experiment_id="3",
             ingredients=[{"trial": "a", "epoch": 2, "model_id": "m-1", "accepted": True, "val_score": 0.9},
                          {"trial": "b", "epoch": 1, "model_id": "m-2", "accepted": False}],
             val={"accuracy": 0.9, "macro_f1": 0.8}, test={"accuracy": 0.85, "accuracy_ci": [0.8, 0.9], "macro_f1": 0.84},
             vs_best_single={"acc_diff": 0.01, "acc_diff_low": -0.02, "acc_diff_high": 0.04, "mcnemar_p": 0.5},
             best_single={"trial": "a", "epoch": 3}, metric="macro_f1", bn_mode="average",
             preprocess={"mean": [0.5]}, dataset_fingerprint="fp", code_version="1.0", decision="moved")


def test_model_card_and_note_say_what_they_should():
    card = model_card(**_CARD)
    assert "| accuracy % | 90.00 | 85.00 [80.00, 90.00] |" in card
    assert "[m-1](#/experiments/3/models/m-1)" in card and "m-2" not in card  # accepted ingredients only
    assert "trial a epoch 3): 1.00 points [-2.00, 4.00], McNemar p = 0.5" in card and "## Limits" in card
    assert "chose" not in card  # greedy records no parameters
    wise = model_card(**{**_CARD, "recipe": "wise_ft"}, params={"alpha": "0.7", "head": "keep"})
    assert "## What the wise_ft recipe chose" in wise and "| alpha | 0.7 |" in wise and "| head | keep |" in wise
    note = sweep_note("s", "val_macro_f1", [{"trial": "t1", "status": "FINISHED", "epochs": 3, "val_macro_f1": 0.5}],
                      [{"name": "x", "recipe": "greedy", "val": {"macro_f1": 0.7}, "test": {"accuracy": 0.6}}], None)
    assert "| t1 | finished | 3 | 0.5000 |" in note and "| x | greedy | 0.7000 | 0.6000 [, ] |" in note


def _inputs(run) -> tuple[dict[str, str], set[str]]:
    """{dataset name: context} and the input model ids of a run."""
    datasets = {d.dataset.name: {t.key: t.value for t in d.tags}.get("mlflow.data.context")
                for d in run.inputs.dataset_inputs}
    return datasets, {m.model_id for m in (run.inputs.model_inputs or [])}


@pytest.mark.integration
def test_trial_runs_name_their_data_and_their_init(tiny_sweep, mlflow_server):
    from tests.test_sweep import _trial_runs
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    sweep_run = client.get_run(tiny_sweep["parent_run_id"])
    fp = sweep_run.data.tags["ich.dataset_fingerprint"]
    init_fp = next(v for k, v in sweep_run.data.tags.items() if k.startswith("ich.init."))
    inits = [m for m in client.search_logged_models([exp], filter_string="tags.`ich.kind` = 'init'")
             if m.tags.get("ich.sha256") == init_fp]
    assert inits, "the warm-start init is not a LoggedModel"
    for found in _trial_runs(client, exp, EXPERIMENT):
        run = client.get_run(found.info.run_id)  # a search does not return the runs' input models
        datasets, models = _inputs(run)
        assert datasets == {split_dataset_name(fp, s): s for s in ("train", "val", "test")}, datasets
        assert models == {inits[0].model_id}, (models, inits[0].model_id)
        assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {split_digest(fp)}
    assert _inputs(sweep_run)[0] == {split_dataset_name(fp, s): s for s in ("train", "val", "test")}  # logged first
    note = sweep_run.data.tags["mlflow.note.content"]  # --no-soups here: the trials and 'no report'
    assert all(f"| {t['trial']} | " in note for t in tiny_sweep["trials"]), note


@pytest.mark.integration
def test_a_registered_soup_shows_its_data_ingredients_and_card(champion, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    run = client.get_run(champion.run_id)
    fp = champion.tags["ich.dataset_fingerprint"]
    folder = client.download_artifacts(champion.run_id, "ingredients.json", str(tmp_path))  # what it tried
    soup_meta = json.loads(open(folder).read())
    accepted = {i["model_id"] for i in soup_meta if i["accepted"]}
    rejected = {i["model_id"] for i in soup_meta if not i["accepted"]}
    datasets, models = _inputs(run)
    splits = {"val", "test"} | ({"train"} if run.data.tags["ich.bn_mode"] == "recalibrate" else set())
    assert datasets == {split_dataset_name(fp, s): s for s in splits}, datasets
    assert models == accepted and not models & rejected
    val = (split_dataset_name(fp, "val"), split_digest(fp))
    soup_model = client.get_logged_model(champion.tags["ich.soup_model_id"])
    links = {m.key: (m.dataset_name, m.dataset_digest) for m in soup_model.metrics}
    assert links["val_accuracy"] == val and links["val_macro_f1"] == val, links
    for model_id in accepted:  # the ingredients' val metrics too (logged by the trials)
        assert {(m.dataset_name, m.dataset_digest) for m in client.get_logged_model(model_id).metrics
                if m.key.startswith("val_")} == {val}
    card = client.get_model_version(champion.name, champion.version).description
    assert card.startswith(f"# {run.data.tags.get('mlflow.runName', run.info.run_name)}") and "## Ingredients" in card
    assert all(m in card for m in accepted) and "## Limits" in card and fp in card
