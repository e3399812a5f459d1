"""Soups while the sweep runs (issue 14, item 1): a Tune callback on the driver. `soup_so_far: true` in a sweep config.

When a trial finishes or ASHA stops it:
- its within-trajectory soups (every recipe's, over its own checkpoints) are built as a Ray task
  (soups/parallel.py: cook_within, the orchestrator's own pull/family/build code, with a GPU fraction when the
  cluster has GPUs, and no CPU reserved so that it runs beside the trials). The task is submitted here and
  collected on later callbacks, so the driver's loop never waits for it. Each result goes on the sweep run:
  `within_<recipe>_val_<metric>` with step = the trial's place in the order trials ended, and
  `soups_so_far/within-<trial>.json` (val figures, ingredients, weights sha256).
- its best checkpoint (by the recorded val metric) is pulled from MLflow (sha256 verified) and offered to the
  across-run greedy soup, accepted when the soup with it scores at least as well on val under the tie rule in
  force (soups/average.py's `improves`). The sweep run gets `soup_so_far_val_<metric>` and `soup_so_far_size`
  with step = number of trials done, and `soup_so_far.json` (ingredients in the order they joined).

After the post-hoc soups, `compare_with_posthoc` sets the soup so far beside `ich soup`'s across-best greedy
soup: greedy is order-dependent (here trials arrive in the order they end, post hoc ranked by val), so both
val figures and the ingredients that differ go on the sweep run (`soup_so_far_vs_posthoc.json`, a tag).

The champion alias moves only at the end (the orchestrator's rule, on the post-hoc soups), not during the sweep.
Resume: the state (trials seen, ingredient ids, best figure, within results) is Tune callback state, plain data;
the running sum is rebuilt from the ingredients' checkpoints (sha256 verified, same order: the same bits), and
within soups submitted but not collected before the stop are submitted again. A failure here is printed as one
line and never fails the sweep.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from ray import tune

from ich.data import load_dataset
from soups.store import registry, retry
from soups.average import RunningSum, improves
from soups.compat import IncompatibleCheckpoint, check_compatible
from soups.evaluate import EvalSpec, Evaluator, higher_is_better
from soups.store.tags import TAG_VS_POSTHOC

STATE_VERSION = 1


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def within_task_resources(cluster_gpus: float, parallel: int) -> dict:
    """Ray options of one trial's within-soup task. No CPU reserved: trials usually hold every CPU (and Tune
    reuses their actors for the next trials), so a task that waited for one ran only after the sweep (measured:
    every within-soup task of a 6-trial sweep on 2 CPUs started after the last trial). The task is a few val passes, small
    beside a trial's epochs. On GPUs it asks a fraction, which does wait while trials hold every GPU."""
    return {"num_cpus": 0, "num_gpus": 1 / max(2, parallel) if cluster_gpus else 0, "max_retries": 1}


class SoupSoFar(tune.Callback):
    def __init__(self, *, tracking_uri: str, experiment_id: str, sweep: str, parent_run_id: str, data: str,
                 metric: str = "macro_f1", tie_rule: str = "accept", device: str = "cpu",
                 soups: dict | None = None, within: bool = True) -> None:
        self.uri, self.experiment_id, self.sweep, self.parent_run_id = tracking_uri, experiment_id, sweep, parent_run_id
        self.data, self.metric, self.tie_rule, self.device = data, metric, tie_rule, device
        self.soups = dict(soups or {})  # SoupOptions fields of the sweep's `soups:` (bn, recipe, parallel...)
        self.within_enabled = within
        self.sum = RunningSum()
        self.best: float | None = None
        self.done = 0
        self.seen: dict[str, int] = {}  # trial id -> its place in the order trials ended (the metrics' step)
        self.accepted: list[str] = []  # model ids, in the order they joined
        self.offered: list[str] = []
        self.within: dict[str, dict] = {}  # trial id -> the within task's result (plain data)
        self._ref = None  # (label, meta) of the first ingredient: later ones must be compatible with it
        self._ev: Evaluator | None = None  # holds the dataset, loaded on first use: Tune pickles its callbacks
        self._dataset = None
        self._dataset_ref = None
        self._refs: dict = {}  # trial id -> ObjectRef of its within task
        self._resubmit: list[str] = []
        self._rebuild: list[str] = []

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ev": None, "_dataset": None, "_dataset_ref": None, "_refs": {}, "_ref": None,
                "sum": RunningSum(), "_resubmit": [], "_rebuild": list(self.accepted)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ Tune's callback state (resume)

    def get_state(self) -> dict:
        """Plain data only (no tensors, no objects): Tune pickles it with the experiment state."""
        return {"version": STATE_VERSION, "done": self.done, "seen": dict(self.seen), "best": self.best,
                "accepted": list(self.accepted), "offered": list(self.offered),
                "within": json.loads(json.dumps(self.within))}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            print("soup so far: callback state of another version; starting from empty", file=sys.stderr, flush=True)
            return
        self.done, self.seen, self.best = int(state["done"]), dict(state["seen"]), state["best"]
        self.accepted, self.offered, self.within = list(state["accepted"]), list(state["offered"]), dict(state["within"])
        self.sum, self._ref, self._refs = RunningSum(), None, {}
        self._rebuild = list(self.accepted)  # the running sum, from its ingredients, at the next offer
        # within tasks in flight when the sweep stopped are lost with the old driver: build them again
        self._resubmit = [t for t in self.seen if t not in self.within]

    # ------------------------------------------------------------------ Tune's events

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        trial_id = trial.trial_id
        if trial_id in self.seen:  # a trial restored after it had ended: counted once
            return
        self.done += 1
        self.seen[trial_id] = self.done
        self._guard(f"trial {trial_id}: within soups", self._submit_within, trial_id)
        self._guard(f"trial {trial_id}", self.offer, trial_id)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self._resubmit:
            pending, self._resubmit = self._resubmit, []
            for trial_id in pending:
                self._guard(f"trial {trial_id}: within soups", self._submit_within, trial_id)
        if self._refs:
            self._guard("within soups", self._collect, False)

    def on_experiment_end(self, trials: list, **info) -> None:
        for trial_id in self._resubmit:
            self._guard(f"trial {trial_id}: within soups", self._submit_within, trial_id)
        self._resubmit = []
        self._guard("within soups", self._collect, True)
        self._guard("soup so far state", self._log_state)

    @staticmethod
    def _guard(what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - the soups so far are a view of the sweep, never its failure
            print(f"soup so far: {what}: {_first_line(e)}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ within soups, as Ray tasks

    def _options(self):
        from soups.options import SoupOptions
        names = {f.name for f in dataclasses.fields(SoupOptions)}
        extra = {k: v for k, v in self.soups.items() if k in names and k not in ("experiment", "sweep", "tracking_uri")}
        extra.setdefault("metric", self.metric)
        extra.setdefault("tie_rule", self.tie_rule)
        extra.setdefault("device", self.device)
        return SoupOptions(experiment="-", sweep=self.sweep, tracking_uri=self.uri, **extra)

    def _load_dataset(self):
        if self._dataset is None:
            self._dataset = load_dataset(self.data)
        return self._dataset

    def _submit_within(self, trial_id: str) -> None:
        if not self.within_enabled:
            return
        import ray
        import torch

        from soups.parallel import cook_within
        opts = self._options()
        if "within" not in opts.scopes:
            return
        if self._dataset_ref is None:  # once in the object store, mapped by every task on a node
            self._dataset_ref = ray.put(self._load_dataset())
        gpus = ray.cluster_resources().get("GPU", 0) if opts.device != "cpu" else 0
        task = ray.remote(**within_task_resources(gpus, opts.parallel))(cook_within)
        # the driver's intra-op threads: the post-hoc `ich soup` on this machine adds in the same order
        from soups.store.signing import trusted_texts
        self._refs[trial_id] = task.remote(opts, self._dataset_ref, self.experiment_id, self.sweep, trial_id, self.uri,
                                           torch.get_num_threads(), trusted_texts())  # the task trusts the driver's keys

    def _collect(self, block: bool) -> None:
        import ray
        refs = list(self._refs.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)
        ready = set(ready)
        for trial_id, ref in list(self._refs.items()):
            if ref not in ready:
                continue
            del self._refs[trial_id]
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - one trial's soups failing leaves the others
                self.within[trial_id] = {"trial": trial_id, "soups": [], "notes": [], "error": _first_line(e)}
                print(f"soup so far: trial {trial_id}: within soups: {_first_line(e)}", file=sys.stderr, flush=True)
                continue
            self._record_within(trial_id, result)

    def _record_within(self, trial_id: str, result: dict) -> None:
        step = self.seen.get(trial_id, self.done)
        result = {**result, "step": step}
        result.pop("pid", None)
        self.within[trial_id] = result
        client = MlflowClient(self.uri)
        now = int(time.time() * 1000)
        metrics = [Metric(f"within_{s['recipe']}_val_{self.metric}", float(s["val"][self.metric]), now, step)
                   for s in result["soups"]]
        if metrics:
            retry.call_with_retry("log within soups", client.log_batch, self.parent_run_id, metrics=metrics)
        retry.call_with_retry("log within soups", client.log_text, self.parent_run_id,
                                 json.dumps(result, indent=2), f"soups_so_far/within-{trial_id}.json")
        figures = ", ".join(f"{s['recipe']} {s['val'][self.metric]:.4f} "
                            f"({sum(i['accepted'] for i in s['ingredients'])}/{len(s['ingredients'])})"
                            for s in result["soups"]) or "; ".join(result["notes"]) or "none"
        print(f"soup so far: trial {trial_id} within soups, val {self.metric}: {figures}", flush=True)

    # ------------------------------------------------------------------ the across-run greedy soup

    def _pull(self, client, record):
        with tempfile.TemporaryDirectory(prefix="ich-soup-so-far-") as tmp:
            return registry.load_record(client, record, Path(tmp))  # one read: sha256, safetensors, finite, tags

    def _restore_sum(self, client) -> None:
        """After a resume: the running sum again from its ingredients, in the order they joined (the same bits)."""
        ids, self._rebuild = self._rebuild, []
        for model_id in ids:
            record = registry.get_model_record(client, model_id)
            sd, meta = self._pull(client, record)
            if self._ref is None:
                self._ref = (record.label(), meta)
            self.sum.add(sd, record.label())

    def offer(self, trial_id: str) -> None:
        client = MlflowClient(self.uri)
        if self._rebuild:
            self._restore_sum(client)
        key = f"val_{self.metric}"
        records = [r for r in registry.search_checkpoints(client, [self.experiment_id], sweep=self.sweep, trial=trial_id)
                   if r.metrics.get(key) is not None]
        if not records:
            return
        sign = 1.0 if higher_is_better(self.metric) else -1.0
        record = max(records, key=lambda r: (sign * r.metrics[key], -r.epoch))
        sd, meta = self._pull(client, record)
        self.offered.append(record.model_id)
        if self._ref is None:
            self._ref = (record.label(), meta)
        else:
            try:
                check_compatible([self._ref, (record.label(), meta)])
            except IncompatibleCheckpoint as e:
                print(f"soup so far: {e}", file=sys.stderr, flush=True)
                return
        if self._ev is None:
            self._ev = Evaluator(self._load_dataset(), EvalSpec.of(self._ref[1]), device=self.device)
        candidate = self.sum.candidate_with(sd, record.label()) if self.sum.count else sd
        score = self._ev.score(self._ev.logits(candidate, "val"), "val", self.metric)
        if self.best is None or improves(score, self.best, higher_is_better=higher_is_better(self.metric),
                                         tie_rule=self.tie_rule):
            self.sum.add(sd, record.label())
            self.best = score
            self.accepted.append(record.model_id)
        now = int(time.time() * 1000)
        retry.call_with_retry("log soup so far", client.log_batch, self.parent_run_id, metrics=[
            Metric(f"soup_so_far_val_{self.metric}", float(self.best), now, self.done),
            Metric("soup_so_far_size", float(len(self.accepted)), now, self.done)])
        self._log_state(client)

    def state_json(self) -> dict:
        return {"metric": self.metric, "tie_rule": self.tie_rule, "trials_done": self.done,
                f"val_{self.metric}": self.best, "accepted": list(self.accepted), "offered": list(self.offered),
                "bn_mode": "average", "trial_steps": dict(self.seen)}

    def _log_state(self, client=None) -> None:
        client = client or MlflowClient(self.uri)
        retry.call_with_retry("log soup so far", client.log_text, self.parent_run_id,
                                 json.dumps(self.state_json(), indent=2), "soup_so_far.json")


# ---------------------------------------------------------------------------------------------- at the end

def _read_json_artifact(client, run_id: str, path: str) -> dict | None:
    """A JSON artifact of the run (data, never a pickle), or None when it is not there."""
    with tempfile.TemporaryDirectory(prefix="ich-soup-so-far-") as tmp:
        try:
            local = retry.call_with_retry(f"download {path}", client.download_artifacts, run_id, path, tmp)
        except Exception:  # noqa: BLE001 - absent (no trial ended, or soup_so_far off)
            return None
        return json.loads(Path(local).read_text(encoding="utf-8"))


def diff_with_posthoc(so_far: dict, posthoc_soups: list[dict], within: dict[str, dict] | None = None) -> dict:
    """Pure: the soup so far beside the post-hoc across-best greedy soup(s) of `ich soup`'s summary entries,
    and each trial's within soups built during the sweep beside the post-hoc ones (ingredients, val)."""
    metric = so_far["metric"]
    across = [s for s in posthoc_soups if s["scope"] == "across" and s["recipe"] == "greedy"
              and s["name"].startswith("across-best")]
    mine = set(so_far["accepted"])
    # more than one compatible group: the one holding the soup so far's ingredients
    post = max(across, key=lambda s: len(mine & {i["model_id"] for i in s["ingredients"]}), default=None)
    out = {"metric": metric,
           "so_far": {"val": so_far.get(f"val_{metric}"), "bn_mode": so_far.get("bn_mode", "average"),
                      "ingredients": so_far["accepted"], "order": "trials in the order they ended"},
           "posthoc": None, "same_ingredients": None, "only_so_far": [], "only_posthoc": []}
    if post is not None:
        theirs = [i["model_id"] for i in post["ingredients"] if i["accepted"]]
        out["posthoc"] = {"name": post["name"], "val": post["val"][metric], "bn_mode": post["bn_mode"],
                          "ingredients": theirs, "order": "trials' best checkpoints by val, best first"}
        out["only_so_far"] = [m for m in so_far["accepted"] if m not in set(theirs)]
        out["only_posthoc"] = [m for m in theirs if m not in mine]
        out["same_ingredients"] = not out["only_so_far"] and not out["only_posthoc"]
    if within is not None:
        by_name = {s["name"]: s for s in posthoc_soups if s["scope"] == "within"}
        rows = []
        for trial, result in sorted(within.items()):
            for s in result.get("soups", []):
                p = by_name.get(s["name"])
                rows.append({"soup": s["name"], "during_sweep_val": s["val"][metric],
                             "posthoc_val": None if p is None else p["val"][metric],
                             "same_ingredients": None if p is None else
                             [(i["model_id"], i["accepted"]) for i in s["ingredients"]]
                             == [(i["model_id"], i["accepted"]) for i in p["ingredients"]],
                             "weights_sha256": s.get("weights_sha256")})
        out["within"] = rows
    return out


def summary_line(d: dict) -> str:
    m, a, p = d["metric"], d["so_far"], d["posthoc"]
    if p is None:
        return f"soup so far: val {m} {a['val']}, {len(a['ingredients'])} ingredient(s); no post-hoc across greedy soup"
    same = "same ingredients" if d["same_ingredients"] else \
        f"ingredients differ ({len(d['only_so_far'])} only so far, {len(d['only_posthoc'])} only post hoc)"
    return (f"soup so far vs post-hoc {p['name']}: val {m} {a['val']:.4f} ({len(a['ingredients'])} ingr., "
            f"{a['bn_mode']} BN) vs {p['val']:.4f} ({len(p['ingredients'])} ingr., {p['bn_mode']} BN); {same}")


def compare_with_posthoc(tracking_uri: str, parent_run_id: str, posthoc: dict | None) -> dict | None:
    """After the sweep's soups: log `soup_so_far_vs_posthoc.json` and a tag on the sweep run, print one line.
    A failure is one line on stderr: the sweep and its soups are done by then."""
    try:
        return _compare_with_posthoc(tracking_uri, parent_run_id, posthoc or {})
    except Exception as e:  # noqa: BLE001
        print(f"soup so far vs post hoc: {_first_line(e)}", file=sys.stderr, flush=True)
        return None


def _compare_with_posthoc(tracking_uri: str, parent_run_id: str, posthoc: dict) -> dict | None:
    client = MlflowClient(tracking_uri)
    so_far = _read_json_artifact(client, parent_run_id, "soup_so_far.json")
    if so_far is None:
        return None
    within = {}
    for trial in so_far.get("trial_steps", {}):
        w = _read_json_artifact(client, parent_run_id, f"soups_so_far/within-{trial}.json")
        if w is not None:
            within[trial] = w
    d = diff_with_posthoc(so_far, posthoc.get("soups", []), within)
    line = summary_line(d)
    retry.call_with_retry("log soup so far vs post hoc", client.log_text, parent_run_id, json.dumps(d, indent=2),
                             "soup_so_far_vs_posthoc.json")
    tag = "no post-hoc soup" if d["posthoc"] is None else "same ingredients" if d["same_ingredients"] else \
        f"differ: {len(d['only_so_far'])} only so far, {len(d['only_posthoc'])} only post hoc"
    retry.call_with_retry("tag soup so far vs post hoc", client.log_batch, parent_run_id,
                             tags=[RunTag(TAG_VS_POSTHOC, tag)])
    print(line, flush=True)
    return d
