"""The pyfunc model folder of a soup, written on the machine that serves it: `save_pyfunc` puts a Models-from-Code
pyfunc model around a verified checkpoint folder (its `python_model` is the installed soups/serve/model.py, its
weights the checkpoint folder artifact; nothing in it is a pickle; its environment pinned from this one by
`pip_requirements`). `ich serve` builds it from a registered soup record (soups/serve/verify.py), so no MLmodel,
code or environment file of a served soup comes from the tracking server.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from soups.serve.model import ARTIFACT, CODE_FILE, signature


def pip_requirements() -> list[str]:
    """Pinned from this environment: skips MLflow's slow requirement inference (a subprocess)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "timm", "safetensors", "pillow", "numpy", "pandas", "pyarrow", "tqdm", "mlflow"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def save_pyfunc(ckpt_dir: str | Path, path: str | Path) -> Path:
    """The pyfunc model folder of the soup at ckpt_dir, written at path (which must not exist); returns path."""
    import warnings

    import mlflow.pyfunc
    with warnings.catch_warnings(), no_progress_bar():  # the signature is given: MLflow's input-example advice is noise
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        mlflow.pyfunc.save_model(path=str(path), python_model=str(CODE_FILE), artifacts={ARTIFACT: str(ckpt_dir)},
                                 signature=signature(), pip_requirements=pip_requirements(),
                                 metadata={"classes": classes_of(ckpt_dir)})
    return Path(path)


@contextmanager
def no_progress_bar():
    """MLflow's artifact progress bar off while copying (downloads, save_model's artifact copy): refusals stay one
    line on stderr and `ich serve` prints only its own lines."""
    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet


def classes_of(ckpt_dir: str | Path) -> list[str]:
    from ich.checkpoint import read_meta
    return list(read_meta(ckpt_dir).class_names)
