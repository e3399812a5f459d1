"""Helpers of the serving tests: wait for `ich serve`, and what the trainer's eval path gives for an image."""
from __future__ import annotations

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


def expected_probabilities(ckpt: Path, image: Path) -> np.ndarray:
    """The trainer's eval logits of the image as `ich ingest` would store it, softmaxed (float64)."""
    import torch

    from ich.checkpoint import load_checkpoint
    from ich.models import create_model
    from ich.preprocess import Preprocess, decode_image, transform
    state_dict, meta = load_checkpoint(ckpt)
    pre = Preprocess.from_meta(meta)
    model = create_model(meta.architecture, meta.num_classes, meta.img_size)
    model.load_state_dict(state_dict)
    model.eval()
    stored = decode_image(image.read_bytes(), pre.decode_size, str(image))
    with torch.no_grad():
        logits = model(transform(torch.from_numpy(stored[None].copy()), pre))
    return torch.softmax(logits.double(), dim=1)[0].numpy()
