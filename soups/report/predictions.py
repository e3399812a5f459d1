"""The report's logits: `Predictions`, per (model id, split), from memory, then the prediction cache
($ICH_HOME/cache/predictions/<dataset fingerprint>/<model id>-<split>.npy), then one forward pass per model it lacks
(weights pulled and sha256-verified through `load`)."""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ich.data import ICHDataset
from soups import registry
from soups.evaluate import EvalSpec, Evaluator
from soups.logit_store import cached_logits_path, save_cached_logits
from soups.options import SPLITS
from soups.report.snapshot import ReportError


@dataclass
class Predictions:
    """Logits per (model id, split): memory, then the disk cache, then one forward pass per model (all splits).
    `load(record, folder) -> (state_dict, meta)` pulls weights (sha256 verified); None when every model is cached."""
    dataset: ICHDataset
    cache_dir: Path
    tmp: Path
    load: Callable | None = None
    device: str = "auto"
    computed: int = 0  # models run by this report (the rest came from the cache)
    mem: dict = field(default_factory=dict)
    evaluators: dict = field(default_factory=dict)

    def _path(self, model_id: str, split: str) -> Path:
        return cached_logits_path(self.cache_dir, model_id, split)

    def _cached(self, model_id: str, split: str) -> np.ndarray | None:
        key = (model_id, split)
        if key not in self.mem:
            path = self._path(model_id, split)
            shape = (len(self.dataset.splits[split]), self.dataset.num_classes)
            try:
                logits = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                return None
            if logits.shape != shape or not np.isfinite(logits).all():
                return None  # a cache file of another dataset build or a torn write: run the model again
            self.mem[key] = logits
        return self.mem[key]

    def _evaluator(self, meta) -> Evaluator:
        spec = EvalSpec.of(meta)  # the preprocessing the checkpoint (or soup) records
        if spec.key() not in self.evaluators:
            self.evaluators[spec.key()] = Evaluator(self.dataset, spec, device=self.device)
        return self.evaluators[spec.key()]

    def ensure(self, records: list[registry.CheckpointRecord]) -> None:
        """Run every model that lacks a cached split, with a progress bar; each model once, on every split."""
        unique = {r.model_id: r for r in records}
        todo = [r for r in unique.values() if any(self._cached(r.model_id, s) is None for s in SPLITS)]
        if todo and self.load is None:
            raise ReportError(f"model {todo[0].model_id}: no logits in the cache and no way to pull its weights")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for record in tqdm(todo, desc="report predictions", unit="model", file=sys.stderr, disable=not todo or None):
            state_dict, meta = self.load(record, self.tmp)  # sha256 verified
            if list(meta.class_names) != self.dataset.classes:
                raise ReportError(f"model {record.model_id}: its class map differs from the dataset's")
            ev = self._evaluator(meta)
            ev.load(state_dict)
            for split in SPLITS:
                logits = ev.logits(None, split)
                self.mem[(record.model_id, split)] = logits
                save_cached_logits(self.cache_dir, record.model_id, split, logits)
            shutil.rmtree(self.tmp / record.model_id, ignore_errors=True)
            self.computed += 1

    def logits(self, model_id: str, split: str) -> np.ndarray:
        return self.mem[(model_id, split)]
