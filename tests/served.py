"""Helpers of the serving tests: wait for `ich serve`, and what the trainer's eval path gives for an image.

The reference below is written out with PIL and torchvision from the numbers the checkpoint records (its
checkpoint.json read as plain JSON), not with ich.preprocess: the served model runs `decode_image` and
`transform`, so a reference built on them would agree with any mistake they make."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import requests


def wait_served(url: str, server: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Until `ich serve` answers /ping; fails with the end of its log if it exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline and server.poll() is None:
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]


def stored_image(image: Path, size: int):
    """The image as `ich ingest` stores it, with PIL alone: EXIF orientation, RGB, shorter side to `size`
    (bicubic, PIL's reducing_gap 3), then the centre size x size square (offsets rounded down).

    decode_image is part of what the served model runs (it decodes request bytes with it), so it is written
    out here too. Only PNGs: ingest's DCT-domain draft for JPEGs is not written out, so a JPEG is refused."""
    from PIL import Image, ImageOps
    im = Image.open(image)
    assert im.format == "PNG", f"{image}: the reference decodes PNGs only, not {im.format}"
    im = ImageOps.exif_transpose(im).convert("RGB")  # the test images are L or RGB: no alpha to composite
    w, h = im.size
    nw, nh = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def reference_input(image: Path, meta: dict, **wrong):
    """(1, 3, N, N) network input by the recorded contract (ich/preprocess.py's docstring): centre crop crop_pct of
    the stored image (side round(S * crop_pct), offset rounded down), resize to img_size (antialiased, the recorded
    interpolation; bicubic clipped to [0, 1] as PIL's is), normalize by mean/std. `wrong` replaces recorded
    values (mean=..., crop_pct=...): the controls that a mistake shows."""
    import torch
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    pre = {**meta["preprocess"], **wrong}
    img_size = meta["img_size"]
    s = pre["stored_size"] or img_size
    x = TF.to_tensor(stored_image(image, s))  # (3, s, s) float in [0, 1]
    crop = max(1, round(s * pre["crop_pct"]))
    x = TF.crop(x, (s - crop) // 2, (s - crop) // 2, crop, crop)
    if crop != img_size:
        x = TF.resize(x, [img_size, img_size], interpolation=InterpolationMode(pre["interpolation"]), antialias=True)
        if pre["interpolation"] == "bicubic":
            x = x.clamp(0.0, 1.0)
    return TF.normalize(x, pre["mean"], pre["std"])[None].to(torch.float32)


def expected_probabilities(ckpt: Path, image: Path, **wrong) -> np.ndarray:
    """The trainer's eval logits of the image as `ich ingest` would store it, softmaxed (float64); the network is
    the checkpoint's weights in the project's model factory (what is compared is everything around it)."""
    import torch
    from safetensors.torch import load_file

    from ich.models import create_model
    meta = json.loads((ckpt / "checkpoint.json").read_text(encoding="utf-8"))
    model = create_model(meta["architecture"], meta["num_classes"], meta["img_size"])
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    model.eval()
    with torch.no_grad():
        logits = model(reference_input(image, meta, **wrong))
    return torch.softmax(logits.double(), dim=1)[0].numpy()
