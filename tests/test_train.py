"""The training loop on real data (scikit-learn's digits): it learns, it resumes exactly, its CLI works."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ich.checkpoint import CheckpointError, load_checkpoint
from sweeps.cli import main as ich_main
from ich.data import ICHDataset, Split
from ich.train import TrainConfig, Trainer, evaluate_logits, lr_at

# Digits are not mirror-symmetric, so no flips; light augmentation so 6 epochs suffice.
LIGHT = dict(hflip=0.0, lr=2e-3, rand_augment_n=0, random_erasing=0.0, color_jitter=0.0, scale_min=0.5)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a busy 2-core machine two intra-op threads spin against each other (5-10x slower); one is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subset(data: ICHDataset, n_train: int, seed: int = 0) -> ICHDataset:
    """The same dataset (same fingerprint) with a stratified-enough random subset of its train split."""
    tr = data.splits["train"]
    idx = np.sort(np.random.default_rng(seed).choice(len(tr), n_train, replace=False))
    splits = dict(data.splits)
    splits["train"] = Split(tr.images[idx], tr.labels[idx], [tr.paths[i] for i in idx])
    return ICHDataset(data.manifest, splits)


# ----------------------------------------------------------------------------------------------- it learns

def test_tiny_coatnet_learns_the_digits(digits_data):
    cfg = TrainConfig(model="coatnet_tiny_ich", epochs=6, batch_size=64, **LIGHT)
    trainer = Trainer(cfg, digits_data)
    history = [r.metrics for r in trainer.fit()]
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5, 6]
    first, last = history[0], history[-1]
    for m in history:
        assert all(math.isfinite(v) for v in m.values()), m
        assert 0 <= m["data_wait_share"] < 1 and m["images_per_s"] > 0
    assert last["train_loss"] < 0.6 * first["train_loss"]
    assert last["val_loss"] < first["val_loss"]
    assert last["val_accuracy"] >= 0.8, history  # chance is 0.1; this recipe reaches 0.92-0.96
    assert last["val_macro_f1"] >= 0.75
    assert last["lr"] < 0.05 * cfg.lr  # cosine has come down
    test = trainer.evaluate("test")
    assert test["test_accuracy"] >= 0.75
    # evaluate() agrees with the metrics computed from predict()'s logits.
    logits = trainer.predict("val")
    assert logits.shape == (len(digits_data.splits["val"]), 10)
    again = evaluate_logits(logits, digits_data.splits["val"].labels, 10, prefix="val_")
    assert again["val_accuracy"] == pytest.approx(last["val_accuracy"])


# ----------------------------------------------------------------------------------------------- exact resume

def test_resume_from_saved_state_replays_the_same_run(digits_data, tmp_path):
    data = subset(digits_data, 384)  # 6 batches of 64 = 3 optimizer steps per epoch
    # Every random stream on: data order, RandAugment/erasing/jitter, MixUp/CutMix, drop path; warmup and
    # restarts so the learning rate depends on the step counter; accumulation so steps != batches.
    cfg = TrainConfig(epochs=4, batch_size=64, accum_steps=2, lr=2e-3, schedule="cosine_restarts",
                      restart_period=1, warmup_epochs=0.5, min_lr=1e-5, mixup=0.2, cutmix=1.0,
                      label_smoothing=0.1, drop_path=0.1, seed=11, eval_batch_size=128)
    straight = Trainer(cfg, data)
    full = [r.metrics for r in straight.fit()]
    assert straight.epoch == 4 and straight.step == 4 * 3

    first = Trainer(cfg, data)
    part1 = [r.metrics for r in first.fit(epochs=2)]
    assert first.epoch == 2
    at_two = first.weights()
    first.save_state(tmp_path / "state")
    del first
    torch.manual_seed(999)  # whatever the global RNG holds must not matter
    np.random.seed(999)
    resumed = Trainer(cfg, data)
    resumed.load_state(tmp_path / "state")
    assert (resumed.epoch, resumed.step) == (2, 6)
    part2 = [r.metrics for r in resumed.fit()]
    assert [m["epoch"] for m in part2] == [3, 4]

    a, b = straight.weights(), resumed.weights()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert any(not torch.equal(a[k], at_two[k]) for k in a)  # epochs 3-4 really trained
    for m_full, m_res in zip(full, part1 + part2):
        for k in ("train_loss", "lr", "val_loss", "val_accuracy", "val_macro_f1"):
            assert m_res[k] == pytest.approx(m_full[k], rel=1e-5, abs=1e-6), (m_full["epoch"], k)
    # Optimizer moments resumed too.
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for pid in sa:
        torch.testing.assert_close(sb[pid]["exp_avg_sq"], sa[pid]["exp_avg_sq"], atol=1e-8, rtol=1e-4)
        assert float(sb[pid]["step"]) == float(sa[pid]["step"]) == 12

    # A different seed gives a different run (so the comparison above can fail).
    other = Trainer(dataclasses.replace(cfg, seed=12), data)
    m_other = next(iter(other.fit(epochs=1))).metrics
    assert abs(m_other["train_loss"] - full[0]["train_loss"]) > 1e-4


def test_training_state_of_another_dataset_is_refused(digits_data, tmp_path):
    data = subset(digits_data, 64)
    cfg = TrainConfig(epochs=1, batch_size=64, **LIGHT)
    t = Trainer(cfg, data)
    list(t.fit())
    t.save_state(tmp_path / "state")
    assert json.loads((tmp_path / "state" / "train_state.json").read_text())["epoch"] == 1
    other = ICHDataset({**data.manifest, "fingerprint": "f" * 64}, data.splits)
    with pytest.raises(CheckpointError, match="another dataset"):
        Trainer(cfg, other).load_state(tmp_path / "state")
    with pytest.raises(CheckpointError, match="cannot read"):
        Trainer(cfg, data).load_state(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------- schedules

def test_cosine_decays_from_peak_to_min_lr():
    cfg = TrainConfig(epochs=10, lr=1e-3, min_lr=1e-5, schedule="cosine")
    spe = 20
    lrs = [lr_at(cfg, s, spe) for s in range(cfg.epochs * spe)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-5, abs=1e-7)  # ends near min_lr
    assert all(b <= a + 1e-15 for a, b in zip(lrs, lrs[1:]))  # monotone
    assert lrs[len(lrs) // 2] == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-9)  # half way: the midpoint
    assert lr_at(cfg, 10 * spe + 5, spe) == pytest.approx(1e-5)  # past the end: stays at min_lr


def test_cosine_restarts_return_to_the_peak_every_period():
    cfg = TrainConfig(epochs=12, lr=2e-3, min_lr=0.0, schedule="cosine_restarts", restart_period=3)
    spe = 10
    period = 3 * spe
    for k in range(4):
        assert lr_at(cfg, k * period, spe) == pytest.approx(2e-3)  # peak at every restart
        assert lr_at(cfg, k * period + period - 1, spe) < 0.01 * 2e-3  # bottom just before it
        assert lr_at(cfg, k * period + period // 2, spe) == pytest.approx(1e-3)
    cycle = [lr_at(cfg, s, spe) for s in range(period)]
    assert [lr_at(cfg, s + 2 * period, spe) for s in range(period)] == pytest.approx(cycle)


def test_warmup_ramps_linearly_then_follows_the_schedule():
    cfg = TrainConfig(epochs=10, lr=1e-3, warmup_epochs=2, schedule="cosine")
    spe = 5
    warm = [lr_at(cfg, s, spe) for s in range(10)]
    assert warm == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lr_at(cfg, 10, spe) == pytest.approx(1e-3)  # the cosine starts at the peak after warmup
    assert lr_at(cfg, 49, spe) < 1e-5
    const = TrainConfig(lr=5e-4, warmup_epochs=1, schedule="constant")
    assert [lr_at(const, s, 4) for s in range(6)] == pytest.approx([1.25e-4, 2.5e-4, 3.75e-4, 5e-4, 5e-4, 5e-4])
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(TrainConfig(schedule="step"), 0, 10)


def test_config_from_dict_coerces_and_refuses_unknown_options():
    cfg = TrainConfig.from_dict({"lr": 1, "epochs": np.int64(3), "compile": 0, "model": "vit_tiny_ich"})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.epochs == 3 and type(cfg.epochs) is int
    assert cfg.compile is False
    with pytest.raises(ValueError, match="unknown training option.*lr_max"):
        TrainConfig.from_dict({"lr_max": 1})


# ----------------------------------------------------------------------------------------------- CLI

ROW = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)%\s*$")


def _rows(text: str) -> list[tuple]:
    return [m.groups() for line in text.splitlines() if (m := ROW.match(line))]


def test_ich_train_cli_per_epoch_metrics_checkpoints_and_resume(digits_dataset, digits_data, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", str(digits_dataset), "--out", str(out), "--hflip", "0", "--lr", "2e-3", "--rand-augment-n",
            "0", "--random-erasing", "0", "--color-jitter", "0", "--scale-min", "0.5", "--batch-size", "64"]
    assert ich_main(base + ["--epochs", "2"]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    assert [int(r[0]) for r in rows] == [1, 2], text
    assert f"coatnet_tiny_ich on 10 classes, {len(digits_data.splits['train'])} train images" in text
    assert re.search(r"^test: accuracy 0\.\d{4}, macro F1 0\.\d{4}$", text, re.M), text
    for r in rows:
        epoch, val_acc = int(r[0]), float(r[3])
        state, meta = load_checkpoint(out / f"epoch_{epoch:03d}")
        assert meta.epoch == epoch and meta.architecture == "coatnet_tiny_ich" and meta.img_size == 32
        assert meta.class_names == digits_data.classes and meta.dataset_fingerprint == digits_data.fingerprint
        assert meta.init_fingerprint.startswith("random:")
        assert round(meta.metrics["val_accuracy"], 4) == pytest.approx(val_acc)  # what was printed was saved
        assert "head.fc.weight" in state and state["head.fc.weight"].shape == (10, 128)
    assert (out / "state" / "train_state.safetensors").is_file()

    # --resume continues at epoch 3 and writes only the new checkpoint.
    before = load_checkpoint(out / "epoch_002")[0]
    assert ich_main(base + ["--epochs", "3", "--resume", str(out / "state")]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "at epoch 2" in text
    assert [int(r[0]) for r in _rows(text)] == [3], text
    assert sorted(p.name for p in out.iterdir()) == ["epoch_001", "epoch_002", "epoch_003", "state"]
    after = load_checkpoint(out / "epoch_002")[0]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert load_checkpoint(out / "epoch_003")[1].epoch == 3


def test_ich_train_bad_option_value_is_a_one_line_error(digits_dataset, capsys):
    assert ich_main(["train", str(digits_dataset), "--model", "resnet_typo_ich", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ich train: error:") and "resnet_typo_ich" in err


def test_ich_train_on_a_missing_dataset_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "no-such-dataset"
    p = subprocess.run([sys.executable, "-m", "sweeps.cli", "train", str(missing), "--epochs", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ich train: error:") and str(missing) in lines[0]
    assert "Traceback" not in p.stderr and p.stdout == ""
