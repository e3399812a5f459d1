"""The report's logits: `Predictions`, per (model id, split), from the prediction store `ich soup` writes
(soups/logit_store.PredictionStore over $ICH_HOME/cache/predictions/<dataset fingerprint>), then one forward pass
per model it lacks (weights pulled and sha256-verified through `load`), put in the same store."""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ich.data import ICHDataset
from soups.store import registry
from soups.evaluate import EvalSpec, Evaluator
from soups.logit_store import PredictionStore
from soups.options import SPLITS
from soups.report.snapshot import ReportError


@dataclass
class Predictions:
    """Logits per (model id, split): the prediction store, then one forward pass per model (all splits).
    `load(record, folder) -> (state_dict, meta)` pulls weights (sha256 verified); None when every model is cached."""
    dataset: ICHDataset
    cache_dir: Path
    tmp: Path
    load: Callable | None = None
    device: str = "auto"
    computed: int = 0  # models run by this report (the rest came from the store)
    evaluators: dict = field(default_factory=dict)
    store: PredictionStore = field(init=False)

    def __post_init__(self) -> None:
        shapes = {s: (len(self.dataset.splits[s].labels), self.dataset.num_classes) for s in SPLITS}
        self.store = PredictionStore(self.cache_dir, shapes=shapes)

    def _evaluator(self, meta) -> Evaluator:
        spec = EvalSpec.of(meta)  # the preprocessing the checkpoint (or soup) records
        if spec.key() not in self.evaluators:
            self.evaluators[spec.key()] = Evaluator(self.dataset, spec, device=self.device)
        return self.evaluators[spec.key()]

    def ensure(self, records: list[registry.CheckpointRecord]) -> None:
        """Run every model the store lacks, with a progress bar; each model once, on every split."""
        unique = {r.model_id: r for r in records}
        todo = [r for r in unique.values() if r.model_id not in self.store]
        if todo and self.load is None:
            raise ReportError(f"model {todo[0].model_id}: no logits in the cache and no way to pull its weights")
        for record in tqdm(todo, desc="report predictions", unit="model", file=sys.stderr, disable=not todo or None):
            state_dict, meta = self.load(record, self.tmp)  # sha256 verified
            if list(meta.class_names) != self.dataset.classes:
                raise ReportError(f"model {record.model_id}: its class map differs from the dataset's")
            ev = self._evaluator(meta)
            ev.load(state_dict)
            self.store[record.model_id] = {split: ev.logits(None, split) for split in SPLITS}
            shutil.rmtree(self.tmp / record.model_id, ignore_errors=True)
            self.computed += 1

    def logits(self, model_id: str, split: str) -> np.ndarray:
        return self.store[model_id][split]

    def put(self, model_id: str, split: str, logits: np.ndarray) -> None:
        """One split of a model's logits, into the store beside its others (tests plant predictions with it)."""
        self.store[model_id] = {**(self.store.get(model_id) or {}), split: logits}
