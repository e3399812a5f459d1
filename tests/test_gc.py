"""`ich gc`: which checkpoints lose their weights (pure planner), and the whole command on a real `mlflow server`:
dry run deletes nothing, --apply frees exactly the bytes it reports, every record stays, soups and the champion
still load, and a soup run afterwards skips the collected checkpoints with one note instead of sha256 failures.
"""
from __future__ import annotations

import base64
import json
import math
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from ich.checkpoint import META, WEIGHTS, CheckpointMeta, load_checkpoint, save_checkpoint
from sweeps.cli import main as ich_main
from ich.errors import ConfigError
from ich.models import create_model
from soups.store import registry, tags
from soups.store.gc import CheckpointState, GcError, GcPolicy, plan

ARCH = "coatnet_tiny_ich"


# ---------------------------------------------------------------------------------------------- planner (pure)

def _c(trial: str, epoch: int, score: float, ready: bool = True, mid: str | None = None) -> CheckpointState:
    return CheckpointState(mid or f"{trial}{epoch}{'' if ready else 'x'}", "s", trial, epoch, score, ready)


def test_plan_keeps_top_k_last_k_and_protected_and_drops_superseded():
    cands = [_c("a", 1, 0.5), _c("a", 2, 0.9), _c("a", 3, 0.7), _c("a", 4, 0.6), _c("a", 3, 0.99, ready=False),
             _c("b", 1, 0.4), _c("b", 2, math.nan), _c("b", 3, 0.3)]
    cands.append(CheckpointState("b9", "s", "b", 9, 0.95, True, collected=True))  # weights gone: ranks nowhere
    cands.append(CheckpointState("b5p", "s", "b", 5, 0.1, False, failed=False))  # PENDING: may be uploading now
    out = plan(cands, {"a1": "ingredient of soup x"}, GcPolicy(keep_top_k=1, keep_last_k=1))
    assert set(out.keep) == {"a1", "a2", "a4", "b1", "b3", "b5p"}
    assert out.keep["b5p"] == ["pending (being logged)"]
    assert out.keep["a2"] == ["top-1 val_macro_f1"] and out.keep["a4"] == ["last-1 epoch"]
    assert out.keep["a1"] == ["ingredient of soup x"]
    # a FAILED duplicate never ranks, even with the best score; a NaN score ranks last
    assert set(out.delete) == {"a3", "a3x", "b2", "b9"}
    assert out.delete["a3x"].startswith("superseded")


def test_plan_loss_ranks_low_first_and_zero_keeps_only_protected():
    cands = [_c("a", 1, 0.2), _c("a", 2, 0.1), _c("a", 3, 0.3)]
    assert set(plan(cands, {}, GcPolicy(keep_top_k=1, keep_last_k=0, metric="val_loss", mode="min")).keep) == {"a2"}
    assert set(plan(cands, {}, GcPolicy(keep_top_k=0, keep_last_k=0)).delete) == {"a1", "a2", "a3"}
    assert set(plan(cands, {"a3": "champion"}, GcPolicy(keep_top_k=0, keep_last_k=0)).keep) == {"a3"}
    with pytest.raises(GcError, match="keep_top_k=-1"):
        plan(cands, {}, GcPolicy(keep_top_k=-1))
    with pytest.raises(GcError, match="val_"):
        plan(cands, {}, GcPolicy(metric="test_accuracy"))


def test_sweep_config_gc_keys(tmp_path):
    from sweeps.config import load_config
    from tests.fixtures_sweep import write_sweep_config
    path = write_sweep_config(tmp_path, "gc-config")
    assert (load_config(path).gc.keep_top_k, load_config(path).gc.keep_last_k) == (2, 1)
    path.write_text(path.read_text() + "gc: {keep_top_k: 3, keep_last_k: 0}\n")
    assert (load_config(path).gc.keep_top_k, load_config(path).gc.keep_last_k) == (3, 0)
    path.write_text(path.read_text() + "gc: {keep_top_k: -1}\n")
    with pytest.raises(ConfigError, match="gc.keep_top_k"):
        load_config(path)
    path.write_text(path.read_text().replace("gc: {keep_top_k: -1}", "gc: {keep_best: 1}"))
    with pytest.raises(ConfigError, match="keep_best"):
        load_config(path)


# ---------------------------------------------------------------------------------------------- on a real server

EXPERIMENT = "gc-test"
# val_macro_f1 per epoch: trial a's best is epoch 2, trial b's epoch 3 (the champion's across-best ingredients)
SCORES = {"a": [0.50, 0.70, 0.60, 0.55], "b": [0.40, 0.45, 0.80, 0.42]}


def _artifact_bytes(root: Path, experiment_id: str) -> int:
    return sum(p.stat().st_size for p in (root / experiment_id).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def gc_sweep(mlflow_server, mlflow_server_handle, digits_data, digits_dataset, tmp_path_factory):
    """Two trials x 4 epochs of tiny checkpoints, a retried epoch (a FAILED duplicate), a hand-made soup of an
    early epoch, and the orchestrator's across-best uniform soup registered as champion."""
    from soups.orchestrate import SoupOptions, run_soups
    tmp = tmp_path_factory.mktemp("gc")
    client = MlflowClient(mlflow_server)
    eid = registry.get_or_create_experiment(client, EXPERIMENT)
    sweep_run = client.create_run(eid, run_name=EXPERIMENT, tags={
        "ich.kind": "sweep", "ich.sweep": EXPERIMENT, "ich.data": str(digits_dataset)})
    client.log_param(sweep_run.info.run_id, "metric", "val_macro_f1")
    torch.manual_seed(0)
    base = create_model(ARCH, digits_data.num_classes, 32).state_dict()
    gen = torch.Generator().manual_seed(1)
    ids: dict[tuple[str, int], str] = {}

    def checkpoint(trial: str, epoch: int, score: float, run_id: str, salt: int = 0) -> str:
        sd = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
              for k, v in base.items()}
        meta = CheckpointMeta(ARCH, 32, digits_data.num_classes, digits_data.classes, digits_data.fingerprint,
                              "gc-init", epoch, {"val_macro_f1": score, "val_accuracy": score},
                              extra={"sweep": EXPERIMENT, "trial": trial})
        folder = tmp / f"{trial}-{epoch}-{salt}"
        save_checkpoint(folder, sd, meta)
        return registry.log_checkpoint(client, (eid, run_id), folder)

    superseded = None
    for trial, scores in SCORES.items():
        run = client.create_run(eid, run_name=trial, tags={"ich.kind": "trial", "ich.sweep": EXPERIMENT,
                                                           "ich.trial": trial,
                                                           "mlflow.parentRunId": sweep_run.info.run_id})
        for epoch, score in enumerate(scores, start=1):
            if (trial, epoch) == ("a", 3):  # a retried epoch: the first record becomes a FAILED duplicate
                superseded = checkpoint(trial, epoch, 0.99, run.info.run_id, salt=1)
            ids[(trial, epoch)] = checkpoint(trial, epoch, score, run.info.run_id)

    # a soup made by hand from trial a's first epoch (neither top-k nor last-k): gc must keep its ingredient
    hand_run = client.create_run(eid, run_name="hand-soup", tags={"ich.kind": "soup", "ich.sweep": EXPERIMENT})
    sd, meta = load_checkpoint(registry.download_checkpoint(client, registry.get_model_record(client, ids[("a", 1)]),
                                                            tmp / "pulled"))
    meta.extra = {"soup": "hand", "ingredients": [ids[("a", 1)]]}
    save_checkpoint(tmp / "hand-soup", sd, meta)
    hand = registry.log_soup_model(client, experiment_id=eid, run_id=hand_run.info.run_id, ckpt_dir=tmp / "hand-soup",
                                   name="hand", tags={tags.TAG_EPOCH: "0", tags.TAG_TRIAL: "soup",
                                                      tags.TAG_DATASET: digits_data.fingerprint,
                                                      tags.TAG_INIT: "gc-init", tags.TAG_ARCHITECTURE: ARCH},
                                   metrics={"val_macro_f1": 0.5})
    summary = run_soups(SoupOptions(experiment=EXPERIMENT, tracking_uri=mlflow_server, scope="across",
                                    recipe="uniform", bn="average", n_resamples=200))
    assert summary["skipped"] == [] and summary["champion"]["moved"]
    return {"client": client, "eid": eid, "ids": ids, "superseded": superseded, "hand": hand, "tmp": tmp,
            "champion": summary["champion"], "artifacts": mlflow_server_handle.data_dir / "mlflow" / "artifacts"}


def _gc(capsys, tmp: Path, *extra: str) -> tuple[int, dict, str]:
    out = tmp / "gc.json"
    out.unlink(missing_ok=True)
    rc = ich_main(["gc", "--experiment", EXPERIMENT, "--keep-top-k", "0", "--keep-last-k", "1", "--json", str(out),
                   *extra])
    printed = capsys.readouterr().out
    return rc, (json.loads(out.read_text()) if out.exists() else {}), printed


@pytest.mark.integration
def test_gc_dry_run_then_apply_on_a_real_server(gc_sweep, mlflow_server, digits_data, digits_dataset, capsys):
    from soups.orchestrate import SoupOptions, run_soups
    from soups.serve.verify import fetch_verified
    import mlflow.pyfunc
    client, eid, ids, tmp = gc_sweep["client"], gc_sweep["eid"], gc_sweep["ids"], gc_sweep["tmp"]
    champion_ingredients = {ids[("a", 2)], ids[("b", 3)]}
    expect_gone = {ids[("a", 3)], ids[("b", 1)], ids[("b", 2)], gc_sweep["superseded"]}
    weights_bytes = {mid: int(f.file_size) for mid in expect_gone
                     for f in client.list_logged_model_artifacts(mid) if f.path == WEIGHTS}
    records_before = registry.search_checkpoints(client, [eid])
    disk_before = _artifact_bytes(gc_sweep["artifacts"], eid)

    rc, dry, printed = _gc(capsys, tmp)
    assert rc == 0 and not dry["applied"]
    assert {r["model_id"] for r in dry["models"]} == expect_gone
    assert (dry["deleted"], dry["deleted_ready"], dry["deleted_superseded"]) == (4, 3, 1)
    assert dry["bytes"] == sum(weights_bytes.values()) > 0
    assert dry["checkpoints"] == 9 and dry["kept"] == 5 and dry["soups"] == 2
    assert "(dry run)" in printed and "would delete the weights of 4" in printed and "--apply" in printed
    assert _artifact_bytes(gc_sweep["artifacts"], eid) == disk_before  # a dry run deletes nothing

    rc, done, printed = _gc(capsys, tmp, "--apply")
    assert rc == 0 and done["applied"] and done["bytes"] == dry["bytes"]
    assert disk_before - _artifact_bytes(gc_sweep["artifacts"], eid) == done["bytes"]
    assert "deleted the weights of 4" in printed
    # every record stays: READY records, metrics, sha256 and the metadata file; the weights of the 4 are gone
    after = {r.model_id: r for r in registry.search_checkpoints(client, [eid])}
    assert set(after) == {r.model_id for r in records_before}
    for mid in expect_gone:
        model = client.get_logged_model(mid)
        assert model.tags["ich.gc"] == "deleted" and model.tags["ich.gc_bytes"] == str(weights_bytes[mid])
        assert model.tags[registry.TAG_SHA256]
        assert [f.path for f in client.list_logged_model_artifacts(mid)] == [META]
        if mid != gc_sweep["superseded"]:
            assert after[mid].metrics["val_macro_f1"] in SCORES["a"] + SCORES["b"]
    # what stays loads (sha256 verified): the champion's ingredients, the hand soup's, each trial's last
    for mid in champion_ingredients | {ids[("a", 1)], ids[("a", 4)], ids[("b", 4)]}:
        registry.load_record(client, after[mid], tmp / "check")
    registry.load_record(client, registry.get_model_record(client, gc_sweep["hand"]), tmp / "check")
    champion = gc_sweep["champion"]
    registry.load_record(client, registry.get_model_record(client, champion["model_id"]), tmp / "check")
    _, folder, _ = fetch_verified(f"models:/{champion['registered_model']}@champion", tmp / "served")
    served = mlflow.pyfunc.load_model(str(folder))  # the pyfunc around the verified soup record: no pickle
    image = next((Path(digits_dataset).parent / "images").rglob("*.png"))
    out = served.predict(pd.DataFrame({"image": [base64.b64encode(image.read_bytes()).decode()]}))
    assert out["class"][0] in digits_data.classes and abs(sum(out["probabilities"][0]) - 1) < 1e-4

    # souping again: the collected records are skipped with one note, no sha256/download failure per checkpoint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = run_soups(SoupOptions(experiment=EXPERIMENT, tracking_uri=mlflow_server, scope="across",
                                      recipe="uniform", bn="average", n_resamples=200))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not [m for m in messages if "skipping checkpoint" in m], messages
    assert again["skipped"] == []
    assert any("3 checkpoint(s) kept as records only" in n for n in again["notes"]), again["notes"]

    # a second gc finds nothing left to delete
    rc, second, printed = _gc(capsys, tmp, "--apply")
    assert rc == 0 and second["deleted"] == 0 and second["bytes"] == 0 and second["already_collected"] == 4

    # the sweep config's gc keys set the policy when no CLI override is given
    from tests.fixtures_sweep import write_sweep_config
    config = write_sweep_config(tmp, EXPERIMENT)
    config.write_text(config.read_text() + "gc: {keep_top_k: 3, keep_last_k: 0}\n")
    assert ich_main(["gc", "--experiment", EXPERIMENT, "--config", str(config), "--json", str(tmp / "cfg.json")]) == 0
    from_config = json.loads((tmp / "cfg.json").read_text())
    assert (from_config["policy"]["keep_top_k"], from_config["policy"]["keep_last_k"]) == (3, 0)
    assert from_config["policy"]["metric"] == "val_macro_f1" and from_config["deleted"] == 0
    capsys.readouterr()


@pytest.mark.integration
def test_gc_unknown_experiment_is_one_line(mlflow_server, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ich_main(["gc", "--experiment", "no-such-gc-experiment"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ich gc: error:") and "no-such-gc-experiment" in err[0]
