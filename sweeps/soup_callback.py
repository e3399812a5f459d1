"""The soup so far (issue 14, item 1): a Tune callback on the driver that extends the across-run greedy soup
while the sweep runs. `soup_so_far: true` in a sweep config.

When a trial finishes or ASHA stops it, its best checkpoint (by the recorded val metric) is pulled from MLflow
(sha256 verified) and offered to the greedy soup: accepted when the soup with it scores at least as well on
val under the tie rule in force (soups/average.py's `improves`). The sweep run gets
`soup_so_far_val_<metric>` and `soup_so_far_size` with step = number of trials done. Greedy is order-dependent:
here trials arrive in the order they end, the post-hoc across-best greedy ranks them by val first, so the two
may pick different ingredients; `ich soup` at the end still builds every soup from scratch.

Not done here (left for later): within-trajectory soups per trial as Ray tasks, moving the champion alias.
A failure in the callback is printed as one line and never fails the sweep.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric
from ray import tune

from ich.checkpoint import load_checkpoint
from ich.data import load_dataset
from soups import registry
from soups.average import RunningSum, improves
from soups.compat import IncompatibleCheckpoint, check_compatible
from soups.evaluate import EvalSpec, Evaluator, higher_is_better


class SoupSoFar(tune.Callback):
    def __init__(self, *, tracking_uri: str, experiment_id: str, sweep: str, parent_run_id: str, data: str,
                 metric: str = "macro_f1", tie_rule: str = "accept", device: str = "cpu") -> None:
        self.uri, self.experiment_id, self.sweep, self.parent_run_id = tracking_uri, experiment_id, sweep, parent_run_id
        self.data, self.metric, self.tie_rule, self.device = data, metric, tie_rule, device
        self.sum = RunningSum()
        self.best: float | None = None
        self.done = 0
        self.accepted: list[str] = []  # model ids, in the order they joined
        self.offered: list[str] = []
        self._ref = None  # (label, meta) of the first ingredient: later ones must be compatible with it
        self._ev: Evaluator | None = None  # holds the dataset, loaded on first use: Tune pickles its callbacks

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ev": None}

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.done += 1
        try:
            self.offer(trial.trial_id)
        except Exception as e:  # noqa: BLE001 - the soup so far is a view of the sweep, never its failure
            print(f"soup so far: trial {trial.trial_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr, flush=True)

    def offer(self, trial_id: str) -> None:
        client = MlflowClient(self.uri)
        key = f"val_{self.metric}"
        records = [r for r in registry.search_checkpoints(client, [self.experiment_id], sweep=self.sweep, trial=trial_id)
                   if r.metrics.get(key) is not None]
        if not records:
            return
        sign = 1.0 if higher_is_better(self.metric) else -1.0
        record = max(records, key=lambda r: (sign * r.metrics[key], -r.epoch))
        with tempfile.TemporaryDirectory(prefix="ich-soup-so-far-") as tmp:
            sd, meta = load_checkpoint(registry.download_checkpoint(client, record, Path(tmp)),
                                       expected_sha256=record.sha256)
        self.offered.append(record.model_id)
        if self._ref is None:
            self._ref, self._ev = (record.label(), meta), Evaluator(load_dataset(self.data), EvalSpec.of(meta),
                                                                device=self.device)
        else:
            try:
                check_compatible([self._ref, (record.label(), meta)])
            except IncompatibleCheckpoint as e:
                print(f"soup so far: {e}", file=sys.stderr, flush=True)
                return
        candidate = self.sum.candidate_with(sd, record.label()) if self.sum.count else sd
        score = self._ev.score(self._ev.logits(candidate, "val"), "val", self.metric)
        if self.best is None or improves(score, self.best, higher_is_better=higher_is_better(self.metric),
                                         tie_rule=self.tie_rule):
            self.sum.add(sd, record.label())
            self.best = score
            self.accepted.append(record.model_id)
        now = int(time.time() * 1000)
        registry.call_with_retry("log soup so far", client.log_batch, self.parent_run_id, metrics=[
            Metric(f"soup_so_far_val_{self.metric}", float(self.best), now, self.done),
            Metric("soup_so_far_size", float(self.sum.count), now, self.done)])
