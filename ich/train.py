"""One trial's training and evaluation loop. Knows nothing of Ray or MLflow.

    trainer = Trainer(TrainConfig(...), dataset, init_weights="path/to/weights.safetensors")
    for result in trainer.fit():          # one EpochResult per epoch
        result.metrics                    # train_loss, lr, val_accuracy, val_macro_f1, ...
        result.weights()                  # CPU state dict of this epoch's model
        trainer.save_state(folder)        # everything needed to resume exactly

Randomness is a pure function of (seed, epoch): data order, augmentation, MixUp/CutMix and dropout are
re-seeded at every epoch start, so resuming from an epoch boundary replays the same run bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ich.checkpoint import CheckpointError, load_weights, state_dict_to_cpu
from ich.data import AugmentConfig, ICHDataset, Prefetcher, batch_indices, mixup_cutmix, train_transform
from ich.init_source import init_preprocess
from ich.metrics import metrics_of
from ich.models import ModelError, create_model, load_init_weights, random_init_fingerprint, resolve_init_weights
from ich.preprocess import Preprocess, PreprocessError, resolve, transform
from ich.train_config import RETIRED_OPTIONS, TrainConfig  # noqa: F401  (RETIRED_OPTIONS: still found here)

TRAIN_STATE = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"

def augment_config(cfg: TrainConfig) -> AugmentConfig:
    return AugmentConfig(img_size=cfg.img_size, scale=(cfg.scale_min, 1.0), hflip=cfg.hflip,
                         color_jitter=cfg.color_jitter, color_jitter_hue=cfg.color_jitter_hue,
                         rand_augment_n=cfg.rand_augment_n, rand_augment_magnitude=cfg.rand_augment_magnitude,
                         rand_augment_bins=cfg.rand_augment_bins, random_erasing=cfg.random_erasing,
                         eval_crop_pct=cfg.eval_crop_pct)


def weight_decay_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW's parameter groups: timm's (no decay on norms, biases and position tables) unless
    cfg.decay_norm_and_bias, then one group that decays every parameter (the paper's code)."""
    if cfg.decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    from timm.optim import param_groups_weight_decay
    return param_groups_weight_decay(model, cfg.weight_decay)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimizer step `step` (pure; the schedule has no state to save)."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    t = step - warmup
    if cfg.schedule == "cosine":
        period = max(1, cfg.epochs * steps_per_epoch - warmup)
    elif cfg.schedule == "cosine_restarts":
        period = max(1, cfg.restart_period * steps_per_epoch)
        t %= period
    else:
        raise ValueError(f"unknown schedule '{cfg.schedule}' (cosine | cosine_restarts | constant)")
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, period) / period))


@dataclass
class EpochResult:
    epoch: int  # epochs completed, 1-based
    metrics: dict[str, float]
    weights: Callable[[], dict[str, torch.Tensor]] = field(repr=False)


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + stream) % (2 ** 63)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: np.ndarray, preprocess: Preprocess, device: torch.device,
                   batch_size: int, *, num_classes: int, amp_dtype: torch.dtype | None = None,
                   channels_last: bool = False) -> np.ndarray:
    """Logits (N, C) float32 of `model` in eval mode on uint8 images (N, H, W, 3), batch by batch with the
    evaluation preprocessing: the one loop of Trainer.predict and the soups' Evaluator (soups/evaluate.py)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size].copy()).to(device)  # object-store arrays are read-only
        x = transform(x, preprocess)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, num_classes), np.float32)


class Trainer:
    """`init_preprocess`: the init's preprocessing fields (ich.preprocess.init_preprocess), given with
    `init_state`; read from `init_weights` otherwise. Without any, the dataset's defaults apply."""

    def __init__(self, cfg: TrainConfig, data: ICHDataset, init_weights: str | None = None,
                 init_state: dict[str, torch.Tensor] | None = None, init_fingerprint: str | None = None,
                 init_preprocess: dict | None = None):
        self.cfg, self.data = cfg, data
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
        on_cuda = self.device.type == "cuda"
        self.amp_dtype = {"auto": torch.bfloat16 if on_cuda else None, "bf16": torch.bfloat16,
                          "fp16": torch.float16, "off": None}[cfg.amp]
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and on_cuda)
        if init_state is None and init_weights and init_preprocess is None:
            init_weights = str(resolve_init_weights(init_weights))  # a local file or checkpoint folder
            init_preprocess = _init_preprocess(init_weights)
        # One preprocessing for eval, checkpoints and serving; train augmentation normalizes alike.
        self.preprocess: Preprocess = resolve(cfg.img_size, data.image_size, cfg.eval_crop_pct, init_preprocess)
        if init_preprocess and init_preprocess.get("input_size") not in (None, cfg.img_size):
            warnings.warn(f"img_size {cfg.img_size} differs from the {init_preprocess['input_size']} px the init "
                          f"weights were trained at ({self.preprocess.source})", RuntimeWarning, stacklevel=2)
        self._set_preprocess(self.preprocess)

        torch.manual_seed(cfg.init_seed)  # the same random init in every trial when no weights are given
        self.model = create_model(cfg.model, data.num_classes, cfg.img_size, drop_path_rate=cfg.drop_path)
        if init_state is not None:  # an init already in memory (Ray object store), with its fingerprint
            self.model.load_state_dict(init_state)
            self.init_fingerprint = init_fingerprint or "unknown"
        elif init_weights:
            self.init_fingerprint, _ = load_init_weights(self.model, init_weights)
        else:
            self.init_fingerprint = random_init_fingerprint(cfg.model, data.num_classes, cfg.img_size, cfg.init_seed)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if cfg.compile else self.model

        self.optimizer = torch.optim.AdamW(weight_decay_groups(self.model, cfg), lr=cfg.lr, fused=on_cuda or None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16" and on_cuda)
        self.epoch = 0
        self.step = 0
        n_train = len(data.splits["train"])
        self.batches_per_epoch = max(1, n_train // cfg.batch_size)
        self.steps_per_epoch = max(1, self.batches_per_epoch // cfg.accum_steps)

    def _set_preprocess(self, p: Preprocess) -> None:
        self.preprocess = p
        self.aug = dataclasses.replace(augment_config(self.cfg), mean=p.mean, std=p.std, eval_crop_pct=p.crop_pct,
                                       interpolation=p.interpolation)

    # ------------------------------------------------------------------ training
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_epoch(self, on_step: Callable[[], None] | None = None) -> dict[str, float]:
        """One pass over train. `on_step` runs after every optimizer step (the sweep reports there the
        previous epoch once its checkpoint has reached MLflow, so logging overlaps training)."""
        cfg, split = self.cfg, self.data.splits["train"]
        torch.manual_seed(_epoch_seed(cfg.seed, self.epoch, 0))  # dropout / drop path
        rng = np.random.default_rng(_epoch_seed(cfg.seed, self.epoch, 1))  # data order, MixUp/CutMix
        gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, self.epoch, 2))  # augmentation
        batches = batch_indices(len(split), cfg.batch_size, rng, drop_last=len(split) >= cfg.batch_size)
        batches = batches[: self.steps_per_epoch * cfg.accum_steps]
        self.model.train()
        loader = Prefetcher(split, batches, self.device)
        t0 = time.perf_counter()
        total_loss, seen = torch.zeros((), device=self.device), 0
        try:
            for i, (imgs, labels) in enumerate(loader):
                x = train_transform(imgs, self.aug, gen)
                x, target = mixup_cutmix(x, labels, self.data.num_classes, mixup=cfg.mixup, cutmix=cfg.cutmix,
                                         label_smoothing=cfg.label_smoothing, rng=rng)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    logits = self.forward(x)
                loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                self.scaler.scale(loss / cfg.accum_steps).backward()
                total_loss += loss.detach() * len(labels)
                seen += len(labels)
                if (i + 1) % cfg.accum_steps == 0:
                    lr = lr_at(cfg, self.step, self.steps_per_epoch)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    if cfg.grad_clip > 0:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    if on_step is not None:
                        on_step()
        finally:
            loader.close()
        train_loss = float(total_loss) / max(seen, 1)  # one device sync per epoch, not per step
        elapsed = time.perf_counter() - t0
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training diverged at epoch {self.epoch + 1}: train loss is {train_loss}")
        self.epoch += 1
        return {"train_loss": train_loss, "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": seen / elapsed, "data_wait_share": loader.wait_s / elapsed,
                "epoch_time_s": elapsed}

    # ------------------------------------------------------------------ evaluation
    def predict(self, split: str | None = None, images: np.ndarray | None = None,
                model: torch.nn.Module | None = None) -> np.ndarray:
        """Logits (N, C) as float32 numpy for a split of the dataset or an array of uint8 images."""
        images = self.data.splits[split].images if images is None else images
        return predict_logits(model or self.forward, images, self.preprocess, self.device, self.cfg.eval_batch_size,
                              num_classes=self.data.num_classes, amp_dtype=self.amp_dtype,
                              channels_last=self.channels_last)

    def evaluate(self, split: str = "val", model: torch.nn.Module | None = None) -> dict[str, float]:
        logits = self.predict(split, model=model)
        return evaluate_logits(logits, self.data.splits[split].labels, self.data.num_classes, prefix=f"{split}_")

    # ------------------------------------------------------------------ the loop
    def fit(self, epochs: int | None = None, on_step: Callable[[], None] | None = None) -> Iterator[EpochResult]:
        """Train up to cfg.epochs (or `epochs` more), yielding after every epoch."""
        stop = self.cfg.epochs if epochs is None else min(self.cfg.epochs, self.epoch + epochs)
        while self.epoch < stop:
            metrics = self.train_epoch(on_step)
            t0 = time.perf_counter()
            metrics.update(self.evaluate("val"))
            metrics["eval_time_s"] = time.perf_counter() - t0
            metrics["epoch"] = self.epoch
            yield EpochResult(self.epoch, metrics, self.weights)

    def weights(self) -> dict[str, torch.Tensor]:
        return state_dict_to_cpu(self.model.state_dict())

    # ------------------------------------------------------------------ exact resume
    def save_state(self, folder: str | Path, with_model: bool = True) -> None:
        """Model, optimizer and counters as safetensors + JSON (no pickles). RNG is derived from (seed, epoch).

        with_model=False leaves the weights out when they are saved beside it anyway (a checkpoint folder);
        load_state then takes them from `model_weights`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.weights().items()} if with_model else {}
        opt = self.optimizer.state_dict()
        for pid, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        meta = {"epoch": self.epoch, "step": self.step, "config": dataclasses.asdict(self.cfg),
                "init_fingerprint": self.init_fingerprint, "dataset_fingerprint": self.data.fingerprint,
                "param_groups": opt["param_groups"], "scaler": self.scaler.state_dict(),
                "preprocess": self.preprocess.to_dict()}
        # Each file is written beside and renamed into place: a crash mid-write never leaves a torn file.
        save_file(tensors, str(folder / (TRAIN_STATE + ".tmp")))
        (folder / (TRAIN_STATE_JSON + ".tmp")).write_text(json.dumps(meta, indent=1))
        os.replace(folder / (TRAIN_STATE + ".tmp"), folder / TRAIN_STATE)
        os.replace(folder / (TRAIN_STATE_JSON + ".tmp"), folder / TRAIN_STATE_JSON)

    def load_state(self, folder: str | Path, model_weights: str | Path | None = None) -> None:
        folder = Path(folder)
        try:
            meta = json.loads((folder / TRAIN_STATE_JSON).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{folder}: cannot read {TRAIN_STATE_JSON} ({e})") from None
        if meta["dataset_fingerprint"] != self.data.fingerprint:
            raise CheckpointError(f"{folder}: training state is from another dataset "
                                  f"({meta['dataset_fingerprint'][:12]}… != {self.data.fingerprint[:12]}…)")
        tensors = load_weights(folder / TRAIN_STATE, device="cpu")
        weights = load_weights(model_weights) if model_weights else \
            {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(weights)
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
        self.init_fingerprint = meta["init_fingerprint"]
        if meta.get("preprocess"):  # the run goes on with the preprocessing it started with
            self._set_preprocess(Preprocess.from_dict(meta["preprocess"], self.cfg.img_size, str(folder)))


def _init_preprocess(path: str) -> dict | None:
    """The preprocessing the init weights at `path` carry (sidecar / checkpoint metadata), one line if unusable."""
    try:
        return init_preprocess(path)
    except (PreprocessError, CheckpointError) as e:
        raise ModelError(f"init weights {path}: {e}") from None


def evaluate_logits(logits: np.ndarray, labels: np.ndarray, num_classes: int, prefix: str = "") -> dict[str, float]:
    """Every registered metric (ich/metrics.py: accuracy, macro precision/recall/F1, loss, ...) of logits against labels."""
    return {prefix + k: v for k, v in metrics_of(logits, labels, num_classes).items()}
