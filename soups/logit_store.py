"""The prediction store: every model's val/test logits on one dataset build, keyed by (model id, split, dataset
fingerprint). `ich soup` writes it (each ingredient it evaluates, each soup it builds), the champion decision and
soft voting read it, and `ich report` reads it before running any model (soups/report/predictions.py).

One .npy per (model id, split) under $ICH_HOME/cache/predictions/<dataset fingerprint> (prediction_cache), written
through at once (atomic): a model id names immutable weights (verified by sha256 when pulled), so its logits on one
dataset build never change, and a later `ich soup` or `ich report` finds them there. A file of another shape or
with a non-finite value is not used. In memory up to `max_bytes` (oldest dropped first; the file stays): at ICH-17
size a checkpoint's logits are ~96 kB (667 val + 741 test images x 17 classes x 4 bytes), ~200 MB for a
paper-scale sweep of ~2,000 checkpoints. Without a folder (tests, a Ray task) or when the cache cannot be written,
a temp folder of its own holds the files, removed by close() or at exit. Pure numpy: no MLflow, no torch.
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
SPLITS = ("val", "test")

Splits = dict[str, np.ndarray]


def prediction_cache(home: Path, dataset_fingerprint: str) -> Path:
    """The store's folder for one dataset build."""
    return Path(home) / "cache" / "predictions" / dataset_fingerprint[:16]


def cached_logits_path(folder: Path, model_id: str, split: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_id)
    return Path(folder) / f"{safe}-{split}.npy"


def save_cached_logits(folder: Path, model_id: str, split: str, logits: np.ndarray) -> None:
    """Atomic: a concurrent reader sees the whole file or none."""
    path = cached_logits_path(folder, model_id, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(f".{os.getpid()}.part.npy")
    np.save(part, np.asarray(logits, dtype=np.float32), allow_pickle=False)
    part.replace(path)


class PredictionStore(MutableMapping):
    """model id -> {split: (N, C) float32 logits}: written through to `folder`, in memory up to max_bytes.

    `shapes` ({split: (N, C)}), when given, is what a file must hold to be used (another dataset build's or a torn
    file is not); `splits` are the splits a model must have in the folder to be found there."""

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 shapes: dict[str, tuple[int, int]] | None = None, splits: tuple[str, ...] = SPLITS) -> None:
        self.max_bytes = int(max_bytes)
        self.shapes, self.splits = shapes, tuple(splits)
        self._folder = Path(folder) if folder is not None else None
        self._owned: str | None = None  # a temp folder we made, removed by close() or at exit
        self._mem: OrderedDict[str, Splits] = OrderedDict()
        self._files: dict[str, tuple[list[str], int]] = {}  # model id -> (its splits written here, their bytes)
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0  # written by this store
        self.peak_bytes_in_memory = 0

    @staticmethod
    def nbytes(splits: Splits) -> int:
        return sum(int(a.nbytes) for a in splits.values())

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._use_temp_folder()
        return self._folder

    def _use_temp_folder(self) -> None:
        self._owned = tempfile.mkdtemp(prefix="ich-logits-")
        self._folder = Path(self._owned)
        weakref.finalize(self, shutil.rmtree, self._owned, True)

    def _write(self, key: str, splits: Splits) -> None:
        while True:
            try:
                for split, a in splits.items():
                    save_cached_logits(self.folder, key, split, a)
                return
            except OSError as e:  # an unwritable cache: said once, then a temp folder of our own
                if self._owned:
                    raise
                print(f"prediction cache {self._folder} not written ({e}); logits kept in a temp folder for this "
                      "call", flush=True)
                self._use_temp_folder()

    def __setitem__(self, key: str, splits: Splits) -> None:
        if key in self._mem:
            self.bytes_in_memory -= self.nbytes(self._mem.pop(key))
        splits = {s: np.ascontiguousarray(a) for s, a in splits.items()}
        self._write(key, splits)
        n = self.nbytes(splits)
        self.bytes_on_disk += n - (self._files[key][1] if key in self._files else 0)  # a model put again: replaced
        self._files[key] = (list(splits), n)
        while self._mem and self.bytes_in_memory + n > self.max_bytes:  # make room first: never above the limit
            self._drop(next(iter(self._mem)))
        if n <= self.max_bytes:  # larger than the limit alone: on disk only
            self._mem[key] = splits
            self.bytes_in_memory += n
        self.peak_bytes_in_memory = max(self.peak_bytes_in_memory, self.bytes_in_memory)

    def _drop(self, key: str) -> None:
        self.bytes_in_memory -= self.nbytes(self._mem.pop(key))  # its file stays

    def _read(self, key: str) -> Splits | None:
        """The model's splits from the folder (this store's files, or an earlier call's), or None if any is missing
        or unusable. Read back, not kept: memory stays within max_bytes."""
        if self._folder is None:
            return None
        names = self._files[key][0] if key in self._files else self.splits
        out = {}
        for split in names:
            try:
                a = np.load(cached_logits_path(self._folder, key, split), allow_pickle=False)
            except (OSError, ValueError):
                return None
            expected = (self.shapes or {}).get(split)
            if a.ndim != 2 or (expected is not None and a.shape != tuple(expected)) or not np.isfinite(a).all():
                return None  # another dataset build's file, or a torn one: the model is run again
            out[split] = a
        return out

    def get(self, key: str, default=None):
        if key in self._mem:
            return self._mem[key]
        found = self._read(key)
        return default if found is None else found

    def __getitem__(self, key: str) -> Splits:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found

    def __delitem__(self, key: str) -> None:
        known = key in self._mem or key in self._files
        if key in self._mem:
            self._drop(key)
        if key in self._files:
            splits, n = self._files.pop(key)
            self.bytes_on_disk -= n
            for s in splits:
                cached_logits_path(self.folder, key, s).unlink(missing_ok=True)
        if not known:
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def __iter__(self) -> Iterator[str]:  # the models this store was given (not an earlier call's files)
        yield from list(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        self._mem.clear()
        self._files.clear()
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
