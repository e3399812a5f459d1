"""Soft voting's logits without unbounded memory: the orchestrator keeps every checkpoint's val/test logits
(N x C float32 per split) so that any family can be soft-voted. At ICH-17 size that is ~96 kB per checkpoint
(667 val + 741 test images x 17 classes x 4 bytes), ~200 MB for a paper-scale sweep of ~2,000 checkpoints.

LogitStore holds up to `max_bytes` in memory and spills the oldest entries to .npy files past it (read back
with allow_pickle=False); soft_vote_stream averages them one model at a time. Pure numpy: no MLflow, no torch.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, MutableMapping
from pathlib import Path

import numpy as np

from soups.analysis import softmax

DEFAULT_MAX_BYTES = int(float(os.environ.get("ICH_SOUP_LOGITS_MB", "64")) * 1e6)

Splits = dict[str, np.ndarray]


class LogitStore(MutableMapping):
    """model id -> {split: (N, C) logits}. In memory up to max_bytes (insertion order), the rest on disk."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, folder: str | os.PathLike | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self._folder = Path(folder) if folder is not None else None
        self._owned: str | None = None  # a temp folder we made, removed by close() or at exit
        self._mem: OrderedDict[str, Splits] = OrderedDict()
        self._disk: dict[str, tuple[list[str], int]] = {}  # model id -> (its splits on disk, their bytes)
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0
        self.peak_bytes_in_memory = 0

    @staticmethod
    def nbytes(splits: Splits) -> int:
        return sum(int(a.nbytes) for a in splits.values())

    def _dir(self) -> Path:
        if self._folder is None:
            self._owned = tempfile.mkdtemp(prefix="ich-logits-")
            self._folder = Path(self._owned)
            weakref.finalize(self, shutil.rmtree, self._owned, True)
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    def _path(self, key: str, split: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in key)
        return self._dir() / f"{safe}.{split}.npy"

    def __setitem__(self, key: str, splits: Splits) -> None:
        if key in self:
            del self[key]
        splits = {s: np.ascontiguousarray(a) for s, a in splits.items()}
        n = self.nbytes(splits)
        while self._mem and self.bytes_in_memory + n > self.max_bytes:  # make room first: never above the limit
            self._spill(next(iter(self._mem)))
        self._mem[key] = splits
        self.bytes_in_memory += n
        if self.bytes_in_memory > self.max_bytes:  # larger than the limit alone: straight to disk
            self._spill(key)
        self.peak_bytes_in_memory = max(self.peak_bytes_in_memory, self.bytes_in_memory)

    def _spill(self, key: str) -> None:
        splits = self._mem.pop(key)
        for split, a in splits.items():
            np.save(self._path(key, split), a, allow_pickle=False)
        n = self.nbytes(splits)
        self._disk[key] = (list(splits), n)
        self.bytes_in_memory -= n
        self.bytes_on_disk += n

    def __getitem__(self, key: str) -> Splits:
        if key in self._mem:
            return self._mem[key]
        if key in self._disk:  # read back, not cached: memory stays within max_bytes
            return {s: np.load(self._path(key, s), allow_pickle=False) for s in self._disk[key][0]}
        raise KeyError(key)

    def __delitem__(self, key: str) -> None:
        if key in self._mem:
            self.bytes_in_memory -= self.nbytes(self._mem.pop(key))
        elif key in self._disk:
            splits, n = self._disk.pop(key)
            self.bytes_on_disk -= n
            for s in splits:
                self._path(key, s).unlink(missing_ok=True)
        else:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._mem or key in self._disk

    def __iter__(self) -> Iterator[str]:
        yield from list(self._mem)
        yield from list(self._disk)

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def close(self) -> None:
        self._mem.clear()
        self._disk.clear()
        self.bytes_in_memory = self.bytes_on_disk = 0
        if self._owned:
            shutil.rmtree(self._owned, ignore_errors=True)
            self._owned, self._folder = None, None


def soft_vote_stream(logit_sets: Iterable[np.ndarray]) -> np.ndarray:
    """soups.analysis.soft_vote one model at a time: the same float64 sum in the same order, then the same
    division and softmax, so the same bits, holding one model's logits instead of all of them."""
    total, n = None, 0
    for x in logit_sets:
        x = np.asarray(x, dtype=np.float64)
        if total is None:
            total = x.copy()
        else:
            total += x
        n += 1
    if total is None:
        raise ValueError("soft voting of no models")
    return softmax(total / n)


def soft_vote_logits(logit_sets: Iterable[np.ndarray]) -> np.ndarray:
    """Log of soft voting's probabilities (the evaluator's metrics take logits), one model's logits at a time."""
    return np.log(np.clip(soft_vote_stream(logit_sets), 1e-300, None))


# ------------------------------------------------------------------ the prediction cache the report reads
# One .npy per (model id, split) under $ICH_HOME/cache/predictions/<dataset fingerprint>: `ich soup` writes the
# logits it computed (every soup's, every ingredient's it evaluated) and `ich report` reads them instead of pulling
# and running those models again. A model id names immutable weights (verified by sha256 when pulled), so its
# logits on one dataset build never change; a file of another shape or with a non-finite value is not used.

def prediction_cache(home: Path, dataset_fingerprint: str) -> Path:
    return Path(home) / "cache" / "predictions" / dataset_fingerprint[:16]


def cached_logits_path(folder: Path, model_id: str, split: str) -> Path:
    return Path(folder) / f"{model_id}-{split}.npy"


def save_cached_logits(folder: Path, model_id: str, split: str, logits: np.ndarray) -> None:
    """Atomic: a concurrent reader sees the whole file or none."""
    path = cached_logits_path(folder, model_id, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(f".{os.getpid()}.part.npy")
    np.save(part, np.asarray(logits, dtype=np.float32))
    part.replace(path)
