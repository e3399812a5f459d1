"""The paper's recipe as configs (issue 22, docs/design.md#16): every value of sweeps/configs/paper-*.yaml is
checked, item by item, against the recipe read out of docs/paper.md's text. Also the sweep config's `grid:`.

The expected values come from the paper's text (regexes written here) and, where the paper names a torchvision
transform without arguments, from torchvision's own defaults and its ImageNet eval transform; never from the
code under test.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from pathlib import Path

import pytest

from ich.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "docs" / "paper.md"
SHARED_PAPER = ROOT.parent / "shared" / "paper.md"  # beside the clone in CI and on the team's machine
CONFIGS = {"paper-coatnet0.yaml": "coatnet0", "paper-coatnet2.yaml": "coatnet2", "paper-baselines.yaml": "baselines"}
NUM = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"  # 1e-4, 0.2, 1.0 (not the full stop after it)
# The paper's table names models; timm's names of those architectures
BASELINE_ARCHS = {"ResNet-50": "resnet50", "DenseNet-121": "densenet121", "ViT": "vit_base_patch16_224"}


def test_docs_paper_is_the_shared_copy():
    text = PAPER.read_text(encoding="utf-8")
    assert "## Training recipe of the paper" in text
    if SHARED_PAPER.is_file():
        assert text == SHARED_PAPER.read_text(encoding="utf-8"), "docs/paper.md differs from ../shared/paper.md"


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}[^\n]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"paper.md has no section {title!r}"
    return " ".join(m.group(1).split())  # lines joined: the recipe wraps mid-sentence


def _find(pattern: str, text: str, what: str) -> tuple[str, ...]:
    m = re.search(pattern, text)
    assert m, f"paper.md: {what} not found (pattern {pattern!r})"
    return m.groups()


@functools.lru_cache
def paper_recipe() -> dict:
    """The recipe as paper.md states it, item -> value."""
    text = PAPER.read_text(encoding="utf-8")
    recipe, soups = _section(text, "Training recipe of the paper"), _section(text, "Soups")
    table = _section(text, "The paper's table (ICH-17 test, %)")
    from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts
    from torchvision import transforms as T
    from torchvision.models import ResNet50_Weights
    # "resize 256, center crop 224, ImageNet mean/std" is torchvision's ImageNet eval transform
    imagenet_eval = ResNet50_Weights.IMAGENET1K_V1.transforms()
    resize, crop = map(int, _find(r"Eval: resize (\d+), center crop (\d+), ImageNet mean/std", recipe, "eval"))
    assert (resize, crop) == (imagenet_eval.resize_size[0], imagenet_eval.crop_size[0])
    batch, accum = _find(r"batch (\d+) with gradient accumulation (\d+)", recipe, "batch")
    mixup, cutmix = _find(rf"MixUp {NUM} \+ CutMix {NUM}", recipe, "MixUp/CutMix")
    ra_n, ra_m = _find(r"RandAugment\((\d+), (\d+)\)", recipe, "RandAugment")
    t0, t_mult = _find(r"T_0=(\d+), T_mult=(\d+)", recipe, "T_0/T_mult")
    _find(r"(horizontal flip)", recipe, "horizontal flip")  # no probability given: torchvision's default
    _find(r"(A checkpoint every epoch)", recipe, "checkpoint every epoch")
    _find(r"(mixed precision)", recipe, "mixed precision")
    _find(r"(Within a trajectory \(the paper\))", soups, "within-trajectory soups")
    _find(r"(ranks and accepts by macro F1 and accepts ties)", soups, "greedy rule")
    rows = re.findall(r"\| ([\w-]+) \| [\d.]+ \| [\d.]+ \|", table)
    return {
        "lr": float(_find(rf"lr {NUM},", recipe, "lr")[0]),
        "weight_decay": float(_find(rf"weight decay {NUM},", recipe, "weight decay")[0]),
        "epochs": int(_find(r"(\d+) epochs", recipe, "epochs")[0]),
        "batch_size": int(batch),
        "accum_steps": int(accum),
        "amp": "fp16",  # "mixed precision": the paper's code trains in fp16 with loss scaling (issue 22)
        "grad_clip": float(_find(rf"gradient clipping {NUM}", recipe, "gradient clipping")[0]),
        "label_smoothing": float(_find(rf"label smoothing {NUM}", recipe, "label smoothing")[0]),
        "mixup": float(mixup),
        "cutmix": float(cutmix),
        "img_size": int(_find(r"RandomResizedCrop (\d+)", recipe, "RandomResizedCrop")[0]),
        "scale_min": inspect.signature(T.RandomResizedCrop).parameters["scale"].default[0],
        "hflip": inspect.signature(T.RandomHorizontalFlip).parameters["p"].default,
        # "ColorJitter 0.4": brightness = contrast = saturation = 0.4, hue untouched
        "color_jitter": float(_find(rf"ColorJitter {NUM}", recipe, "ColorJitter")[0]),
        "color_jitter_hue": 0.0,
        "rand_augment_n": int(ra_n),
        "rand_augment_magnitude": int(ra_m),
        "rand_augment_bins": inspect.signature(T.RandAugment).parameters["num_magnitude_bins"].default,
        "random_erasing": float(_find(rf"RandomErasing {NUM}", recipe, "RandomErasing")[0]),
        "eval_crop_pct": crop / resize,
        "eval_mean": [float(v) for v in imagenet_eval.mean],
        "eval_std": [float(v) for v in imagenet_eval.std],
        "eval_interpolation": imagenet_eval.interpolation.value,
        "schedule": "cosine_restarts",  # cosine annealing with warm restarts
        "restart_period": int(t0),
        "restart_period_multiplier": int(t_mult),
        "min_lr": inspect.signature(CosineAnnealingWarmRestarts).parameters["eta_min"].default,
        "warmup_epochs": 0.0,  # none mentioned
        "decay_norm_and_bias": True,  # the paper's AdamW decays all parameters (issue 22)
        "search": {},  # one trajectory per model and seed: nothing searched
        "stopped_early": False,  # every trajectory trains its 50 epochs
        "trajectories_per_seed": 1,
        "seeds": [0, 1, 2],
        "soup_scope": "within",
        "soup_recipes": "all",  # uniform and greedy
        "soup_metric": "macro_f1",
        "tie_rule": "accept",
        "ingredients": "top_k",
        "k": int(_find(r"In its MDS figure \(val\): (\d+) ingredients", table, "ingredients")[0]),
        "coatnet0_weights": "hub:" + _find(r"timm `(coatnet_0_rw_224\.\w+)`", recipe, "CoAtNet-0 weights")[0],
        "coatnet2_family": _find(r"CoAtNet-2 \(`(\w+)` family\)", recipe, "CoAtNet-2")[0],
        "baselines": sorted(BASELINE_ARCHS[r] for r in rows if not r.startswith("CoAtNet")),
    }


def config_recipe(cfg, kind: str) -> dict:
    """The same items as the config makes them, item -> value."""
    from ich.train import TrainConfig
    t = {**cfg.train}
    p = cfg.init.preprocess
    out = {k: t.get(k, getattr(TrainConfig, k, None)) for k in (
        "lr", "weight_decay", "epochs", "batch_size", "accum_steps", "amp", "grad_clip", "label_smoothing", "mixup",
        "cutmix", "img_size", "scale_min", "hflip", "color_jitter", "color_jitter_hue", "rand_augment_n",
        "rand_augment_magnitude", "rand_augment_bins", "random_erasing", "schedule", "restart_period", "min_lr",
        "warmup_epochs", "decay_norm_and_bias")}
    out.update({
        # eval: the paper's preprocessing, both through init.preprocess and as the training config's eval crop
        "eval_crop_pct": p.get("crop_pct") if p.get("crop_pct") == t.get("eval_crop_pct") else
        ("init.preprocess", p.get("crop_pct"), "train.eval_crop_pct", t.get("eval_crop_pct")),
        "eval_mean": p.get("mean"),
        "eval_std": p.get("std"),
        "eval_interpolation": p.get("interpolation"),
        # the restart period is fixed (there is no multiplier option): T_mult = 1
        "restart_period_multiplier": 1 if "restart_mult" not in {f.name for f in dataclasses.fields(TrainConfig)}
        else t.get("restart_mult"),
        "search": cfg.search,
        "stopped_early": cfg.asha.grace_period < cfg.max_epochs,
        "trajectories_per_seed": cfg.num_samples,
        "seeds": cfg.grid.get("seed"),
        "soup_scope": cfg.soups.scope,
        "soup_recipes": cfg.soups.recipe,
        "soup_metric": cfg.soups.metric,
        "tie_rule": cfg.soups.tie_rule,
        "ingredients": getattr(cfg.soups, "ingredients", None),
        "k": getattr(cfg.soups, "k", None),
    })
    if kind == "coatnet0":
        out["coatnet0_weights"] = cfg.init.weights if t.get("model") == "coatnet_0_rw_224" else t.get("model")
    elif kind == "coatnet2":
        weights = cfg.init.weights or ""
        out["coatnet2_family"] = t.get("model") if weights.startswith(f"hub:{t.get('model')}.") else weights
    else:
        out["baselines"] = sorted(cfg.grid.get("model", []))
    return out


def mismatches(cfg, kind: str) -> dict:
    """item -> (paper, config) for every item where the config differs from the paper."""
    want, got = paper_recipe(), config_recipe(cfg, kind)
    return {k: (want[k], got[k]) for k in got if got[k] != want[k]}


@functools.lru_cache
def load(name: str):
    from sweeps.config import load_config
    return load_config(ROOT / "sweeps" / "configs" / name)


ITEMS = ["lr", "weight_decay", "decay_norm_and_bias", "epochs", "batch_size", "accum_steps", "amp", "grad_clip",
         "label_smoothing", "mixup", "cutmix", "img_size", "scale_min", "hflip", "color_jitter", "color_jitter_hue",
         "rand_augment_n", "rand_augment_magnitude", "rand_augment_bins", "random_erasing", "eval_crop_pct",
         "eval_mean", "eval_std", "eval_interpolation", "schedule", "restart_period", "restart_period_multiplier",
         "min_lr", "warmup_epochs", "search", "stopped_early", "trajectories_per_seed", "seeds", "soup_scope", "soup_recipes", "soup_metric",
         "tie_rule", "ingredients", "k"]


def test_every_paper_item_is_checked():
    assert set(paper_recipe()) == set(ITEMS) | {"coatnet0_weights", "coatnet2_family", "baselines"}


@pytest.mark.parametrize("item", ITEMS)
@pytest.mark.parametrize("name", CONFIGS)
def test_paper_config_item(name, item):
    want, got = paper_recipe()[item], config_recipe(load(name), CONFIGS[name])[item]
    assert got == want, f"{name}: {item} is {got!r}, the paper's is {want!r}"


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_config_models(name):
    kind = CONFIGS[name]
    item = {"coatnet0": "coatnet0_weights", "coatnet2": "coatnet2_family", "baselines": "baselines"}[kind]
    want, got = paper_recipe()[item], config_recipe(load(name), kind)[item]
    assert got == want, f"{name}: {item} is {got!r}, the paper's is {want!r}"


def test_paper_configs_share_one_experiment():
    cfgs = {name: load(name) for name in CONFIGS}
    assert len({c.experiment for c in cfgs.values()}) == 1, "the paper's table needs one experiment"
    assert len({c.sweep for c in cfgs.values()}) == 3, "each config has its own sweep name"
    # `champion` stays a CoAtNet: the baselines register their soups under a model of their own
    base = cfgs["paper-baselines.yaml"].soups.registered_model
    assert base and base != cfgs["paper-coatnet0.yaml"].soups.registered_model
    assert cfgs["paper-coatnet0.yaml"].soups.registered_model == cfgs["paper-coatnet2.yaml"].soups.registered_model
    assert {m: load("paper-baselines.yaml").init.weights[m].split(".")[0] for m in cfgs["paper-baselines.yaml"].models} \
        == {m: f"hub:{m}" for m in cfgs["paper-baselines.yaml"].models}, "each baseline from its own ImageNet weights"


def test_comparison_reports_a_changed_value(tmp_path):
    """Control: a copy of the config with one value changed fails the comparison, naming that item only."""
    src = (ROOT / "sweeps" / "configs" / "paper-coatnet0.yaml").read_text()
    assert mismatches(load("paper-coatnet0.yaml"), "coatnet0") == {}
    from sweeps.config import load_config
    for old, new, item in [("  lr: 1.0e-4 ", "  lr: 3.0e-4 ", "lr"),
                           ("decay_norm_and_bias: true", "decay_norm_and_bias: false", "decay_norm_and_bias"),
                           ("\n    crop_pct: 0.875", "\n    crop_pct: 0.95", "eval_crop_pct"),
                           ("  amp: fp16", "  amp: bf16", "amp"),
                           ("seed: [0, 1, 2]", "seed: [0, 1]", "seeds"),
                           ("grace_period: 50", "grace_period: 6", "stopped_early"),
                           ("  k: 8", "  k: 5", "k")]:
        assert src.count(old) == 1, old
        path = tmp_path / f"{item}.yaml"
        path.write_text(src.replace(old, new))
        assert list(mismatches(load_config(path), "coatnet0")) == [item]


# --- the sweep config's grid: (sweeps/config.py) ----------------------------------------------------------

GRID_YAML = "experiment: g\nnum_samples: 2\ntrain: {epochs: 3}\ngrid: {seed: [0, 1], lr: [1.0e-3, 3e-4]}\n"


def _grid_config(tmp_path, sets=(), text=GRID_YAML):
    from sweeps.config import load_config
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return load_config(path, sets=list(sets))


def test_grid_becomes_grid_search(tmp_path):
    from sweeps.config import tune_space
    cfg = _grid_config(tmp_path)
    assert cfg.grid == {"seed": [0, 1], "lr": [1e-3, 3e-4]}  # typed: YAML 1.1 reads 3e-4 as a string
    assert cfg.num_trials == 2 * 2 * 2  # num_samples repeats the whole grid
    assert tune_space(cfg) == {"seed": {"grid_search": [0, 1]}, "lr": {"grid_search": [1e-3, 3e-4]}}
    cfg = _grid_config(tmp_path, ["grid.seed=[5, 6, 7]", "grid.model=[coatnet_tiny_ich, resnet50]", "grid.lr=null"])
    assert cfg.grid == {"seed": [5, 6, 7], "model": ["coatnet_tiny_ich", "resnet50"]}
    assert cfg.models == ["coatnet_tiny_ich", "resnet50"]
    assert _grid_config(tmp_path, ["grid.epochs=[2, 5]", "asha.grace_period=5"]).max_epochs == 5


@pytest.mark.parametrize("sets, says", [
    (["grid.seed=[]"], "grid.seed must be a non-empty list"),
    (["grid.seed=3"], "grid.seed must be a non-empty list"),
    (["grid.seed=[1, 1]"], "grid.seed lists a value twice"),
    (["grid.epochs=[abc]"], "grid.epochs value 'abc' is not valid"),
    (["grid.seeds=[1]"], "unknown key 'seeds' in grid"),
    (["grid.model=[no_such_net]"], "unknown model 'no_such_net'"),
    (["search.mixup={uniform: [0.0, 0.2]}"], "grid (seed, lr) and search (mixup) cannot be combined"),
])
def test_grid_refuses_bad_input(tmp_path, sets, says):
    with pytest.raises(ConfigError, match=re.escape(says)) as e:
        _grid_config(tmp_path, sets)
    assert "\n" not in str(e.value)


def test_grid_refusal_control(tmp_path):
    """Control for the refusals above: the same keys with good values load."""
    cfg = _grid_config(tmp_path, ["grid.seed=[1, 2]", "grid.epochs=[3]", "grid.model=[coatnet_tiny_ich]",
                                  "train.mixup=0.1"])
    assert cfg.grid["epochs"] == [3] and cfg.grid["seed"] == [1, 2]
    # the search alone (no grid) is the Optuna sweep it always was
    cfg = _grid_config(tmp_path, ["search.mixup={uniform: [0.0, 0.2]}"], text="experiment: g\ntrain: {epochs: 3}\n")
    assert cfg.grid == {} and "mixup" in cfg.search
