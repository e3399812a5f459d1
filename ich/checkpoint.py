"""Checkpoint format: weights as safetensors plus a small JSON of metadata. Data, never code.

A checkpoint is a folder:
    model.safetensors   the state dict (tensors only; nothing is ever unpickled)
    checkpoint.json     CheckpointMeta (architecture, img size, class map, fingerprints, epoch, metrics,
                        preprocessing: mean, std, crop_pct, interpolation, stored size)

Format 2 added `preprocess` (ich/preprocess.py). Format-1 checkpoints still load: their preprocessing is
what they were evaluated with (ImageNet mean/std, bilinear, their eval crop).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from ich.errors import IchError
from ich.preprocess import Preprocess, PreprocessError, legacy_dict

WEIGHTS = "model.safetensors"
META = "checkpoint.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Fields that must agree for two checkpoints to be averaged (docs/design.md#7).
COMPAT_FIELDS = ("architecture", "img_size", "num_classes", "class_names", "dataset_fingerprint", "init_fingerprint")


class CheckpointError(IchError):
    """A checkpoint that cannot be used; the message names the checkpoint and the problem in one line."""


@dataclass
class CheckpointMeta:
    architecture: str
    img_size: int
    num_classes: int
    class_names: list[str]
    dataset_fingerprint: str
    init_fingerprint: str
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # free-form: sweep, trial, config...
    # mean, std, crop_pct, interpolation, stored_size, source (ich.preprocess.Preprocess.to_dict()); None when
    # built in memory without one: the dataset's defaults (what format 1 used), filled in below.
    preprocess: dict | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.preprocess is None:
            self.preprocess = legacy_dict(self.img_size, self.extra)
        elif isinstance(self.preprocess, Preprocess):
            self.preprocess = self.preprocess.to_dict()
        Preprocess.from_dict(self.preprocess, self.img_size, "preprocess")  # refuses unusable values

    @classmethod
    def for_training(cls, cfg, dataset, *, init_fingerprint: str, epoch: int, metrics: dict[str, float],
                     preprocess=None, extra: dict | None = None) -> "CheckpointMeta":
        """The one factory of a trained model's metadata (a trial's epoch, `ich train`, a warm start): the identity
        comes from the TrainConfig (model, img_size) and the dataset (classes, fingerprint); preprocess is the
        trainer's (None: the dataset's defaults)."""
        return cls(architecture=cfg.model, img_size=cfg.img_size, num_classes=dataset.num_classes,
                   class_names=list(dataset.classes), dataset_fingerprint=dataset.fingerprint,
                   init_fingerprint=init_fingerprint, epoch=int(epoch), metrics=dict(metrics), extra=dict(extra or {}),
                   preprocess=preprocess)

    def derived(self, *, epoch: int, metrics: dict[str, float], extra: dict, preprocess=None) -> "CheckpointMeta":
        """The metadata of a model made from checkpoints of this identity (a soup of its ingredients): the same
        architecture, img size, classes, dataset and init; its own epoch, metrics and extra; the ingredients'
        preprocessing unless given."""
        return dataclasses.replace(self, class_names=list(self.class_names), epoch=int(epoch), metrics=dict(metrics),
                                   extra=dict(extra), preprocess=self.preprocess if preprocess is None else preprocess,
                                   format_version=FORMAT_VERSION)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, where: str = "checkpoint") -> "CheckpointMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        version = d.get("format_version", FORMAT_VERSION)
        if version not in READABLE_VERSIONS:
            raise CheckpointError(f"{where}: format_version {version}, expected one of "
                                  f"{', '.join(map(str, READABLE_VERSIONS))}")
        if version == FORMAT_VERSION:
            required.add("preprocess")  # first-class since format 2; format 1 gets the defaults it was used with
        elif "preprocess" in d:
            raise CheckpointError(f"{where}: format_version {version} has no preprocess field")
        missing = sorted(required - d.keys())
        if missing:
            raise CheckpointError(f"{where}: metadata lacks {', '.join(missing)}")
        unknown = sorted(d.keys() - names)
        if unknown:
            raise CheckpointError(f"{where}: metadata has unknown fields {', '.join(unknown)}")
        try:
            meta = cls(**d)
        except PreprocessError as e:
            raise CheckpointError(f"{where}: {e}") from None
        meta.format_version = FORMAT_VERSION  # read as the current format (format 1 got its preprocess above)
        if len(meta.class_names) != meta.num_classes:
            raise CheckpointError(
                f"{where}: num_classes={meta.num_classes} but class_names has {len(meta.class_names)} entries")
        return meta


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_to_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (what safetensors needs); shared storage is split."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def save_checkpoint(directory: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta) -> str:
    """Write a checkpoint folder atomically; returns the sha256 of its weights file."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(state_dict_to_cpu(state_dict), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / META).write_text(meta.to_json(), encoding="utf-8")
        digest = sha256_file(tmp / WEIGHTS)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest


def read_meta(directory: str | os.PathLike) -> CheckpointMeta:
    path = Path(directory) / META
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {META}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: metadata is not a JSON object")
    return CheckpointMeta.from_dict(d, where=str(directory))


def _refuse_non_safetensors(head: bytes, size: int, where) -> None:
    # safetensors = 8-byte little-endian header length + a JSON header starting with "{". Anything else
    # (a torch.save zip, a raw pickle renamed .safetensors) is refused before any parser sees it.
    n = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if not (2 <= n <= size - 8) or head[8:9] != b"{":
        kind = "a zip/pickle archive" if head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") \
            else "truncated or not safetensors"
        raise CheckpointError(f"{where}: not a safetensors file ({kind}); refusing to load")


def load_weights(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Strict safetensors read: anything else (a pickle renamed .safetensors, a truncated file) is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    with open(path, "rb") as f:
        head = f.read(9)
    _refuse_non_safetensors(head, path.stat().st_size, path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def read_hashed(path: str | os.PathLike) -> tuple[bytes, str]:
    """A weights file's bytes and their sha256, from one read (weights_from_bytes then parses the same bytes)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file") from None
    return data, hashlib.sha256(data).hexdigest()


def weights_from_bytes(data: bytes, where: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Strict safetensors parse of a weights file's bytes (as load_weights); the tensors own their memory."""
    _refuse_non_safetensors(data[:9], len(data), where)
    try:
        return load_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def first_nonfinite(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor holding NaN or Inf, else None."""
    for k, v in state_dict.items():
        # A sum is finite iff no element is NaN/Inf, barring overflow: ~20x cheaper than isfinite().all(),
        # and the exact test still decides whenever the sum is not finite.
        if v.is_floating_point() and v.numel() and not math.isfinite(float(v.detach().sum())) \
                and not torch.isfinite(v).all():
            return k
    return None


def load_checkpoint(directory: str | os.PathLike, device: str = "cpu", expected_sha256: str | None = None,
                    check_finite: bool = True) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Read and verify a checkpoint folder: metadata, sha256 (when given), safetensors, finite weights."""
    directory = Path(directory)
    meta = read_meta(directory)
    weights = directory / WEIGHTS
    if expected_sha256 is not None:
        if not weights.is_file():
            raise CheckpointError(f"{weights}: no such weights file")
        actual = sha256_file(weights)
        if actual != expected_sha256:
            raise CheckpointError(
                f"{directory}: sha256 mismatch (recorded {expected_sha256[:12]}…, file {actual[:12]}…); altered or corrupt")
    state = load_weights(weights, device=device)
    if check_finite and (bad := first_nonfinite(state)) is not None:
        raise CheckpointError(f"{directory}: tensor {bad} holds NaN/Inf")
    return state, meta

