"""How soups registered before 2026-12-08 were logged: `log_pyfunc`, a second LoggedModel holding the same weights as
the soup's record (a Models-from-Code pyfunc model, written by soups/serve/pyfunc_folder.py's pins; the sha256 of its
weights, metadata and code as tags), signed as stored by `sign_logged`. Such versions are still verified and served
(soups/serve/verify.py), and the tests plant models of this shape. A soup is registered as its own record now
(soups/champion.py); `ich serve` writes its pyfunc folder locally (soups/serve/pyfunc_folder.py).
"""
from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from soups.serve.model import ARTIFACT, CODE_FILE, signature
from soups.serve.pyfunc_folder import classes_of, pip_requirements
from soups.serve.verify import META_FILE, TAG_WEIGHTS_SHA256, WEIGHTS_FILE, _download_model, _sha256
from soups.store.tags import KIND_SOUP_PYFUNC, TAG_CODE_SHA256, TAG_META_SHA256


def example_image(pixels: np.ndarray) -> str:
    """A (S, S, 3) uint8 image as base64 PNG: the input example of the REST API."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def recorded_hashes(ckpt_dir: str | Path) -> dict[str, str]:
    """The tags that pin a soup model's content at logging time: weights, metadata, code."""
    ckpt_dir = Path(ckpt_dir)
    return {TAG_WEIGHTS_SHA256: _sha256(ckpt_dir / WEIGHTS_FILE), TAG_META_SHA256: _sha256(ckpt_dir / META_FILE),
            TAG_CODE_SHA256: _sha256(CODE_FILE)}


def log_pyfunc(ckpt_dir: str | Path, *, name: str, tags: dict[str, str] | None = None,
               example_pixels: np.ndarray | None = None):
    """Log the soup at ckpt_dir as a Models-from-Code pyfunc model of the active run (no pickle; the sha256
    of its weights, metadata and code as tags of the LoggedModel), signed (sign_logged); returns MLflow's
    ModelInfo."""
    example = None if example_pixels is None else pd.DataFrame({"image": [example_image(example_pixels)]})
    info = mlflow.pyfunc.log_model(
        name=name, python_model=str(CODE_FILE), artifacts={ARTIFACT: str(ckpt_dir)},
        signature=signature(), input_example=example, pip_requirements=pip_requirements(),
        tags={**{k: str(v) for k, v in (tags or {}).items()}, **recorded_hashes(ckpt_dir)},
        model_type=KIND_SOUP_PYFUNC, metadata={"classes": classes_of(ckpt_dir)})
    sign_logged(info.model_id)
    return info


def sign_logged(model_id: str) -> dict[str, str]:
    """Sign a logged soup pyfunc model as it is stored: MLflow writes the folder (MLmodel with the model id, the
    python_model file, requirements.txt, conda.yaml, python_env.yaml, the input example, the checkpoint) and uploads
    it inside log_model, so the manifest is taken from one download of exactly what a verifier will download."""
    from mlflow import MlflowClient

    from soups.store import retry, signing

    client = MlflowClient()
    with tempfile.TemporaryDirectory(prefix="ich-sign-") as tmp:
        local = _download_model(model_id, Path(tmp) / "model", f"model {model_id}")
        tags = retry.call_with_retry(f"get model {model_id}", client.get_logged_model, model_id).tags or {}
        signature_tags = signing.sign(model_id, tags, local)
    retry.call_with_retry(f"sign model {model_id}", client.set_logged_model_tags, model_id, signature_tags)
    return signature_tags
