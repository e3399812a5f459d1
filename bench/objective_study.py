"""The objective study (issue 14, item 4): `objective: single` versus `objective: trajectory_soup`, same budget.

    python -m bench.objective_study [--quick] [--datasets digits,fashion] [--seeds 0]

For each data set and each objective, one sweep runs in-process (sweeps.coatnet.run_sweep on a real local Ray and
a real `mlflow server` started here), with the same sweep config but for `objective:`: the same Optuna seed (so the
same proposed hyperparameters), the same trials, epochs and ASHA settings, and the same initial weights (one
warm-start base model per data set, trained here once and given to both sweeps as `init.weights`). The soups of
each sweep are then built (soups.orchestrate.run_soups) and the best soup by val (the orchestrator's own rule) is
pulled back from MLflow (sha256 verified) and evaluated on val and test.

Reported per (data set, objective): the best soup's val and test accuracy and macro F1 with their own 95% bootstrap
intervals, and the best single checkpoint's for context. Per data set: trajectory_soup - single for the best
soups, a paired 95% bootstrap interval over the same val / test images (soups/stats.py), and McNemar's exact test
on test. Only val selects; test only reports.

Data sets: `digits` (scikit-learn's, the demo; the default) and `fashion` (Debian's dataset-fashion-mnist at ICH-17
scale, bench/fashion_mnist.py; only when asked). Output: bench/out/objective_study.json and .md (the table).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OBJECTIVES = ("single", "trajectory_soup")
DATASETS = ("digits", "fashion")
METRICS = ("accuracy", "macro_f1")
SPLITS = ("val", "test")
OUT = Path(__file__).resolve().parent / "out"


@dataclass(frozen=True)
class Budget:
    """What both objectives get, identically."""
    num_samples: int = 6
    max_concurrent: int = 2
    epochs: int = 3
    restart_period: int = 2  # cosine warm restarts: a trajectory's checkpoints differ (the paper)
    grace_period: int = 1
    reduction_factor: int = 2
    warm_start_epochs: int = 8  # the shared base model, trained to convergence (cosine to zero)
    n_resamples: int = 2000  # bootstrap resamples of every interval


FULL = Budget()
QUICK = Budget(num_samples=2, epochs=2, warm_start_epochs=2, n_resamples=200)

SWEEP_YAML = """
experiment: {experiment}
metric: val_macro_f1
mode: max
objective: {objective}
num_samples: {num_samples}
max_concurrent: {max_concurrent}
cpus_per_trial: 1
max_failures: 2
seed: {seed}
train:
  model: coatnet_tiny_ich
  img_size: 32
  batch_size: 64
  epochs: {epochs}
  schedule: cosine_restarts
  restart_period: {restart_period}
  hflip: {hflip}
  scale_min: 0.5
  rand_augment_n: 1
  random_erasing: 0.0
  eval_crop_pct: 1.0
search:
  lr: {{loguniform: [2.0e-4, 1.0e-3]}}
  weight_decay: {{loguniform: [1.0e-3, 5.0e-2]}}
  label_smoothing: {{uniform: [0.0, 0.1]}}
  mixup: {{uniform: [0.0, 0.2]}}
  rand_augment_magnitude: {{uniform: [6.0, 27.0]}}  # torchvision's bins 0..30: timm's old m 2-9
  seed: {{randint: [0, 100000]}}
asha:
  grace_period: {grace_period}
  reduction_factor: {reduction_factor}
init:
  weights: {init}
"""


def sweep_yaml(experiment: str, objective: str, budget: Budget, seed: int, init: Path, hflip: float) -> str:
    """The sweep config: identical for both objectives but for `objective:` (and the experiment's name)."""
    b = asdict(budget)
    return textwrap.dedent(SWEEP_YAML.format(experiment=experiment, objective=objective, seed=seed,
                                             init=json.dumps(str(init)), hflip=hflip, **b))


# ------------------------------------------------------------------------------------------ data and init

def dataset_folder(name: str, cache: Path) -> Path:
    """The ingested folder of a study data set (built once under `cache`)."""
    if name == "digits":
        from sweeps.job import demo_dataset
        return demo_dataset(cache)
    if name == "fashion":
        from bench.fashion_mnist import build_dataset
        return build_dataset(cache / "datasets")
    raise ValueError(f"unknown data set {name!r} (known: {', '.join(DATASETS)})")


def hflip_for(name: str) -> float:
    return 0.5 if name == "fashion" else 0.0  # clothes are mirror-symmetric, digits are not


def warm_start(data_dir: Path, budget: Budget, hflip: float, out: Path) -> Path:
    """The shared init: a base model trained to convergence on train (cosine to zero), saved as a checkpoint
    folder with its preprocessing; both objectives' sweeps start every trial from it."""
    import torch

    from ich.checkpoint import CheckpointMeta, save_checkpoint
    from ich.data import load_dataset
    from ich.train import TrainConfig, Trainer

    folder = out / f"warm-start-{budget.warm_start_epochs}ep"
    if (folder / "checkpoint.json").is_file():
        return folder
    data = load_dataset(data_dir)
    tc = TrainConfig(model="coatnet_tiny_ich", img_size=32, batch_size=64, epochs=budget.warm_start_epochs, lr=2.0e-3,
                     schedule="cosine", min_lr=0.0, hflip=hflip, scale_min=0.5, rand_augment_n=1,
                     random_erasing=0.0, eval_crop_pct=1.0, seed=0, init_seed=0)
    torch.manual_seed(0)
    trainer = Trainer(tc, data)
    metrics = {}
    for result in trainer.fit():
        metrics = result.metrics
        print(f"warm start epoch {result.epoch}/{tc.epochs}: val_accuracy {metrics['val_accuracy']:.4f}", flush=True)
    meta = CheckpointMeta(architecture=tc.model, img_size=tc.img_size, num_classes=data.num_classes,
                          class_names=data.classes, dataset_fingerprint=data.fingerprint,
                          init_fingerprint=trainer.init_fingerprint, epoch=tc.epochs,
                          metrics={k: float(v) for k, v in metrics.items()}, extra={"study": "warm start"},
                          preprocess=trainer.preprocess.to_dict())
    save_checkpoint(folder, trainer.weights(), meta)
    return folder


# ------------------------------------------------------------------------------------------ one sweep

def _best(entries: list[dict], key) -> dict:
    return max(entries, key=key)  # max() keeps the first of equals, as the orchestrator's register_best does


def predictions(client, model_id: str, dataset, tmp: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A soup's or checkpoint's val/test predictions from its weights in MLflow (sha256 verified, no pickle)."""
    from soups.store import registry
    from soups.evaluate import EvalSpec, Evaluator

    record = registry.get_model_record(client, model_id)
    state_dict, meta = registry.load_record(client, record, tmp)
    ev = Evaluator(dataset, EvalSpec.of(meta), device="cpu")
    return {s: ev.logits(state_dict, s).argmax(1) for s in SPLITS}, meta


def run_objective(*, dataset_name: str, data_dir: Path, objective: str, budget: Budget, seed: int, init: Path,
                  home: Path, tracking_uri: str, prefix: str) -> dict:
    """One sweep with `objective` plus its soups; returns figures and (private, `_pred`) predictions of the best
    soup and the best single checkpoint."""
    from mlflow import MlflowClient

    from ich.data import load_dataset
    from soups.orchestrate import SoupOptions, run_soups
    from sweeps.job import parse_args, run_sweep

    experiment = f"{prefix}{dataset_name}-s{seed}-{objective}"
    config = home / f"{experiment}.yaml"
    config.write_text(sweep_yaml(experiment, objective, budget, seed, init, hflip_for(dataset_name)))
    t0 = time.time()
    sweep = run_sweep(parse_args(["--config", str(config), "--data", str(data_dir), "--no-soups"]), home)
    sweep_s = time.time() - t0
    t0 = time.time()
    summary = run_soups(SoupOptions(experiment=experiment, tracking_uri=tracking_uri, n_resamples=max(100, min(
        budget.n_resamples, 1000)), device="cpu"))
    soups_s = time.time() - t0

    metric = summary["metric"]
    best = _best(summary["soups"], lambda e: e["val"][metric])
    single = _best([e["best_single"] for e in summary["soups"]], lambda e: e["val"][metric])
    dataset = load_dataset(data_dir)
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="ich-study-") as tmp:
        soup_pred, _ = predictions(client, best["model_id"], dataset, Path(tmp) / "soup")
        single_pred, _ = predictions(client, single["model_id"], dataset, Path(tmp) / "single")
    # The weights pulled back must score what the orchestrator recorded (same data, same weights).
    y = {s: dataset.splits[s].labels for s in SPLITS}
    recheck = max(abs(float((soup_pred[s] == y[s]).mean()) - best[s]["accuracy"]) for s in SPLITS)
    trials = sweep["trials"]
    return {
        "dataset": dataset_name, "objective": objective, "seed": seed, "experiment": experiment,
        "best_soup": {"name": best["name"], "model_id": best["model_id"], "bn_mode": best["bn_mode"],
                      "ingredients": sum(i["accepted"] for i in best["ingredients"])},
        "best_single": {"trial": single["trial"], "epoch": single["epoch"], "model_id": single["model_id"]},
        "n_soups": len(summary["soups"]),
        "trials": [{**{k: t[k] for k in ("trial", "status", "epochs")},  # the proposals: same seed, same configs
                    "config": {k: v for k, v in (t["config"] or {}).items() if isinstance(v, (int, float, str))}}
                   for t in trials],
        "epochs_trained": int(sum(t["epochs"] for t in trials)),
        "sweep_s": round(sweep_s, 1), "soups_s": round(soups_s, 1),
        "recheck_abs_diff": recheck,
        "_pred": {"soup": soup_pred, "single": single_pred},
    }


# ------------------------------------------------------------------------------------------ statistics (pure)

def ci_dict(ci) -> dict:
    return {"point": ci.point, "low": ci.low, "high": ci.high}


def figures(y: dict[str, np.ndarray], pred: dict[str, np.ndarray], num_classes: int, n_resamples: int) -> dict:
    """Each metric of one model on val and test with its own 95% bootstrap interval."""
    from soups.stats import bootstrap_ci
    return {s: {m: ci_dict(bootstrap_ci(y[s], pred[s], m, n_resamples=n_resamples, seed=0, num_classes=num_classes))
                for m in METRICS} for s in SPLITS}


def paired(y: dict[str, np.ndarray], pred_a: dict[str, np.ndarray], pred_b: dict[str, np.ndarray],
           num_classes: int, n_resamples: int) -> dict:
    """a - b on the same images: paired 95% bootstrap intervals on val and test, McNemar's exact test."""
    from soups.stats import mcnemar_exact, paired_bootstrap_diff
    out = {}
    for s in SPLITS:
        out[s] = {m: ci_dict(paired_bootstrap_diff(y[s], pred_a[s], pred_b[s], m, n_resamples=n_resamples, seed=0,
                                                   num_classes=num_classes)) for m in METRICS}
        test = mcnemar_exact(y[s], pred_a[s], pred_b[s])
        out[s]["mcnemar"] = {"a_right_b_wrong": test.b, "a_wrong_b_right": test.c, "p_value": test.p_value}
    return out


def compare(runs: dict[str, dict], y: dict[str, np.ndarray], num_classes: int, n_resamples: int) -> dict:
    """One data set's rows: each objective's best soup and best single with intervals, and the paired
    difference trajectory_soup - single of the best soups."""
    rows = {}
    for objective, r in runs.items():
        rows[objective] = {**{k: v for k, v in r.items() if not k.startswith("_")},
                           "soup": figures(y, r["_pred"]["soup"], num_classes, n_resamples),
                           "single": figures(y, r["_pred"]["single"], num_classes, n_resamples)}
    diff = paired(y, runs["trajectory_soup"]["_pred"]["soup"], runs["single"]["_pred"]["soup"], num_classes,
                  n_resamples)
    return {"objectives": rows, "trajectory_minus_single": diff}


# ------------------------------------------------------------------------------------------ the study

def study_dataset(dataset_name: str, data_dir: Path, *, budget: Budget, seed: int, home: Path, tracking_uri: str,
                  prefix: str = "study-") -> dict:
    """Both objectives on one data set with the same budget, seed and init; returns compare()'s result."""
    from ich.data import load_dataset
    init = warm_start(data_dir, budget, hflip_for(dataset_name), home / f"{prefix}{dataset_name}-init")
    runs = {objective: run_objective(dataset_name=dataset_name, data_dir=data_dir, objective=objective,
                                     budget=budget, seed=seed, init=init, home=home, tracking_uri=tracking_uri,
                                     prefix=prefix) for objective in OBJECTIVES}
    data = load_dataset(data_dir)
    y = {s: data.splits[s].labels for s in SPLITS}
    out = compare(runs, y, data.num_classes, budget.n_resamples)
    out.update(dataset=dataset_name, seed=seed, data=str(data_dir),
               sizes={s: int(len(data.splits[s])) for s in ("train", "val", "test")})
    return out


def _pct(c: dict) -> str:
    return f"{100 * c['point']:.2f} [{100 * c['low']:.2f}, {100 * c['high']:.2f}]"


def _pp(c: dict) -> str:
    return f"{100 * c['point']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"


def table_rows(results: list[dict]) -> list[list[str]]:
    """The study table: per data set and seed, one row per objective, then the paired difference."""
    rows = []
    for r in results:
        ds = f"{r['dataset']} (seed {r['seed']}; n val/test {r['sizes']['val']}/{r['sizes']['test']})"
        for objective in OBJECTIVES:
            o = r["objectives"][objective]
            soup = f"{o['best_soup']['name']} ({o['best_soup']['ingredients']} ingr.)"
            rows.append([ds, objective, soup, _pct(o["soup"]["val"]["accuracy"]), _pct(o["soup"]["test"]["accuracy"]),
                         _pct(o["soup"]["test"]["macro_f1"]), _pct(o["single"]["test"]["accuracy"]),
                         str(o["epochs_trained"])])
        d = r["trajectory_minus_single"]
        rows.append([ds, "**trajectory_soup - single** (paired)", "best soups", _pp(d["val"]["accuracy"]),
                     _pp(d["test"]["accuracy"]) + f", McNemar p={d['test']['mcnemar']['p_value']:.2f}",
                     _pp(d["test"]["macro_f1"]), "", ""])
    return rows


HEADER = ["data set", "objective", "best soup (by val)", "val acc % [95% CI]", "test acc % [95% CI]",
          "test macro F1 % [95% CI]", "best single test acc %", "epochs trained"]


def markdown_table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def run_study(datasets: list[str], *, budget: Budget, seeds: list[int], work: Path, cache: Path,
              tracking_uri: str, on_result=None) -> list[dict]:
    """Every (data set, seed); on_result(results so far) after each, so a long run leaves what it has."""
    results = []
    for name in datasets:
        data_dir = dataset_folder(name, cache)
        for seed in seeds:
            results.append(study_dataset(name, data_dir, budget=budget, seed=seed, home=work, tracking_uri=tracking_uri))
            if on_result is not None:
                on_result(results)
    return results


def write_outputs(out: Path, results: list[dict], meta: dict) -> str:
    """bench/out/objective_study.json (everything) and .md (the table); returns the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": results}, indent=2))
    table = markdown_table(results)
    out.with_suffix(".md").write_text(f"{table}\n\n{json.dumps(meta)}\n")
    return table


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"smallest budget ({QUICK.num_samples} trials x "
                                                         f"{QUICK.epochs} epochs): a smoke run, not a result")
    p.add_argument("--datasets", default="digits", help="comma-separated: digits (default), fashion "
                                                         "(needs `apt-get install -y dataset-fashion-mnist`)")
    p.add_argument("--seeds", default="0", help="comma-separated sweep seeds (Optuna's sampler)")
    p.add_argument("--out", default=str(OUT / "objective_study.json"))
    p.add_argument("--cache", help="where the ingested data sets are kept (default $ICH_HOME/study)")
    p.add_argument("--work", help="working folder (MLflow store, Optuna DB, Ray results, warm starts); kept. "
                                  "Default: a fresh temp folder, removed after a successful run")
    a = p.parse_args(argv)
    datasets = [d.strip() for d in a.datasets.split(",") if d.strip()]
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown or not datasets:
        p.error(f"--datasets: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(DATASETS)})")
    seeds = [int(s) for s in a.seeds.split(",")]
    budget = QUICK if a.quick else FULL

    import ray
    import torch

    from bench.fashion_mnist import FashionMnistError
    from ich.home import ich_home
    from soups.tracking_server import free_port, start_server

    # One thread: on a shared, loaded machine two OpenMP threads spend the share waiting on each other (measured:
    # no warm-start epoch in 2 CPU-minutes with two, ~10 CPU-s per epoch with one).
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, _terminate)  # `kill PID` still stops the MLflow server and Ray started here
    cache = Path(a.cache) if a.cache else ich_home() / "study"
    # A fresh Optuna DB, Ray results and MLflow store: nothing of an earlier study offsets seeds or names.
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="ich-objective-study-"))
    out = Path(a.out)
    started = time.time()
    meta = {"quick": a.quick, "budget": asdict(budget), "datasets": datasets, "seeds": seeds, "cpus": os.cpu_count(),
            "command": "python -m bench.objective_study " + " ".join(argv if argv is not None else sys.argv[1:])}

    def progress(results: list[dict]) -> None:
        write_outputs(out, results, {**meta, "wall_s": round(time.time() - started, 1),
                                     "done": len(results) == len(datasets) * len(seeds)})

    server = start_server(work / "mlflow", port=free_port())
    os.environ["MLFLOW_TRACKING_URI"] = server.uri
    try:
        ray.init(num_cpus=min(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
        results = run_study(datasets, budget=budget, seeds=seeds, work=work, cache=cache, tracking_uri=server.uri,
                            on_result=progress)
    except FashionMnistError as e:
        print(f"objective_study: error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
        server.stop()
    wall = time.time() - started
    table = write_outputs(out, results, {**meta, "wall_s": round(wall, 1), "done": True})
    print(f"\n{table}\n\nobjective study: {wall:.0f} s wall; {out} and {out.with_suffix('.md')}", flush=True)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
