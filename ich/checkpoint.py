"""Checkpoint format: weights as safetensors plus a small JSON of metadata. Data, never code.

A checkpoint is a folder:
    model.safetensors   the state dict (tensors only; nothing is ever unpickled)
    checkpoint.json     CheckpointMeta (architecture, img size, class map, fingerprints, epoch, metrics,
                        preprocessing: mean, std, crop_pct, interpolation, stored size)

Format 2 added `preprocess` (ich/preprocess.py). Format-1 checkpoints still load: their preprocessing is
what they were evaluated with (ImageNet mean/std, bilinear, their eval crop).

checkpoint.json comes from the registry or a user's folder, so `read_meta` (every reader: pull, predict, serve,
the report) bounds it before anything is built from it: the file's length and JSON nesting depth before parsing,
then every field's type and range (`CheckpointMeta.from_dict`): the architecture from an allowlist
(`allowed_architectures`: the project's own models, extended by $ICH_ALLOWED_ARCHITECTURES), image sizes and the
class count bounded whole numbers, class names short printable strings, one per class. Each violation is one
line naming the file and the field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from ich.errors import CONTROL_CHARS, IchError
from ich.preprocess import Preprocess, PreprocessError, legacy_dict

WEIGHTS = "model.safetensors"
META = "checkpoint.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Fields that must agree for two checkpoints to be averaged (docs/design.md#7).
COMPAT_FIELDS = ("architecture", "img_size", "num_classes", "class_names", "dataset_fingerprint", "init_fingerprint")

# The architectures the product trains (ich/models.py builds them; the tiny ones it registers with timm): every
# timm name of sweeps/configs/*.yaml is here (tests/test_checkpoint_bounds.py). A checkpoint naming another one is
# refused: its name alone would make the reader build any of timm's ~1,000 models (a vit_giant is gigabytes).
COATNETS = ("coatnet_tiny_ich", "coatnet_pico_rw_224", "coatnet_nano_rw_224", "coatnet_0_rw_224",
            "coatnet_1_rw_224", "coatnet_2_rw_224", "coatnet_rmlp_nano_rw_224", "coatnet_rmlp_1_rw_224",
            "coatnet_rmlp_2_rw_224")
BASELINES = ("resnet50", "densenet121", "vit_base_patch16_224", "vit_small_patch16_224",
             "resnet_tiny_ich", "densenet_tiny_ich", "vit_tiny_ich")
ARCHITECTURES_ENV = "ICH_ALLOWED_ARCHITECTURES"  # comma-separated timm names added to the allowlist
# Bounds on checkpoint.json: what its values may ask a reader to allocate (an img_size of 20000 asked torch for
# 19.5 TB, a stored_size of 60000 for an 11 GB decode, 10**6 classes for +0.6 GB of head).
MAX_META_BYTES = 1 << 20
MAX_META_DEPTH = 32  # JSON nesting: a soup's metadata is 4 levels deep; 200,000 made json.loads recurse out
MIN_IMG_SIZE, MAX_IMG_SIZE = 32, 1024  # network input side: the tiny models run at 32, the paper's at 224
MAX_STORED_SIZE = 2048  # side of the stored image serving decodes to (0: img_size)
MAX_CLASSES = 10_000
MAX_NAME_CHARS = 256  # a class name, a fingerprint, a metric name
MAX_EPOCH = 1_000_000


def allowed_architectures(environ=None) -> tuple[str, ...]:
    """The project's architectures plus those named in $ICH_ALLOWED_ARCHITECTURES (comma-separated)."""
    extra = (os.environ if environ is None else environ).get(ARCHITECTURES_ENV, "")
    return COATNETS + BASELINES + tuple(n.strip() for n in extra.split(",") if n.strip())


def has_control_chars(text: str) -> bool:
    return bool(CONTROL_CHARS.search(text))


def json_depth(text: str, limit: int) -> int:
    """How deep the JSON text nests arrays and objects (strings skipped), counted without recursion; stops
    counting once past `limit`."""
    brackets = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
    depth = deepest = 0
    for c in brackets:
        if c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif c in "]}":
            depth -= 1
    return deepest


def bounded_json(data: bytes, where, *, max_bytes: int = MAX_META_BYTES, max_depth: int = MAX_META_DEPTH):
    """Parse checkpoint.json's bytes: at most max_bytes, nested at most max_depth (checked before parsing: json.loads
    recursed out at ~1,000), else a CheckpointError naming `where`."""
    if len(data) > max_bytes:
        raise CheckpointError(f"{where}: {len(data)} bytes, over the {max_bytes}-byte limit for metadata")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if json_depth(text, max_depth) > max_depth:
        raise CheckpointError(f"{where}: JSON nested over {max_depth} levels deep; refusing to parse it")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer of over 4,300 digits
        raise CheckpointError(f"{where}: not valid JSON ({str(e).splitlines()[0][:200]})") from None


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
        """Metadata read from a file: every field typed and bounded (check_fields), else one line naming `where`."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: metadata is not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        version = d.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise CheckpointError(f"{where}: format_version {_shown(version)}, expected one of "
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
            raise CheckpointError(f"{where}: metadata has unknown fields {', '.join(unknown)[:200]}")
        if version == FORMAT_VERSION and not isinstance(d["preprocess"], dict):  # None would mean "the defaults"
            raise CheckpointError(f"{where}: preprocess must be a JSON object, not {_shown(d['preprocess'])}")
        check_fields(d, where)
        try:
            meta = cls(**d)
        except PreprocessError as e:
            raise CheckpointError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:  # format 1: extra's eval crop or image size is not a number
            raise CheckpointError(f"{where}: unusable format-1 preprocessing in extra ({e})") from None
        meta.format_version = FORMAT_VERSION  # read as the current format (format 1 got its preprocess above)
        return meta


def _shown(value, limit: int = 80) -> str:
    """A value as it may appear in a one-line error: repr (control characters escaped), cut to `limit`."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _whole(d: dict, name: str, lo: int, hi: int, where) -> None:
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointError(f"{where}: {name} must be a whole number from {lo} to {hi}, got {_shown(v)}")


def _name(v, what: str, where) -> None:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME_CHARS or has_control_chars(v):
        raise CheckpointError(f"{where}: {what} must be a string of 1 to {MAX_NAME_CHARS} printable characters, "
                              f"got {_shown(v)}")


def check_fields(d: dict, where) -> None:
    """The types and bounds of checkpoint.json's fields (the keys are known to be there)."""
    allowed = allowed_architectures()
    if d["architecture"] not in allowed:
        raise CheckpointError(f"{where}: architecture {_shown(d['architecture'])} is not one of the project's "
                              f"({', '.join(allowed)}); add it to ${ARCHITECTURES_ENV} to allow it")
    _whole(d, "img_size", MIN_IMG_SIZE, MAX_IMG_SIZE, where)
    _whole(d, "num_classes", 1, MAX_CLASSES, where)
    _whole(d, "epoch", 0, MAX_EPOCH, where)
    names = d["class_names"]
    if not isinstance(names, list) or len(names) != d["num_classes"]:
        raise CheckpointError(f"{where}: num_classes={d['num_classes']} but class_names "
                              f"{'has ' + str(len(names)) + ' entries' if isinstance(names, list) else 'is not a list'}")
    for n in names:
        _name(n, "a class name", where)
    if len(set(names)) != len(names):
        raise CheckpointError(f"{where}: class_names repeat a name")
    for key in ("dataset_fingerprint", "init_fingerprint"):
        _name(d[key], key, where)
    metrics = d.get("metrics", {})
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{where}: metrics must be a JSON object, not {type(metrics).__name__}")
    for k, v in metrics.items():
        _name(k, "a metric name", where)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise CheckpointError(f"{where}: metric {k} must be a number, got {_shown(v)}")
    if not isinstance(d.get("extra", {}), dict):
        raise CheckpointError(f"{where}: extra must be a JSON object, not {type(d['extra']).__name__}")
    pre = d.get("preprocess")
    if isinstance(pre, dict) and "stored_size" in pre:
        stored = pre["stored_size"]
        if isinstance(stored, bool) or not isinstance(stored, int) or not 0 <= stored <= MAX_STORED_SIZE:
            raise CheckpointError(f"{where}: preprocess.stored_size must be 0 or a whole number up to "
                                  f"{MAX_STORED_SIZE}, got {_shown(stored)}")
    if isinstance(pre, dict) and "source" in pre and (not isinstance(pre["source"], str)
                                                      or len(pre["source"]) > MAX_NAME_CHARS):
        raise CheckpointError(f"{where}: preprocess.source must be a string of at most {MAX_NAME_CHARS} characters")
    extra = d.get("extra", {})
    if pre is None and "image_size" in extra:  # format 1: the stored size comes from extra
        stored = extra["image_size"]
        if stored is not None and (isinstance(stored, bool) or not isinstance(stored, int)
                                   or not 0 <= stored <= MAX_STORED_SIZE):
            raise CheckpointError(f"{where}: extra.image_size must be a whole number up to {MAX_STORED_SIZE}, "
                                  f"got {_shown(stored)}")


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
    """A checkpoint folder's checkpoint.json, bounded (length, nesting), typed and checked (from_dict)."""
    path = Path(directory) / META
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_META_BYTES + 1)  # never more than the bound, whatever the file's size
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {META}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    d = bounded_json(data, path)
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

