"""`objective: trajectory_soup`: a trial is judged by the uniform soup of its own checkpoints so far.

Each epoch the trial adds its weights to a float64 running sum (soups/average.py's RunningSum: one extra
state dict in memory), evaluates the mean on val (one extra val pass) and reports `val_soup_<metric>`;
ASHA and Optuna then rank trials by it. BatchNorm statistics are averaged like the weights (no train pass).
The running sum travels with the trial's Tune checkpoint, so a retried or resumed trial goes on bitwise.
Knows nothing of Ray or MLflow.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ich.checkpoint import CheckpointError
from ich.train import Trainer, evaluate_logits
from soups.average import RunningSum

OBJECTIVES = ("single", "trajectory_soup")
PREFIX = "val_soup_"
SUM_FILE = "soup_sum.safetensors"  # in the Tune checkpoint folder, beside the training state
SUM_JSON = "soup_sum.json"


def objective_metric(metric: str, objective: str) -> str:
    """The metric ASHA and Optuna use: `val_macro_f1` -> `val_soup_macro_f1` under trajectory_soup."""
    if objective == "trajectory_soup":
        return PREFIX + metric.removeprefix("val_")
    return metric


class TrajectorySoup:
    """The running uniform soup of one trial's checkpoints, evaluated with the trial's own eval pipeline."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.sum = RunningSum()
        self.epochs: list[int] = []
        self._model: torch.nn.Module | None = None  # one scratch copy of the network, reused every epoch

    def add(self, weights: dict[str, torch.Tensor], epoch: int) -> None:
        self.sum.add(weights, f"epoch {epoch}")
        self.epochs.append(int(epoch))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.sum.mean()

    def evaluate(self) -> dict[str, float]:
        """val_soup_* metrics of the soup of every epoch added so far."""
        if self._model is None:
            self._model = copy.deepcopy(self.trainer.model)
        self._model.load_state_dict(self.state_dict())
        data = self.trainer.data.splits["val"]
        logits = self.trainer.predict("val", model=self._model)
        out = evaluate_logits(logits, data.labels, self.trainer.data.num_classes, prefix=PREFIX)
        out["soup_size"] = float(self.sum.count)
        return out

    def save(self, folder: str | Path) -> None:
        sums, dtypes, count = self.sum.export()
        folder = Path(folder)
        save_file({k: v.contiguous() for k, v in sums.items()}, str(folder / SUM_FILE))
        (folder / SUM_JSON).write_text(json.dumps({"dtypes": dtypes, "count": count, "epochs": self.epochs}))

    def load(self, folder: str | Path) -> bool:
        """Take the running sum saved in a trial checkpoint folder; False when it holds none (objective changed)."""
        folder = Path(folder)
        if not (folder / SUM_FILE).is_file():
            return False
        try:
            meta = json.loads((folder / SUM_JSON).read_text())
            self.sum = RunningSum.restore(load_file(str(folder / SUM_FILE)), meta["dtypes"], meta["count"],
                                          f"{folder / SUM_FILE}")
            self.epochs = [int(e) for e in meta["epochs"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / SUM_FILE}: cannot restore the trial's running soup ({e})") from None
        return True
