"""Fashion-MNIST at ICH-17 scale, from Debian's `dataset-fashion-mnist` package (installed, never downloaded here).

    apt-get install -y dataset-fashion-mnist      # files under /usr/share/datasets/fashion-mnist
    python -m bench.fashion_mnist OUT_DIR [--seed 0]

ICH-17 has 7,406 photos: a low-resource set. Here: 740 training images per class (7,400 in all, ICH-17's size)
and 74 val images per class drawn without overlap from Fashion-MNIST's 60,000 training images, and 300 test
images per class from its separate 10,000-image test file, all with a fixed seed. The test split is larger than
ICH-17's (741) on purpose: it only reports, and a bigger one makes the study's intervals narrower.

The images are written as a pre-split ImageFolder of greyscale PNGs (`<root>/{train,val,test}/<class>/<n>.png`)
and ingested with `ich ingest` (ich/ingest.py) into a dataset folder like the digits demo's. Used only by
bench/objective_study.py when asked (`--datasets fashion`); never by default and never by the tests.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PACKAGE = "dataset-fashion-mnist"
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST's label order; '/' cannot be part of a folder name.
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class FashionMnistError(RuntimeError):
    """The package's files are missing or malformed; one line naming the file and the fix."""


@dataclass(frozen=True)
class Subsample:
    train_per_class: int = 740
    val_per_class: int = 74
    test_per_class: int = 300
    seed: int = 0
    size: int = 32  # ingest size (28 px images are resized up, as the digits' 8 px are)

    def name(self) -> str:
        return (f"fashion-mnist-{self.train_per_class}-{self.val_per_class}-{self.test_per_class}"
                f"-s{self.seed}-{self.size}px")


def read_idx(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) labels from one pair of IDX files (gzip), checked against their headers."""
    for p in (images_path, labels_path):
        if not p.is_file():
            raise FashionMnistError(f"{p}: missing; install it with `apt-get install -y {PACKAGE}`")
    try:
        with gzip.open(images_path, "rb") as f:
            raw_images = f.read()
        with gzip.open(labels_path, "rb") as f:
            raw_labels = f.read()
    except (OSError, EOFError) as e:
        raise FashionMnistError(f"{images_path.parent}: unreadable IDX file ({e})") from None
    magic_i, n_i, rows, cols = np.frombuffer(raw_images[:16], dtype=">u4")
    magic_l, n_l = np.frombuffer(raw_labels[:8], dtype=">u4")
    if magic_i != 2051 or magic_l != 2049 or n_i != n_l or len(raw_images) != 16 + n_i * rows * cols \
            or len(raw_labels) != 8 + n_l:
        raise FashionMnistError(f"{images_path}: not a matching pair of IDX image/label files")
    images = np.frombuffer(raw_images, dtype=np.uint8, offset=16).reshape(int(n_i), int(rows), int(cols))
    labels = np.frombuffer(raw_labels, dtype=np.uint8, offset=8).astype(np.int64)
    if labels.max() >= len(CLASSES):
        raise FashionMnistError(f"{labels_path}: label {labels.max()} outside 0..{len(CLASSES) - 1}")
    return images, labels


def stratified_pick(labels: np.ndarray, per_class: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint index sets, one per entry of per_class, each holding that many items of every class."""
    out = [[] for _ in per_class]
    for c in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < sum(per_class):
            raise FashionMnistError(f"class {CLASSES[c]}: {len(members)} images, {sum(per_class)} asked for")
        start = 0
        for i, k in enumerate(per_class):
            out[i].append(members[start:start + k])
            start += k
    return [np.sort(np.concatenate(parts)) for parts in out]


def write_imagefolder(out: Path, sub: Subsample, source: Path = DEFAULT_SOURCE) -> dict[str, int]:
    """The subsample as `<out>/{train,val,test}/<class>/<index>.png`; returns images per split."""
    from PIL import Image

    train_x, train_y = read_idx(source / FILES["train"][0], source / FILES["train"][1])
    test_x, test_y = read_idx(source / FILES["t10k"][0], source / FILES["t10k"][1])
    rng = np.random.default_rng(sub.seed)
    train_idx, val_idx = stratified_pick(train_y, [sub.train_per_class, sub.val_per_class], rng)
    (test_idx,) = stratified_pick(test_y, [sub.test_per_class], rng)
    counts = {}
    for split, (x, y, idx, origin) in {"train": (train_x, train_y, train_idx, "train"),
                                       "val": (train_x, train_y, val_idx, "train"),
                                       "test": (test_x, test_y, test_idx, "t10k")}.items():
        for c in CLASSES:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        for i in idx:  # the file name keeps the source file and index: traceable to the package's data
            Image.fromarray(x[i], "L").save(out / split / CLASSES[y[i]] / f"{origin}-{i:05d}.png")
        counts[split] = len(idx)
    return counts


def build_dataset(cache: Path, sub: Subsample = Subsample(), source: Path = DEFAULT_SOURCE) -> Path:
    """The ingested dataset folder (cached under `cache`, built once per subsample): an `ich ingest` output."""
    from ich.ingest import ingest

    ds = cache / sub.name()
    if (ds / "manifest.json").is_file():
        return ds
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fashion-png-", dir=cache) as tmp:
        counts = write_imagefolder(Path(tmp) / "images", sub, source)
        print(f"fashion-mnist subsample {sub.name()}: {counts} PNGs written; ingesting at {sub.size} px", flush=True)
        ingest(Path(tmp) / "images", ds, size=sub.size, seed=sub.seed, workers=min(2, os.cpu_count() or 1),
               progress=False, overwrite=True)
    return ds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="cache folder; the dataset goes to OUT/<subsample name>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default=str(DEFAULT_SOURCE), help=f"folder of the {PACKAGE} IDX files")
    a = p.parse_args(argv)
    try:
        ds = build_dataset(Path(a.out), Subsample(seed=a.seed), Path(a.source))
    except FashionMnistError as e:
        print(f"fashion_mnist: error: {e}", file=sys.stderr)
        return 2
    print(ds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
