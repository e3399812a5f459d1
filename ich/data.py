"""Loading an ingested dataset and feeding batches to the training loop.

The Parquet shards hold raw RGB uint8 pixels (see ich/ingest.py), so loading is a memcpy, never a
JPEG decode: a split becomes one (N, S, S, 3) uint8 array that Ray can share through its object store.
Augmentation runs batched on the training device (GPU on workers, CPU here), with per-sample random
parameters, so the data path stays a small fraction of step time.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ich.ingest import IngestError, load_manifest
from ich.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, transform
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int64
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ICHDataset:
    manifest: dict
    splits: dict[str, Split]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])


def load_dataset(path: str | Path, splits=SPLITS) -> ICHDataset:
    """Read an ingested dataset folder (manifest.json + Parquet shards) into memory."""
    path = Path(path)
    manifest = load_manifest(path)
    size = int(manifest["image_size"])
    out = {}
    for split in splits:
        shard_paths = manifest["shards"].get(split, [])
        if not shard_paths:
            raise IngestError(f"{path}: dataset has no '{split}' split")
        tables = []
        for rel in shard_paths:
            try:
                tables.append(pq.read_table(path / rel, columns=["image", "label", "path"]))
            except (OSError, ValueError) as e:
                raise IngestError(f"{path / rel}: unreadable Parquet shard ({e})") from None
        n = sum(t.num_rows for t in tables)
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        paths: list[str] = []
        i = 0
        for t in tables:
            for blob in t.column("image").to_pylist():
                if len(blob) != size * size * 3:
                    raise IngestError(f"{path}: image {i} of '{split}' has {len(blob)} bytes, expected {size * size * 3}")
                images[i] = np.frombuffer(blob, dtype=np.uint8).reshape(size, size, 3)
                i += 1
            paths.extend(t.column("path").to_pylist())
        labels[:] = np.concatenate([t.column("label").to_numpy() for t in tables])
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(manifest["classes"]):
            raise IngestError(f"{path}: '{split}' has labels outside 0..{len(manifest['classes']) - 1}")
        out[split] = Split(images, labels, paths)
    return ICHDataset(manifest, out)


# ----------------------------------------------------------------------------------------------
# Augmentation: per-sample parameters, batched ops on the device.

@dataclass
class AugmentConfig:
    img_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4  # brightness / contrast / saturation strength
    rand_augment_n: int = 2  # RandAugment(n, m); geometric ops are fused into the crop's affine warp
    rand_augment_m: float = 9.0  # magnitude 0..10 (timm scale)
    random_erasing: float = 0.2  # probability per sample
    eval_crop_pct: float = 0.875  # eval: center crop this fraction, then resize to img_size
    mean: tuple[float, float, float] = IMAGENET_MEAN  # train and eval normalization (the init weights')
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # eval resize


_GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_COLOR_OPS = ("identity", "brightness", "contrast", "color", "sharpness", "solarize", "posterize", "autocontrast")
RAND_AUGMENT_OPS = _GEOMETRIC_OPS + _COLOR_OPS


def _normalize(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div_(255.0)


def eval_preprocess(cfg: AugmentConfig) -> Preprocess:
    return Preprocess(img_size=cfg.img_size, mean=tuple(cfg.mean), std=tuple(cfg.std), crop_pct=cfg.eval_crop_pct,
                      interpolation=cfg.interpolation)


def eval_transform(images_u8: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Center crop cfg.eval_crop_pct of the stored image, resize to img_size, normalize: ich.preprocess.transform."""
    return transform(images_u8, eval_preprocess(cfg))


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """a*factor + b*(1-factor), per-sample factor, clamped to [0, 1] like PIL's ImageEnhance."""
    f = factor.view(-1, 1, 1, 1)
    return (b + f * (a - b)).clamp_(0, 1)


def train_transform(images_u8: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop + flip + RandAugment + ColorJitter + RandomErasing, batched, per-sample parameters.

    All random numbers come from `gen` (a CPU generator) so a training run is reproducible from its seed."""
    device = images_u8.device
    x = to_float(images_u8)
    b = x.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(device)

    # RandomResizedCrop as an affine warp: area fraction and log aspect ratio per sample.
    area = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * rand(b)
    log_r = math.log(cfg.ratio[0]) + (math.log(cfg.ratio[1]) - math.log(cfg.ratio[0])) * rand(b)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - w) * (2 * rand(b) - 1)
    cy = (1 - h) * (2 * rand(b) - 1)
    flip = torch.where(rand(b) < cfg.hflip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = w * flip
    theta[:, 1, 1] = h
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy

    # RandAugment: n ops per sample drawn uniformly; magnitude m/10 of timm's ranges, random sign.
    mag = cfg.rand_augment_m / 10.0
    ops = torch.randint(len(RAND_AUGMENT_OPS), (cfg.rand_augment_n, b), generator=gen).to(device) \
        if cfg.rand_augment_n > 0 else None
    if ops is not None:
        sign = torch.where(rand(cfg.rand_augment_n, b) < 0.5, -1.0, 1.0)
        geo = torch.eye(3, device=device).repeat(b, 1, 1)
        for k in range(cfg.rand_augment_n):
            m = torch.eye(3, device=device).repeat(b, 1, 1)
            ang = sign[k] * math.radians(30.0) * mag
            is_rot = ops[k] == 0
            m[is_rot, 0, 0] = torch.cos(ang[is_rot])
            m[is_rot, 0, 1] = -torch.sin(ang[is_rot])
            m[is_rot, 1, 0] = torch.sin(ang[is_rot])
            m[is_rot, 1, 1] = torch.cos(ang[is_rot])
            m[ops[k] == 1, 0, 1] = (sign[k] * 0.3 * mag)[ops[k] == 1]
            m[ops[k] == 2, 1, 0] = (sign[k] * 0.3 * mag)[ops[k] == 2]
            m[ops[k] == 3, 0, 2] = (sign[k] * 0.9 * mag)[ops[k] == 3]  # 0.45 of width = 0.9 in [-1, 1] units
            m[ops[k] == 4, 1, 2] = (sign[k] * 0.9 * mag)[ops[k] == 4]
            geo = geo @ m
        full = torch.cat([theta, torch.tensor([0.0, 0.0, 1.0], device=device).expand(b, 1, 3)], dim=1)
        theta = (full @ geo)[:, :2]

    grid = F.affine_grid(theta, [b, 3, cfg.img_size, cfg.img_size], align_corners=False)
    # Downscaling a large stored image by a lot aliases; pre-shrink once when the crop is much smaller.
    if x.shape[-1] > 2 * cfg.img_size:
        x = F.interpolate(x, size=(2 * cfg.img_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    if ops is not None:
        for k in range(cfg.rand_augment_n):
            op = ops[k] - len(_GEOMETRIC_OPS)
            factor = 1.0 + sign[k] * 0.9 * mag
            for j, name in enumerate(_COLOR_OPS):
                sel = op == j
                if name == "identity" or not bool(sel.any()):
                    continue
                xs = x[sel]
                if name == "brightness":
                    ys = _blend(xs, torch.zeros_like(xs), factor[sel])
                elif name == "contrast":
                    mean = _grey(xs).mean(dim=(1, 2, 3), keepdim=True)
                    ys = _blend(xs, mean.expand_as(xs), factor[sel])
                elif name == "color":
                    ys = _blend(xs, _grey(xs).expand_as(xs), factor[sel])
                elif name == "sharpness":
                    blurred = F.avg_pool2d(F.pad(xs, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
                    ys = _blend(xs, blurred, factor[sel])
                elif name == "solarize":
                    thresh = 1.0 - mag
                    ys = torch.where(xs >= thresh, 1.0 - xs, xs)
                elif name == "posterize":
                    levels = 2 ** max(1, 8 - int(4 * mag))
                    ys = torch.floor(xs * (levels - 1) + 0.5) / (levels - 1)
                else:  # autocontrast
                    lo = xs.amin(dim=(2, 3), keepdim=True)
                    hi = xs.amax(dim=(2, 3), keepdim=True)
                    ys = torch.where(hi > lo, (xs - lo) / (hi - lo).clamp(min=1e-6), xs)
                x[sel] = ys

    if cfg.color_jitter > 0:
        cj = cfg.color_jitter
        bri = 1 + cj * (2 * rand(b) - 1)
        con = 1 + cj * (2 * rand(b) - 1)
        sat = 1 + cj * (2 * rand(b) - 1)
        x = _blend(x, torch.zeros_like(x), bri)
        x = _blend(x, _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), con)
        x = _blend(x, _grey(x).expand_as(x), sat)

    x = _normalize(x, cfg)

    if cfg.random_erasing > 0:
        # One rectangle per selected sample (area 2-33%, log aspect 0.3-3.3) filled with normal noise, like timm.
        s = cfg.img_size
        on = rand(b) < cfg.random_erasing
        ea = 0.02 + 0.31 * rand(b)
        er = torch.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * rand(b))
        eh = (torch.sqrt(ea * er) * s).clamp(1, s)
        ew = (torch.sqrt(ea / er) * s).clamp(1, s)
        ey = (s - eh) * rand(b)
        ex = (s - ew) * rand(b)
        ii = torch.arange(s, device=device).view(1, s, 1)
        jj = torch.arange(s, device=device).view(1, 1, s)
        mask = ((ii >= ey.view(-1, 1, 1)) & (ii < (ey + eh).view(-1, 1, 1)) &
                (jj >= ex.view(-1, 1, 1)) & (jj < (ex + ew).view(-1, 1, 1)) & on.view(-1, 1, 1))
        noise = torch.randn(x.shape, generator=gen).to(device)
        x = torch.where(mask.unsqueeze(1), noise, x)
    return x


def mixup_cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, mixup: float, cutmix: float,
                 label_smoothing: float, rng: np.random.Generator, switch_prob: float = 0.5,
                 prob: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch MixUp / CutMix (timm's semantics) returning mixed inputs and soft targets."""
    off = label_smoothing / num_classes
    target = torch.full((y.shape[0], num_classes), off, device=x.device)
    target.scatter_(1, y.view(-1, 1), 1.0 - label_smoothing + off)
    if (mixup <= 0 and cutmix <= 0) or rng.random() >= prob:
        return x, target
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    flipped = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # correct lam for the clipped box
    else:
        x = x * lam + flipped * (1 - lam)
    return x, target * lam + target.flip(0) * (1 - lam)


# ----------------------------------------------------------------------------------------------
# Batches: a background thread gathers the next uint8 batch while the model trains on this one.

def batch_indices(n: int, batch_size: int, rng: np.random.Generator | None, drop_last: bool) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


class Prefetcher:
    """Iterate (images_u8, labels) batches, gathered by a background thread `depth` batches ahead.

    `wait_s` accumulates the time the consumer spent blocked waiting for data."""

    def __init__(self, split: Split, batches: list[np.ndarray], device: torch.device, depth: int = 2):
        self.split, self.batches, self.device = split, batches, device
        self.pin = device.type == "cuda"
        self.wait_s = 0.0
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._thread.start()

    def _fill(self):
        try:
            for idx in self.batches:
                if self._stop.is_set():
                    return
                imgs = torch.from_numpy(self.split.images[idx])
                labels = torch.from_numpy(self.split.labels[idx])
                if self.pin:
                    imgs, labels = imgs.pin_memory(), labels.pin_memory()
                self._q.put((imgs, labels))
            self._q.put(None)
        except BaseException as e:  # surface loader errors in the training thread
            self._q.put(e)

    def __iter__(self):
        import time
        while True:
            t0 = time.perf_counter()
            item = self._q.get()
            self.wait_s += time.perf_counter() - t0
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            imgs, labels = item
            yield imgs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def close(self):
        self._stop.set()
        while not self._q.empty():
            self._q.get_nowait()
