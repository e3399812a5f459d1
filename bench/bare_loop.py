"""Bare training throughput of the tiny CoAtNet on the embedded digits (no Ray, no MLflow), as ratios against a
plain PyTorch loop of the same model, batch and data measured side by side in the same run.

    python bench/bare_loop.py                 # ratios + absolute images/s, 1 warm-up + 5 measured epochs each
    python bench/bare_loop.py --accuracy      # also val top-1 after 10 epochs of the standard recipe
    python bench/bare_loop.py --threads 1     # pin torch's intra-op threads (see the note below)

Three loops train in turn, one epoch each per round (plain, ich without augmentation, ich with the paper's
augmentation, then again), so load drift on a shared machine hits all alike; they share the process, so the
same torch threads:
- plain: the reference, written out below: uint8 batch -> float, normalized -> forward, cross-entropy, backward,
  AdamW step. Nothing else.
- ich, augmentation off: ich.train.Trainer with every augmentation at zero. Its ratio to plain is the loop's own
  overhead (prefetch thread, soft-target loss, grad clip, LR schedule, the identity crop warp): goal >= 0.95.
- ich, the paper's augmentation: RandomResizedCrop, ColorJitter, RandAugment(2, 9/31), RandomErasing, MixUp 0.2 /
  CutMix 1.0. Its ratio to plain is what the augmentation costs on top: information only.
A figure is the median over rounds of the per-round ratio (each ich epoch against the plain epoch beside it), in
images per CPU second of this process on a CPU (all its threads, the prefetch thread included: wall time on a
shared machine mostly measures the other processes) and per wall second on a GPU; the wall ratio is printed beside
it. Absolute images/s are information only: they differ threefold between VMs for the same code.

Importable: `measure(...) -> dict` returns the figures; `figures(result)` turns them into
(figure, measured, goal) rows for bench/run_all.py, and `main()` prints them as `figure | measured | goal`.

The digits are ingested at 32 px once into $ICH_HOME/bench/digits-32 when ICH_HOME is set (reused by later
runs), else into a temporary folder removed afterwards.

Note: on a 2-core machine that is busy with other work, torch's default of 2 intra-op threads can run
several times slower than 1 thread (the two threads wait on each other); compare with --threads 1.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Runnable as `python bench/bare_loop.py` from the repository root without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ich.data import ICHDataset, load_dataset  # noqa: E402
from ich.models import create_model  # noqa: E402
from ich.train import TrainConfig, Trainer  # noqa: E402

# Goals: ratios measured side by side, which hold on any machine (an absolute img/s does not: the same code ran at
# 550-800 img/s on one VM and ~1,800 on another). The accuracy goal is for 10 epochs of the paper's augmentation on
# 8x8 digits upscaled to 32 px (chance is 0.10); a lighter augmentation reaches 0.95 in 6 epochs (tests/test_train.py).
GOAL_LOOP_OVER_PLAIN = 0.95
GOAL_DATA_WAIT_SHARE = 0.05
GOAL_VAL_ACCURACY = 0.70

# Every augmentation of TrainConfig at zero: what is left is the loop itself.
NO_AUGMENT = dict(rand_augment_n=0, color_jitter=0.0, color_jitter_hue=0.0, random_erasing=0.0, mixup=0.0,
                  cutmix=0.0, hflip=0.0, scale_min=1.0)
# The paper's augmentation: TrainConfig's defaults (crop, ColorJitter 0.4, RandAugment(2, 9/31), RandomErasing 0.2)
# plus MixUp 0.2 / CutMix 1.0. standard_config() turns the flip off (digits); a flip costs nothing (a sign in the warp).
PAPER_AUGMENT = dict(mixup=0.2, cutmix=1.0)

# The plain loop's normalization, written out (ImageNet's, the dataset default the Trainer uses too).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def standard_config(**over) -> TrainConfig:
    """The standard CPU recipe: the paper's augmentation (minus flips: digits are not mirror-symmetric),
    AdamW lr 2e-3, cosine to zero, batch 64 at 32 px."""
    d = dict(model="coatnet_tiny_ich", img_size=32, batch_size=64, lr=2e-3, hflip=0.0, schedule="cosine")
    d.update(over)
    return TrainConfig(**d)


class PlainLoop:
    """The reference: a plain PyTorch training loop of the same model, batch size and uint8 data. No augmentation,
    no prefetch thread, no MixUp/CutMix, no grad clip, no schedule; the same device, precision and memory format
    as the Trainer it is compared with."""

    def __init__(self, cfg: TrainConfig, data: ICHDataset, trainer: Trainer):
        self.cfg, self.device = cfg, trainer.device
        self.amp_dtype, self.channels_last = trainer.amp_dtype, trainer.channels_last
        self.images, self.labels = data.splits["train"].images, data.splits["train"].labels
        torch.manual_seed(cfg.init_seed)
        self.model = create_model(cfg.model, data.num_classes, cfg.img_size).to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        self.rng = np.random.default_rng(cfg.seed)

    def train_epoch(self) -> int:
        """One pass over train in batches of cfg.batch_size (the last partial batch dropped, like the Trainer);
        returns the number of images seen."""
        bs, size = self.cfg.batch_size, self.cfg.img_size
        self.model.train()
        order = self.rng.permutation(len(self.labels))
        total_loss, seen = torch.zeros((), device=self.device), 0
        for i in range(0, max(len(order) - bs, 0) + 1, bs):
            idx = order[i:i + bs]
            x = torch.from_numpy(self.images[idx]).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = (x - self.mean) / self.std
            # The Trainer's memory format: the permute above leaves channels-last strides, which alone changes the
            # tiny CoAtNet's CPU step time by ~25% (the Trainer's crop warp returns a contiguous NCHW batch).
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            y = torch.from_numpy(self.labels[idx]).to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext():
                logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            total_loss += loss.detach()
            seen += len(idx)
        float(total_loss)  # one device sync per epoch, like the Trainer
        return seen


@contextlib.contextmanager
def digits_dataset(data_dir: str | os.PathLike | None = None):
    """Yield the folder of the digits ingested at 32 px (made on first use)."""
    from ich.demo_data import write_digits
    from ich.ingest import IngestError, ingest, load_manifest

    def make(root: Path) -> Path:
        ds = root / "digits-32"
        try:
            if load_manifest(ds)["image_size"] == 32:
                return ds
        except IngestError:
            pass
        images = root / "digits-images"
        if not images.exists():
            write_digits(images)
        ingest(images, ds, size=32, workers=min(2, os.cpu_count() or 1), overwrite=True, progress=False)
        return ds

    if data_dir is not None:
        yield Path(data_dir)
    elif os.environ.get("ICH_HOME"):
        root = Path(os.environ["ICH_HOME"]).expanduser() / "bench"
        root.mkdir(parents=True, exist_ok=True)
        yield make(root)
    else:
        with tempfile.TemporaryDirectory(prefix="ich-bench-") as tmp:
            yield make(Path(tmp))


@contextlib.contextmanager
def torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def measure(data: str | os.PathLike | ICHDataset | None = None, *, warmup_epochs: int = 1, epochs: int = 5,
            accuracy: bool = False, accuracy_epochs: int = 10, threads: int | None = None, seed: int = 0,
            **config) -> dict:
    """Images/s of the plain loop and of Trainer.train_epoch without and with the paper's augmentation, one epoch
    each per round, `warmup_epochs` rounds then `epochs` measured rounds; with `accuracy`, val top-1 after
    `accuracy_epochs` of the standard recipe. `config` overrides standard_config() for all three loops."""
    with contextlib.ExitStack() as stack:
        if not isinstance(data, ICHDataset):
            data = load_dataset(stack.enter_context(digits_dataset(data)))
        n_threads = stack.enter_context(torch_threads(threads))
        rounds = warmup_epochs + epochs
        # A cosine as long as the run: the learning rate changes, the work per step does not.
        cfg_off = standard_config(epochs=rounds, seed=seed, **{**config, **NO_AUGMENT})
        cfg_paper = standard_config(epochs=rounds, seed=seed, **{**PAPER_AUGMENT, **config})
        ich_off, ich_paper = Trainer(cfg_off, data), Trainer(cfg_paper, data)
        plain = PlainLoop(cfg_off, data, ich_off)
        loops = {"plain": plain.train_epoch, "ich_off": ich_off.train_epoch, "ich_paper": ich_paper.train_epoch}
        ips = {k: [] for k in loops}  # images per wall second
        cpu_ips = {k: [] for k in loops}  # images per CPU second of this process (all its threads)
        wait: dict[str, list[float]] = {"ich_off": [], "ich_paper": []}
        for r in range(rounds):
            for name, epoch in loops.items():
                # Both clocks from outside, the same for every loop (the Trainer's own starts after its batch order).
                t0, c0 = time.perf_counter(), time.process_time()
                m = epoch()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                seen = m if isinstance(m, int) else round(m["images_per_s"] * m["epoch_time_s"])
                if r >= warmup_epochs:
                    ips[name].append(seen / wall)
                    cpu_ips[name].append(seen / cpu)
                    if name in wait:
                        wait[name].append(m["data_wait_share"])

        def paired(a: str, per: dict) -> float:  # each ich epoch over the plain epoch of the same round
            return statistics.median(x / y for x, y in zip(per[a], per["plain"]))

        on_cpu = ich_off.device.type == "cpu"
        out = {
            "model": cfg_off.model, "img_size": cfg_off.img_size, "batch_size": cfg_off.batch_size,
            "device": str(ich_off.device), "threads": n_threads, "train_images": len(data.splits["train"]),
            "epochs": epochs, "images_per_s_epochs": ips, "cpu_images_per_s_epochs": cpu_ips,
            "images_per_s": {k: statistics.median(v) for k, v in ips.items()},
            "cpu_images_per_s": {k: statistics.median(v) for k, v in cpu_ips.items()},
            # The figure's clock: on a CPU, CPU time (wall time on a shared machine mostly measures the other
            # processes); on a GPU, wall time (the host's CPU time is not the work).
            "clock": "cpu" if on_cpu else "wall",
            "off_over_plain": paired("ich_off", cpu_ips if on_cpu else ips),
            "paper_over_plain": paired("ich_paper", cpu_ips if on_cpu else ips),
            "off_over_plain_wall": paired("ich_off", ips), "paper_over_plain_wall": paired("ich_paper", ips),
            "data_wait_share": {k: statistics.median(v) for k, v in wait.items()},
            "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
        if accuracy:
            cfg = standard_config(epochs=accuracy_epochs, seed=seed, **config)
            trainer = Trainer(cfg, data)
            last = None
            for res in trainer.fit():
                last = res.metrics
            out.update(val_accuracy=last["val_accuracy"], val_macro_f1=last["val_macro_f1"],
                       accuracy_epochs=accuracy_epochs)
    return out


def figures(result: dict) -> list[tuple[str, str, str]]:
    """(figure, measured, goal) rows for a results table."""
    where = f"{result['model']} {result['img_size']}px b{result['batch_size']}, {result['device']}, " \
            f"{result['threads']} thread{'s' * (result['threads'] != 1)}"
    ips, cpu, n = result["images_per_s"], result["cpu_images_per_s"], result["epochs"]

    def measured(ich: str, ratio: str) -> str:
        wall = f"wall {result[ratio + '_wall']:.2f}: {ips[ich]:.0f} / {ips['plain']:.0f} img/s"
        if result["clock"] == "cpu":
            return (f"{result[ratio]:.2f} CPU time ({cpu[ich]:.0f} / {cpu['plain']:.0f} img per CPU s; {wall}; "
                    f"median of {n} interleaved epoch pairs)")
        return f"{result[ratio]:.2f} ({wall}; median of {n} interleaved epoch pairs)"

    wait = result["data_wait_share"]
    rows = [
        (f"bare training throughput, ich loop without augmentation / plain PyTorch loop ({where}; the loop's own "
         f"overhead: prefetch, soft-target loss, grad clip, schedule, identity crop warp)",
         measured("ich_off", "off_over_plain"), f">= {GOAL_LOOP_OVER_PLAIN}"),
        (f"bare training throughput, ich loop with the paper's augmentation / plain PyTorch loop ({where}; adds what "
         f"the augmentation costs: crop, ColorJitter, RandAugment, RandomErasing, MixUp/CutMix)",
         measured("ich_paper", "paper_over_plain"), "info (what the augmentation costs)"),
        ("share of step time waiting for data, ich loop without augmentation (least compute to hide the gather)",
         f"{wait['ich_off']:.1%} (with the paper's augmentation {wait['ich_paper']:.1%})", f"< {GOAL_DATA_WAIT_SHARE:.0%}"),
    ]
    if "val_accuracy" in result:
        rows.append((f"digits val top-1 after {result['accuracy_epochs']} epochs (lr 2e-3, cosine, hflip 0)",
                     f"{result['val_accuracy']:.3f}", f">= {GOAL_VAL_ACCURACY:.2f} (chance 0.10)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="an ingested 32 px dataset folder (default: the digits, ingested on first use)")
    p.add_argument("--epochs", type=int, default=5, help="measured rounds, one epoch of each loop (median reported)")
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--accuracy", action="store_true", help="also train 10 epochs and report val top-1")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-thread-compare", action="store_true",
                   help="skip the extra 1-thread measurement made when torch uses several threads")
    a = p.parse_args(argv)
    with digits_dataset(a.data) as folder:
        data = load_dataset(folder)
    runs = [measure(data, warmup_epochs=a.warmup_epochs, epochs=a.epochs, accuracy=a.accuracy, threads=a.threads,
                    batch_size=a.batch_size)]
    if a.threads is None and runs[0]["threads"] > 1 and not a.no_thread_compare:
        runs.append(measure(data, warmup_epochs=a.warmup_epochs, epochs=a.epochs, threads=1,
                            batch_size=a.batch_size))
    print("figure | measured | goal")
    for r in runs:
        for row in figures(r):
            print(" | ".join(row))
    if len(runs) == 2:
        ratio = runs[0]["images_per_s"]["ich_off"] / runs[1]["images_per_s"]["ich_off"]
        print(f"throughput {runs[0]['threads']} threads / 1 thread (ich loop without augmentation) | {ratio:.2f}x | "
              f">= 1.0x (else pin 1 thread)")
    for r in runs:
        per = "; ".join(f"{k} {', '.join(f'{v:.0f}' for v in r['images_per_s_epochs'][k])} "
                        f"(CPU {', '.join(f'{v:.0f}' for v in r['cpu_images_per_s_epochs'][k])})"
                        for k in r["images_per_s_epochs"])
        print(f"({r['threads']} thread(s), img/s per measured epoch, information only: {per}; "
              f"{r['train_images']} train images; load average {r['load_avg']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
