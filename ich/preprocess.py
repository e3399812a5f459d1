"""One preprocessing contract (docs/design.md#9): how a stored image becomes a network input.

The values travel with the weights: they come from the init weights' timm pretrained config when there is
one (`coatnet_0_rw_224.sw_in1k`: mean = std = 0.5, crop 0.95, bicubic), else the dataset's defaults
(ImageNet mean/std, the training config's eval crop, bilinear). Every checkpoint records them
(CheckpointMeta.preprocess) and one function, `transform`, applies them wherever a model is evaluated:
training eval, soups, the report, the pyfunc model and `ich predict`.

    pre = Preprocess.from_meta(meta)                 # a checkpoint's (or soup's) preprocessing
    x = transform(images_u8, pre)                    # (B, S, S, 3) uint8 stored images -> (B, 3, N, N) float
    x = transform(decode_images([(bytes, name), ...], pre), pre)   # image files, decoded as `ich ingest` does
    logits = image_logits(model, pre, [(bytes, name), ...])           # the same, through the model

Where an init's values come from is ich/init_source.py (`init_preprocess(source)`: a hub tag's timm config,
a checkpoint's metadata, a JSON sidecar, else None); `resolve` below combines them with the defaults.
A sweep's `init.preprocess: {mean, std, crop_pct, interpolation}` overrides any of them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ich.decode import decode_image  # image bytes -> stored pixels, exactly as `ich ingest` decodes them
from ich.errors import IchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")
DEFAULT_CROP_PCT = 0.875  # TrainConfig.eval_crop_pct's default: what v1 checkpoints were evaluated with
DATASET_DEFAULT = "dataset default"
OVERRIDABLE = ("mean", "std", "crop_pct", "interpolation")


class PreprocessError(IchError):
    """Preprocessing values that cannot be used; one line naming where they came from and what is wrong."""


@dataclass(frozen=True)
class Preprocess:
    """Everything besides the weights that fixes a model's predictions on an image."""
    img_size: int  # network input side (the checkpoint's img_size)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = DEFAULT_CROP_PCT  # center crop this fraction of the stored image, then resize to img_size
    interpolation: str = "bilinear"  # bilinear | bicubic (antialiased)
    stored_size: int = 0  # side of the stored (ingested) image the crop starts from; serving decodes to it. 0: img_size
    source: str = DATASET_DEFAULT  # where the values came from (information; not compared)

    def __post_init__(self):
        check_fields(self.to_dict(), "preprocessing")

    @property
    def decode_size(self) -> int:
        return self.stored_size or self.img_size

    def key(self) -> tuple:
        """What must agree for two models to be evaluated (or averaged) alike."""
        return (self.img_size, self.mean, self.std, self.crop_pct, self.interpolation, self.decode_size)

    def to_dict(self) -> dict:
        """The checkpoint.json form (img_size lives in the checkpoint's own img_size field)."""
        d = dataclasses.asdict(self)
        d.pop("img_size")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict, img_size: int, where: str = "checkpoint") -> "Preprocess":
        if not isinstance(d, dict):
            raise PreprocessError(f"{where}: preprocess must be a JSON object, not {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)} - {"img_size"})
        if unknown:
            raise PreprocessError(f"{where}: preprocess has unknown fields {', '.join(unknown)}")
        missing = sorted(set(OVERRIDABLE) - set(d))
        if missing:
            raise PreprocessError(f"{where}: preprocess lacks {', '.join(missing)}")
        check_fields(d, where)
        return cls(img_size=int(img_size), mean=_triple(d["mean"]), std=_triple(d["std"]),
                   crop_pct=float(d["crop_pct"]), interpolation=d["interpolation"],
                   stored_size=int(d.get("stored_size") or 0), source=str(d.get("source", DATASET_DEFAULT)))

    @classmethod
    def from_meta(cls, meta) -> "Preprocess":
        """A CheckpointMeta's preprocessing (old-format checkpoints get the values they were evaluated with)."""
        return cls.from_dict(meta.preprocess, meta.img_size, where=f"checkpoint {meta.architecture}")


def _triple(v) -> tuple[float, float, float]:
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def check_fields(d: dict, where: str) -> None:
    """Refuse values that would silently give wrong logits: names the field and the value."""
    for name in ("mean", "std"):
        if name in d:
            v = d[name]
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
                raise PreprocessError(f"{where}: {name} must be 3 finite numbers (R, G, B), got {v!r}")
            if name == "std" and min(v) <= 0:
                raise PreprocessError(f"{where}: std must be positive, got {list(v)}")
    if "crop_pct" in d:
        c = d["crop_pct"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise PreprocessError(f"{where}: crop_pct must be in (0, 1], got {c!r}")
    if "interpolation" in d and d["interpolation"] not in INTERPOLATIONS:
        raise PreprocessError(f"{where}: interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                              f"got {d['interpolation']!r}")
    if "stored_size" in d and (isinstance(d["stored_size"], bool) or not isinstance(d["stored_size"], int)
                               or d["stored_size"] < 0):
        raise PreprocessError(f"{where}: stored_size must be a whole number >= 0, got {d['stored_size']!r}")


# ---------------------------------------------------------------------------------------------- the function

def transform(images_u8: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """(B, H, W, 3) uint8 stored images -> (B, 3, img_size, img_size) normalized float: center crop crop_pct,
    resize (antialiased, pre.interpolation), normalize by mean/std. The one eval transform of the project."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
    s = x.shape[-1]
    crop = max(1, round(s * pre.crop_pct))
    if crop != s:
        o = (s - crop) // 2
        x = x[..., o:o + crop, o:o + crop]
    if x.shape[-1] != pre.img_size:
        x = F.interpolate(x, size=(pre.img_size, pre.img_size), mode=pre.interpolation, antialias=True,
                          align_corners=False)
        if pre.interpolation == "bicubic":
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL's (timm's) result is clipped to the pixel range
    mean = torch.tensor(pre.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def decode_images(images: list[tuple[bytes, str]], pre: Preprocess) -> torch.Tensor:
    """[(bytes, name), ...] -> (B, S, S, 3) uint8 at the checkpoint's stored size, ready for `transform`."""
    pixels = [decode_image(data, pre.decode_size, where) for data, where in images]
    if not pixels:
        return torch.zeros((0, pre.decode_size, pre.decode_size, 3), dtype=torch.uint8)
    return torch.from_numpy(np.stack(pixels))


@torch.no_grad()
def image_logits(model: torch.nn.Module, pre: Preprocess, images: list[tuple[bytes, str]]) -> np.ndarray:
    """Logits (N, C) float32 of image files [(bytes, name), ...]: decode as ingest does, `transform`, forward.
    What `ich predict` and the served model compute; equals the trainer's eval logits for the stored image."""
    x = transform(decode_images(images, pre), pre)
    model.eval()
    return model(x).float().numpy() if len(x) else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------------------------------------- where values come from

def dataset_default(img_size: int, crop_pct: float = DEFAULT_CROP_PCT, stored_size: int = 0) -> Preprocess:
    """Today's behaviour for inits without a config of their own: ImageNet statistics, bilinear."""
    return Preprocess(img_size=img_size, crop_pct=float(crop_pct), stored_size=stored_size)


def legacy_dict(img_size: int, extra: dict | None) -> dict:
    """What a format-1 checkpoint (no preprocess field) was evaluated with by the orchestrator and report:
    ImageNet statistics, bilinear, its eval crop (soups: extra; trials: their training config; else 0.875)."""
    extra = extra if isinstance(extra, dict) else {}
    config = extra.get("config") if isinstance(extra.get("config"), dict) else {}
    crop = extra.get("eval_crop_pct", config.get("eval_crop_pct", DEFAULT_CROP_PCT))
    stored = extra.get("image_size") or 0
    return Preprocess(img_size=img_size, crop_pct=float(crop), stored_size=int(stored),
                      source="format 1 default").to_dict()


def resolve(img_size: int, stored_size: int, default_crop_pct: float, init: dict | None = None,
            overrides: dict | None = None) -> Preprocess:
    """The preprocessing of a training run: the user's overrides, else the init's values, else the defaults."""
    fields = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "crop_pct": float(default_crop_pct),
              "interpolation": "bilinear"}
    source = DATASET_DEFAULT
    if init:
        fields.update({k: init[k] for k in OVERRIDABLE if k in init})
        source = init.get("source", "init")
    if overrides:
        check_overrides(overrides, "init.preprocess")
        fields.update(overrides)
        source += " + init.preprocess"
    return Preprocess(img_size=img_size, mean=_triple(fields["mean"]), std=_triple(fields["std"]),
                      crop_pct=float(fields["crop_pct"]), interpolation=fields["interpolation"],
                      stored_size=stored_size, source=source)


def check_overrides(d: dict, where: str) -> None:
    if not isinstance(d, dict):
        raise PreprocessError(f"{where}: expected a mapping of {', '.join(OVERRIDABLE)}")
    unknown = sorted(set(d) - set(OVERRIDABLE))
    if unknown:
        raise PreprocessError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(OVERRIDABLE)})")
    check_fields(d, where)
