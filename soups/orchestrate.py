"""The soup orchestrator: checkpoints of a sweep come back from MLflow, soups go back into it.

    run_soups(SoupOptions(experiment="ich17"))       # or: ich soup --experiment ich17

1. Pull. Every READY checkpoint of the sweep is found by search (never by a local path), downloaded in
   background threads while soups are being built, and verified: sha256, safetensors, finite weights,
   registry tags against checkpoint.json. A checkpoint that fails is skipped with a warning naming it.
2. Group. Checkpoints average only within a group: same architecture, init and dataset (tags), same
   img size, class map and eval crop (metadata); a member that differs from its group's first is refused.
3. Build. within: uniform and greedy over each trial's epochs (the paper). across: uniform and greedy
   over each trial's best checkpoint (Wortsman), plus a greedy over every checkpoint of the group.
   Greedy ranks ingredients by their recorded val metric and selects on val; test is only reported.
   BatchNorm statistics are recalibrated on train when asked ('auto' keeps what is better on val), once
   per finished soup: greedy's tries use the averaged statistics (a train pass per try would cost more
   than the whole selection).
4. Report. Each soup is a run under the sweep run: val/test metrics of the soup, the best single
   ingredient, the uniform soup and soft voting of the same ingredients, bootstrap intervals and paired
   tests on test, the ingredients table, a curve plot, and the weights as a LoggedModel.
5. Register. The best soup (val) becomes a version of the registered model; alias `champion` moves to
   it only when it beats the current champion (rule 'better': its val metric; rule 'significant':
   McNemar's exact test on val, p < alpha, with higher val accuracy).

Memory stays flat in the number of ingredients: a running sum, one candidate and one checkpoint loaded
ahead; only the ingredients' logits (N x C each) are kept, for soft voting (soups/logit_store.py: in memory up
to ICH_SOUP_LOGITS_MB, 64 MB by default, spilled to disk past it).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from tqdm import tqdm

from ich.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, save_checkpoint
from ich.data import ICHDataset, load_dataset
from ich.errors import IchError
from soups import provenance, registry
from soups.logit_store import LogitStore, soft_vote_stream
from soups.average import Ingredient, RunningSum, greedy_soup, prefetch
from soups.bn import choose_bn_mode
from soups.compat import IncompatibleCheckpoint, check_compatible
from soups.evaluate import EvalSpec, Evaluator, higher_is_better, metric_value
from soups.stats import bootstrap_ci, mcnemar_exact, paired_comparison

SCOPES = ("within", "across", "all")
RECIPES = ("uniform", "greedy", "all")
METRICS = ("macro_f1", "accuracy", "loss")
TIE_RULES = ("accept", "strict")
BN_OPTIONS = ("average", "recalibrate", "auto")
CHAMPION_RULES = ("better", "significant")
ALIAS = "champion"
CI_ALPHA = 0.05  # the reported intervals are 95%; opts.alpha is the champion test's level
SEED = 0  # bootstrap resamples: the same images for every model of a call
REPORTED = ("accuracy", "macro_f1", "macro_precision", "macro_recall", "loss")

TAG_SCOPE = "ich.scope"
TAG_SOUP_RECIPE = "ich.recipe"
TAG_METRIC = "ich.metric"
TAG_TIE_RULE = "ich.tie_rule"
TAG_BN_MODE = "ich.bn_mode"
TAG_GROUP = "ich.group"
TAG_SOUP_MODEL = "ich.soup_model_id"
TAG_DECISION = "ich.champion_decision"
TAG_DECISION_REASON = "ich.champion_reason"
NO_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


class SoupError(IchError):
    """Soups cannot be built: unknown experiment, no checkpoints, bad option; one line naming it."""


@dataclass
class SoupOptions:
    experiment: str
    sweep: str | None = None  # default: the sweep of the experiment's latest sweep run
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, or the project's local server
    scope: str = "all"  # within | across | all
    recipe: str = "all"  # uniform | greedy | all
    metric: str = "macro_f1"  # macro_f1 | accuracy | loss: ranks ingredients, greedy, champion
    tie_rule: str = "accept"  # accept (the paper's code) | strict (the model-soups reference)
    bn: str = "auto"  # average | recalibrate | auto
    registered_model: str | None = None  # default: "<experiment>-soup"
    json_path: str | None = None
    data: str | None = None  # default: the sweep run's ich.data tag
    device: str = "auto"
    n_resamples: int = 1000
    champion_rule: str = "better"  # better | significant
    alpha: float = 0.05
    parallel: int = 1  # families built at once as Ray tasks (soups/parallel.py); 1: one after another, here

    def validate(self) -> None:
        for name, allowed in (("scope", SCOPES), ("recipe", RECIPES), ("metric", METRICS), ("tie_rule", TIE_RULES),
                              ("bn", BN_OPTIONS), ("champion_rule", CHAMPION_RULES)):
            if getattr(self, name) not in allowed:
                raise SoupError(f"soup option {name}={getattr(self, name)!r}: must be one of {', '.join(allowed)}")
        if not self.experiment:
            raise SoupError("soup option experiment: empty name")
        if not 0 < self.alpha < 1:
            raise SoupError(f"soup option alpha={self.alpha}: must lie between 0 and 1")
        if self.n_resamples < 100:
            raise SoupError(f"soup option n_resamples={self.n_resamples}: use at least 100")
        if not isinstance(self.parallel, int) or self.parallel < 1:
            raise SoupError(f"soup option parallel={self.parallel!r}: must be a whole number >= 1")

    @property
    def recipes(self) -> list[str]:
        return ["uniform", "greedy"] if self.recipe == "all" else [self.recipe]

    @property
    def scopes(self) -> list[str]:
        return ["within", "across"] if self.scope == "all" else [self.scope]


# ---------------------------------------------------------------------------------------------- pull

@dataclass
class Pulled:
    """A checkpoint downloaded and verified into the local cache (weights stay on disk until used)."""
    record: registry.CheckpointRecord
    folder: Path
    meta: CheckpointMeta
    score: float  # its val metric as recorded in MLflow: ranks ingredients
    spec: EvalSpec  # architecture + preprocessing (checkpoint.json)

    @property
    def label(self) -> str:
        return self.record.label()

    def load(self) -> dict:
        state_dict, _ = load_checkpoint(self.folder, expected_sha256=self.record.sha256)
        return state_dict

    def group_key(self) -> tuple:
        m = self.meta
        return (m.architecture, m.init_fingerprint, m.dataset_fingerprint, m.img_size, tuple(m.class_names),
                self.spec.key())


def _short_reason(error: BaseException, *prefixes: str) -> str:
    """First line of an error without the checkpoint's name or folder in front (the label says that)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    for prefix in prefixes:
        if text.startswith(prefix):
            rest = text[len(prefix):]
            cut = rest.find(": ")  # the folder may go on (…/artifacts) before its colon
            return rest[cut + 2:] if cut >= 0 else rest.lstrip(" :")
    return text


class CheckpointPool:
    """Downloads and verifies checkpoints in background threads, in the order given, into a disk cache.

    get(record) waits for that one; while soups of the first trials are evaluated, the checkpoints of
    the next ones are downloading. A failure is recorded in `skipped` and warned about once.
    """

    def __init__(self, client, pulls: list[tuple[registry.CheckpointRecord, float]], folder: Path, workers: int = 2):
        self.client, self.folder = client, folder
        self.skipped: list[dict] = []
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soups-pull")
        self._futures: dict[str, Future] = {r.model_id: self._executor.submit(self._pull, r, s) for r, s in pulls}
        self._done: dict[str, Pulled | None] = {}
        self._bar = tqdm(total=len(pulls), desc="pull checkpoints", unit="ckpt", file=sys.stderr, disable=None)

    def _pull(self, record: registry.CheckpointRecord, score: float) -> Pulled:
        folder = registry.download_checkpoint(self.client, record, self.folder)
        state_dict, meta = load_checkpoint(folder, expected_sha256=record.sha256)  # safetensors, finite
        del state_dict
        for name in ("architecture", "dataset_fingerprint", "init_fingerprint"):
            tagged, stored = getattr(record, name), getattr(meta, name)
            if tagged and tagged != stored:
                raise CheckpointError(f"{name} is {stored!r} in checkpoint.json but {tagged!r} in the registry")
        return Pulled(record, folder, meta, score, EvalSpec.of(meta))

    def get(self, record: registry.CheckpointRecord) -> Pulled | None:
        if record.model_id not in self._done:
            try:
                self._done[record.model_id] = self._futures[record.model_id].result()
            except (CheckpointError, MlflowException, OSError) as e:
                self._done[record.model_id] = None
                reason = _short_reason(e, f"checkpoint {record.label()}", str(self.folder / record.model_id))
                self.skip(record, reason)
            self._bar.update(1)
        return self._done[record.model_id]

    def skip(self, record: registry.CheckpointRecord, reason: str) -> None:
        if any(s["model_id"] == record.model_id for s in self.skipped):
            return
        warnings.warn(f"skipping checkpoint {record.label()}: {reason}", RuntimeWarning, stacklevel=2)
        self.skipped.append({"trial": record.trial, "epoch": record.epoch, "model_id": record.model_id,
                             "reason": reason})

    def close(self) -> None:
        self._bar.close()
        self._executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- families

@dataclass
class Family:
    """Ingredients offered to one set of soups, best val first."""
    scope: str
    name: str  # e.g. "within-<trial>", "across-best", "across-all"
    group: str
    members: list[Pulled]
    recipes: list[str]
    trial: str | None = None


def _group_id(key: tuple) -> str:
    """Short, stable name of a compatibility group: architecture plus a hash of the rest."""
    return f"{key[0]}-{hashlib.sha256(repr(key[1:]).encode()).hexdigest()[:8]}"


def _best_first(members: list[Pulled], metric: str) -> list[Pulled]:
    sign = -1.0 if higher_is_better(metric) else 1.0
    return sorted(members, key=lambda p: (sign * p.score, p.record.trial, p.record.epoch))


def _compatible(members: list[Pulled], pool: CheckpointPool) -> list[Pulled]:
    """Members whose metadata agrees with the first one's; the others are refused, naming the field."""
    if not members:
        return []
    ref, kept = members[0], [members[0]]
    for p in members[1:]:
        try:
            check_compatible([(ref.label, ref.meta), (p.label, p.meta)])  # preprocessing too
        except IncompatibleCheckpoint as e:
            pool.skip(p.record, str(e))
            continue
        kept.append(p)
    return kept


# ---------------------------------------------------------------------------------------------- build

@dataclass
class Built:
    """One soup's weights and predictions, before it is reported."""
    state_dict: dict
    bn_mode: str
    logits: dict[str, np.ndarray]  # split -> (N, C)


@dataclass
class SoupBuilder:
    opts: SoupOptions
    dataset: ICHDataset
    pool: CheckpointPool
    evaluators: dict = field(default_factory=dict)
    # model_id -> split -> (N, C), kept for soft voting: in memory up to ICH_SOUP_LOGITS_MB (64), then on disk
    logits: LogitStore = field(default_factory=LogitStore)

    def evaluator(self, p: Pulled) -> Evaluator:
        key = p.spec.key()
        if key not in self.evaluators:
            self.evaluators[key] = Evaluator(self.dataset, p.spec, device=self.opts.device)
        return self.evaluators[key]

    def score(self, ev: Evaluator, logits: np.ndarray, split: str = "val") -> float:
        return ev.score(logits, split, self.opts.metric)

    def _stream(self, members: list[Pulled]):
        """(member, state dict) pairs; meant to run inside prefetch's thread, so loading overlaps evaluation."""
        for p in members:
            try:
                yield p, p.load()
            except CheckpointError as e:  # verified on pull; only a cache file changed since could land here
                self.pool.skip(p.record, _short_reason(e, str(p.folder)))

    def uniform(self, members: list[Pulled], ev: Evaluator, desc: str) -> tuple[dict, list[Pulled]]:
        """Uniform soup of the members, computing each member's val/test logits on the way (one pass)."""
        total, used = RunningSum(), []
        for p, sd in tqdm(prefetch(self._stream(members), 1), total=len(members), desc=desc, unit="ckpt",
                          file=sys.stderr, disable=None, leave=False):
            total.add(sd, p.label)
            if p.record.model_id not in self.logits:
                self.logits[p.record.model_id] = {s: ev.logits(sd, s) for s in ("val", "test")}
            used.append(p)
            del sd
        if not used:
            raise SoupError(f"{desc}: no usable ingredients")
        return total.mean(), used

    def greedy(self, members: list[Pulled], ev: Evaluator, desc: str):
        bar = tqdm(total=len(members), desc=desc, unit="try", file=sys.stderr, disable=None, leave=False)

        def evaluate(sd: dict) -> float:
            bar.update(1)
            return self.score(ev, ev.logits(sd, "val"))

        by_id = {p.record.model_id: p for p in members}
        ingredients = (Ingredient(p.record.model_id, p.score, sd) for p, sd in self._stream(members))
        try:
            result = greedy_soup(ingredients, evaluate, higher_is_better=higher_is_better(self.opts.metric),
                                 tie_rule=self.opts.tie_rule, prefetch_depth=1,
                                 on_skip=lambda s: self.pool.skip(by_id[s.name].record, s.reason))
        finally:
            bar.close()
        return result

    def finish(self, state_dict: dict, ev: Evaluator) -> Built:
        """Apply the BN option (decided on val) and compute the soup's val and test logits."""
        val = ev.logits(state_dict, "val")
        mode = "none" if not ev.has_bn else "average"
        if ev.has_bn and self.opts.bn != "average":
            recal = ev.recalibrated(state_dict)
            recal_val = ev.logits(recal, "val")
            if self.opts.bn == "recalibrate":
                mode = "recalibrate"
            else:
                mode = choose_bn_mode(self.score(ev, val), self.score(ev, recal_val),
                                      higher_is_better(self.opts.metric))
            if mode == "recalibrate":
                state_dict, val = recal, recal_val
        return Built(state_dict, mode, {"val": val, "test": ev.logits(state_dict, "test")})


# ---------------------------------------------------------------------------------------------- report

def _metrics(ev: Evaluator, logits: np.ndarray, split: str) -> dict[str, float]:
    m = ev.metrics(logits, split)
    return {k: float(m[k]) for k in REPORTED}


def _soft_vote_logits(logit_sets) -> np.ndarray:
    """Log of soft voting's probabilities (the evaluator's metrics take logits), one model's logits at a time."""
    return np.log(np.clip(soft_vote_stream(logit_sets), 1e-300, None))


def _paired(y: np.ndarray, a: np.ndarray, b: np.ndarray, opts: SoupOptions, k: int) -> dict[str, float]:
    return paired_comparison(y, a, b, n_resamples=opts.n_resamples, alpha=CI_ALPHA, seed=SEED, num_classes=k)


def report_soup(*, name: str, family: Family, recipe: str, soup: Built, members: list[Pulled], ev: Evaluator,
                builder: SoupBuilder, uniform: Built, accepted: set[str], tries: dict[str, float]) -> dict:
    """The soup's summary entry: figures of the soup, best single, uniform and soft voting on val and test."""
    opts, k = builder.opts, builder.dataset.num_classes
    best = members[0]
    best_logits = builder.logits[best.record.model_id]
    soft = {s: _soft_vote_logits(builder.logits[p.record.model_id][s] for p in members) for s in ("val", "test")}
    y = ev.labels("test")
    soup_pred, best_pred, soft_pred = (soup.logits["test"].argmax(1), best_logits["test"].argmax(1),
                                       soft["test"].argmax(1))
    test = _metrics(ev, soup.logits["test"], "test")
    for metric in ("accuracy", "macro_f1"):
        ci = bootstrap_ci(y, soup_pred, metric, n_resamples=opts.n_resamples, alpha=CI_ALPHA, seed=SEED,
                          num_classes=k)
        test[f"{metric}_ci"] = [ci.low, ci.high]
    return {
        "name": name, "scope": family.scope, "recipe": recipe, "group": family.group, "trial": family.trial,
        "ingredients": [{"trial": p.record.trial, "epoch": p.record.epoch, "model_id": p.record.model_id,
                         "run_id": p.record.run_id,
                         "sha256": p.record.sha256, "val_score": p.score,
                         "candidate_val": tries.get(p.record.model_id),
                         "accepted": p.record.model_id in accepted} for p in members],
        "bn_mode": soup.bn_mode,
        "val": _metrics(ev, soup.logits["val"], "val"),
        "test": test,
        "best_single": {"trial": best.record.trial, "epoch": best.record.epoch, "model_id": best.record.model_id,
                        "val": _metrics(ev, best_logits["val"], "val"),
                        "test": _metrics(ev, best_logits["test"], "test")},
        "uniform": {"bn_mode": uniform.bn_mode, "val": _metrics(ev, uniform.logits["val"], "val"),
                    "test": _metrics(ev, uniform.logits["test"], "test")},
        "soft_vote": {"val": _metrics(ev, soft["val"], "val"), "test": _metrics(ev, soft["test"], "test")},
        "vs_best_single": _paired(y, soup_pred, best_pred, opts, k),
        "soft_vote_vs_best_single": _paired(y, soft_pred, best_pred, opts, k),
        "run_id": None, "model_id": None,
    }


def flat_metrics(entry: dict) -> dict[str, float]:
    """The entry's figures as flat MLflow metric names (val_accuracy, test_accuracy_low, vs_best_acc_diff...)."""
    out: dict[str, float] = {}
    for split in ("val", "test"):
        for k in REPORTED:
            out[f"{split}_{k}"] = entry[split][k]
    for metric in ("accuracy", "macro_f1"):
        out[f"test_{metric}_low"], out[f"test_{metric}_high"] = entry["test"][f"{metric}_ci"]
    for prefix, key in (("best_single", "best_single"), ("uniform", "uniform"), ("soft_vote", "soft_vote")):
        for split in ("val", "test"):
            for k in REPORTED:
                out[f"{prefix}_{split}_{k}"] = entry[key][split][k]
    for prefix, key in (("vs_best", "vs_best_single"), ("soft_vote_vs_best", "soft_vote_vs_best_single")):
        for k, v in entry[key].items():
            out[f"{prefix}_{k}"] = v
    out["n_ingredients"] = float(len(entry["ingredients"]))
    out["n_accepted"] = float(sum(i["accepted"] for i in entry["ingredients"]))
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def write_artifacts(folder: Path, entry: dict, metric: str) -> None:
    from soups.plots import ingredient_curve
    folder.mkdir(parents=True, exist_ok=True)
    rows = entry["ingredients"]
    columns = ["trial", "epoch", "model_id", "sha256", "val_score", "candidate_val", "accepted"]
    with open(folder / "ingredients.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: r[c] for c in columns} for r in rows)
    (folder / "ingredients.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (folder / "soup.json").write_text(json.dumps(json_safe(entry), indent=2, ensure_ascii=False), encoding="utf-8")
    ingredient_curve(folder / "ingredient_curve.png", rows, metric=metric,
                     title=f"{entry['name']} ({entry['bn_mode']} BN)", soup_val=entry["val"][metric],
                     uniform_val=entry["uniform"]["val"][metric] if entry["recipe"] != "uniform" else None)


# ---------------------------------------------------------------------------------------------- MLflow

@dataclass
class Context:
    client: MlflowClient
    opts: SoupOptions
    experiment_id: str
    sweep: str
    sweep_run_id: str | None
    dataset: ICHDataset
    tmp: Path


def log_soup(ctx: Context, entry: dict, soup: Built, ref: Pulled) -> None:
    """The soup's run (child of the sweep run) with metrics, artifacts and its weights as a LoggedModel."""
    client, opts = ctx.client, ctx.opts
    tags = {registry.TAG_KIND: registry.KIND_SOUP, registry.TAG_SWEEP: ctx.sweep, TAG_SOUP_RECIPE: entry["recipe"],
            TAG_SCOPE: entry["scope"], TAG_METRIC: opts.metric, TAG_TIE_RULE: opts.tie_rule,
            TAG_BN_MODE: entry["bn_mode"], TAG_GROUP: entry["group"]}
    if entry["trial"]:
        tags[registry.TAG_TRIAL] = entry["trial"]
    if ctx.sweep_run_id:
        tags["mlflow.parentRunId"] = ctx.sweep_run_id
    # Traceable: this code and environment, and the distinct code versions that trained the ingredients.
    ingredient_runs = {i["run_id"] for i in entry["ingredients"] if i["accepted"]}
    run_tags = {**tags, **provenance.run_tags("soups/orchestrate.py"),
                **provenance.ingredient_tags(client, ctx.experiment_id, ingredient_runs)}
    run = registry.call_with_retry("create soup run", client.create_run, ctx.experiment_id, run_name=entry["name"],
                                   tags=run_tags)
    run_id = run.info.run_id
    metrics = flat_metrics(entry)
    now = int(time.time() * 1000)
    registry.call_with_retry("log soup metrics", client.log_batch, run_id,
                             metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    folder = ctx.tmp / "runs" / entry["name"]
    write_artifacts(folder, entry, opts.metric)
    registry.call_with_retry("log soup artifacts", client.log_artifacts, run_id, str(folder))

    meta = ref.meta
    soup_meta = CheckpointMeta(
        architecture=meta.architecture, img_size=meta.img_size, num_classes=meta.num_classes,
        class_names=list(meta.class_names), dataset_fingerprint=meta.dataset_fingerprint,
        init_fingerprint=meta.init_fingerprint, epoch=0,
        metrics={f"val_{k}": entry["val"][k] for k in REPORTED} | {f"test_{k}": entry["test"][k] for k in REPORTED},
        extra={"soup": entry["name"], "sweep": ctx.sweep, "scope": entry["scope"], "recipe": entry["recipe"],
               "bn_mode": entry["bn_mode"], "metric": opts.metric, "tie_rule": opts.tie_rule,
               "ingredients": [i["model_id"] for i in entry["ingredients"] if i["accepted"]],
               "image_size": ctx.dataset.image_size},
        preprocess=ref.spec.preprocess)  # the ingredients' (compatible by construction)
    ckpt = ctx.tmp / "soups" / entry["name"]
    save_checkpoint(ckpt, soup.state_dict, soup_meta)
    model_tags = {**tags, registry.TAG_EPOCH: "0", registry.TAG_TRIAL: entry["trial"] or "soup",
                  registry.TAG_DATASET: meta.dataset_fingerprint, registry.TAG_INIT: meta.init_fingerprint,
                  registry.TAG_ARCHITECTURE: meta.architecture}
    model_tags.pop("mlflow.parentRunId", None)
    entry["model_id"] = registry.log_soup_model(
        client, experiment_id=ctx.experiment_id, run_id=run_id, ckpt_dir=ckpt, name=entry["name"], tags=model_tags,
        metrics={f"val_{k}": entry["val"][k] for k in REPORTED})
    registry.call_with_retry("finish soup run", client.set_terminated, run_id, "FINISHED")
    entry["run_id"] = run_id
    entry["_ckpt"] = str(ckpt)  # local folder of the weights, for the pyfunc model (dropped from the JSON)


# ---------------------------------------------------------------------------------------------- champion

def _better(new: float, old: float, metric: str) -> bool:
    return new > old if higher_is_better(metric) else new < old


def _current_champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException as e:
        if registry.is_transient(e):
            raise
        return None  # no alias yet (or its version was deleted)


def _ensure_registered_model(client: MlflowClient, name: str, experiment: str) -> None:
    try:
        registry.call_with_retry(f"get registered model {name!r}", client.get_registered_model, name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            registry.call_with_retry(f"create registered model {name!r}", client.create_registered_model, name,
                                     tags={"ich.experiment": experiment})
        except MlflowException as e2:
            if e2.error_code != "RESOURCE_ALREADY_EXISTS":  # created by another call meanwhile
                raise


def _champion_val_logits(ctx: Context, version) -> tuple[np.ndarray | None, str]:
    """The champion's val logits from its own weights (sha256 verified), or None and why not."""
    model_id = (version.tags or {}).get(TAG_SOUP_MODEL)
    if not model_id:
        return None, f"champion v{version.version} has no {TAG_SOUP_MODEL} tag"
    record = registry.get_model_record(ctx.client, model_id)
    state_dict, meta = registry.load_record(ctx.client, record, ctx.tmp / "champion")
    if list(meta.class_names) != ctx.dataset.classes or meta.dataset_fingerprint != ctx.dataset.fingerprint:
        return None, f"champion v{version.version} was built on another dataset"
    return Evaluator(ctx.dataset, EvalSpec.of(meta), device=ctx.opts.device).logits(state_dict, "val"), ""


def decide_champion(ctx: Context, best: dict, best_val_logits: np.ndarray, current) -> dict:
    """Whether alias `champion` moves to the new best soup; the figures behind the decision."""
    opts, metric = ctx.opts, ctx.opts.metric
    new_val = best["val"][metric]
    out = {"rule": opts.champion_rule, "metric": metric, "new_val": new_val, "champion_val": None,
           "previous_version": None, "p_value": None}
    if current is None:
        return {**out, "moved": True, "reason": "no champion yet"}
    out["previous_version"] = current.version
    tags = current.tags or {}
    if tags.get(registry.TAG_DATASET) and tags[registry.TAG_DATASET] != ctx.dataset.fingerprint:
        return {**out, "moved": False, "reason": f"champion v{current.version} is on another dataset; not comparable"}
    champ_val = tags.get(f"ich.val_{metric}")
    champ_logits = None
    if champ_val is None and current.run_id:  # older versions: the run's metric
        champ_val = registry.call_with_retry("get champion run", ctx.client.get_run, current.run_id).data.metrics.get(
            f"val_{metric}")
    if champ_val is None or opts.champion_rule == "significant":
        champ_logits, why = _champion_val_logits(ctx, current)
        if champ_logits is None:
            return {**out, "moved": False, "reason": why}
        champ_val = metric_value(champ_logits, ctx.dataset.splits["val"].labels, ctx.dataset.num_classes, metric)
    out["champion_val"] = champ_val = float(champ_val)
    if opts.champion_rule == "better":
        moved = _better(new_val, champ_val, metric)
        verb = "beats" if moved else "does not beat"
        return {**out, "moved": moved,
                "reason": f"val {metric} {new_val:.4f} {verb} champion v{current.version}'s {champ_val:.4f}"}
    y = ctx.dataset.splits["val"].labels
    new_pred, champ_pred = best_val_logits.argmax(1), champ_logits.argmax(1)
    test = mcnemar_exact(y, new_pred, champ_pred)
    new_acc, champ_acc = float((new_pred == y).mean()), float((champ_pred == y).mean())
    moved = test.p_value < opts.alpha and new_acc > champ_acc
    out.update(p_value=test.p_value, mcnemar_b=test.b, mcnemar_c=test.c, new_val_accuracy=new_acc,
               champion_val_accuracy=champ_acc)
    return {**out, "moved": moved,
            "reason": f"val accuracy {new_acc:.4f} vs champion v{current.version}'s {champ_acc:.4f}, McNemar exact "
                      f"p={test.p_value:.3g} ({'<' if test.p_value < opts.alpha else '>='} alpha {opts.alpha})"}


def register_best(ctx: Context, soups: list[dict], val_logits: dict[str, np.ndarray]) -> dict:
    """Log the best soup (val) as a pyfunc model, register it, and move `champion` only if it wins."""
    import mlflow

    from soups.pyfunc import log_pyfunc

    client, opts, metric = ctx.client, ctx.opts, ctx.opts.metric
    sign = 1.0 if higher_is_better(metric) else -1.0
    best = max(soups, key=lambda e: sign * e["val"][metric])  # max() keeps the first of equals
    name = opts.registered_model or f"{opts.experiment}-soup"
    _ensure_registered_model(client, name, opts.experiment)
    current = _current_champion(client, name)
    decision = decide_champion(ctx, best, val_logits[best["name"]], current)

    # The fluent API logs the pyfunc; point it at this experiment (an experiment set earlier in the process
    # makes start_run refuse a run of another one).
    mlflow.set_experiment(experiment_id=ctx.experiment_id)
    with mlflow.start_run(run_id=best["run_id"]):
        info = log_pyfunc(best["_ckpt"], name="pyfunc", example_pixels=ctx.dataset.splits["val"].images[0],
                          tags={registry.TAG_KIND: "soup-pyfunc", registry.TAG_SWEEP: ctx.sweep,
                                TAG_SOUP_MODEL: best["model_id"]})
    version_tags = {"ich.soup": best["name"], TAG_SOUP_MODEL: best["model_id"], "ich.pyfunc_model_id": info.model_id,
                    registry.TAG_SWEEP: ctx.sweep, "ich.experiment": opts.experiment, TAG_METRIC: metric,
                    registry.TAG_DATASET: ctx.dataset.fingerprint,
                    TAG_DECISION: "moved" if decision["moved"] else "kept",
                    TAG_DECISION_REASON: decision["reason"][:5000],
                    **{f"ich.val_{k}": repr(best["val"][k]) for k in REPORTED},
                    **{f"ich.champion_{k}": repr(decision[k]) for k in ("champion_val", "p_value")
                       if decision[k] is not None}}
    version = registry.call_with_retry(
        f"register soup in {name!r}", client.create_model_version, name, source=f"models:/{info.model_id}",
        run_id=best["run_id"], tags=version_tags, model_id=info.model_id)
    if decision["moved"]:
        registry.call_with_retry(f"move alias {ALIAS}", client.set_registered_model_alias, name, ALIAS, version.version)
    run_tags = {k: v for k, v in version_tags.items() if k.startswith("ich.champion")}
    run_tags.update({"ich.registered_model": name, "ich.registered_version": str(version.version)})
    registry.call_with_retry("tag champion decision", client.log_batch, best["run_id"],
                             tags=[RunTag(k, v) for k, v in run_tags.items()])
    alias_version = version.version if decision["moved"] else (current.version if current else None)
    return {"registered_model": name, "version": str(version.version), "soup": best["name"],
            "run_id": best["run_id"], "model_id": best["model_id"], "pyfunc_model_id": info.model_id,
            "alias": ALIAS, "alias_version": None if alias_version is None else str(alias_version), **decision}


# ---------------------------------------------------------------------------------------------- main

def json_safe(x):
    """JSON-safe: numpy scalars to Python, NaN/Inf to None, private keys (leading _) dropped."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _families(opts: SoupOptions, records: list[tuple[registry.CheckpointRecord, float]], pool: CheckpointPool,
              notes: list[str]):
    """Yield the families to soup, within first (so later trials keep downloading meanwhile), then across."""
    trials: OrderedDict[str, list[registry.CheckpointRecord]] = OrderedDict()
    for record, _ in records:
        trials.setdefault(record.trial, []).append(record)
    if "within" in opts.scopes:
        for trial, trial_records in trials.items():
            pulled = [p for r in trial_records if (p := pool.get(r)) is not None]
            members = _compatible(_best_first(pulled, opts.metric), pool)
            if len(members) < 2:
                notes.append(f"trial {trial}: {len(members)} usable checkpoint(s), no within-trial soup")
                continue
            yield Family("within", f"within-{trial}", _group_id(members[0].group_key()), members, opts.recipes, trial)
    if "across" in opts.scopes:
        groups: OrderedDict[tuple, list[Pulled]] = OrderedDict()
        for record, _ in records:
            if (p := pool.get(record)) is not None:
                groups.setdefault(p.group_key(), []).append(p)
        for key, group_members in groups.items():
            group = _group_id(key)
            suffix = f"-{group}" if len(groups) > 1 else ""
            members = _compatible(_best_first(group_members, opts.metric), pool)
            best_per_trial = list({p.record.trial: p for p in reversed(members)}.values())  # each trial's first
            best_per_trial = _best_first(best_per_trial, opts.metric)
            if len(best_per_trial) < 2:
                notes.append(f"group {group}: checkpoints of {len(best_per_trial)} trial(s), no across-run soup")
                continue
            yield Family("across", f"across-best{suffix}", group, best_per_trial, opts.recipes)
            if "greedy" in opts.recipes:
                yield Family("across", f"across-all{suffix}", group, members, ["greedy"])


def cook_family(builder: SoupBuilder, family: Family):
    """Build a family's soups, one recipe at a time: yields (recipe, soup, uniform, accepted, tries). No MLflow:
    the serial path records each soup before the next is built, a Ray task (soups/parallel.py) returns them."""
    ev = builder.evaluator(family.members[0])
    uniform_sd, members = builder.uniform(family.members, ev, f"{family.name} uniform")
    family.members = members
    uniform = builder.finish(uniform_sd, ev)
    del uniform_sd
    if "uniform" not in family.recipes:
        uniform.state_dict = {}  # only its predictions are reported: keep memory flat during greedy
    for recipe in family.recipes:
        if recipe == "uniform":
            soup, accepted, tries = uniform, {p.record.model_id for p in members}, {}
        else:
            result = builder.greedy(members, ev, f"{family.name} greedy")
            soup = builder.finish(result.state_dict, ev)
            accepted, tries = set(result.accepted), {s.name: s.candidate_score for s in result.steps}
            del result
        yield recipe, soup, uniform, accepted, tries


def _build_family(ctx: Context, builder: SoupBuilder, family: Family, soups: list[dict],
                  val_logits: dict[str, np.ndarray]) -> None:
    for cooked in cook_family(builder, family):
        _record_soup(ctx, builder, family, *cooked, soups, val_logits)


def _record_soup(ctx: Context, builder: SoupBuilder, family: Family, recipe: str, soup: Built, uniform: Built,
                 accepted: set[str], tries: dict[str, float], soups: list[dict],
                 val_logits: dict[str, np.ndarray]) -> None:
    """Report one built soup, log it to MLflow and keep its val predictions for the champion decision."""
    members, ev = family.members, builder.evaluator(family.members[0])
    name = f"{family.name}-{recipe}"
    entry = report_soup(name=name, family=family, recipe=recipe, soup=soup, members=members, ev=ev,
                        builder=builder, uniform=uniform, accepted=accepted, tries=tries)
    log_soup(ctx, entry, soup, members[0])
    soup.state_dict = {}  # on disk and in MLflow now; the next recipe needs the memory
    val_logits[name] = soup.logits["val"]
    soups.append(entry)


def _default_tracking_uri() -> str:
    from soups.tracking_server import ensure_tracking_uri
    return ensure_tracking_uri()


def run_soups(opts: SoupOptions) -> dict:
    """Build the soups of a sweep from MLflow, record them there, move `champion`; returns the summary."""
    import mlflow

    opts.validate()
    started = time.time()
    uri = opts.tracking_uri or _default_tracking_uri()
    mlflow.set_tracking_uri(uri)  # the pyfunc model is logged through the fluent API
    client = MlflowClient(uri)
    experiment = registry.call_with_retry(f"get experiment {opts.experiment!r}", client.get_experiment_by_name,
                                          opts.experiment)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise SoupError(f"experiment {opts.experiment!r}: not found on the MLflow server at {uri}")
    experiment_id = experiment.experiment_id
    sweep_tags = {registry.TAG_KIND: "sweep", **({registry.TAG_SWEEP: opts.sweep} if opts.sweep else {})}
    sweep_run = registry.latest_run_by_tags(client, experiment_id, sweep_tags)  # parent of the soup runs
    sweep = opts.sweep or (sweep_run.data.tags.get(registry.TAG_SWEEP) if sweep_run else None)
    all_records = registry.search_checkpoints(client, [experiment_id], sweep=sweep)
    if not all_records:
        raise SoupError(f"experiment {opts.experiment!r}: no checkpoints" + (f" of sweep {sweep!r}" if sweep else ""))
    sweeps = sorted({r.sweep for r in all_records})
    if sweep is None and len(sweeps) > 1:
        raise SoupError(f"experiment {opts.experiment!r} holds sweeps {', '.join(sweeps)}: pick one with --sweep")
    sweep = sweep or sweeps[0]
    data = opts.data or (sweep_run.data.tags.get("ich.data") if sweep_run else None)
    if not data:
        raise SoupError(f"sweep {sweep!r}: no ich.data tag on a sweep run; pass the dataset with --data")
    dataset = load_dataset(data)

    # Checks that need no download: a val figure to rank by, and the dataset we evaluate on.
    skipped, records = [], []
    key = f"val_{opts.metric}"
    collected = [r for r in all_records if r.tags.get("ich.gc") == "deleted"]  # weights deleted by `ich gc`
    for r in all_records:
        if r in collected:  # the record stays, the weights are gone: one note below, no warning each
            continue
        score = r.metrics.get(key)
        reason = (f"no {key} recorded" if score is None else f"{key} is {score}" if not math.isfinite(score)
                  else f"dataset fingerprint {r.dataset_fingerprint[:12]} is not the one of {data} "
                       f"({dataset.fingerprint[:12]})" if r.dataset_fingerprint != dataset.fingerprint else None)
        if reason:
            warnings.warn(f"skipping checkpoint {r.label()}: {reason}", RuntimeWarning, stacklevel=2)
            skipped.append({"trial": r.trial, "epoch": r.epoch, "model_id": r.model_id, "reason": reason})
        else:
            records.append((r, float(score)))
    if not records:
        first = skipped[0]["reason"] if skipped else "weights deleted by ich gc"
        raise SoupError(f"experiment {opts.experiment!r}: none of its {len(all_records)} checkpoints is usable "
                        f"(first: {first})")
    print(f"soups of sweep {sweep}: {len(records)} checkpoints of {len({r.trial for r, _ in records})} trials, "
          f"scope {opts.scope}, recipe {opts.recipe}, metric val_{opts.metric}, BN {opts.bn}", flush=True)

    soups: list[dict] = []
    notes: list[str] = []
    if collected:
        notes.append(f"{len(collected)} checkpoint(s) kept as records only (weights deleted by ich gc), not souped")
    val_logits: dict[str, np.ndarray] = {}
    champion = None
    # MLflow prints a "View run" line (after an extra get_run) for every run it ends: noise here.
    quiet = os.environ.get(NO_URLS)
    os.environ[NO_URLS] = "true"
    tmp = Path(tempfile.mkdtemp(prefix="ich-soups-"))
    pool = CheckpointPool(client, records, tmp / "pulled")
    ctx = Context(client, opts, experiment_id, sweep, sweep_run.info.run_id if sweep_run else None, dataset, tmp)
    try:
        builder = SoupBuilder(opts, dataset, pool)
        if opts.parallel > 1:  # families as Ray tasks; recorded here in the same order as the serial path
            from soups.parallel import cook_families
            for family, cooked in cook_families(builder, _families(opts, records, pool, notes), uri, notes):
                for one in cooked:
                    _record_soup(ctx, builder, family, *one, soups, val_logits)
        else:
            for family in _families(opts, records, pool, notes):
                _build_family(ctx, builder, family, soups, val_logits)
        pool.close()
        if soups:
            champion = register_best(ctx, soups, val_logits)
        else:
            notes.append("no soup could be built")
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if quiet is None:
            os.environ.pop(NO_URLS, None)
        else:
            os.environ[NO_URLS] = quiet

    summary = json_safe({
        "experiment": opts.experiment, "sweep": sweep, "sweep_run_id": ctx.sweep_run_id, "tracking_uri": uri,
        "data": str(data), "metric": opts.metric, "tie_rule": opts.tie_rule, "bn": opts.bn, "scope": opts.scope,
        "recipe": opts.recipe, "champion_rule": opts.champion_rule, "soups": soups,
        "skipped": skipped + pool.skipped, "notes": notes, "champion": champion,
        "seconds": round(time.time() - started, 1)})
    if opts.json_path:
        Path(opts.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_path).write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    print_table(summary)
    return summary


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:6.2f}"


def print_table(summary: dict) -> None:
    metric = summary["metric"]
    print(f"\n{'soup':<32} {'n':>5} {'val ' + metric:>12} {'test acc [95% CI]':>24} {'test F1':>7} "
          f"{'best':>6} {'vote':>6} {'Δacc vs best (p)':>18}  BN")
    for s in summary["soups"]:
        n = f"{sum(i['accepted'] for i in s['ingredients'])}/{len(s['ingredients'])}"
        lo, hi = s["test"]["accuracy_ci"]
        vs = s["vs_best_single"]
        print(f"{s['name'][:32]:<32} {n:>5} {s['val'][metric]:>12.4f} {_pct(s['test']['accuracy'])} "
              f"[{_pct(lo)},{_pct(hi)}] {_pct(s['test']['macro_f1'])} {_pct(s['best_single']['test']['accuracy'])} "
              f"{_pct(s['soft_vote']['test']['accuracy'])} {100 * vs['acc_diff']:+7.2f} (p={vs['mcnemar_p']:.2f})"
              f"  {s['bn_mode']}")
    for s in summary["skipped"]:
        print(f"skipped trial {s['trial']} epoch {s['epoch']} ({s['model_id']}): {s['reason']}")
    for note in summary["notes"]:
        print(f"note: {note}")
    c = summary.get("champion")
    if c:
        print(f"{c['registered_model']} v{c['version']} ({c['soup']}): alias {c['alias']} "
              f"{'moved to it' if c['moved'] else 'kept on v' + str(c['alias_version'])}: {c['reason']}")
    print(f"soups took {summary['seconds']} s", flush=True)


# ---------------------------------------------------------------------------------------------- CLI

def add_soup_args(p: argparse.ArgumentParser) -> None:
    """Options of `ich soup`. Wired into sweeps/cli.py with:
    s = sub.add_parser("soup", help=...); add_soup_args(s); s.set_defaults(func=cmd_soup)"""
    p.add_argument("--experiment", required=True, help="MLflow experiment of the sweep")
    p.add_argument("--sweep", help="sweep name (default: that of the experiment's latest sweep run)")
    p.add_argument("--scope", choices=SCOPES, default="all", help="within each trial, across trials, or all")
    p.add_argument("--recipe", choices=RECIPES, default="all")
    p.add_argument("--metric", choices=METRICS, default="macro_f1", help="val metric that ranks and selects")
    p.add_argument("--tie-rule", choices=TIE_RULES, default="accept",
                   help="greedy: accept ties (the paper's code) or strict improvement (model-soups reference)")
    p.add_argument("--bn", choices=BN_OPTIONS, default="auto", help="BatchNorm statistics of the soups")
    p.add_argument("--registered-model", help="registered model name (default: <experiment>-soup)")
    p.add_argument("--json", dest="json_path", help="write the summary here")
    p.add_argument("--data", help="dataset folder (default: the sweep run's ich.data tag)")
    p.add_argument("--device", default="auto")
    p.add_argument("--champion-rule", choices=CHAMPION_RULES, default="better",
                   help="move alias champion when val is better, or only when significantly better (McNemar)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of --champion-rule significant")
    p.add_argument("--resamples", dest="n_resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="build up to N soup families at once as Ray tasks (default 1: one after another)")


def cmd_soup(args: argparse.Namespace) -> None:
    """`ich soup`: bad input exits 2 with one line."""
    from ich.errors import exit_on_user_error
    names = {f.name for f in dataclasses.fields(SoupOptions)}
    with exit_on_user_error("ich soup"):
        run_soups(SoupOptions(**{k: v for k, v in vars(args).items() if k in names}))
