"""`ich train --config FILE --set a.b=v` and `ich train --trial ID` (issue 24 item 5): one trial reproduced
without copying values by hand. The options each checkpoint trained with are read back from its
checkpoint.json (extra.config); the init from its init fingerprint. Controls: the same command without the config
or the trial trains with the defaults and a random init."""
from __future__ import annotations

import dataclasses

import pytest

from ich.checkpoint import read_meta
from ich.train_config import TrainConfig
from sweeps.cli import main as ich_main

FAST = ["--epochs", "1", "--batch-size", "64"]


def _config(tmp_path) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text("experiment: reproduce\ntrain:\n  model: coatnet_tiny_ich\n  img_size: 32\n"
                    "  label_smoothing: 0.05\n  lr: 1.0e-3\n  mixup: 0.0\n  cutmix: 0.0\n"
                    "search: {}\nasha: {grace_period: 1}\n")
    return str(path)


def test_a_sweep_configs_train_block_with_set_and_flags(digits_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", str(digits_dataset), "--config", _config(tmp_path), "--set", "train.lr=2e-3", "--out", str(out),
            *FAST]
    assert ich_main(argv) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "train: block with train.lr=2e-3" in said
    config = read_meta(out / "epoch_001").extra["config"]
    assert config["label_smoothing"] == 0.05  # from the file
    assert config["lr"] == 2e-3  # --set over the file
    assert config["epochs"] == 1 and config["batch_size"] == 64  # flags over both
    # Control: without --config the file's value is not there (the default is).
    assert ich_main(["train", str(digits_dataset), "--out", str(tmp_path / "plain"), *FAST]) == 0
    assert read_meta(tmp_path / "plain" / "epoch_001").extra["config"]["label_smoothing"] == \
        TrainConfig.label_smoothing != 0.05


def test_set_without_a_config_and_an_unknown_trial_are_one_line(digits_dataset, tmp_path, mlflow_server, capsys):
    assert ich_main(["train", str(digits_dataset), "--set", "train.lr=1"]) == 2
    assert "give the config with --config" in capsys.readouterr().err
    assert ich_main(["train", str(digits_dataset), "--trial", "nope", "--experiment", "tiny-sweep-none"]) == 2
    assert "no experiment 'tiny-sweep-none'" in capsys.readouterr().err


@pytest.mark.integration
def test_a_recorded_trial_is_reproduced_with_its_params_and_its_init(tiny_sweep, mlflow_server, mlflow_client,
                                                                     tmp_path, capsys):
    from tests.test_sweep import _trial_runs
    exp = tiny_sweep["experiment_id"]
    run = sorted(_trial_runs(mlflow_client, exp, "tiny-sweep"), key=lambda r: r.data.tags["ich.trial"])[0]
    trial = run.data.tags["ich.trial"]
    recorded = run.data.params
    one_checkpoint = next(m for m in mlflow_client.search_logged_models([exp], max_results=1000)
                          if m.source_run_id == run.info.run_id and m.tags.get("ich.kind") == "checkpoint")
    out = tmp_path / "again"
    assert ich_main(["train", str(tiny_sweep["data"]), "--trial", trial, "--experiment", "tiny-sweep", "--out",
                     str(out), "--epochs", "1"]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert f"options of trial {trial}" in said and "init of trial" in said
    meta = read_meta(out / "epoch_001")
    config = meta.extra["config"]
    for f in dataclasses.fields(TrainConfig):  # every recorded param back, but the epochs the flag changed
        if f.name != "epochs":
            assert str(config[f.name]) == recorded[f.name], (f.name, config[f.name], recorded[f.name])
    assert config["epochs"] == 1 and recorded["epochs"] != "1"
    # The same shared init as the trial: its checkpoints' init fingerprint (control: a plain run's is random).
    assert meta.init_fingerprint == one_checkpoint.tags["ich.init_fingerprint"]
    assert ich_main(["train", str(tiny_sweep["data"]), "--out", str(tmp_path / "plain"), "--epochs", "1"]) == 0
    assert read_meta(tmp_path / "plain" / "epoch_001").init_fingerprint.startswith("random:")
