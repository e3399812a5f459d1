"""One trial's training options (TrainConfig) and the scales they are checked against. Imports no torch: the
`ich train` flags, sweep configs and `ich --help` are built from these fields without loading the training loop
(ich/train.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ich.errors import ConfigError

# Options no longer read, with how to say the same thing today: refused in one line wherever a training option is
# read (configs, --set, Tune params, `ich train`), never reinterpreted. timm's m and torchvision's magnitude share
# the maxima (rotate 30°, shear 0.3, translate ~0.45, factor 1 ± 0.9, solarize down to 0): m/10 = magnitude/30.
RETIRED_OPTIONS = {
    "rand_augment_m": "(timm's 0-10 magnitude scale) is no longer read: use rand_augment_magnitude on torchvision's "
                      "scale (0..rand_augment_bins-1, default bins 31); magnitude = 3*m gives the same strength "
                      "(rotate 30°*m/10 = 30°*3m/30; shear, translate, colour and solarize alike), capped at 30 "
                      "(m above 10 has no equivalent); posterize now rounds its bits and the op set adds Equalize, "
                      "so runs still differ slightly",
}


def augment_problem(n, magnitude, bins, color_jitter, hue) -> str | None:
    """What is wrong with these augmentation options, starting with the option's name; None when all are in scale.
    Out-of-scale values are refused, never clamped: every factor they give stays >= 0."""
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
        return f"rand_augment_bins must be a whole number >= 2 (torchvision's num_magnitude_bins), not {bins!r}"
    if not 0 <= magnitude <= bins - 1:  # NaN fails too
        return (f"rand_augment_magnitude must be within [0, {bins - 1}] (torchvision's RandAugment scale: bin 0.."
                f"rand_augment_bins-1 with rand_augment_bins {bins}), not {magnitude!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return f"rand_augment_n must be a whole number >= 0 (ops per image), not {n!r}"
    if not 0 <= color_jitter < 1:
        return f"color_jitter must be within [0, 1) (factors 1 ± color_jitter stay >= 0), not {color_jitter!r}"
    if not 0 <= hue <= 0.5:
        return f"color_jitter_hue must be within [0, 0.5] (torchvision's ColorJitter hue), not {hue!r}"
    return None


@dataclass
class TrainConfig:
    """The paper's recipe (paper.md) is the GPU config; defaults here suit the tiny CPU model."""
    model: str = "coatnet_tiny_ich"
    img_size: int = 32
    epochs: int = 10
    batch_size: int = 64
    accum_steps: int = 1  # gradient accumulation (the paper: batch 64 x 2)
    lr: float = 1e-3
    weight_decay: float = 0.05
    # False: timm's groups, no decay on norms, biases and position tables; True: decay on every parameter,
    # like the paper's AdamW(model.parameters(), weight_decay=wd)
    decay_norm_and_bias: bool = False
    schedule: str = "cosine"  # cosine | cosine_restarts | constant
    restart_period: int = 3  # epochs per cosine cycle for cosine_restarts (the paper's T_0)
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0
    grad_clip: float = 1.0  # max grad norm; 0 = off
    drop_path: float = 0.0
    # augmentation
    scale_min: float = 0.08  # RandomResizedCrop area
    hflip: float = 0.5
    color_jitter: float = 0.4  # ColorJitter(b, c, s) strength, [0, 1)
    color_jitter_hue: float = 0.0  # ColorJitter's hue, [0, 0.5]
    rand_augment_n: int = 2  # ops per image
    # torchvision's RandAugment scale: bin 0..rand_augment_bins-1, strength = magnitude / (bins - 1) of each op's
    # maximum (9 of 31 bins: the paper's RandAugment(2, 9)); a float so a search can sample it
    rand_augment_magnitude: float = 9.0
    rand_augment_bins: int = 31
    random_erasing: float = 0.2
    eval_crop_pct: float = 0.875  # when the init weights carry no preprocessing of their own (ich/preprocess.py)
    # execution
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    channels_last: str = "auto"  # auto (CUDA only) | on | off
    compile: bool = False
    device: str = "auto"
    eval_batch_size: int = 256
    seed: int = 0  # data order, augmentation, dropout
    init_seed: int = 0  # random init when no init weights: shared by all trials so they can be souped

    def __post_init__(self):
        if problem := augment_problem(self.rand_augment_n, self.rand_augment_magnitude, self.rand_augment_bins,
                                      self.color_jitter, self.color_jitter_hue):
            raise ConfigError(problem)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        for k in d:
            if k in RETIRED_OPTIONS:
                raise ConfigError(f"{k} {RETIRED_OPTIONS[k]}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        out = {}
        for k, v in d.items():  # Tune/YAML hand numbers of the wrong kind (1 vs 1.0, numpy ints)
            t = types[k]
            if t == "bool" and isinstance(v, str):
                v = v.strip().lower() in ("1", "true", "yes", "on")
            out[k] = int(v) if t == "int" else float(v) if t == "float" else bool(v) if t == "bool" else v
        return cls(**out)
