"""The embedded demo data: scikit-learn's bundled handwritten digits written out as an ImageFolder.

1,797 real 8x8 greyscale images in 10 classes, shipped inside the scikit-learn wheel, so every machine
has them offline. Written as out/<digit>/<index:04d>.png, ready for `ich ingest`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ich.ingest import IngestError


def write_digits(out: str | Path) -> dict[str, int]:
    """Write the digits as greyscale PNGs under `out`; returns the number of images per class ("0".."9")."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IngestError(f"{out}: already exists and is not empty; choose a new folder for the demo digits")
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # values 0..16 -> 0..255

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    counts = {str(c): 0 for c in range(10)}
    try:
        for c in counts:
            (tmp / c).mkdir()
        for index, (img, target) in enumerate(zip(pixels, digits.target)):
            Image.fromarray(img, "L").save(tmp / str(target) / f"{index:04d}.png")
            counts[str(target)] += 1
        if out.exists():
            out.rmdir()  # empty (checked above); a rename onto a folder is not portable
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
