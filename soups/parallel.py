"""Soup families built at once as Ray tasks: `ich soup --parallel N`, or `soups.parallel: N` in a sweep config.

Families are independent (each trial's within soups, each compatible group's across soups). A Ray task builds
one family's soups with the serial path's own code (build.cook_family) on the same members in the same
order, so parallel and serial give the same soups, weights bitwise equal (the float64 running sum does not
depend on where or on how many threads it runs). The driver pulls and verifies the checkpoints as before,
keeps at most N tasks in flight, and records the results (reports, MLflow runs, champion) in family order.
A task on a node without the driver's checkpoint cache downloads (and verifies) its members itself, and the
family's shared init (the anchor of model_stock) the same way: a Family carries the pulled records, not tensors.

`cook_within`: one trial's within soups as a task started by the sweep's SoupSoFar callback (sweeps/soup_callback.py).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path


class _Skips:
    """Stands in for the driver's CheckpointPool inside a task: collects skips to hand back to it."""

    def __init__(self) -> None:
        self.skipped: list[tuple[str, str]] = []

    def skip(self, record, reason: str) -> None:
        self.skipped.append((record.model_id, reason))


def _cook(opts, dataset, family, tracking_uri: str, threads: int, trusted: list[str] | None = None):
    """One family, inside a Ray task: (member ids after skips, [(recipe, soup, uniform, accepted, tries)],
    member logits for soft voting, skips, the worker's pid). `trusted`: the driver's trusted public keys (a pull
    here verifies signatures against those, not against whatever key the worker's environment names)."""
    import torch
    from mlflow import MlflowClient

    from soups.store import registry, signing
    signing.use_only(trusted)
    from soups.build import SoupBuilder, cook_family
    from soups.worker_exit import quiet_sigterm_exit
    quiet_sigterm_exit()
    # The driver's intra-op threads: CPU kernels (and BN recalibration's running statistics) then add in the
    # same order as on the serial path, so logits, greedy's choices and weights come out the same bits.
    torch.set_num_threads(threads)
    tmp = None
    try:
        for p in (*family.members, *([family.anchor] if family.anchor is not None else [])):  # the init too
            if not p.folder.is_dir():  # another node: fetch it here (sha256 verified again on load)
                tmp = tmp or Path(tempfile.mkdtemp(prefix="ich-soup-task-"))
                p.folder = registry.download_checkpoint(MlflowClient(tracking_uri), p.record, tmp)
        skips = _Skips()
        builder = SoupBuilder(opts, dataset, skips)
        cooked = list(cook_family(builder, family))
        logits = {p.record.model_id: builder.logits[p.record.model_id] for p in family.members}
        return [p.record.model_id for p in family.members], cooked, logits, skips.skipped, os.getpid()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def cook_families(builder, families: Iterable, tracking_uri: str,
                  notes: list[str]) -> Iterator[tuple[object, list[tuple]]]:
    """Yield (family, its built soups) in the order of `families`, building up to builder.opts.parallel at once;
    a note says how many families ran in how many worker processes."""
    import ray
    import torch

    from soups import recipes
    from soups.store import signing
    started = not ray.is_initialized()
    if started:  # no Ray yet (`ich soup` alone): a local one, or the cluster RAY_ADDRESS names
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0) if builder.opts.device != "cpu" else 0
        task = ray.remote(num_cpus=1, num_gpus=1 / builder.opts.parallel if gpus else 0, max_retries=1,
                          runtime_env=recipes.ray_runtime_env())(_cook)  # a cluster's nodes see ICH_RECIPES too
        threads = torch.get_num_threads()
        trusted = signing.trusted_texts()  # public keys: the tasks verify against the driver's trust
        dataset = ray.put(builder.dataset)  # once in the object store, mapped by every task on a node
        window: deque = deque()
        pids: list[int] = []

        def collect():
            family, ref = window.popleft()
            ids, cooked, logits, skipped, pid = ray.get(ref)
            pids.append(pid)
            by_id = {p.record.model_id: p for p in family.members}
            for model_id, reason in skipped:
                builder.pool.skip(by_id[model_id].record, reason)
            family.members = [by_id[i] for i in ids]  # the driver's own records, in the task's order
            for model_id, per_split in logits.items():
                if model_id not in builder.logits:
                    builder.logits[model_id] = per_split
            return family, cooked

        pending = iter(families)

        def submit() -> None:
            family = next(pending, None)
            if family is not None:
                window.append((family, task.remote(builder.opts, dataset, family, tracking_uri, threads, trusted)))

        for _ in range(builder.opts.parallel):
            submit()
        while window:
            done = collect()
            submit()  # before the caller records `done`: N families keep building meanwhile
            yield done
        notes.append(f"{len(pids)} soup families built as Ray tasks, up to {builder.opts.parallel} at once, "
                     f"in {len(set(pids))} worker process(es)")
    finally:
        if started:
            ray.shutdown()


def state_dict_sha256(state_dict: dict) -> str:
    """sha256 of a state dict's tensors (name, dtype, shape, bytes; names sorted): equal iff bitwise equal."""
    import hashlib

    import torch
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}|{str(t.dtype).removeprefix('torch.')}|{tuple(state_dict[k].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cook_within(opts, dataset, experiment_id: str, sweep: str, trial: str, tracking_uri: str, threads: int,
                trusted: list[str] | None = None) -> dict:
    """One trial's within-trajectory soups, inside a Ray task started while the sweep runs (sweeps/soup_callback.py).

    The trial's READY checkpoint records are searched here (not on the driver), then go through `ich soup`'s own
    code: filter (pull.usable_records), pull (CheckpointPool: download, sha256, finite weights), family
    (pull.families, scope within) and build (build.cook_family), with the driver's torch threads; so the soups
    equal the post-hoc ones, weights bitwise, under the same ingredient pool (opts.ingredients, opts.k). Returns plain
    data: per recipe the val figures, BN mode, ingredients (accepted or not), the pool (soup_record.pool_entry) and
    the weights' sha256; or a note why there is no soup."""
    import dataclasses

    import torch
    from mlflow import MlflowClient

    from soups.store import registry, signing
    from soups.build import SoupBuilder, cook_family
    from soups.pull import CheckpointPool, families, usable_records
    from soups.soup_record import pool_entry
    from soups.worker_exit import quiet_sigterm_exit

    quiet_sigterm_exit()
    signing.use_only(trusted)  # the driver's trusted keys (signatures are checked on every pull)
    torch.set_num_threads(threads)
    client = MlflowClient(tracking_uri)
    records = registry.search_checkpoints(client, [experiment_id], sweep=sweep, trial=trial)
    opts = dataclasses.replace(opts, scope="within", parallel=1)
    usable = usable_records(records, opts.metric, dataset.fingerprint, "the sweep's dataset", warn=False)
    out = {"trial": trial, "soups": [], "notes": [], "skipped": list(usable.skipped), "pid": os.getpid()}
    usable = usable.records
    if not usable:
        out["notes"].append(f"trial {trial}: no usable checkpoint")
        return out
    tmp = Path(tempfile.mkdtemp(prefix="ich-within-task-"))
    pool = CheckpointPool(client, usable, tmp / "pulled")
    try:
        builder = SoupBuilder(opts, dataset, pool)
        for family in families(opts, usable, pool, out["notes"]):
            ev = builder.evaluator(family.members[0])
            for recipe, soup, _uniform, accepted, tries in cook_family(builder, family):
                out["soups"].append({
                    "name": f"{family.name}-{recipe}", "recipe": recipe, "bn_mode": soup.bn_mode,
                    "val": {k: float(v) for k, v in ev.metrics(soup.logits["val"], "val").items()},
                    "ingredients": [{"epoch": p.record.epoch, "model_id": p.record.model_id,
                                     "accepted": p.record.model_id in accepted,
                                     "candidate_val": tries.get(p.record.model_id)} for p in family.members],
                    "pool": pool_entry(family), "weights_sha256": state_dict_sha256(soup.state_dict)})
    finally:
        pool.close()
        out["skipped"] += pool.skipped
        shutil.rmtree(tmp, ignore_errors=True)
    return out
