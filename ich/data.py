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

from ich.errors import ConfigError
from ich.ingest import IngestError, load_manifest
from ich.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, transform
from ich.train_config import augment_problem
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
    color_jitter: float = 0.4  # ColorJitter(b, c, s): brightness / contrast / saturation strength, [0, 1)
    color_jitter_hue: float = 0.0  # ColorJitter's hue, [0, 0.5]
    rand_augment_n: int = 2  # RandAugment ops per image; geometric ops are fused into the crop's affine warp
    rand_augment_magnitude: float = 9.0  # torchvision's bin index 0..bins-1: strength = magnitude / (bins - 1)
    rand_augment_bins: int = 31  # torchvision's num_magnitude_bins
    random_erasing: float = 0.2  # probability per sample
    eval_crop_pct: float = 0.875  # eval: center crop this fraction, then resize to img_size
    mean: tuple[float, float, float] = IMAGENET_MEAN  # train and eval normalization (the init weights')
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # eval resize

    def __post_init__(self):
        if problem := augment_problem(self.rand_augment_n, self.rand_augment_magnitude, self.rand_augment_bins,
                                      self.color_jitter, self.color_jitter_hue):
            raise ConfigError(problem)


# RandAugment on torchvision's scale (torchvision.transforms.RandAugment: op set, order and maxima): every op's
# strength is magnitude / (bins - 1) of its maximum; signed ops take a random sign.
RAND_AUGMENT_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
                    "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SHEAR_MAX = 0.3  # shear factor, about the top-left corner
TRANSLATE_MAX = 150.0 / 331.0  # of the image size
ROTATE_MAX = 30.0  # degrees
ENHANCE_MAX = 0.9  # brightness / color / contrast / sharpness factor 1 ± 0.9


def _op(name: str) -> int:
    return RAND_AUGMENT_OPS.index(name)


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
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # torchvision's rgb_to_grayscale


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """a*factor + b*(1-factor), per-sample factor, clamped to [0, 1] like torchvision and PIL's ImageEnhance."""
    f = factor.view(-1, 1, 1, 1)
    return (b + f * (a - b)).clamp_(0, 1)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """The uint8 values (as int64) of a float image in [0, 1]: posterize and equalize work on these."""
    return (x * 255).round_().clamp_(0, 255).long()


def _sharpness_blur(x: torch.Tensor) -> torch.Tensor:
    """torchvision's smoothing kernel [[1,1,1],[1,5,1],[1,1,1]]/13 per channel; border pixels kept (all of them
    below 3x3, where torchvision leaves the image as it is)."""
    if min(x.shape[-2:]) <= 2:
        return x
    k = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    k[1, 1] = 5.0
    k = (k / k.sum()).expand(x.shape[1], 1, 3, 3)
    out = x.clone()
    out[..., 1:-1, 1:-1] = F.conv2d(x, k, groups=x.shape[1])
    return out


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's equalize on the uint8 values, one histogram per (sample, channel), batched with scatter_add."""
    q = _levels(x)
    flat = q.flatten(2).flatten(0, 1)  # (B*C, H*W)
    hist = torch.zeros(flat.shape[0], 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    last = ((hist > 0) * torch.arange(256, device=x.device)).argmax(dim=1, keepdim=True)  # last non-empty bin
    step = (flat.shape[1] - hist.gather(1, last)) // 255  # pixels outside the last non-empty bin, / 255
    lut = (hist.cumsum(1) + step // 2) // step.clamp(min=1)
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(0, 255)
    out = torch.where(step == 0, flat, lut.gather(1, flat))  # one level (step 0): unchanged
    return out.view_as(q).float() / 255


def rand_augment_warp(ops: torch.Tensor, signs: torch.Tensor, magnitude: float, bins: int) -> torch.Tensor:
    """(B, 3, 3) sampling matrices of the geometric ops in slots ops (n, B) with signs (n, B) of ±1, in
    affine_grid's [-1, 1] coordinates of a square image: output point -> input point, so slot 0's op acts first.
    The matrices are the inverses torchvision's affine/rotate sample with (Rotate counter-clockwise about the
    center, ShearX/Y about the top-left corner)."""
    s = magnitude / (bins - 1)
    n, b = ops.shape
    warp = torch.eye(3, device=ops.device).repeat(b, 1, 1)
    for k in range(n):
        m = torch.eye(3, device=ops.device).repeat(b, 1, 1)

        def put(name, i, j, value):  # torch.where, not a masked write: no device sync
            m[:, i, j] = torch.where(ops[k] == _op(name), value, m[:, i, j])

        sign = signs[k].to(m.dtype)
        shear = sign * SHEAR_MAX * s
        put("shear_x", 0, 1, shear)  # x_in = x + shear * (y + 1)
        put("shear_x", 0, 2, shear)
        put("shear_y", 1, 0, shear)  # y_in = y + shear * (x + 1)
        put("shear_y", 1, 2, shear)
        shift = -sign * 2 * TRANSLATE_MAX * s  # a fraction of the size is twice that in [-1, 1] units
        put("translate_x", 0, 2, shift)
        put("translate_y", 1, 2, shift)
        ang = sign * math.radians(ROTATE_MAX * s)
        put("rotate", 0, 0, torch.cos(ang))
        put("rotate", 0, 1, -torch.sin(ang))
        put("rotate", 1, 0, torch.sin(ang))
        put("rotate", 1, 1, torch.cos(ang))
        warp = warp @ m
    return warp


def rand_augment_colour(x: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor, magnitude: float,
                        bins: int) -> torch.Tensor:
    """The pixel ops in slots ops (n, B) with signs (n, B) on float images (B, 3, H, W) in [0, 1], slot by slot
    (geometric slots are identity here: rand_augment_warp does them). Values stay in [0, 1]."""
    s = magnitude / (bins - 1)
    x = x.clone()
    for k in range(ops.shape[0]):
        factor = 1.0 + signs[k].to(x.dtype) * ENHANCE_MAX * s  # within [0.1, 1.9]: magnitude <= bins - 1
        for name in ("brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast",
                     "equalize"):
            sel = ops[k] == _op(name)
            if not bool(sel.any()):
                continue
            xs, f = x[sel], factor[sel]
            if name == "brightness":
                ys = _blend(xs, torch.zeros_like(xs), f)
            elif name == "color":
                ys = _blend(xs, _grey(xs).expand_as(xs), f)
            elif name == "contrast":
                ys = _blend(xs, _grey(xs).mean(dim=(1, 2, 3), keepdim=True).expand_as(xs), f)
            elif name == "sharpness":
                ys = _blend(xs, _sharpness_blur(xs), f)
            elif name == "posterize":
                bits = 8 - round(s * 4)  # torchvision: 8 - round(magnitude / ((bins - 1) / 4)), half to even
                ys = (_levels(xs) & -(2 ** (8 - bits))).float() / 255
            elif name == "solarize":
                ys = torch.where(xs >= 1.0 - s, 1.0 - xs, xs)  # threshold 255 -> 0 in uint8 terms
            elif name == "autocontrast":
                lo = xs.amin(dim=(2, 3), keepdim=True)
                hi = xs.amax(dim=(2, 3), keepdim=True)
                flat = hi == lo  # torchvision leaves a constant channel as it is
                ys = ((xs - torch.where(flat, 0.0, lo)) / torch.where(flat, 1.0, hi - lo)).clamp(0, 1)
            else:
                ys = _equalize(xs)
            x[sel] = ys
    return x


def rand_augment(x: torch.Tensor, ops: torch.Tensor, signs: torch.Tensor, magnitude: float,
                 bins: int) -> torch.Tensor:
    """RandAugment with the given ops (n, B) and signs (n, B) on float images (B, 3, S, S) in [0, 1]: what
    train_transform does with random ones, with the geometry warped on its own instead of fused into the crop."""
    grid = F.affine_grid(rand_augment_warp(ops, signs, magnitude, bins)[:, :2], list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rand_augment_colour(x, ops, signs, magnitude, bins)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in [0, 1), saturation, value of (B, 3, H, W) RGB in [0, 1], each (B, H, W)."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    sat = c / torch.where(v > 0, v, 1.0)
    cd = torch.where(c > 0, c, 1.0)
    h = torch.where(v == r, (g - b) / cd, torch.where(v == g, 2.0 + (b - r) / cd, 4.0 + (r - g) / cd))
    h = torch.where(c > 0, h, 0.0)
    return (h / 6.0) % 1.0, sat, v


def _hsv_to_rgb(h: torch.Tensor, sat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # channel n (R=5, G=3, B=1): v - v*s*clamp(min(k, 4-k), 0, 1) with k = (n + 6h) mod 6
    n = torch.tensor([5.0, 3.0, 1.0], device=h.device).view(1, 3, 1, 1)
    k = (n + 6 * h.unsqueeze(1)) % 6
    return v.unsqueeze(1) * (1 - sat.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's hue by shift (B,) turns, like torchvision's adjust_hue per image."""
    h, sat, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + shift.view(-1, 1, 1)) % 1.0, sat, v)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter per sample: factors (B, 4) = brightness, contrast, saturation factors and the hue
    shift; order (B, 4) a permutation of 0..3 per sample, the order the four ops run in (-1: an op left out)."""
    x = x.clone()
    for slot in range(4):
        for op in range(4):
            sel = order[:, slot] == op
            if not bool(sel.any()):
                continue
            xs, f = x[sel], factors[sel, op]
            if op == 0:
                ys = _blend(xs, torch.zeros_like(xs), f)
            elif op == 1:
                ys = _blend(xs, _grey(xs).mean(dim=(1, 2, 3), keepdim=True).expand_as(xs), f)
            elif op == 2:
                ys = _blend(xs, _grey(xs).expand_as(xs), f)
            else:
                ys = adjust_hue(xs, f)
            x[sel] = ys
    return x


def train_transform(images_u8: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop + flip + ColorJitter + RandAugment + RandomErasing (the paper's order), batched, with
    per-sample parameters; RandAugment's geometric ops are fused into the crop's warp (one resampling).

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

    # RandAugment: n ops per sample drawn uniformly from torchvision's 14, a random sign each.
    n, mag, bins = cfg.rand_augment_n, cfg.rand_augment_magnitude, cfg.rand_augment_bins
    if n > 0:
        ops = torch.randint(len(RAND_AUGMENT_OPS), (n, b), generator=gen).to(device)
        signs = torch.where(rand(n, b) < 0.5, -1.0, 1.0)
        full = torch.cat([theta, torch.tensor([0.0, 0.0, 1.0], device=device).expand(b, 1, 3)], dim=1)
        theta = (full @ rand_augment_warp(ops, signs, mag, bins))[:, :2]

    grid = F.affine_grid(theta, [b, 3, cfg.img_size, cfg.img_size], align_corners=False)
    # Downscaling a large stored image by a lot aliases; pre-shrink once when the crop is much smaller.
    if x.shape[-1] > 2 * cfg.img_size:
        x = F.interpolate(x, size=(2 * cfg.img_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    if cfg.color_jitter > 0 or cfg.color_jitter_hue > 0:
        cj, hue = cfg.color_jitter, cfg.color_jitter_hue
        factors = torch.cat([1 + cj * (2 * rand(b, 3) - 1), hue * (2 * rand(b, 1) - 1)], dim=1)
        order = torch.argsort(rand(b, 4), dim=1)  # torchvision draws a random order per call
        if cj == 0:  # ops of strength 0 are left out, like torchvision's None factors
            order = torch.where(order < 3, -1, order)
        if hue == 0:
            order = torch.where(order == 3, -1, order)
        x = color_jitter(x, factors, order)

    if n > 0:
        x = rand_augment_colour(x, ops, signs, mag, bins)

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
