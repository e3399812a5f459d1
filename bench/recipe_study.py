"""Every soup recipe vs the best single checkpoint (issue 21, item 8), the paper's schedule at CPU scale.

    apt-get install -y dataset-fashion-mnist
    python -m bench.recipe_study [--datasets fashion,digits] [--seeds 0,1,2] [--epochs 12] [--quick]

What runs:
- Data: Fashion-MNIST at ICH-17 scale (bench/fashion_mnist.py: 740 train / 74 val / 300 test per class, 32 px) and
  the embedded digits demo (scikit-learn's 1,797 digits at 32 px, train/val/test 1439/179/179: sweeps/job.py).
- Init: bench/paper_replication.pretrain, the stand-in for ImageNet weights: the tiny CoAtNet trained on
  Fashion-MNIST training images the Fashion subsample does not use, its classifier then replaced by a fresh one.
  The same init serves both data sets (both have 10 classes): for Fashion it is in-domain pretraining on disjoint
  images, for digits a transfer from another domain, as ImageNet -> ICH-17 is.
- Fine-tuning: one trajectory per data set and seed from that init (bench/paper_replication.trajectory), the
  paper's recipe value by value (sweeps/configs/paper-coatnet0.yaml's `train:` block: AdamW 1e-4, cosine warm
  restarts T_0 = 3, MixUp/CutMix, RandAugment...) at CPU scale: the tiny model at 32 px, fp32, `--epochs` epochs
  (default: 15 for Fashion, five restart cycles, and the paper's 50 for the cheap digits), a checkpoint every
  epoch. Digits: horizontal flip off
  (digits are not mirror-symmetric, as bench/objective_study.py).
- Pool: the paper's top 8 epochs by val macro F1 (ties: the later epoch), or every epoch if fewer.
- Soups: every registered recipe (soups/recipes/: uniform, greedy, model_stock, wise_ft, learned), each cooked by
  its own `cook(RecipeInputs)`, the function `ich soup` calls, with the product's default options (SoupOptions():
  macro F1 selects, greedy accepts ties, BN `auto`, wise_ft alphas 0..1 step 0.1 from the best single with the head
  kept, learned by model, fit on one half of val and chosen on the other). The inputs are built here from the
  trajectory's weights in memory instead of MLflow: the members are the pool's epochs, the anchor (model_stock,
  wise_ft) is the init the trajectory fine-tuned from, and the uniform pass and `finish` (BN option, val/test
  logits) are soups/build.SoupBuilder's own.
- Best single: the pool's best epoch by val macro F1 (the product's best single).
- Reported per soup: test accuracy and macro F1 with 95% bootstrap intervals; soup minus best single on the same
  test images with a paired bootstrap 95% interval and McNemar's exact p; cost: seconds to cook (uniform: the
  family's uniform pass, which also computes every member's logits, plus finish; wise_ft includes the test
  evaluation at every alpha the product logs for its report). Pooled over seeds per data set: the mean of the
  per-seed differences, its interval from resampling the same test images for every seed (stratified), and
  McNemar's exact p over the discordant pairs of all seeds together (approximate: the seeds share the images).
- Reference row `best_single_bn`: the best single through the same `finish` as the soups (the product's BN option,
  `auto`: BN statistics recalibrated on train when val says so). The product compares its soups with the raw best
  single; against this row the soup's own effect is seen apart from the BN recalibration's (`vs_reference`, and
  the pooled table `pooled_vs_reference`).

Selection (ranking, pools, greedy, alphas, learned coefficients, BN mode) uses val only; test only reports.
Output: bench/out/recipe_study.json and .md (copy the json to docs/recipe_study.json). Not part of `make bench`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.paper_replication import (RANK_METRIC, TOP_K, figures, paper_train_block, pct, pretrain,  # noqa: E402
                                     study_args, trajectory)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "best_single_bn"  # the best single with the soups' BN option applied (auto: recalibrated if val says so)


@dataclass
class Member:
    """One epoch of the trajectory in the shape a recipe reads (soups/pull.Pulled's fields the recipes use)."""
    record: SimpleNamespace  # model_id, label()
    score: float
    spec: object  # soups.evaluate.EvalSpec
    state_dict: dict

    @property
    def label(self) -> str:
        return self.record.model_id

    def load(self) -> dict:
        return self.state_dict


class _NoSkips:
    def skip(self, record, reason):  # in-memory weights cannot fail to load; a recipe's skip would be a bug here
        raise RuntimeError(f"{record.model_id} skipped: {reason}")


def member_of(epoch: dict, spec) -> Member:
    name = f"epoch-{epoch['epoch']}"
    return Member(SimpleNamespace(model_id=name, label=lambda n=name: n), epoch["val"][RANK_METRIC], spec,
                  epoch["weights"])


def cook_all(data, pool: list[dict], init_state: dict, preprocess, recipe_names: list[str] | None = None) -> dict:
    """Every recipe's soup of `pool` (best val first): {recipe: {"soup": Soup, "accepted", "params", "seconds"}},
    plus "members" (their val/test logits, from the uniform pass) and "best" (the best single's id)."""
    from soups import recipes
    from soups.build import SoupBuilder
    from soups.evaluate import EvalSpec
    from soups.options import SoupOptions

    opts = SoupOptions(experiment="recipe-study")  # the product's defaults
    builder = SoupBuilder(opts, data, _NoSkips())
    spec = EvalSpec("coatnet_tiny_ich", preprocess)
    members = [member_of(e, spec) for e in pool]
    ev = builder.evaluator(members[0])
    t0 = time.perf_counter()
    uniform_sd, members = builder.uniform(members, ev, "uniform")
    uniform = builder.finish(uniform_sd, ev)
    uniform_s = time.perf_counter() - t0
    kept: dict = {}

    inputs = recipes.RecipeInputs(
        family="trajectory", members=members, ingredients=builder.stream, evaluator=ev,
        anchor={k: v.clone() for k, v in init_state.items()}, uniform=uniform, opts=opts,
        finish=lambda sd: builder.finish(sd, ev), skip=lambda p, reason: builder.pool.skip(p.record, reason),
        anchor_name="the shared init", soup_weights=lambda name: kept[name])
    out = {}
    for name in recipe_names or recipes.names():
        t1 = time.perf_counter()
        cooked = recipes.get(name).cook(inputs)
        seconds = time.perf_counter() - t1 + (uniform_s if name == "uniform" else 0.0)
        kept[name] = (cooked.soup.state_dict, cooked.accepted)
        out[name] = {"soup": cooked.soup, "accepted": sorted(cooked.accepted, key=lambda m: int(m.split("-")[1])),
                     "params": {k: v for k, v in cooked.params.items() if k != "heldout_curve"},
                     "seconds": seconds}
    t1 = time.perf_counter()  # a reference, not a recipe: the best single through the same finish (BN option)
    out[REFERENCE] = {"soup": builder.finish(members[0].load(), ev), "accepted": [members[0].record.model_id],
                      "params": {}, "seconds": time.perf_counter() - t1}
    out["members"] = {m.record.model_id: builder.logits[m.record.model_id] for m in members}
    out["best"] = members[0].record.model_id
    return out


def run_seed(data, init_state: dict, train: dict, seed: int, n_resamples: int) -> tuple[dict, dict]:
    """One trajectory and its soups: (the JSON row, {model: test predictions} for the pooled figures)."""
    from soups.evaluate import metric_value
    from soups.stats import paired_comparison

    t0 = time.perf_counter()
    trainer, epochs = trajectory(data, init_state, train, seed)
    train_s = time.perf_counter() - t0
    y_val, y_test, k = data.splits["val"].labels, data.splits["test"].labels, data.num_classes
    ranked = sorted(epochs, key=lambda e: (-e["val"][RANK_METRIC], -e["epoch"]))  # best first; ties: later epoch
    pool = ranked[:TOP_K]
    cooked = cook_all(data, pool, init_state, trainer.preprocess)
    best_logits = cooked["members"][cooked["best"]]
    best_pred = best_logits["test"].argmax(1)
    row = {"seed": seed, "train_s": round(train_s), "epochs": len(epochs),
           "val_curve": [round(e["val"][RANK_METRIC], 4) for e in epochs], "pool": [e["epoch"] for e in pool],
           "best_single": {"epoch": pool[0]["epoch"], "val_macro_f1": metric_value(best_logits["val"], y_val, k,
                                                                                  RANK_METRIC),
                           "test": figures(y_test, best_logits["test"], k, n_resamples)}, "soups": {}}
    preds = {"best_single": best_pred}
    for name, c in cooked.items():
        if name in ("members", "best"):
            continue
        soup = c["soup"]
        pred = soup.logits["test"].argmax(1)
        preds[name] = pred
        row["soups"][name] = {
            "ingredients": c["accepted"], "bn_mode": soup.bn_mode, "params": c["params"],
            "seconds": round(c["seconds"], 2),
            "val_macro_f1": metric_value(soup.logits["val"], y_val, k, RANK_METRIC),
            "test": figures(y_test, soup.logits["test"], k, n_resamples),
            "vs_best_single": paired_comparison(y_test, pred, best_pred, n_resamples=n_resamples, num_classes=k)}
        print(f"  seed {seed} {name}: test acc {pct(row['soups'][name]['test']['accuracy'][0])} "
              f"(best single {pct(row['best_single']['test']['accuracy'][0])}), {c['seconds']:.1f} s", flush=True)
    ref_pred = preds[REFERENCE]
    for name, e in row["soups"].items():  # vs the best single with the same BN option: the soup's own effect
        if name != REFERENCE:
            e["vs_reference"] = paired_comparison(y_test, preds[name], ref_pred, n_resamples=n_resamples,
                                                  num_classes=k)
    return row, preds


def pooled_delta(y: np.ndarray, soup_preds: list[np.ndarray], best_preds: list[np.ndarray], metric: str,
                 num_classes: int, n_resamples: int, seed: int = 0, alpha: float = 0.05) -> list[float]:
    """[mean over seeds of metric(soup) - metric(best), low, high]: the seeds' models are scored on the same
    resampled test images (stratified bootstrap, soups/stats), so the interval keeps the pairing by image."""
    from soups.stats import metric_on_resamples, point_metric, resample_indices
    idx = resample_indices(y, n_resamples, np.random.default_rng(seed))
    diffs = np.mean([metric_on_resamples(y, s, idx, metric, num_classes) - metric_on_resamples(y, b, idx, metric,
                                                                                                num_classes)
                     for s, b in zip(soup_preds, best_preds)], axis=0)
    point = float(np.mean([point_metric(y, s, metric, num_classes) - point_metric(y, b, metric, num_classes)
                           for s, b in zip(soup_preds, best_preds)]))
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    return [point, float(low), float(high)]


def pooled(y: np.ndarray, preds: list[dict], num_classes: int, n_resamples: int, against: str = "best_single") -> dict:
    """Per recipe, over the seeds: mean Δacc and ΔF1 vs `against` (a key of preds) with paired intervals, and McNemar
    over all seeds' pairs."""
    from soups.stats import mcnemar_exact
    out = {}
    best = [p[against] for p in preds]
    for name in [n for n in preds[0] if n not in ("best_single", against)]:
        soup = [p[name] for p in preds]
        test = mcnemar_exact(np.tile(y, len(preds)), np.concatenate(soup), np.concatenate(best))
        out[name] = {"acc_diff": pooled_delta(y, soup, best, "accuracy", num_classes, n_resamples),
                     "f1_diff": pooled_delta(y, soup, best, "macro_f1", num_classes, n_resamples),
                     "mcnemar_b": test.b, "mcnemar_c": test.c, "mcnemar_p": test.p_value}
    return out


def _ci(v: list[float]) -> str:
    return f"{pct(v[0])} [{pct(v[1])}, {pct(v[2])}]"


def _delta(point: float, low: float, high: float) -> str:
    return f"{100 * point:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def markdown(result: dict) -> str:
    """The per-seed table and the pooled table of every data set."""
    lines = []
    for ds, r in result["datasets"].items():
        lines += [f"### {ds} ({r['n_test']} test images, {r['epochs']} epochs, pool: top {TOP_K} by val)", "",
                  "| seed | model | ingr. | val F1 | test acc [95% CI] | test F1 [95% CI] | Δacc vs best [95% CI] | "
                  "ΔF1 vs best [95% CI] | McNemar p | cook s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for s in r["seeds"]:
            b = s["best_single"]
            lines.append(f"| {s['seed']} | **best single** (epoch {b['epoch']}) | 1 | {pct(b['val_macro_f1'])} | "
                         f"{_ci(b['test']['accuracy'])} | {_ci(b['test']['macro_f1'])} | | | | |")
            for name, e in s["soups"].items():
                v = e["vs_best_single"]
                extra = f", α {e['params']['alpha']}" if "alpha" in e["params"] else ""
                extra += ", BN recal." if e["bn_mode"] == "recalibrate" else ""
                name = "(best single, BN option)" if name == REFERENCE else name
                lines.append(f"| {s['seed']} | {name}{extra} | {len(e['ingredients'])} | {pct(e['val_macro_f1'])} | "
                             f"{_ci(e['test']['accuracy'])} | {_ci(e['test']['macro_f1'])} | "
                             f"{_delta(v['acc_diff'], v['acc_diff_low'], v['acc_diff_high'])} | "
                             f"{_delta(v['f1_diff'], v['f1_diff_low'], v['f1_diff_high'])} | {v['mcnemar_p']:.3g} | "
                             f"{e['seconds']:.1f} |")
        if r.get("pooled"):
            lines += ["", f"Pooled over seeds {', '.join(str(s['seed']) for s in r['seeds'])} (mean of soup − best "
                      "single; interval: the same test images resampled for every seed; McNemar over all seeds' "
                      "pairs):", "", "| recipe | Δacc [95% CI] | ΔF1 [95% CI] | b / c | McNemar p | mean cook s |",
                      "|---|---|---|---|---|---|"]
            for name, v in r["pooled"].items():
                cost = np.mean([s["soups"][name]["seconds"] for s in r["seeds"]])
                lines.append(f"| {name} | {_delta(*v['acc_diff'])} | {_delta(*v['f1_diff'])} | "
                             f"{v['mcnemar_b']} / {v['mcnemar_c']} | {v['mcnemar_p']:.3g} | {cost:.1f} |")
        if r.get("pooled_vs_reference"):
            lines += ["", "Pooled, each soup − the best single with the same BN option (the reference row): the soup's "
                      "own effect, the BN option's set aside:", "",
                      "| recipe | Δacc [95% CI] | ΔF1 [95% CI] | b / c | McNemar p |", "|---|---|---|---|---|"]
            for name, v in r["pooled_vs_reference"].items():
                lines.append(f"| {name} | {_delta(*v['acc_diff'])} | {_delta(*v['f1_diff'])} | "
                             f"{v['mcnemar_b']} / {v['mcnemar_c']} | {v['mcnemar_p']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def epochs_of(spec: str, datasets: list[str]) -> dict[str, int]:
    """--epochs: one count for every data set ("15") or one per data set ("fashion=15,digits=50")."""
    if "=" not in spec:
        return dict.fromkeys(datasets, int(spec))
    given = {k.strip(): int(v) for k, v in (item.split("=", 1) for item in spec.split(","))}
    missing = [d for d in datasets if d not in given]
    if missing:
        raise SystemExit(f"--epochs {spec}: no epoch count for {', '.join(missing)}")
    return {d: given[d] for d in datasets}


def load_data(name: str, cache: Path):
    from bench.objective_study import dataset_folder
    from ich.data import load_dataset
    return load_dataset(dataset_folder(name, cache))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="fashion,digits")
    p.add_argument("--epochs", default="fashion=15,digits=50",
                   help="epochs per trajectory: N, or per data set (name=N,...)")
    a = study_args(p, argv, quick_epochs="2")
    datasets = a.datasets.split(",")
    epochs = epochs_of(a.epochs, datasets)

    from bench.objective_study import hflip_for

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "recipe_study_quick" if a.quick else "recipe_study"
    t0 = time.perf_counter()
    init_state = pretrain(32, a.pretrain_per_class, a.pretrain_epochs, seed=0)
    result = {"command": "python -m bench.recipe_study " + " ".join(sys.argv[1:] if argv is None else argv),
              "top_k": TOP_K, "rank_metric": RANK_METRIC, "n_resamples": a.n_resamples,
              "pretrain": {"per_class": a.pretrain_per_class, "epochs": a.pretrain_epochs,
                           "seconds": round(time.perf_counter() - t0)}, "datasets": {}}
    for ds in datasets:
        data = load_data(ds, out)
        hflip = hflip_for(ds)  # the paper's flip for clothes; none for digits (bench/objective_study.py)
        train = paper_train_block(model="coatnet_tiny_ich", img_size=data.image_size, epochs=epochs[ds], amp="off",
                                  channels_last="off", eval_batch_size=512, hflip=hflip)
        entry = {"data": data.manifest.get("fingerprint"), "n_test": len(data.splits["test"].labels),
                 "epochs": epochs[ds], "train": train, "seeds": []}
        result["datasets"][ds] = entry
        preds = []
        for seed in [int(s) for s in a.seeds.split(",")]:
            print(f"{ds} seed {seed}", flush=True)
            row, pr = run_seed(data, init_state, train, seed, a.n_resamples)
            entry["seeds"].append(row)
            preds.append(pr)
            entry["pooled"] = pooled(data.splits["test"].labels, preds, data.num_classes, a.n_resamples)
            entry["pooled_vs_reference"] = pooled(data.splits["test"].labels, preds, data.num_classes,
                                                  a.n_resamples, against=REFERENCE)
            (out / f"{name}.json").write_text(json.dumps(result, indent=1))  # partial results survive
    result["seconds"] = round(time.perf_counter() - t0)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out / f"{name}.md").write_text(md)
    print(md)
    print(f"took {result['seconds']} s; {out / f'{name}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
