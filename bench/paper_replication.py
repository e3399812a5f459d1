"""The paper's recipe at CPU scale (issue 22, item 5): within-trajectory soups of one 50-epoch trajectory per seed.

    apt-get install -y dataset-fashion-mnist
    python -m bench.paper_replication [--seeds 0,1,2] [--epochs 50] [--quick]

What runs, and how it maps onto the paper (../shared/paper.md, docs/paper.md):
- Data: Fashion-MNIST at ICH-17 scale (bench/fashion_mnist.py: 740 train / 74 val per class, 300 test per class,
  ingested at 32 px), the paper's split roles: val selects, test only reports.
- "ImageNet-pretrained": the tiny CoAtNet (ich/models.py) is first trained on images of Fashion-MNIST's training
  file that the subsample does not use (disjoint from train, val and test), then its classifier is replaced by a
  fresh one, as the paper replaces the ImageNet head for 17 classes. Every seed fine-tunes from this one init.
- Fine-tuning: the paper's recipe value by value (sweeps/configs/paper-coatnet0.yaml's `train:` block, read from
  the file) with only the scale changed: the tiny model at 32 px on CPU, fp32 (no CUDA for fp16), everything else
  as the paper: AdamW lr 1e-4, wd 1e-3 on all parameters, batch 64 x 2, clip 1.0, MixUp 0.2 + CutMix 1.0,
  RandomResizedCrop + flip + ColorJitter 0.4 + RandAugment(2, 9 of 31 bins) + RandomErasing 0.2, cosine warm
  restarts T_0 = 3, 50 epochs, a checkpoint every epoch; eval: centre crop 0.875 (the paper's 224/256), ImageNet
  mean/std.
- Soups per seed (one trajectory): best single (best val macro F1, the paper's ranking metric), uniform and
  greedy soups (ranked and accepted by val macro F1, ties accepted: the paper's rule) and soft voting, over two
  ingredient pools: the paper's top 8 epochs by val, and every epoch. BN buffers are averaged like every other
  tensor (the paper's plain state-dict mean).
- Reported: test accuracy and macro F1 with 95% bootstrap intervals, each soup minus the best single on the same
  test images (paired bootstrap 95% interval) with McNemar's exact p, beside the paper's deltas.

The selection (ranking, pools, greedy acceptance) uses val only; test is computed once per model for the table.
Output: bench/out/paper_replication.json and .md. Not part of `make bench` (about an hour on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
PAPER_CONFIG = ROOT / "sweeps" / "configs" / "paper-coatnet0.yaml"
# The paper's table (paper.md): soup minus the single model on ICH-17 test, percentage points (acc, macro F1).
PAPER_DELTAS = {"CoAtNet-0": {"uniform": (71.30 - 70.63, 66.38 - 65.98), "greedy": (71.03 - 70.63, 66.42 - 65.98)},
                "CoAtNet-2": {"uniform": (72.36 - 71.43, 69.28 - 68.58), "greedy": (72.23 - 71.43, 69.05 - 68.58)}}
TOP_K = 8
RANK_METRIC = "macro_f1"


def paper_train_block(**scale) -> dict:
    """The paper config's `train:` values with the CPU-scale overrides (model, size, precision)."""
    import yaml
    train = dict(yaml.safe_load(PAPER_CONFIG.read_text())["train"])
    train.update(scale)
    return train


def pretraining_dataset(size: int, per_class: int, seed: int):
    """An in-memory ICHDataset of Fashion-MNIST training images the study subsample does not use."""
    import torch
    import torch.nn.functional as F

    from bench.fashion_mnist import DEFAULT_SOURCE, FILES, CLASSES, Subsample, read_idx, stratified_pick
    from ich.data import ICHDataset, Split

    sub = Subsample()
    x, y = read_idx(DEFAULT_SOURCE / FILES["train"][0], DEFAULT_SOURCE / FILES["train"][1])
    rng = np.random.default_rng(sub.seed)  # the subsample's own draw, replayed, so we can exclude it exactly
    used = np.concatenate(stratified_pick(y, [sub.train_per_class, sub.val_per_class], rng))
    rest = np.setdiff1d(np.arange(len(y)), used)
    rng = np.random.default_rng(seed + 1000)
    train_idx, val_idx = [], []
    for c in range(len(CLASSES)):
        members = rng.permutation(rest[y[rest] == c])
        train_idx.append(members[:per_class])
        val_idx.append(members[per_class:per_class + per_class // 10])

    def split(idx):
        idx = np.sort(np.concatenate(idx))
        t = torch.from_numpy(x[idx]).float().unsqueeze(1)
        t = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 255).round()
        imgs = t.to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
        return Split(imgs, y[idx].astype(np.int64))

    manifest = {"classes": list(CLASSES), "fingerprint": f"fashion-pretrain-{per_class}-s{seed}", "image_size": size}
    assert not set(rest) & set(used)
    return ICHDataset(manifest, {"train": split(train_idx), "val": split(val_idx), "test": split(val_idx)})


def pretrain(size: int, per_class: int, epochs: int, seed: int) -> dict:
    """The stand-in for ImageNet weights: trained on disjoint images, classifier then replaced (paper: new head)."""
    import torch

    from ich.models import classifier_keys, create_model
    from ich.train import TrainConfig, Trainer

    data = pretraining_dataset(size, per_class, seed)
    cfg = TrainConfig(model="coatnet_tiny_ich", img_size=size, epochs=epochs, lr=2e-3, weight_decay=0.05,
                      schedule="cosine", scale_min=0.35, rand_augment_n=1, random_erasing=0.0, seed=seed)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, data)
    for r in trainer.fit():
        print(f"  pretrain epoch {r.epoch}/{epochs}: val acc {r.metrics['val_accuracy']:.4f}", flush=True)
    state = trainer.weights()
    torch.manual_seed(seed)
    fresh = create_model("coatnet_tiny_ich", data.num_classes, size)
    for k in classifier_keys(fresh):  # a new classifier, as the paper's replaced ImageNet head
        state[k] = fresh.state_dict()[k].clone()
    print(f"  pretraining took {time.perf_counter() - t0:.0f} s", flush=True)
    return state


def trajectory(data, init_state: dict, train: dict, seed: int):
    """One paper trajectory: every epoch's weights (CPU) and val metrics."""
    from ich.train import TrainConfig, Trainer

    cfg = TrainConfig.from_dict({**train, "seed": seed})
    trainer = Trainer(cfg, data, init_state={k: v.clone() for k, v in init_state.items()},
                      init_fingerprint="fashion-pretrain")
    epochs = []
    for r in trainer.fit():
        epochs.append({"epoch": r.epoch, "weights": r.weights(), "val": {k[4:]: v for k, v in r.metrics.items()
                                                                          if k.startswith("val_")}})
        if r.epoch % 5 == 0 or r.epoch == cfg.epochs:
            print(f"  seed {seed} epoch {r.epoch}/{cfg.epochs}: val macro F1 {r.metrics['val_macro_f1']:.4f} "
                  f"lr {r.metrics['lr']:.2e}", flush=True)
    return trainer, epochs


def soups_of(trainer, pool: list[dict], y_val: np.ndarray, num_classes: int) -> dict:
    """Uniform, greedy (val macro F1, ties accepted) and soft voting over `pool` (best-first by val)."""
    import copy

    from soups.average import Ingredient, RunningSum, greedy_soup
    from soups.evaluate import metric_value

    model = copy.deepcopy(trainer.model)

    def logits(sd, split):
        model.load_state_dict(sd)
        return trainer.predict(split, model=model)

    ings = [Ingredient(f"epoch {e['epoch']}", e["val"][RANK_METRIC], e["weights"]) for e in pool]
    total = RunningSum()
    for ing in ings:
        total.add(ing.state_dict(), ing.name)
    uni = total.mean()
    greedy = greedy_soup(ings, lambda sd: metric_value(logits(sd, "val"), y_val, num_classes, RANK_METRIC),
                         tie_rule="accept")
    out = {"uniform": {"sd": uni, "ingredients": [i.name for i in ings]},
           "greedy": {"sd": greedy.state_dict, "ingredients": greedy.accepted}}
    for name in out:
        out[name]["val_logits"], out[name]["test_logits"] = logits(out[name]["sd"], "val"), logits(out[name]["sd"], "test")
        del out[name]["sd"]
    vote = {s: np.mean([logits(e["weights"], s) for e in pool], axis=0) for s in ("val", "test")}
    out["soft_vote"] = {"ingredients": [i.name for i in ings], "val_logits": vote["val"], "test_logits": vote["test"]}
    return out


def figures(y: np.ndarray, logits: np.ndarray, num_classes: int, n_resamples: int) -> dict:
    from soups.stats import bootstrap_ci
    pred = logits.argmax(1)
    out = {}
    for m in ("accuracy", "macro_f1"):
        ci = bootstrap_ci(y, pred, m, n_resamples=n_resamples, num_classes=num_classes)
        out[m] = [ci.point, ci.low, ci.high]
    return out


def run_seed(data, init_state, train, seed: int, n_resamples: int) -> dict:
    from soups.evaluate import metric_value
    from soups.stats import paired_comparison

    t0 = time.perf_counter()
    trainer, epochs = trajectory(data, init_state, train, seed)
    train_s = time.perf_counter() - t0
    y_val, y_test = data.splits["val"].labels, data.splits["test"].labels
    k = data.num_classes
    ranked = sorted(epochs, key=lambda e: (-e["val"][RANK_METRIC], -e["epoch"]))  # best first; ties: later epoch
    best = ranked[0]
    best_test = trainer.predict("test", model=_with(trainer, best["weights"]))
    row = {"seed": seed, "train_s": round(train_s), "epochs": len(epochs),
           "val_curve": [round(e["val"][RANK_METRIC], 4) for e in epochs],
           "best_single": {"epoch": best["epoch"], "val_macro_f1": best["val"][RANK_METRIC],
                           "test": figures(y_test, best_test, k, n_resamples)}, "pools": {}}
    for pool_name, pool in (("top8", ranked[:TOP_K]), ("all", ranked)):
        t1 = time.perf_counter()
        soups = soups_of(trainer, pool, y_val, k)
        entry = {"ingredients": [e["epoch"] for e in pool], "seconds": round(time.perf_counter() - t1, 1)}
        for name, s in soups.items():
            cmp = paired_comparison(y_test, s["test_logits"].argmax(1), best_test.argmax(1), n_resamples=n_resamples,
                                    num_classes=k)
            entry[name] = {"ingredients": s["ingredients"],
                           "val_macro_f1": metric_value(s["val_logits"], y_val, k, RANK_METRIC),
                           "test": figures(y_test, s["test_logits"], k, n_resamples), "vs_best_single": cmp}
        row["pools"][pool_name] = entry
    return row


def _with(trainer, sd):
    import copy
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(sd)
    return model


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(result: dict) -> str:
    lines = ["| seed | pool | model | val F1 | test acc [95% CI] | test F1 [95% CI] | Δacc vs best [95% CI] | "
             "ΔF1 vs best [95% CI] | McNemar p |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["seeds"]:
        b = r["best_single"]
        acc, f1 = b["test"]["accuracy"], b["test"]["macro_f1"]
        lines.append(f"| {r['seed']} | – | best single (epoch {b['epoch']}) | {pct(b['val_macro_f1'])} | "
                     f"{pct(acc[0])} [{pct(acc[1])}, {pct(acc[2])}] | {pct(f1[0])} [{pct(f1[1])}, {pct(f1[2])}] | | | |")
        for pool_name, entry in r["pools"].items():
            for name in ("uniform", "greedy", "soft_vote"):
                s = entry[name]
                acc, f1, v = s["test"]["accuracy"], s["test"]["macro_f1"], s["vs_best_single"]
                label = f"{name} ({len(s['ingredients'])} ingr.)"
                lines.append(
                    f"| {r['seed']} | {pool_name} | {label} | {pct(s['val_macro_f1'])} | "
                    f"{pct(acc[0])} [{pct(acc[1])}, {pct(acc[2])}] | {pct(f1[0])} [{pct(f1[1])}, {pct(f1[2])}] | "
                    f"{100 * v['acc_diff']:+.2f} [{100 * v['acc_diff_low']:+.2f}, {100 * v['acc_diff_high']:+.2f}] | "
                    f"{100 * v['f1_diff']:+.2f} [{100 * v['f1_diff_low']:+.2f}, {100 * v['f1_diff_high']:+.2f}] | "
                    f"{v['mcnemar_p']:.2f} |")
    lines += ["", "Mean over seeds of soup − best single (test, percentage points), beside the paper's:", "",
              "| pool | soup | Δacc (mean, min..max) | ΔF1 (mean, min..max) | paper CoAtNet-0 Δacc / ΔF1 | "
              "paper CoAtNet-2 Δacc / ΔF1 |", "|---|---|---|---|---|---|"]
    for pool_name in ("top8", "all"):
        for name in ("uniform", "greedy", "soft_vote"):
            da = [100 * r["pools"][pool_name][name]["vs_best_single"]["acc_diff"] for r in result["seeds"]]
            df = [100 * r["pools"][pool_name][name]["vs_best_single"]["f1_diff"] for r in result["seeds"]]
            paper = [f"{d[0]:+.2f} / {d[1]:+.2f}" if d else "–"
                     for d in (PAPER_DELTAS["CoAtNet-0"].get(name), PAPER_DELTAS["CoAtNet-2"].get(name))]
            lines.append(f"| {pool_name} | {name} | {np.mean(da):+.2f} ({min(da):+.2f}..{max(da):+.2f}) | "
                         f"{np.mean(df):+.2f} ({min(df):+.2f}..{max(df):+.2f}) | {paper[0]} | {paper[1]} |")
    return "\n".join(lines) + "\n"


def study_args(p: argparse.ArgumentParser, argv, quick_epochs) -> argparse.Namespace:
    """The options of a CPU-scale trajectory study (this script's and bench/recipe_study.py's, which add --epochs
    and their own before calling): parsed, torch's threads set, and --quick's smoke sizes applied."""
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pretrain-per-class", type=int, default=2000)
    p.add_argument("--pretrain-epochs", type=int, default=6)
    p.add_argument("--n-resamples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--quick", action="store_true", help="2 epochs, 1 seed, a small pretraining: a smoke run")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    if a.quick:
        a.seeds, a.epochs, a.pretrain_per_class, a.pretrain_epochs, a.n_resamples = "0", quick_epochs, 100, 1, 200
    return a


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=50)
    a = study_args(p, argv, quick_epochs=2)

    from bench.fashion_mnist import build_dataset
    from ich.data import load_dataset

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(build_dataset(out / "datasets"))
    size = data.image_size
    train = paper_train_block(model="coatnet_tiny_ich", img_size=size, epochs=a.epochs, amp="off",
                              channels_last="off", eval_batch_size=512)
    print(f"paper recipe at CPU scale: {json.dumps(train)}", flush=True)
    t0 = time.perf_counter()
    init_state = pretrain(size, a.pretrain_per_class, a.pretrain_epochs, seed=0)
    result = {"train": train, "data": data.manifest.get("fingerprint"), "top_k": TOP_K, "rank_metric": RANK_METRIC,
              "pretrain": {"per_class": a.pretrain_per_class, "epochs": a.pretrain_epochs},
              "n_resamples": a.n_resamples, "seeds": []}
    for seed in [int(s) for s in a.seeds.split(",")]:
        result["seeds"].append(run_seed(data, init_state, train, seed, a.n_resamples))
        (out / "paper_replication.json").write_text(json.dumps(result, indent=1))  # partial results survive
    result["seconds"] = round(time.perf_counter() - t0)
    (out / "paper_replication.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out / "paper_replication.md").write_text(md)
    print(md)
    print(f"took {result['seconds']} s; {out / 'paper_replication.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
