"""The orchestrator's parts without a server: one source for the soup options (CLI flags, sweep config,
validation), the shared helpers, the soup entry, and a checkpoint verified once on pull.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ich.checkpoint import CheckpointError, CheckpointMeta, save_checkpoint
from ich.errors import ConfigError
from soups import pull
from soups.store import registry
from soups.analysis import soft_vote
from soups.logit_store import soft_vote_logits
from soups.pool import best_first
from soups.soup_record import NO_URLS, json_safe, quiet_run_urls
from soups.evaluate import EvalSpec
from soups.options import SoupError, SoupOptions, add_soup_args, option_problem
from soups.store.registry import CheckpointRecord
from soups.soup_record import SoupEntry


# ---------------------------------------------------------------------------------------------- options

def test_cli_flags_and_defaults_come_from_the_dataclass():
    parser = argparse.ArgumentParser()
    add_soup_args(parser)
    args = parser.parse_args(["--experiment", "e"])
    defaults = SoupOptions(experiment="e")
    for f in dataclasses.fields(SoupOptions):
        if f.name == "tracking_uri":  # no flag: the environment or the local server
            assert not hasattr(args, f.name)
            continue
        assert getattr(args, f.name) == getattr(defaults, f.name), f.name
    args = parser.parse_args(["--experiment", "e", "--resamples", "300", "--alpha", "0.01", "--json", "x.json",
                              "--parallel", "3", "--bn", "recalibrate"])
    assert (args.n_resamples, args.alpha, args.json_path, args.parallel, args.bn) == (300, 0.01, "x.json", 3,
                                                                                     "recalibrate")
    args = parser.parse_args(["--experiment", "e", "--ingredients", "top_k", "--k", "2"])
    assert (args.ingredients, args.k) == ("top_k", 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--experiment", "e", "--metric", "top5"])
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --experiment is required


@pytest.mark.parametrize("name,value,problem", [
    ("scope", "sideways", "must be one of within, across, all"),
    ("metric", "top5", "must be one of accuracy, macro_precision, macro_recall, macro_f1, loss"),  # ich/metrics.py's
    ("bn", "none", "must be one of average, recalibrate, auto"),
    ("alpha", 1.5, "must lie between 0 and 1"),
    ("n_resamples", 10, "must be a whole number >= 100"),
    ("parallel", 0, "must be a whole number >= 1"),
    ("ingredients", "best", "must be one of all, top_k, cycle_end"),
    ("k", 0, "must be a whole number >= 1"),
    ("experiment", "", "must not be empty"),
])
def test_each_bad_option_is_named_in_one_line(name, value, problem):
    assert option_problem(name, value) == problem
    with pytest.raises(SoupError) as info:
        SoupOptions(**{"experiment": "e", name: value}).validate()
    assert str(info.value) == f"soup option {name}={value!r}: {problem}"


def test_sweep_config_soups_block_is_derived_from_the_options(tmp_path):
    from sweeps.config import DEFAULT_CONFIG, SoupConfig, load_config
    sweep_fields = {f.name for f in dataclasses.fields(SoupConfig)}
    assert {"scope", "recipe", "metric", "tie_rule", "bn", "registered_model", "parallel", "champion_rule", "alpha",
            "n_resamples", "ingredients", "k", "model_stock_k", "wise_alphas", "wise_head", "wise_from", "learned_by", "learned_max", "learned_steps",
            "learned_lr", "learned_seed"} == sweep_fields
    for f in dataclasses.fields(SoupConfig):
        assert f.default == SoupOptions.__dataclass_fields__[f.name].default, f.name
    text = DEFAULT_CONFIG.read_text()
    good = tmp_path / "good.yaml"
    assert "\nsoups:\n" in text
    good.write_text(text.replace("\nsoups:\n", "\nsoups:\n  champion_rule: significant\n  alpha: 0.01\n"
                                                "  n_resamples: 200\n", 1))
    cfg = load_config(good)
    assert (cfg.soups.champion_rule, cfg.soups.alpha, cfg.soups.n_resamples) == ("significant", 0.01, 200)
    opts = SoupOptions(experiment="e", **vars(cfg.soups))  # what the sweep passes to run_soups
    opts.validate()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("\nsoups:\n", "\nsoups:\n  alpha: 2\n", 1))
    with pytest.raises(ConfigError, match=r"bad.yaml: soups.alpha must lie between 0 and 1, not 2$"):
        load_config(bad)


def test_recipes_are_one_registry():
    from soups import recipes
    assert recipes.names()[:2] == ["uniform", "greedy"]  # built-ins first, in the table's order
    assert SoupOptions(experiment="e").recipes == recipes.names()
    assert SoupOptions(experiment="e", recipe="greedy").recipes == ["greedy"]
    assert option_problem("recipe", "soup_of_the_day") == f"must be one of {', '.join(recipes.names())}, all"


# ---------------------------------------------------------------------------------------------- helpers

def test_best_first_follows_the_metric_direction_and_breaks_ties_stably():
    items = [("b", 0.5), ("a", 0.9), ("c", 0.5), ("d", 0.1)]
    up = best_first(items, "accuracy", score=lambda t: t[1], tiebreak=lambda t: (t[0],))
    assert [t[0] for t in up] == ["a", "b", "c", "d"]
    down = best_first(items, "loss", score=lambda t: t[1], tiebreak=lambda t: (t[0],))
    assert [t[0] for t in down] == ["d", "b", "c", "a"]


def test_soft_vote_logits_are_the_log_of_the_mean_probabilities():
    rng = np.random.default_rng(0)
    sets = [rng.normal(size=(7, 4)).astype(np.float32) for _ in range(3)]
    out = soft_vote_logits(iter(sets))
    assert out.shape == (7, 4)
    assert np.allclose(np.exp(out), soft_vote(sets), atol=1e-6)


def test_json_safe_and_quiet_run_urls(monkeypatch):
    assert json_safe({"a": np.float32(0.5), "b": float("nan"), "_private": 1, "c": [np.int64(3), (1.0,)]}) == \
        {"a": 0.5, "b": None, "c": [3, [1.0]]}
    monkeypatch.delenv(NO_URLS, raising=False)
    with quiet_run_urls():
        assert os.environ[NO_URLS] == "true"
    assert NO_URLS not in os.environ
    monkeypatch.setenv(NO_URLS, "false")
    with pytest.raises(RuntimeError), quiet_run_urls():
        raise RuntimeError("restored even so")
    assert os.environ[NO_URLS] == "false"


def test_soup_entry_json_row_keeps_the_old_keys_without_the_local_folder():
    entry = SoupEntry(name="n", scope="within", recipe="greedy", group="g", trial="t", ingredients=[], bn_mode="none",
                      val={}, test={}, best_single={}, uniform={}, soft_vote={}, vs_best_single={},
                      soft_vote_vs_best_single={}, ckpt="/tmp/x")
    assert list(entry.to_dict()) == ["name", "scope", "recipe", "group", "trial", "ingredients", "bn_mode", "val",
                                     "test", "best_single", "uniform", "soft_vote", "vs_best_single",
                                     "soft_vote_vs_best_single", "run_id", "model_id", "pool", "params", "curve"]


# ---------------------------------------------------------------------------------------------- read once

def _pulled(tmp_path: Path) -> pull.Pulled:
    torch.manual_seed(0)
    state = {"w": torch.randn(4, 3), "b": torch.zeros(4)}
    meta = CheckpointMeta(architecture="coatnet_tiny_ich", img_size=32, num_classes=4, class_names=list("abcd"),
                          dataset_fingerprint="d", init_fingerprint="i", epoch=1)
    folder = tmp_path / "m-1"
    sha = save_checkpoint(folder, state, meta)
    record = CheckpointRecord(model_id="m-1", run_id="r", experiment_id="1", name="n", sweep="s", trial="t", epoch=1,
                              sha256=sha, dataset_fingerprint="d", init_fingerprint="i", architecture="coatnet_tiny_ich")
    return pull.Pulled(record, folder, meta, 0.5, EvalSpec.of(meta), verified=pull._file_id(folder / "model.safetensors"))


def test_a_verified_checkpoint_is_not_hashed_again_but_a_changed_one_is_refused(tmp_path, monkeypatch):
    p = _pulled(tmp_path)
    hashed = []
    real = registry.read_hashed  # verify_pulled's one read, hashed
    monkeypatch.setattr(registry, "read_hashed", lambda path: hashed.append(path) or real(path))
    for _ in range(3):
        assert set(p.load()) == {"w", "b"}
    assert hashed == []  # verified on pull: loads read the weights once each, without hashing them
    weights = p.folder / "model.safetensors"
    time.sleep(0.05)  # a later change: file times tick coarsely (a few ms)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # still safetensors, other weights
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        p.load()
    assert len(hashed) == 1
