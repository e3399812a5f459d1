"""A tiny, deterministic sweep in a real MLflow server, souped as users soup it: the equivalence fixture of issue 20.

tests/test_equivalence.py runs it with the current code and compares what the soups produced, field by field, with
tests/fixtures/equivalence.json, recorded ONCE from the code before issue 20's refactor (commit 8e99265):

    git worktree add /tmp/eq-base 8e99265
    cd /tmp/eq-base && PYTHONPATH=/tmp/eq-base /work/main/.venv/bin/python -m tests.equivalence_sweep \\
        --record /work/main/tests/fixtures/equivalence.json
    git worktree remove /tmp/eq-base

The sweep: 3 trials x 3 epochs of the tiny CoAtNet on the embedded digits (32 px), logged as the trainable logs
them (a trial run under a sweep run, one LoggedModel per epoch with its val metrics). The weights are not trained:
training is not bitwise stable across CPUs (CI runs on another one), so every checkpoint is a seeded init plus
seeded perturbations, made with numpy's PCG64 integers and IEEE float64 arithmetic only (no libm, no torch
kernels): the same bits on any machine. Only the init's classifier is fitted (a linear probe on the seeded
backbone's features, so the models sit at ~89% val accuracy rather than chance); fitting depends on this CPU's
kernels, so the probe was fitted once, when recording, and is read from the fixture. Each trial starts off along its
own direction and comes back toward the init epoch by epoch, plus a little noise per epoch, so the figures vary,
within- and across-trial soups differ, and greedy accepts some ingredients and rejects others.

Then `ich soup` (sweeps.cli.main, the console script's entry, in this process) runs twice:
  1. --bn average: a soup's weights are then a float64 sum of its ingredients rounded once into float32, exact on
     any CPU, so its weights sha256 is compared exactly.
  2. the default BN option (auto): recalibration sums activations over train batches, whose float reductions may
     differ in the last bit across CPUs, so that run's weights are not hashed; its names, ingredients, BN modes and
     figures are compared.
Figures: argmax-based ones (accuracy, F1, precision, recall, their bootstrap intervals and differences) exactly,
continuous ones (log loss, p-values) to 1e-6 (a forward pass may round differently on another CPU's kernels).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

SWEEP = "equivalence-sweep"  # experiment and sweep name
ARCHITECTURE = "coatnet_tiny_ich"
IMG_SIZE = 32
TRIALS = ("t0", "t1", "t2")
EPOCHS = 3
SEED = 20  # issue 20
INIT_FINGERPRINT = "equivalence-init-seed-20"  # one shared init: the trials soup across runs
SOUP_RUNS = {"bn_average": ["--bn", "average"], "bn_default": []}  # fixture key -> extra `ich soup` flags
HASHED_RUN = "bn_average"  # the run whose soup weights are compared by sha256 (see the module docstring)
DRIFT, NOISE = 0.004, 0.012  # per epoch to go along the trial's direction; per checkpoint; units of a tensor's scale
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "equivalence.json"


# ---------------------------------------------------------------------------------------------- the weights

def _uniform(seed: tuple[int, ...], n: int) -> np.ndarray:
    """n values uniform in [-1, 1): PCG64 doubles (53 random bits / 2**53), scaled exactly. Same bits anywhere."""
    return np.random.default_rng(list(seed)).random(n) * 2.0 - 1.0


def _scale(name: str, shape: tuple[int, ...]) -> float:
    """A tensor's spread: He-like 1/sqrt(fan_in) for weights, small for position biases and 1-D tensors."""
    if "relative_position_bias_table" in name:
        return 0.02
    if len(shape) >= 2:
        return 1.0 / math.sqrt(math.prod(shape[1:]))
    return 0.05


def checkpoint_weights(reference: dict, fitted: dict, trial: int, epoch: int) -> dict:
    """Trial `trial`'s weights after `epoch` (0: the shared init). `reference`: the architecture's state dict, for
    names, shapes and dtypes; of its values only the 1-D float tensors' rounded values are kept (LN weights 1, biases
    0), exact anywhere. `fitted`: the init's recorded tensors (fit_init: BN statistics and classifier, nested lists
    of float32 values). The distance to the init shrinks epoch by epoch, as fine-tuning near a plateau would have
    it, and a per-epoch noise makes averages better than their members."""
    import torch

    out = {}
    for index, (name, ref) in enumerate(reference.items()):
        if not ref.is_floating_point():  # num_batches_tracked: as if 22 steps per epoch
            out[name] = torch.full_like(ref, 22 * epoch)
            continue
        shape, n, scale = tuple(ref.shape), ref.numel(), _scale(name, tuple(ref.shape))
        if name in fitted:
            value = np.asarray(fitted[name], dtype=np.float64).reshape(-1)
        elif ref.dim() >= 2:
            value = _uniform((SEED, index), n) * (math.sqrt(3.0) * scale)  # variance scale**2
        else:
            value = torch.round(ref.detach().to(torch.float64)).reshape(-1).numpy()
        if epoch:
            step = (_uniform((SEED, index, 1000 + trial), n) * (DRIFT * (EPOCHS + 1 - epoch) * scale)
                    + _uniform((SEED, index, 1000 + trial, epoch), n) * (NOISE * scale))
            value = value * (1.0 + step) if name.endswith("running_var") else value + step  # variances stay > 0
        out[name] = torch.from_numpy(np.ascontiguousarray(value.astype(np.float32).reshape(shape)))
    return out


def fit_init(dataset_folder: Path) -> dict:
    """The init's fitted tensors: BN statistics recomputed on train for the seeded weights (the soups' own
    recalibration), then a ridge-regression linear probe on the backbone's train features (float64 numpy), as
    float32 values. Random features of the digits support ~89% val accuracy where a random head stays at chance.
    Fitting depends on this CPU's kernels: it runs once, when recording, and the fixture keeps the result."""
    import torch

    from ich.checkpoint import CheckpointMeta
    from ich.data import load_dataset
    from ich.models import create_model
    from ich.train import TrainConfig, Trainer
    from soups.evaluate import EvalSpec, Evaluator

    data = load_dataset(dataset_folder)
    reference = create_model(ARCHITECTURE, data.num_classes, IMG_SIZE).state_dict()
    trainer = Trainer(TrainConfig(model=ARCHITECTURE, img_size=IMG_SIZE, eval_crop_pct=1.0, device="cpu"), data,
                      init_state=checkpoint_weights(reference, {}, 0, 0), init_fingerprint=INIT_FINGERPRINT)
    meta = CheckpointMeta(architecture=ARCHITECTURE, img_size=IMG_SIZE, num_classes=data.num_classes,
                          class_names=data.classes, dataset_fingerprint=data.fingerprint,
                          init_fingerprint=INIT_FINGERPRINT, epoch=0, preprocess=trainer.preprocess)
    state = Evaluator(data, EvalSpec.of(meta), device="cpu").recalibrated(checkpoint_weights(reference, {}, 0, 0))
    fitted = {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}
    trainer.model.load_state_dict(state)
    features = []
    hook = trainer.model.head.fc.register_forward_hook(lambda m, inputs, out: features.append(inputs[0].double()))
    with torch.no_grad():
        trainer.predict("train")
    hook.remove()
    x = torch.cat(features).numpy()
    x = np.hstack([x, np.ones((len(x), 1))])
    y = np.eye(data.num_classes)[data.splits["train"].labels] * 2.0 - 1.0
    w = 3.0 * np.linalg.solve(x.T @ x + 0.1 * np.eye(x.shape[1]), x.T @ y)  # x3: confident logits, same argmax
    fitted["head.fc.weight"], fitted["head.fc.bias"] = torch.from_numpy(w[:-1].T.copy()), torch.from_numpy(w[-1].copy())
    return {k: v.to(torch.float32).tolist() for k, v in fitted.items()}


# ---------------------------------------------------------------------------------------------- the sweep

def log_sweep(client, dataset_folder: Path, workdir: Path, fitted: dict) -> dict:
    """The sweep in MLflow: a sweep run, a trial run per trial, one checkpoint per epoch through the project's own
    path (checkpoint folder + registry.log_checkpoint, val metrics from ich's evaluation, as sweeps/trainable.py
    does). Returns each checkpoint's logged val metrics by "trial/epoch".

    The one place that calls the checkpoint-writing API: when its signature moves (issue 20), update it here."""
    from ich.checkpoint import CheckpointMeta, save_checkpoint
    from ich.data import load_dataset
    from ich.models import create_model
    from ich.train import TrainConfig, Trainer
    from soups.store import registry

    data = load_dataset(dataset_folder)
    reference = create_model(ARCHITECTURE, data.num_classes, IMG_SIZE).state_dict()
    init = checkpoint_weights(reference, fitted, 0, 0)
    cfg = TrainConfig(model=ARCHITECTURE, img_size=IMG_SIZE, eval_crop_pct=1.0, device="cpu", epochs=EPOCHS)
    trainer = Trainer(cfg, data, init_state=init, init_fingerprint=INIT_FINGERPRINT)  # evaluates as a trial does

    experiment_id = registry.get_or_create_experiment(client, SWEEP)
    sweep_run = client.create_run(experiment_id, run_name=SWEEP, tags={
        "ich.kind": "sweep", "ich.sweep": SWEEP, "ich.data": str(dataset_folder)})
    logged = {}
    for t, trial in enumerate(TRIALS):
        run_id = client.create_run(experiment_id, run_name=trial, tags={
            "ich.kind": "trial", "ich.sweep": SWEEP, "ich.trial": trial,
            "mlflow.parentRunId": sweep_run.info.run_id}).info.run_id
        for epoch in range(1, EPOCHS + 1):
            weights = checkpoint_weights(reference, fitted, t, epoch)
            trainer.model.load_state_dict(weights)
            metrics = {k: float(v) for k, v in trainer.evaluate("val").items()}
            meta = CheckpointMeta(architecture=ARCHITECTURE, img_size=IMG_SIZE, num_classes=data.num_classes,
                                  class_names=data.classes, dataset_fingerprint=data.fingerprint,
                                  init_fingerprint=INIT_FINGERPRINT, epoch=epoch, metrics=metrics,
                                  extra={"sweep": SWEEP, "trial": trial}, preprocess=trainer.preprocess)
            folder = workdir / "checkpoints" / trial / f"e{epoch:03d}"
            sha = save_checkpoint(folder, weights, meta)
            if "folder" in inspect.signature(registry.log_checkpoint).parameters:  # after issue 20: the folder says it
                registry.log_checkpoint(client, (experiment_id, run_id), folder)
            else:  # the code the fixture was recorded from (8e99265)
                registry.log_checkpoint(client, experiment_id=experiment_id, run_id=run_id, ckpt_dir=folder,
                                        sweep=SWEEP, trial=trial, epoch=epoch, sha256=sha, metrics=metrics,
                                        dataset_fingerprint=data.fingerprint, init_fingerprint=INIT_FINGERPRINT,
                                        architecture=ARCHITECTURE)
            logged[f"{trial}/{epoch}"] = {"sha256": sha, **metrics}
        client.set_terminated(run_id, "FINISHED")
    client.set_terminated(sweep_run.info.run_id, "FINISHED")
    return logged


# ---------------------------------------------------------------------------------------------- the soups

def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def soup_weights_sha256(client, model_id: str, workdir: Path) -> str:
    """sha256 of the weights file of a soup's LoggedModel, hashed here from its downloaded artifacts (not read
    from a tag, whose name or meaning a refactor may change)."""
    from mlflow.artifacts import download_artifacts

    model = client.get_logged_model(model_id)
    folder = Path(download_artifacts(artifact_uri=model.artifact_location, dst_path=str(workdir / model_id)))
    files = sorted(folder.rglob("model.safetensors"))
    if len(files) != 1:
        raise AssertionError(f"soup model {model_id}: expected one model.safetensors in its artifacts, found "
                             f"{[str(f.relative_to(folder)) for f in files]}")
    return _file_sha256(files[0])


def _ingredient(i: dict) -> dict:
    return {k: i.get(k) for k in ("trial", "epoch", "val_score", "candidate_val", "accepted")}


def soup_row(soup: dict) -> dict:
    """What the fixture keeps of a soup of the JSON summary: no run or model ids (new on every run)."""
    best = soup["best_single"]
    return {
        "name": soup["name"], "scope": soup["scope"], "recipe": soup["recipe"], "group": soup["group"],
        "trial": soup["trial"], "pool": soup.get("pool"), "bn_mode": soup["bn_mode"],
        "ingredients": [_ingredient(i) for i in soup["ingredients"]],
        "val": soup["val"], "test": soup["test"],
        "best_single": {"trial": best["trial"], "epoch": best["epoch"], "val": best["val"], "test": best["test"]},
        "uniform": soup["uniform"], "soft_vote": soup["soft_vote"],
        "vs_best_single": soup["vs_best_single"], "soft_vote_vs_best_single": soup["soft_vote_vs_best_single"],
    }


RECORDED_RECIPES = ("uniform", "greedy")  # the recipes the code before the refactor had: what the fixture compares


def run_soups_cli(flags: list[str], json_path: Path) -> dict:
    """`ich soup --experiment <sweep> --json <path> <flags>` through the console script's entry (this process:
    torch is imported once); MLFLOW_TRACKING_URI names the server. Only the recorded recipes are registered for the
    call: a recipe added since (learned needs no init, so it would cook here) would add soups and could take the
    champion, which is not a change in what the recorded ones make."""
    from sweeps.cli import main

    try:
        from soups import recipes
    except ImportError:  # the code before the refactor: no registry, only those recipes
        recipes = None
    saved = dict(recipes._recipes) if recipes is not None else None
    if recipes is not None:
        recipes.names()  # ICH_RECIPES imported first, so that it cannot add a recipe afterwards
        recipes._recipes.clear()
        recipes._recipes.update({k: v for k, v in saved.items() if k in RECORDED_RECIPES})
    try:
        code = main(["soup", "--experiment", SWEEP, "--json", str(json_path), *flags])
    finally:
        if recipes is not None:
            recipes._recipes.clear()
            recipes._recipes.update(saved)
    if code != 0:
        raise AssertionError(f"ich soup {' '.join(flags)} exited {code}")
    return json.loads(json_path.read_text(encoding="utf-8"))


def run_equivalence_sweep(tracking_uri: str, dataset_folder: Path, workdir: Path, fitted: dict) -> dict:
    """The whole sweep and both soup runs against the MLflow server at tracking_uri (an empty experiment named SWEEP
    expected), from the init's fitted tensors (fit_init); returns the record the fixture holds, less those."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    checkpoints = log_sweep(client, Path(dataset_folder), workdir, fitted)
    runs = {}
    for key, flags in SOUP_RUNS.items():
        summary = run_soups_cli(flags, workdir / f"{key}.json")
        rows = []
        for soup in summary["soups"]:
            row = soup_row(soup)
            if key == HASHED_RUN:
                row["weights_sha256"] = soup_weights_sha256(client, soup["model_id"], workdir / "pulled" / key)
            rows.append(row)
        champion = summary.get("champion") or {}
        runs[key] = {"flags": flags, "soups": rows, "skipped": summary["skipped"],
                     "champion": {"soup": champion.get("soup"), "moved": champion.get("moved")}}
    return {"sweep": {"architecture": ARCHITECTURE, "img_size": IMG_SIZE, "trials": list(TRIALS), "epochs": EPOCHS,
                      "seed": SEED},
            "checkpoints": checkpoints, "runs": runs}


# ---------------------------------------------------------------------------------------------- comparison

# Figures computed from argmax predictions (accuracy, macro F1/precision/recall, their differences, greedy's scores)
# are compared exactly; continuous ones to 1e-6: log loss, McNemar p-values and bootstrap intervals (percentiles
# interpolated in floating point).
TOLERANCE = 1e-6


def _inexact(path: str) -> bool:
    last = path.rsplit(".", 1)[-1].split("[", 1)[0]
    return (last == "loss" or last.endswith("_loss") or last == "mcnemar_p" or last.endswith("_ci")
            or last.endswith("_low") or last.endswith("_high"))


def differences(expected, actual, path: str = "") -> list[str]:
    """Readable lines, one per field that differs ("runs.bn_average.soups[3].test.accuracy: 0.51 != 0.52");
    [] when equal (floats: exact, or to TOLERANCE where _inexact)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in list(expected) + [k for k in actual if k not in expected]:
            where = f"{path}.{key}" if path else str(key)
            if key not in actual:
                out.append(f"{where}: missing (expected {expected[key]!r})")
            elif key not in expected:
                out.append(f"{where}: unexpected (got {actual[key]!r})")
            else:
                out += differences(expected[key], actual[key], where)
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        out = [] if len(expected) == len(actual) else [f"{path}: {len(expected)} items expected, {len(actual)} got"]
        for n, (e, a) in enumerate(zip(expected, actual)):
            name = e.get("name") if isinstance(e, dict) else None
            out += differences(e, a, f"{path}[{n}{' ' + name if name else ''}]")
        return out
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(actual, numbers) and not isinstance(expected, bool) \
            and not isinstance(actual, bool):
        same = expected == actual or (_inexact(path) and math.isclose(expected, actual, rel_tol=TOLERANCE,
                                                                      abs_tol=TOLERANCE))
        return [] if same else [f"{path}: expected {expected!r}, got {actual!r} (off by {actual - expected:+.3g})"]
    return [] if expected == actual else [f"{path}: expected {expected!r}, got {actual!r}"]


# ---------------------------------------------------------------------------------------------- recording

def _digits(root: Path) -> Path:
    """The embedded digits written out and ingested at 32 px, as tests/fixtures_data.digits_dataset does."""
    from ich.demo_data import write_digits
    from ich.ingest import ingest

    write_digits(root / "images")
    ingest(root / "images", root / "dataset", size=IMG_SIZE, workers=2, progress=False)
    return root / "dataset"


def record(out: Path) -> dict:
    """Run the sweep against a fresh MLflow server (started as tests/conftest.py starts one) and write the fixture."""
    from soups.tracking_server import free_port, start_server

    import ich
    print(f"recording with the code in {Path(ich.__file__).resolve().parent.parent}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="ich-equivalence-"))
    handle = start_server(root / "server", port=free_port())
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = handle.uri
    os.environ["ICH_HOME"] = str(root / "home")
    try:
        dataset = _digits(root / "digits")
        fitted = fit_init(dataset)
        result = {"init_fitted": fitted, **run_equivalence_sweep(handle.uri, dataset, root / "work", fitted)}
    finally:
        handle.stop()
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
        shutil.rmtree(root, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", type=Path, required=True, help="write the fixture here")
    a = p.parse_args(argv)
    result = record(a.record)
    print(f"wrote {a.record}: {len(result['checkpoints'])} checkpoints, "
          + ", ".join(f"{k}: {len(v['soups'])} soups" for k, v in result["runs"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
