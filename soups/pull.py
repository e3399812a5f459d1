"""Pull and group: the sweep's record read once, its checkpoints downloaded and verified once, then families.

read_sweep reads what the soups need from MLflow in one go (experiment, sweep run, checkpoint records) into a
SweepSnapshot; usable_records decides from it, without the network, which checkpoints may be souped.
CheckpointPool downloads each checkpoint once and verifies it on its one read (registry.verify_pulled: sha256,
safetensors, finite weights, tags against checkpoint.json), in background threads while soups are being built.
The verified tensors are what the soups use: kept in memory up to ICH_SOUP_CACHE_MB (default 256) so each file
is read once; past that budget memory stays flat and a verified file, unchanged since, is read again without a
hash. families() groups the pulled checkpoints into the sets each soup is built from.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from tqdm import tqdm

from ich.checkpoint import WEIGHTS, CheckpointError, CheckpointMeta, load_weights
from soups import pool as ingredient_pool
from soups import recipes
from soups.store import registry, retry
from soups.compat import IncompatibleCheckpoint, check_compatible, group_key
from soups.evaluate import EvalSpec
from soups.options import SoupError, SoupOptions
from soups.pool import Schedule, best_first
from soups.store.signing import SignatureError
from soups.store.tags import (GC_DELETED, KIND_INIT, KIND_SWEEP, TAG_DATA, TAG_GC, TAG_INIT, TAG_KIND,
                         TAG_SWEEP)

CACHE_MB_ENV = "ICH_SOUP_CACHE_MB"  # verified ingredients kept in memory (MB) so each file is read once
DEFAULT_CACHE_MB = 256


def find_experiment(client, name: str, uri: str):
    """The live experiment `name` on the server at `uri`; SoupError naming it when missing or deleted."""
    experiment = retry.call_with_retry(f"get experiment {name!r}", client.get_experiment_by_name, name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise SoupError(f"experiment {name!r}: not found on the MLflow server at {uri}")
    return experiment


# ---------------------------------------------------------------------------------------------- the record

@dataclass
class SweepSnapshot:
    """What the soups need of a sweep's MLflow record, read once."""
    uri: str
    experiment_id: str
    sweep: str
    sweep_run_id: str | None  # parent of the soup runs
    data: str | None  # the sweep run's ich.data tag
    records: list[registry.CheckpointRecord]  # every checkpoint record of the sweep


def read_sweep(client, opts: SoupOptions, uri: str) -> SweepSnapshot:
    """The experiment, its latest sweep run (of opts.sweep when given) and the sweep's checkpoint records."""
    experiment_id = find_experiment(client, opts.experiment, uri).experiment_id
    sweep_tags = {TAG_KIND: KIND_SWEEP, **({TAG_SWEEP: opts.sweep} if opts.sweep else {})}
    sweep_run = registry.latest_run_by_tags(client, experiment_id, sweep_tags)
    sweep = opts.sweep or (sweep_run.data.tags.get(TAG_SWEEP) if sweep_run else None)
    records = registry.search_checkpoints(client, [experiment_id], sweep=sweep)
    if not records:
        raise SoupError(f"experiment {opts.experiment!r}: no checkpoints" + (f" of sweep {sweep!r}" if sweep else ""))
    sweeps = sorted({r.sweep for r in records})
    if sweep is None and len(sweeps) > 1:
        raise SoupError(f"experiment {opts.experiment!r} holds sweeps {', '.join(sweeps)}: pick one with --sweep")
    return SweepSnapshot(uri=uri, experiment_id=experiment_id, sweep=sweep or sweeps[0],
                         sweep_run_id=sweep_run.info.run_id if sweep_run else None,
                         data=sweep_run.data.tags.get(TAG_DATA) if sweep_run else None, records=records)


def skip_entry(record: registry.CheckpointRecord, reason: str) -> dict:
    return {"trial": record.trial, "epoch": record.epoch, "model_id": record.model_id, "reason": reason}


@dataclass
class PullPlan:
    """usable_records' verdict: the records to pull with their val score, the skipped ones, the collected ones."""
    records: list[tuple[registry.CheckpointRecord, float]] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    collected: list[registry.CheckpointRecord] = field(default_factory=list)  # weights deleted by `ich gc`


def usable_records(records: list[registry.CheckpointRecord], metric: str, dataset_fingerprint: str,
                   data: str, warn: bool = True) -> PullPlan:
    """Checks that need no download: a finite val figure to rank by, and the dataset we evaluate on.
    Records whose weights `ich gc` deleted are kept apart (no warning each)."""
    out = PullPlan()
    key = f"val_{metric}"
    for r in records:
        if r.tags.get(TAG_GC) == GC_DELETED:
            out.collected.append(r)
            continue
        score = r.metrics.get(key)
        reason = (f"no {key} recorded" if score is None else f"{key} is {score}" if not math.isfinite(score)
                  else f"dataset fingerprint {r.dataset_fingerprint[:12]} is not the one of {data} "
                       f"({dataset_fingerprint[:12]})" if r.dataset_fingerprint != dataset_fingerprint else None)
        if reason:
            if warn:
                warnings.warn(f"skipping checkpoint {r.label()}: {reason}", RuntimeWarning, stacklevel=2)
            out.skipped.append(skip_entry(r, reason))
        else:
            out.records.append((r, float(score)))
    return out


# ---------------------------------------------------------------------------------------------- pull

def _file_id(path: Path) -> tuple:
    """What identifies a file's content as verified: path, size, inode and modification time."""
    st = os.stat(path)
    return str(path), st.st_size, st.st_ino, st.st_mtime_ns


@dataclass
class Pulled:
    """A checkpoint downloaded and verified into the local cache (weights stay on disk until used)."""
    record: registry.CheckpointRecord
    folder: Path
    meta: CheckpointMeta
    score: float  # its val metric as recorded in MLflow: ranks ingredients
    spec: EvalSpec  # architecture + preprocessing (checkpoint.json)
    verified: tuple | None = None  # _file_id of the weights when they were verified (sha256, safetensors, finite)
    state_dict: dict | None = None  # the verified tensors, while the pool's memory budget holds them

    @property
    def label(self) -> str:
        return self.record.label()

    def load(self) -> dict:
        """The verified weights: the tensors of the pull's one read when the pool kept them (read-only for the
        caller: shared by every soup of the call); else a file verified on pull and unchanged since, read without
        hashing it again; else (a new copy, e.g. fetched on another node) verified in full."""
        if self.state_dict is not None:
            return self.state_dict
        weights = self.folder / WEIGHTS
        if self.verified is not None and weights.is_file() and _file_id(weights) == self.verified:
            return load_weights(weights)
        state_dict, _ = registry.verify_pulled(self.record, self.folder)
        return state_dict

    def __getstate__(self) -> dict:
        return {**self.__dict__, "state_dict": None}  # a Ray task reads the verified file, not the driver's memory

    def group_key(self) -> tuple:
        return group_key(self.meta)


def short_reason(error: BaseException, *prefixes: str) -> str:
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

    def __init__(self, client, pulls: list[tuple[registry.CheckpointRecord, float]], folder: Path, workers: int = 2,
                 cache_bytes: int | None = None):
        self.client, self.folder = client, folder
        self.skipped: list[dict] = []
        if cache_bytes is None:
            cache_bytes = int(float(os.environ.get(CACHE_MB_ENV, DEFAULT_CACHE_MB)) * (1 << 20))
        self._cache_left, self._cache_lock = cache_bytes, threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soups-pull")
        self._futures: dict[str, Future] = {r.model_id: self._executor.submit(self._pull, r, s) for r, s in pulls}
        self._done: dict[str, Pulled | None] = {}
        self._anchors: dict[str, Pulled | None] = {}  # init fingerprint -> the shared init, pulled (or None)
        self._bar = tqdm(total=len(pulls), desc="pull checkpoints", unit="ckpt", file=sys.stderr, disable=None)

    def _pull(self, record: registry.CheckpointRecord, score: float) -> Pulled:
        folder = registry.download_checkpoint(self.client, record, self.folder)
        state_dict, meta = registry.verify_pulled(record, folder)  # the file's one read: sha256, safetensors, finite, tags
        size = sum(t.numel() * t.element_size() for t in state_dict.values())
        with self._cache_lock:
            keep = size <= self._cache_left
            self._cache_left -= size if keep else 0
        return Pulled(record, folder, meta, score, EvalSpec.of(meta), verified=_file_id(folder / WEIGHTS),
                      state_dict=state_dict if keep else None)

    def get(self, record: registry.CheckpointRecord) -> Pulled | None:
        if record.model_id not in self._done:
            try:
                self._done[record.model_id] = self._futures[record.model_id].result()
            except (CheckpointError, SignatureError, MlflowException, OSError) as e:
                self._done[record.model_id] = None
                reason = short_reason(e, f"checkpoint {record.label()}", str(self.folder / record.model_id))
                self.skip(record, reason)
            self._bar.update(1)
        return self._done[record.model_id]

    def anchor(self, record: registry.CheckpointRecord, notes: list[str], needing: list[str]) -> Pulled | None:
        """The shared init of the record's family, the anchor of the recipes `needing` it: the READY `init`
        LoggedModel of the record's experiment for the record's ich.init_fingerprint (registry.search_init_by_fingerprint:
        a warm start's sha256, a named init's own fingerprint tag), downloaded and verified once per fingerprint.
        None where there is none, with one note per fingerprint."""
        fingerprint = record.init_fingerprint
        if fingerprint in self._anchors:
            return self._anchors[fingerprint]
        self._anchors[fingerprint] = None
        no_soup = f"no {' or '.join(needing)} soup"
        if not fingerprint:
            notes.append(f"{no_soup} of the families of checkpoint {record.label()}: it records no {TAG_INIT}, so its "
                         "shared init cannot be found")
            return None
        found = registry.search_init_by_fingerprint(self.client, [record.experiment_id], fingerprint)
        if not found:
            notes.append(f"{no_soup} for init fingerprint {fingerprint}: this experiment holds no `{KIND_INIT}` "
                         f"LoggedModel of it (sweeps log their init since this version: run the sweep again, or "
                         f"log it with soups.store.registry.log_init_model(client, sweep_run, folder), the folder's "
                         f"checkpoint.json with {TAG_INIT}={fingerprint})")
            return None
        try:
            self._anchors[fingerprint] = self._pull(found[0], math.nan)
        except (CheckpointError, SignatureError, MlflowException, OSError) as e:
            why = short_reason(e, f"checkpoint {found[0].label()}", str(self.folder / found[0].model_id))
            notes.append(f"{no_soup} for init fingerprint {fingerprint}: its init model {found[0].model_id} "
                         f"cannot be used ({why})")
        return self._anchors[fingerprint]

    def skip(self, record: registry.CheckpointRecord, reason: str) -> None:
        if any(s["model_id"] == record.model_id for s in self.skipped):
            return
        warnings.warn(f"skipping checkpoint {record.label()}: {reason}", RuntimeWarning, stacklevel=2)
        self.skipped.append(skip_entry(record, reason))

    def close(self) -> None:
        self._bar.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        for pulled in (*self._done.values(), *self._anchors.values()):  # the soups are built: the kept tensors go
            if pulled is not None:
                pulled.state_dict = None


# ---------------------------------------------------------------------------------------------- families

@dataclass
class Family:
    """Ingredients offered to one set of soups, best val first."""
    scope: str
    name: str  # e.g. "within-<trial>", "across-best", "across-all"
    group: str
    members: list[Pulled]
    recipes: list[str]  # registered recipe names (soups/recipes/)
    trial: str | None = None
    pool: str = "all"  # the ingredient pool's rule (soups/pool.label): "all", "top_k:8", "cycle_end"
    family_size: int | None = None  # checkpoints (across-best: trials) the rule chose from; None: len(members)
    anchor: Pulled | None = None  # the shared init, when a recipe of the family needs it (Recipe.needs_anchor)


def group_id(key: tuple) -> str:
    """Short, stable name of a compatibility group: architecture plus a hash of the rest."""
    return f"{key[0]}-{hashlib.sha256(repr(key[1:]).encode()).hexdigest()[:8]}"


def pulled_best_first(members: list[Pulled], metric: str) -> list[Pulled]:
    return best_first(members, metric, score=lambda p: p.score, tiebreak=lambda p: (p.record.trial, p.record.epoch))


def compatible(members: list[Pulled], pool) -> list[Pulled]:
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


def schedule_of(p: Pulled) -> Schedule | None:
    """The learning-rate schedule the checkpoint was trained with (checkpoint.json's training config)."""
    return Schedule.of(p.meta.extra.get("config"))


def families(opts: SoupOptions, records: list[tuple[registry.CheckpointRecord, float]], pool: CheckpointPool,
             notes: list[str]):
    """Yield the families to soup, within first (so later trials keep downloading meanwhile), then across.
    The ingredient pool (opts.ingredients, soups/pool.py) chooses each family's members among the usable ones."""
    rule = ingredient_pool.label(opts.ingredients, opts.k)
    anchored = [r for r in opts.recipes if recipes.get(r).needs_anchor]
    every_checkpoint = [r for r in opts.recipes if recipes.get(r).every_checkpoint]  # the recipes that choose

    def family(scope: str, name: str, group: str, members: list[Pulled], cookable: list[str], **kw) -> Family | None:
        """The family with the recipes it can be cooked with: those that need the anchor only where it is found
        (pool.anchor: by the members' init fingerprint, once per fingerprint, a note where there is none)."""
        anchor = pool.anchor(members[0].record, notes, anchored) if set(cookable) & set(anchored) else None
        cookable = [r for r in cookable if anchor is not None or r not in anchored]
        return Family(scope, name, group, members, cookable, anchor=anchor, **kw) if cookable else None
    trials: OrderedDict[str, list[registry.CheckpointRecord]] = OrderedDict()
    for record, _ in records:
        trials.setdefault(record.trial, []).append(record)
    if "within" in opts.scopes:
        for trial, trial_records in trials.items():
            pulled = [p for r in trial_records if (p := pool.get(r)) is not None]
            usable = compatible(pulled_best_first(pulled, opts.metric), pool)
            try:
                members = ingredient_pool.within(usable, opts.ingredients, opts.k, opts.metric, score=lambda p: p.score,
                                                 epoch=lambda p: p.record.epoch,
                                                 schedule=schedule_of(usable[0]) if usable else None)
            except ingredient_pool.PoolRefused as e:
                notes.append(f"trial {trial}: {e}, no {rule} within-trial soup")
                continue
            if len(members) < 2:
                epochs = f" (epoch {members[0].record.epoch})" if members else ""
                if rule == "all":
                    notes.append(f"trial {trial}: {len(members)} usable checkpoint(s), no within-trial soup")
                else:
                    notes.append(f"trial {trial}: pool {rule} holds {len(members)} of its {len(usable)} usable "
                                 f"checkpoint(s){epochs}, no within-trial soup")
                continue
            if f := family("within", f"within-{trial}", group_id(members[0].group_key()), members, opts.recipes,
                           trial=trial, pool=rule, family_size=len(usable)):
                yield f
    if "across" in opts.scopes:
        groups: OrderedDict[tuple, list[Pulled]] = OrderedDict()
        for record, _ in records:
            if (p := pool.get(record)) is not None:
                groups.setdefault(p.group_key(), []).append(p)
        for key, group_members in groups.items():
            group = group_id(key)
            suffix = f"-{group}" if len(groups) > 1 else ""
            members = compatible(pulled_best_first(group_members, opts.metric), pool)
            chosen = ingredient_pool.across(members, opts.ingredients, opts.k, opts.metric, score=lambda p: p.score,
                                            epoch=lambda p: p.record.epoch, trial=lambda p: p.record.trial,
                                            schedules={p.record.trial: schedule_of(p) for p in reversed(members)})
            notes.extend(chosen.notes)
            best_per_trial = pulled_best_first(chosen.best_per_trial, opts.metric)
            n_trials = len({p.record.trial for p in members})
            if len(best_per_trial) < 2:
                notes.append(f"group {group}: checkpoints of {len(best_per_trial)} trial(s)"
                             f"{'' if rule == 'all' else f' in pool {rule}'}, no across-run soup")
                continue
            if f := family("across", f"across-best{suffix}", group, best_per_trial, opts.recipes, pool=rule,
                           family_size=n_trials):
                yield f
            every = pulled_best_first(chosen.every, opts.metric)
            if every_checkpoint and (f := family("across", f"across-all{suffix}", group, every, every_checkpoint,
                                                 pool=rule, family_size=len(members))):
                yield f
