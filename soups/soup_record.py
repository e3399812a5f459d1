"""Record: one built soup's figures (SoupEntry), its artifacts, and its run + LoggedModel in MLflow.

Each soup is a run under the sweep run: val/test metrics of the soup, the best single ingredient, the uniform
soup and soft voting of the same ingredients, bootstrap intervals and paired tests on test, the ingredients
table, a curve plot, and the weights as a LoggedModel.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric

from ich.checkpoint import save_checkpoint
from ich.data import ICHDataset
from ich.metrics import metric_names
from soups.store import provenance, registry, retry
from soups.store.tags import (KIND_SOUP, SOUP_TRIAL, TAG_BEST_SINGLE, TAG_BN_MODE, TAG_BOOTSTRAP, TAG_CURVE,
                              TAG_GROUP, TAG_INGREDIENTS, TAG_KIND, TAG_METRIC, TAG_POOL, TAG_SCOPE, TAG_SOUP_RECIPE,
                              TAG_SWEEP, TAG_TIE_RULE, TAG_TRIAL, model_tags, recipe_param_tag)
from soups.build import Soup, SoupBuilder
from soups.logit_store import soft_vote_logits
from soups.store.lineage import run_inputs
from soups.evaluate import Evaluator
from soups.options import SoupOptions
from soups.pull import Family, Pulled
from soups.stats import bootstrap_ci, interval_metrics, paired_comparison

NO_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
CI_ALPHA = 0.05  # the reported intervals are 95%; opts.alpha is the champion test's level
SEED = 0  # bootstrap resamples: the same images for every model of a call


def predictions_sha256(pred: np.ndarray) -> str:
    """sha256 of predicted labels (int64, little-endian): equal hashes, the same input to the bootstrap."""
    return hashlib.sha256(np.ascontiguousarray(pred, dtype="<i8").tobytes()).hexdigest()



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


@contextlib.contextmanager
def quiet_run_urls() -> Iterator[None]:
    """MLflow prints a "View run" line (after an extra get_run) for every run it ends: noise when runs are
    recorded in bulk. Off inside the block; the caller's setting is restored after."""
    before = os.environ.get(NO_URLS)
    os.environ[NO_URLS] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NO_URLS, None)
        else:
            os.environ[NO_URLS] = before


@dataclass
class SoupEntry:
    """One soup's summary; to_dict() is its row of the JSON summary (ckpt, a local folder, is not part of it, nor
    bootstrap: the run's tags hold it)."""
    name: str
    scope: str
    recipe: str
    group: str
    trial: str | None
    ingredients: list[dict]  # trial, epoch, model_id, run_id, sha256, val_score, candidate_val, accepted
    bn_mode: str
    val: dict[str, float]
    test: dict  # every registered metric (ich/metrics.py), plus <metric>_ci as [low, high] of the interval ones
    best_single: dict
    uniform: dict
    soft_vote: dict
    vs_best_single: dict[str, float]
    soft_vote_vs_best_single: dict[str, float]
    run_id: str | None = None
    model_id: str | None = None
    ckpt: str | None = None  # local folder of the weights, for the pyfunc model
    pool: dict | None = None  # rule ("top_k:8"), size (its ingredients), family_size (what the rule chose from)
    params: dict = field(default_factory=dict)  # the recipe's parameters (wise_ft: alpha, head, from...)
    curve: dict | None = None  # a parameter the recipe swept on val, every point's val and test (build.Soup.curve)
    bootstrap: dict | None = None  # what test's intervals and vs_best_single were computed from (TAG_BOOTSTRAP)

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("ckpt", "bootstrap")}


def _metrics(ev: Evaluator, logits: np.ndarray, split: str) -> dict[str, float]:
    return {k: float(v) for k, v in ev.metrics(logits, split).items()}


def _paired(y: np.ndarray, a: np.ndarray, b: np.ndarray, opts: SoupOptions, k: int) -> dict[str, float]:
    return paired_comparison(y, a, b, n_resamples=opts.n_resamples, alpha=CI_ALPHA, seed=SEED, num_classes=k)


def report_soup(*, name: str, family: Family, recipe: str, soup: Soup, members: list[Pulled], ev: Evaluator,
                builder: SoupBuilder, uniform: Soup, accepted: set[str], tries: dict[str, float]) -> SoupEntry:
    """The soup's summary entry: figures of the soup, best single, uniform and soft voting on val and test."""
    opts, k = builder.opts, builder.dataset.num_classes
    best = members[0]
    best_logits = builder.logits[best.record.model_id]
    soft = {s: soft_vote_logits(builder.logits[p.record.model_id][s] for p in members) for s in ("val", "test")}
    y = ev.labels("test")
    soup_pred, best_pred, soft_pred = (soup.logits["test"].argmax(1), best_logits["test"].argmax(1),
                                       soft["test"].argmax(1))
    test = _metrics(ev, soup.logits["test"], "test")
    for metric in interval_metrics():
        ci = bootstrap_ci(y, soup_pred, metric.name, n_resamples=opts.n_resamples, alpha=CI_ALPHA, seed=SEED,
                          num_classes=k)
        test[f"{metric.name}_ci"] = [ci.low, ci.high]
    return SoupEntry(
        name=name, scope=family.scope, recipe=recipe, group=family.group, trial=family.trial,
        ingredients=[{"trial": p.record.trial, "epoch": p.record.epoch, "model_id": p.record.model_id,
                      "run_id": p.record.run_id,
                      "sha256": p.record.sha256, "val_score": p.score,
                      "candidate_val": tries.get(p.record.model_id),
                      "accepted": p.record.model_id in accepted} for p in members],
        bn_mode=soup.bn_mode,
        val=_metrics(ev, soup.logits["val"], "val"),
        test=test,
        best_single={"trial": best.record.trial, "epoch": best.record.epoch, "model_id": best.record.model_id,
                     "val": _metrics(ev, best_logits["val"], "val"),
                     "test": _metrics(ev, best_logits["test"], "test")},
        uniform={"bn_mode": uniform.bn_mode, "val": _metrics(ev, uniform.logits["val"], "val"),
                 "test": _metrics(ev, uniform.logits["test"], "test")},
        soft_vote={"val": _metrics(ev, soft["val"], "val"), "test": _metrics(ev, soft["test"], "test")},
        vs_best_single=_paired(y, soup_pred, best_pred, opts, k),
        soft_vote_vs_best_single=_paired(y, soft_pred, best_pred, opts, k),
        pool=pool_entry(family),
        params=dict(soup.params),
        curve=soup.curve,
        bootstrap={"n_resamples": opts.n_resamples, "alpha": CI_ALPHA, "seed": SEED,
                   "predictions_sha256": predictions_sha256(soup_pred),
                   "best_single_predictions_sha256": predictions_sha256(best_pred)},
    )


def pool_entry(family: Family) -> dict:
    """The family's ingredient pool as recorded on its soups (after build: members are the ones used)."""
    size = len(family.members)
    return {"rule": family.pool, "size": size,
            "family_size": family.family_size if family.family_size is not None else size}


def pool_text(pool: dict | None) -> str:
    """"top_k:2 2/3" (rule, checkpoints in the pool / family size), for tables; "" for summaries before pools."""
    return f"{pool['rule']} {pool['size']}/{pool['family_size']}" if pool else ""


def flat_metrics(entry: SoupEntry) -> dict[str, float]:
    """The entry's figures as flat MLflow metric names (val_accuracy, test_accuracy_low, vs_best_acc_diff...)."""
    out: dict[str, float] = {}
    for split in ("val", "test"):
        for k in metric_names():
            out[f"{split}_{k}"] = getattr(entry, split)[k]
    for metric in interval_metrics():
        out[f"test_{metric.name}_low"], out[f"test_{metric.name}_high"] = entry.test[f"{metric.name}_ci"]
    for prefix in ("best_single", "uniform", "soft_vote"):
        for split in ("val", "test"):
            for k in metric_names():
                out[f"{prefix}_{split}_{k}"] = getattr(entry, prefix)[split][k]
    for prefix, key in (("vs_best", "vs_best_single"), ("soft_vote_vs_best", "soft_vote_vs_best_single")):
        for k, v in getattr(entry, key).items():
            out[f"{prefix}_{k}"] = v
    out["n_ingredients"] = float(len(entry.ingredients))
    out["n_accepted"] = float(sum(i["accepted"] for i in entry.ingredients))
    if entry.pool:
        out["family_size"] = float(entry.pool["family_size"])
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def curve_metrics(curve: dict | None) -> list[tuple[str, float, int]]:
    """A recipe's curve as (key, value, step): <x>_<split>_<metric> at the point's step, every registered metric of
    val and test (test for the report only: the recipe chose on val)."""
    if not curve:
        return []
    x = curve["x"]
    return [(f"{x}_{split}_{k}", float(v), int(point["step"])) for point in curve["points"] for split in ("val", "test")
            for k, v in point[split].items() if v is not None and math.isfinite(float(v))]


def write_artifacts(folder: Path, entry: SoupEntry, metric: str) -> None:
    from soups.plots import ingredient_curve
    folder.mkdir(parents=True, exist_ok=True)
    rows = entry.ingredients
    columns = ["trial", "epoch", "model_id", "sha256", "val_score", "candidate_val", "accepted"]
    with open(folder / "ingredients.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: r[c] for c in columns} for r in rows)
    (folder / "ingredients.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    (folder / "soup.json").write_text(json.dumps(json_safe(entry.to_dict()), indent=2, ensure_ascii=False),
                                      encoding="utf-8")
    ingredient_curve(folder / "ingredient_curve.png", rows, metric=metric,
                     title=f"{entry.name} ({entry.bn_mode} BN)", soup_val=entry.val[metric],
                     uniform_val=entry.uniform["val"][metric] if entry.recipe != "uniform" else None)


@dataclass
class SoupCall:
    """One `ich soup` call, as recording its soups needs it: the client and options, the sweep, the dataset, a
    scratch folder."""
    client: MlflowClient
    opts: SoupOptions
    experiment_id: str
    sweep: str
    sweep_run_id: str | None
    dataset: ICHDataset
    tmp: Path


def log_soup(ctx: SoupCall, entry: SoupEntry, soup: Soup, ref: Pulled) -> None:
    """The soup's run (child of the sweep run) with metrics, artifacts and its weights as a LoggedModel."""
    client, opts = ctx.client, ctx.opts
    tags = {TAG_KIND: KIND_SOUP, TAG_SWEEP: ctx.sweep, TAG_SOUP_RECIPE: entry.recipe,
            TAG_SCOPE: entry.scope, TAG_METRIC: opts.metric, TAG_TIE_RULE: opts.tie_rule,
            TAG_BN_MODE: entry.bn_mode, TAG_GROUP: entry.group, TAG_INGREDIENTS: entry.pool["rule"],
            TAG_POOL: f"{entry.pool['size']}/{entry.pool['family_size']}"}
    if entry.trial:
        tags[TAG_TRIAL] = entry.trial
    tags.update({recipe_param_tag(entry.recipe, k): str(v) for k, v in entry.params.items()})
    if entry.curve:
        tags[TAG_CURVE] = entry.curve["x"]
    if ctx.sweep_run_id:
        tags["mlflow.parentRunId"] = ctx.sweep_run_id
    # Traceable: this code and environment, and the distinct code versions that trained the ingredients.
    ingredient_runs = {i["run_id"] for i in entry.ingredients if i["accepted"]}
    run_tags = {**tags, **provenance.run_tags("soups/orchestrate.py"),
                **provenance.ingredient_tags(client, ctx.experiment_id, ingredient_runs)}
    if entry.bootstrap:  # on the run beside the figures they describe (the report reads both there)
        run_tags[TAG_BEST_SINGLE] = entry.best_single["model_id"]
        run_tags[TAG_BOOTSTRAP] = json.dumps(entry.bootstrap, sort_keys=True)
    run = retry.call_with_retry("create soup run", client.create_run, ctx.experiment_id, run_name=entry.name,
                                   tags=run_tags)
    run_id = run.info.run_id
    # Lineage: the splits it was evaluated on (and fitted BN on), its accepted ingredients as input models (its
    # LoggedModel's val metrics name their split's dataset: registry._push_model).
    splits = ("val", "test") + (("train",) if entry.bn_mode == "recalibrate" else ())
    retry.call_with_retry("log soup inputs", client.log_inputs, run_id, **run_inputs(
        ctx.dataset.fingerprint, splits, model_ids=[i["model_id"] for i in entry.ingredients if i["accepted"]],
        classes=ctx.dataset.classes, sizes={k: len(v) for k, v in ctx.dataset.splits.items()}))
    metrics = flat_metrics(entry)
    now = int(time.time() * 1000)
    retry.call_with_retry("log soup metrics", client.log_batch, run_id,
                             metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    curve = [Metric(k, v, now, step) for k, v, step in curve_metrics(entry.curve)]
    for i in range(0, len(curve), 1000):  # MLflow takes at most 1000 metrics per batch
        retry.call_with_retry("log soup curve", client.log_batch, run_id, metrics=curve[i:i + 1000])
    folder = ctx.tmp / "runs" / entry.name
    write_artifacts(folder, entry, opts.metric)
    retry.call_with_retry("log soup artifacts", client.log_artifacts, run_id, str(folder))

    soup_meta = ref.meta.derived(  # the ingredients' identity (compatible by construction)
        epoch=0,
        metrics={f"val_{k}": entry.val[k] for k in metric_names()} | {f"test_{k}": entry.test[k] for k in metric_names()},
        extra={"soup": entry.name, "sweep": ctx.sweep, "scope": entry.scope, "recipe": entry.recipe,
               "bn_mode": entry.bn_mode, "metric": opts.metric, "tie_rule": opts.tie_rule, "pool": entry.pool,
               "ingredients": [i["model_id"] for i in entry.ingredients if i["accepted"]],
               "image_size": ctx.dataset.image_size, **({"recipe_params": entry.params} if entry.params else {})},
        preprocess=ref.spec.preprocess)  # the ingredients' (compatible by construction)
    ckpt = ctx.tmp / "soups" / entry.name
    sha256 = save_checkpoint(ckpt, soup.state_dict, soup_meta)
    soup_tags = {**tags, **model_tags(soup_meta, kind=KIND_SOUP, sha256=sha256, trial=entry.trial or SOUP_TRIAL)}
    soup_tags.pop("mlflow.parentRunId", None)
    entry.model_id = registry.log_soup_model(
        client, experiment_id=ctx.experiment_id, run_id=run_id, ckpt_dir=ckpt, name=entry.name, tags=soup_tags,
        metrics={f"val_{k}": entry.val[k] for k in metric_names()})
    retry.call_with_retry("finish soup run", client.set_terminated, run_id, "FINISHED")
    entry.run_id = run_id
    entry.ckpt = str(ckpt)
