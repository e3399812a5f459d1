"""Predictions of state dicts on a dataset: one network per architecture, weights swapped in and out.

Used by the soup orchestrator (val scores for greedy selection, test figures) and the report. Pure torch
and numpy: no MLflow here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ich.data import ICHDataset
from ich.metrics import get_metric, higher_is_better, metrics_of  # noqa: F401  (higher_is_better: the registry's)
from ich.models import create_model
from ich.preprocess import Preprocess, transform
from ich.train import predict_logits
from soups.bn import has_batchnorm, recalibrate_bn


def metric_value(logits: np.ndarray, labels: np.ndarray, num_classes: int, metric: str) -> float:
    """The registered metric (ich/metrics.py) of logits against labels."""
    return get_metric(metric).value(logits, labels, num_classes)


@dataclass(frozen=True)
class EvalSpec:
    """What fixes a model's predictions besides its weights: the architecture and its preprocessing."""
    architecture: str
    preprocess: Preprocess

    @property
    def img_size(self) -> int:
        return self.preprocess.img_size

    @classmethod
    def of(cls, meta) -> "EvalSpec":
        """A checkpoint's or soup's (CheckpointMeta) spec."""
        return cls(meta.architecture, Preprocess.from_meta(meta))

    def key(self) -> tuple:
        return (self.architecture, *self.preprocess.key())


class Evaluator:
    def __init__(self, dataset: ICHDataset, spec: EvalSpec, device: str = "auto", batch_size: int = 256):
        self.data, self.spec, self.batch_size = dataset, spec, batch_size
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.model = create_model(spec.architecture, dataset.num_classes, spec.img_size).to(self.device).eval()
        self.amp = torch.bfloat16 if self.device.type == "cuda" else None
        self.has_bn = has_batchnorm(self.model)

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)

    def _batches(self, images: np.ndarray):
        for i in range(0, len(images), self.batch_size):
            yield transform(torch.from_numpy(images[i:i + self.batch_size].copy()).to(self.device), self.spec.preprocess)

    def logits(self, state_dict: dict[str, torch.Tensor] | None, split: str) -> np.ndarray:
        """Logits (N, C) float32 of `state_dict` (or the weights already loaded) on a split: Trainer.predict's loop."""
        if state_dict is not None:
            self.load(state_dict)
        return predict_logits(self.model, self.data.splits[split].images, self.spec.preprocess, self.device,
                              self.batch_size, num_classes=self.data.num_classes, amp_dtype=self.amp)

    def labels(self, split: str) -> np.ndarray:
        return self.data.splits[split].labels

    def score(self, logits: np.ndarray, split: str, metric: str) -> float:
        return metric_value(logits, self.labels(split), self.data.num_classes, metric)

    def metrics(self, logits: np.ndarray, split: str) -> dict[str, float]:
        return metrics_of(logits, self.labels(split), self.data.num_classes)

    def recalibrated(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same weights with BN statistics recomputed by one pass over train (eval preprocessing)."""
        self.load(state_dict)
        recalibrate_bn(self.model, self._batches(self.data.splits["train"].images), self.device)
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

