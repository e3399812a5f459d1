"""Bare training throughput of the tiny CoAtNet on the embedded digits (no Ray, no MLflow).

    python bench/bare_loop.py                 # images/s and data-wait share, 1 warm-up + 3 measured epochs
    python bench/bare_loop.py --accuracy      # also val top-1 after 10 epochs of the standard recipe
    python bench/bare_loop.py --threads 1     # pin torch's intra-op threads (see the note below)

With torch's default of several threads, main() also measures 1 thread and prints the ratio.

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
from pathlib import Path

# Runnable as `python bench/bare_loop.py` from the repository root without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ich.data import ICHDataset, load_dataset  # noqa: E402
from ich.train import TrainConfig, Trainer  # noqa: E402

# Goals: the design's measured figure for the tiny CoAtNet on 2 cores, and what "the data path is not the
# bottleneck" means. The accuracy goal is for 10 epochs of the paper's augmentation on 8x8 digits upscaled to
# 32 px (chance is 0.10); a lighter augmentation reaches 0.95 in 6 epochs (tests/test_train.py).
GOAL_IMAGES_PER_S = 1800.0
GOAL_DATA_WAIT_SHARE = 0.05
GOAL_VAL_ACCURACY = 0.70


def standard_config(**over) -> TrainConfig:
    """The standard CPU recipe: the paper's augmentation (minus flips: digits are not mirror-symmetric),
    AdamW lr 2e-3, cosine to zero, batch 64 at 32 px."""
    d = dict(model="coatnet_tiny_ich", img_size=32, batch_size=64, lr=2e-3, hflip=0.0, schedule="cosine")
    d.update(over)
    return TrainConfig(**d)


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


def measure(data: str | os.PathLike | ICHDataset | None = None, *, warmup_epochs: int = 1, epochs: int = 3,
            accuracy: bool = False, accuracy_epochs: int = 10, threads: int | None = None, seed: int = 0,
            **config) -> dict:
    """Throughput of Trainer.train_epoch (median over `epochs` after `warmup_epochs`) and, with `accuracy`,
    val top-1 after `accuracy_epochs` of the standard recipe. `config` overrides standard_config()."""
    with contextlib.ExitStack() as stack:
        if not isinstance(data, ICHDataset):
            data = load_dataset(stack.enter_context(digits_dataset(data)))
        n_threads = stack.enter_context(torch_threads(threads))
        # Throughput: a long cosine so the learning rate (and the work per step) is the same in every epoch.
        cfg = standard_config(epochs=warmup_epochs + epochs, seed=seed, **config)
        trainer = Trainer(cfg, data)
        per_epoch = [trainer.train_epoch() for _ in range(warmup_epochs + epochs)][warmup_epochs:]
        out = {
            "model": cfg.model, "img_size": cfg.img_size, "batch_size": cfg.batch_size,
            "device": str(trainer.device), "threads": n_threads, "train_images": len(data.splits["train"]),
            "images_per_s": statistics.median(m["images_per_s"] for m in per_epoch),
            "data_wait_share": statistics.median(m["data_wait_share"] for m in per_epoch),
            "epoch_time_s": statistics.median(m["epoch_time_s"] for m in per_epoch),
            "images_per_s_epochs": [m["images_per_s"] for m in per_epoch],
        }
        if accuracy:
            cfg = standard_config(epochs=accuracy_epochs, seed=seed, **config)
            trainer = Trainer(cfg, data)
            last = None
            for r in trainer.fit():
                last = r.metrics
            out.update(val_accuracy=last["val_accuracy"], val_macro_f1=last["val_macro_f1"],
                       accuracy_epochs=accuracy_epochs)
    return out


def figures(result: dict) -> list[tuple[str, str, str]]:
    """(figure, measured, goal) rows for a results table."""
    where = f"{result['model']} {result['img_size']}px b{result['batch_size']}, {result['device']}, " \
            f"{result['threads']} thread{'s' * (result['threads'] != 1)}"
    rows = [
        (f"bare training throughput ({where})", f"{result['images_per_s']:.0f} img/s",
         f">= {GOAL_IMAGES_PER_S:.0f} img/s (design.md, idle 2-core CPU)"),
        ("share of step time waiting for data", f"{result['data_wait_share']:.1%}", f"< {GOAL_DATA_WAIT_SHARE:.0%}"),
    ]
    if "val_accuracy" in result:
        rows.append((f"digits val top-1 after {result['accuracy_epochs']} epochs (lr 2e-3, cosine, hflip 0)",
                     f"{result['val_accuracy']:.3f}", f">= {GOAL_VAL_ACCURACY:.2f} (chance 0.10)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="an ingested 32 px dataset folder (default: the digits, ingested on first use)")
    p.add_argument("--epochs", type=int, default=3, help="measured epochs (median reported)")
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
        ratio = runs[0]["images_per_s"] / runs[1]["images_per_s"]
        print(f"throughput {runs[0]['threads']} threads / 1 thread | {ratio:.2f}x | >= 1.0x (else pin 1 thread)")
    for r in runs:
        print(f"({r['threads']} thread(s), per measured epoch: {', '.join(f'{v:.0f}' for v in r['images_per_s_epochs'])}"
              f" img/s; {r['train_images']} train images, median epoch {r['epoch_time_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
