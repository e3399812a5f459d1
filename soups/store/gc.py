"""`ich gc`: storage that does not grow without bound.

    ich gc --experiment ich17                 # dry run: what would go, counts and bytes
    ich gc --experiment ich17 --apply         # delete it

A paper-scale sweep (72 trials x 30 epochs of CoAtNet-2, ~300 MB each) leaves ~650 GB of checkpoints, most
of which no soup will ever use. gc deletes the weights of the checkpoints that

- no soup uses (the accepted ingredients every soup LoggedModel of the experiment records in its
  checkpoint.json; the champion's too, wherever its soup lives),
- are not within their trial's top-k by the sweep's val metric (`gc.keep_top_k`), and
- are not within their trial's last-k epochs (`gc.keep_last_k`: what a resumed trial continues from),

and the weights of superseded records (FAILED duplicates left by retries and resumes; PENDING ones may be
uploading right now and stay). The record of every
checkpoint stays: its LoggedModel, metrics, tags (sha256 included) and checkpoint.json (the metadata); only
the other artifact files go (model.safetensors), and the model is tagged `ich.gc=deleted` with the bytes
freed. The soup orchestrator and the report skip such records with one note, not a sha256 failure each.

Safety: the tag is written before the files go, so an interrupted gc leaves records that say so (a rerun
finishes them); a soup whose ingredients cannot be read stops gc before anything is deleted; soups, inits
and the pyfunc models older versions registered are never touched (only ich.kind=checkpoint records are candidates).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ich.checkpoint import META
from ich.errors import IchError
from ich.metrics import metric_of_key
from soups.store import registry, retry
from soups.store.tags import (GC_DELETED, KIND_CHECKPOINT, KIND_SWEEP, TAG_EPOCH, TAG_GC, TAG_GC_BYTES, TAG_GC_TIME, TAG_KIND,
                              TAG_SOUP_MODEL, TAG_SWEEP, TAG_TRIAL, latest_metrics)

CHAMPION = "champion"


class GcError(IchError):
    """gc cannot decide safely (unknown experiment, unreadable soup, bad option); one line, nothing deleted."""


@dataclass
class GcPolicy:
    """What a trial keeps besides what soups use. keep_top_k: best by `metric` (val only); keep_last_k: latest
    epochs. Sweep config keys `gc: {keep_top_k: 2, keep_last_k: 1}`; the CLI overrides them."""
    keep_top_k: int = 2
    keep_last_k: int = 1
    metric: str = "val_macro_f1"
    mode: str = "max"

    def validate(self) -> None:
        if self.keep_top_k < 0 or self.keep_last_k < 0:
            raise GcError(f"gc: keep_top_k={self.keep_top_k} and keep_last_k={self.keep_last_k} must be >= 0")
        if self.mode not in ("min", "max"):
            raise GcError(f"gc: mode must be min or max, not {self.mode!r}")
        if not self.metric.startswith("val_"):
            raise GcError(f"gc: metric {self.metric!r} must be a val_ metric (test never selects)")


@dataclass
class CheckpointState:
    """One checkpoint record as gc sees it (pure data: the planner needs no MLflow)."""
    model_id: str
    sweep: str
    trial: str
    epoch: int
    score: float  # the policy's metric; NaN when missing
    ready: bool  # READY
    collected: bool = False  # already tagged ich.gc=deleted
    label: str = ""
    failed: bool | None = None  # FAILED (superseded duplicates, failed uploads); None: whatever is not READY

    def __post_init__(self) -> None:
        if self.failed is None:
            self.failed = not self.ready


@dataclass
class Plan:
    keep: dict[str, list[str]] = field(default_factory=dict)  # model id -> why it stays
    delete: dict[str, str] = field(default_factory=dict)  # model id -> why it goes


def plan(candidates: list[CheckpointState], protected: dict[str, str], policy: GcPolicy) -> Plan:
    """Which records keep their weights and why, and which lose them: pure, no MLflow.

    protected: model id -> why (soup or champion ingredient); always kept, whatever the policy says."""
    policy.validate()
    out = Plan()

    def keep(mid: str, why: str) -> None:
        out.keep.setdefault(mid, []).append(why)

    trials: dict[tuple[str, str], list[CheckpointState]] = {}
    for c in candidates:
        if c.model_id in protected:
            keep(c.model_id, protected[c.model_id])
        if not c.ready and not c.failed:  # PENDING: a trial may be uploading it right now
            keep(c.model_id, "pending (being logged)")
        if c.ready and not c.collected:  # top-k / last-k count checkpoints that still have their weights
            trials.setdefault((c.sweep, c.trial), []).append(c)
    sign = -1.0 if policy.mode == "max" else 1.0
    for members in trials.values():
        # NaN scores rank last; ties by the later epoch (what a resumed trial continues from)
        by_score = sorted(members, key=lambda c: (0 if math.isfinite(c.score) else 1,
                                                  sign * c.score if math.isfinite(c.score) else 0.0, -c.epoch))
        for c in by_score[:policy.keep_top_k]:
            keep(c.model_id, f"top-{policy.keep_top_k} {policy.metric}")
        for c in sorted(members, key=lambda c: -c.epoch)[:policy.keep_last_k]:
            keep(c.model_id, f"last-{policy.keep_last_k} epoch")
    for c in candidates:
        if c.model_id in out.keep:
            continue
        out.delete[c.model_id] = ("superseded (FAILED)" if not c.ready else
                                  f"not in top-{policy.keep_top_k} or last-{policy.keep_last_k}, no soup uses it")
    return out


# ---------------------------------------------------------------------------------------------- MLflow side

@dataclass
class GcOptions:
    experiment: str
    apply: bool = False
    keep_top_k: int | None = None  # None: the sweep config's gc.keep_top_k (default 2)
    keep_last_k: int | None = None  # None: the sweep config's gc.keep_last_k (default 1)
    # The sweep config's {keep_top_k, keep_last_k, metric, mode}, read by the `ich` CLI (soups/ does not read
    # sweep configs: they belong to sweeps/).
    from_config: dict | None = None
    metric: str | None = None  # None: the config's, else the latest sweep run's `metric` param, else val_macro_f1
    tracking_uri: str | None = None
    json_path: str | None = None
    verbose: bool = False


def _policy(opts: GcOptions, client, experiment_id: str) -> GcPolicy:
    policy = GcPolicy()
    metric = mode = None
    if opts.from_config:
        policy.keep_top_k, policy.keep_last_k = opts.from_config["keep_top_k"], opts.from_config["keep_last_k"]
        metric, mode = opts.from_config["metric"], opts.from_config["mode"]
    if metric is None:
        run = registry.latest_run_by_tags(client, experiment_id, {TAG_KIND: KIND_SWEEP})
        metric = run.data.params.get("metric") if run is not None else None
    policy.metric = opts.metric or metric or policy.metric
    known = metric_of_key(policy.metric)  # "val_loss": lower is better (ich/metrics.py); a key it does not know: higher
    policy.mode = mode if (mode and not opts.metric) else ("max" if known is None or known.higher_is_better else "min")
    if opts.keep_top_k is not None:
        policy.keep_top_k = opts.keep_top_k
    if opts.keep_last_k is not None:
        policy.keep_last_k = opts.keep_last_k
    policy.validate()
    return policy


def _soup_ingredients(client, soup: registry.CheckpointRecord, tmp: Path) -> list[str]:
    """The model ids a soup averaged, from its checkpoint.json (JSON only, a small download)."""
    from mlflow.artifacts import download_artifacts
    dst = tmp / soup.model_id
    dst.mkdir(parents=True, exist_ok=True)
    uri = f"{soup.artifact_uri.rstrip('/')}/{META}"
    try:
        path = retry.call_with_retry(f"download {META} of soup {soup.model_id}", download_artifacts,
                                        artifact_uri=uri, dst_path=str(dst), tracking_uri=client.tracking_uri)
        extra = json.loads(Path(path).read_text(encoding="utf-8")).get("extra") or {}
    except Exception as e:  # noqa: BLE001  (any failure: we cannot tell what it uses, so nothing may go)
        raise GcError(f"soup {soup.name} (model {soup.model_id}): cannot read its ingredients from {META} "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); nothing deleted") from None
    ingredients = extra.get("ingredients")
    if not isinstance(ingredients, list):
        raise GcError(f"soup {soup.name} (model {soup.model_id}): its {META} lists no ingredients; nothing deleted")
    return [str(i) for i in ingredients]


def _champion_soups(client, experiment: str) -> list[tuple[str, str]]:
    """(registered model name, soup model id) of every `champion` alias of the experiment's registered models."""
    from mlflow.exceptions import MlflowException
    names = {f"{experiment}-soup"}
    try:
        found = retry.call_with_retry("search registered models", client.search_registered_models,
                                         filter_string=f"tags.`ich.experiment` = {registry._quoted('experiment', experiment)}")
        names |= {m.name for m in found}
    except MlflowException as e:
        if retry.is_transient(e):
            raise
    out = []
    for name in sorted(names):
        try:
            version = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as e:
            if retry.is_transient(e):
                raise
            continue  # no such model or no alias
        soup_id = (version.tags or {}).get(TAG_SOUP_MODEL)
        if not soup_id:
            raise GcError(f"registered model {name} v{version.version} (champion) has no {TAG_SOUP_MODEL} tag: "
                          "cannot tell its ingredients; nothing deleted")
        out.append((name, soup_id))
    return out


def _artifact_files(client, artifact_uri: str) -> list[tuple[str, int]]:
    """(path, bytes) of every file under a LoggedModel's artifact folder."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    registry.check_artifact_location(artifact_uri, client.tracking_uri, "ich gc")
    repo = get_artifact_repository(artifact_uri, tracking_uri=client.tracking_uri)
    files, todo = [], [None]
    while todo:
        path = todo.pop()
        for info in retry.call_with_retry(f"list artifacts of {artifact_uri}", repo.list_artifacts, path):
            if info.is_dir:
                todo.append(info.path)
            else:
                files.append((info.path, int(info.file_size or 0)))
    return files


def _delete_files(client, artifact_uri: str, paths: list[str]) -> None:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    registry.check_artifact_location(artifact_uri, client.tracking_uri, "ich gc")
    repo = get_artifact_repository(artifact_uri, tracking_uri=client.tracking_uri)
    for path in paths:
        retry.call_with_retry(f"delete {path} of {artifact_uri}", repo.delete_artifacts, path)


def _candidates(client, experiment_id: str, metric: str) -> tuple[list[CheckpointState], dict[str, object]]:
    """Every checkpoint LoggedModel of the experiment, READY or not (searches elsewhere see READY only)."""
    from mlflow.entities import LoggedModelStatus
    models = registry._search_models(client, [experiment_id], registry._tag_filter(
        {TAG_KIND: KIND_CHECKPOINT}), None)
    out, by_id = [], {}
    for m in models:
        tags = m.tags or {}
        try:
            epoch = int(tags.get(TAG_EPOCH, ""))
        except ValueError:
            epoch = -1
        score = latest_metrics(m).get(metric, math.nan)
        ready = registry._is_ready(m)
        failed = m.status == LoggedModelStatus.FAILED
        label = f"trial {tags.get(TAG_TRIAL, '?')} epoch {epoch} (model {m.model_id})"
        out.append(CheckpointState(m.model_id, tags.get(TAG_SWEEP, ""), tags.get(TAG_TRIAL, ""), epoch,
                             score, ready, tags.get(TAG_GC) == GC_DELETED, label, failed))
        by_id[m.model_id] = m
    return out, by_id


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run_gc(opts: GcOptions) -> dict:
    """Plan (and with opts.apply, carry out) the deletion; returns the summary (counts, bytes, per model)."""
    from mlflow import MlflowClient
    if not opts.experiment:
        raise GcError("gc: empty experiment name")
    if opts.tracking_uri is None:
        from soups.tracking_server import ensure_tracking_uri
        opts.tracking_uri = ensure_tracking_uri()
    client = MlflowClient(opts.tracking_uri)
    experiment = retry.call_with_retry(f"get experiment {opts.experiment!r}", client.get_experiment_by_name,
                                          opts.experiment)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise GcError(f"experiment {opts.experiment!r}: not found on the MLflow server at {opts.tracking_uri}")
    experiment_id = experiment.experiment_id
    policy = _policy(opts, client, experiment_id)
    started = time.time()

    candidates, models = _candidates(client, experiment_id, policy.metric)
    protected: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ich-gc-") as tmp:
        soups = registry.search_soup_models(client, [experiment_id])
        soup_ids = {s.model_id for s in soups}
        champions = _champion_soups(client, opts.experiment)
        for name, soup_id in champions:  # first: the champion's reason wins where both apply
            soup = next((s for s in soups if s.model_id == soup_id), None) or registry.get_model_record(client, soup_id)
            for mid in _soup_ingredients(client, soup, Path(tmp)):
                protected.setdefault(mid, f"ingredient of the champion of {name}")
        for soup in soups:
            for mid in _soup_ingredients(client, soup, Path(tmp)):
                protected.setdefault(mid, f"ingredient of soup {soup.name}")
    decided = plan(candidates, protected, policy)

    by_id = {c.model_id: c for c in candidates}
    rows, freed, kept_bytes = [], 0, 0
    for mid, why in decided.delete.items():
        c, model = by_id[mid], models[mid]
        files = [(p, n) for p, n in _artifact_files(client, model.artifact_location) if p != META]
        size = sum(n for _, n in files)
        if not files:  # already collected (or never uploaded): nothing left to do
            continue
        rows.append({"model_id": mid, "trial": c.trial, "epoch": c.epoch, "sweep": c.sweep, "ready": c.ready,
                     "bytes": size, "reason": why, "files": [p for p, _ in files]})
        freed += size
    if opts.verbose or opts.apply:  # what stays costs one listing per model: only when asked or applying
        for mid in decided.keep:
            kept_bytes += sum(n for _, n in _artifact_files(client, models[mid].artifact_location))
    if opts.apply:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for row in rows:
            # tag first: an interrupted gc leaves a record that says its weights may be gone (a rerun finishes it)
            retry.call_with_retry(f"tag model {row['model_id']}", client.set_logged_model_tags, row["model_id"],
                                     {TAG_GC: GC_DELETED, TAG_GC_BYTES: str(row["bytes"]), TAG_GC_TIME: now})
            _delete_files(client, models[row["model_id"]].artifact_location, row["files"])

    reasons: dict[str, int] = {}
    for whys in decided.keep.values():
        for why in whys:
            key = why if not why.startswith("ingredient of soup") else "ingredient of a soup"
            reasons[key] = reasons.get(key, 0) + 1
    summary = {
        "experiment": opts.experiment, "applied": opts.apply, "policy": vars(policy),
        "checkpoints": len(candidates), "ready": sum(c.ready for c in candidates),
        "superseded": sum(bool(c.failed) for c in candidates),
        "pending": sum(not c.ready and not c.failed for c in candidates), "soups": len(soup_ids),
        "champions": [{"registered_model": n, "soup_model_id": s} for n, s in champions],
        "kept": len(decided.keep), "kept_reasons": reasons, "kept_bytes": kept_bytes if kept_bytes else None,
        "deleted": len(rows), "deleted_ready": sum(r["ready"] for r in rows),
        "deleted_superseded": sum(not r["ready"] for r in rows), "bytes": freed,
        "already_collected": sum(1 for mid in decided.delete if by_id[mid].collected and
                                 mid not in {r["model_id"] for r in rows}),
        "models": rows, "seconds": round(time.time() - started, 1)}
    if opts.json_path:
        Path(opts.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_path).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print_summary(summary, opts.verbose)
    return summary


def print_summary(s: dict, verbose: bool = False) -> None:
    p = s["policy"]
    verb = "deleted" if s["applied"] else "would delete"
    print(f"ich gc {s['experiment']}{'' if s['applied'] else ' (dry run)'}: {s['checkpoints']} checkpoint records "
          f"({s['ready']} READY, {s['superseded']} superseded, {s['pending']} pending), {s['soups']} soups, "
          f"{len(s['champions'])} champion(s); keep top-{p['keep_top_k']} by {p['metric']} ({p['mode']}) and "
          f"last-{p['keep_last_k']} per trial")
    why = ", ".join(f"{k}: {v}" for k, v in sorted(s["kept_reasons"].items()))
    print(f"  keeps the weights of {s['kept']} ({why})" + (f", {_mb(s['kept_bytes'])}" if s["kept_bytes"] else ""))
    print(f"  {verb} the weights of {s['deleted']} ({s['deleted_ready']} unused, {s['deleted_superseded']} "
          f"superseded): {_mb(s['bytes'])}; {s['already_collected']} already collected")
    shown = s["models"] if verbose else s["models"][:10]
    for r in shown:
        print(f"    trial {r['trial']} epoch {r['epoch']} ({r['model_id']}) {_mb(r['bytes'])}: {r['reason']}")
    if len(shown) < len(s["models"]):
        print(f"    ... and {len(s['models']) - len(shown)} more (--verbose lists them all)")
    if not s["applied"] and s["deleted"]:
        print("  nothing deleted: run again with --apply")


def cmd_gc(args: argparse.Namespace) -> None:
    """`ich gc`: bad input exits 2 with one line."""
    from ich.errors import exit_on_user_error
    with exit_on_user_error("ich gc"):
        run_gc(GcOptions(experiment=args.experiment, apply=args.apply, keep_top_k=args.keep_top_k,
                         keep_last_k=args.keep_last_k, from_config=getattr(args, "from_config", None), metric=args.metric,
                         json_path=args.json_path, verbose=args.verbose))
