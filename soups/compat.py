"""Compatibility checks: soups refuse to mix checkpoints that cannot be averaged (docs/design.md#7).

Two checkpoints average only when they share architecture, image size, class map, dataset and
initialization (COMPAT_FIELDS), their preprocessing (ich/preprocess.py; where it came from may differ),
and their state dicts have the same keys and shapes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ich.checkpoint import COMPAT_FIELDS, CheckpointError, CheckpointMeta
from ich.preprocess import Preprocess


class IncompatibleCheckpoint(CheckpointError):
    """Two checkpoints that cannot go in the same soup; the message names both and what differs."""


def _describe_class_names(ref: Sequence[str], other: Sequence[str]) -> str:
    """A short account of how two class maps differ (they can be long: 17 Vietnamese names)."""
    if len(ref) != len(other):
        only_other = [n for n in other if n not in set(ref)][:3]
        only_ref = [n for n in ref if n not in set(other)][:3]
        parts = [f"{len(other)} != {len(ref)} names"]
        if only_other:
            parts.append(f"only here: {only_other}")
        if only_ref:
            parts.append(f"missing: {only_ref}")
        return "; ".join(parts)
    if sorted(ref) == sorted(other):
        first = next(i for i, (a, b) in enumerate(zip(other, ref)) if a != b)
        return f"same names in another order (index {first}: {other[first]!r} != {ref[first]!r})"
    diffs = [i for i, (a, b) in enumerate(zip(other, ref)) if a != b]
    i = diffs[0]
    return f"{len(diffs)} name(s) differ, first at index {i}: {other[i]!r} != {ref[i]!r}"


def check_compatible(metas: Sequence[tuple[str, CheckpointMeta]]) -> None:
    """Raise IncompatibleCheckpoint at the first checkpoint whose COMPAT_FIELDS differ from the first one's."""
    if not metas:
        return
    ref_name, ref = metas[0]
    for name, meta in metas[1:]:
        for f in COMPAT_FIELDS:
            a, b = getattr(meta, f), getattr(ref, f)
            if f == "class_names":
                a, b = list(a), list(b)
            if a == b:
                continue
            what = _describe_class_names(b, a) if f == "class_names" else f"{a} != {b}"
            raise IncompatibleCheckpoint(f"checkpoint {name} differs from {ref_name} in {f}: {what}")
        a, b = Preprocess.from_meta(meta).key(), Preprocess.from_meta(ref).key()  # a soup has one preprocessing
        for f, x, y in zip(("img_size", "mean", "std", "crop_pct", "interpolation", "stored_size"), a, b):
            if x != y:
                raise IncompatibleCheckpoint(f"checkpoint {name} differs from {ref_name} in preprocess.{f}: "
                                             f"{x} != {y}")


def group_key(meta: CheckpointMeta) -> tuple:
    """What checkpoints averaged together share: architecture, init, dataset, img size, class map and the
    evaluation spec (architecture + preprocessing, soups/evaluate.EvalSpec.key). The orchestrator groups across-run
    soups by it (a sweep that mixes model variants yields one group per variant) and names groups by its hash."""
    from soups.evaluate import EvalSpec  # builds networks: only needed here
    return (meta.architecture, meta.init_fingerprint, meta.dataset_fingerprint, meta.img_size,
            tuple(meta.class_names), EvalSpec.of(meta).key())


def check_state_dicts_match(ref: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], name: str,
                            ref_name: str = "the first ingredient") -> None:
    """Raise IncompatibleCheckpoint when sd's keys, shapes or kind of dtype (floating vs integer) differ from ref's."""
    if ref.keys() != sd.keys():
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise IncompatibleCheckpoint(f"checkpoint {name} lacks key {missing[0]!r}{more} present in {ref_name}")
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise IncompatibleCheckpoint(f"checkpoint {name} has key {extra[0]!r}{more} absent from {ref_name}")
    for k, r in ref.items():
        t = sd[k]
        if tuple(t.shape) != tuple(r.shape):
            raise IncompatibleCheckpoint(
                f"checkpoint {name}: key {k!r} has shape {tuple(t.shape)}, {ref_name} has {tuple(r.shape)}")
        if t.is_floating_point() != r.is_floating_point():
            raise IncompatibleCheckpoint(f"checkpoint {name}: key {k!r} has dtype {t.dtype}, {ref_name} has {r.dtype}")
