"""Serving a soup: an MLflow pyfunc model that classifies image files or base64-encoded images.

The weights travel as a checkpoint folder artifact (model.safetensors + checkpoint.json, never a
pickle); MLflow cloudpickles only the small SoupClassifier class below, which imports `ich` and
`soups` (logged with the model as code_paths, and installed anyway in this project's environment).

Input: a pandas DataFrame with a `path` column (image files) or an `image` column (base64 bytes, for
REST calls). Each image is decoded like `ich ingest` does it (EXIF orientation, any mode to RGB,
shorter side resized to the dataset's stored size, center crop), then gets the eval preprocessing
of training (center crop eval_crop_pct, resize to img_size, ImageNet normalization).
Output: one row per image with `class` (name), `confidence` and `probabilities` (class order).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

ARTIFACT = "soup"  # name of the checkpoint folder among the pyfunc model's artifacts
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
CODE_PATHS = [str(PACKAGE_ROOT / "ich"), str(PACKAGE_ROOT / "soups")]


def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """Image bytes -> (size, size, 3) uint8, the way `ich ingest` stores a photo."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ich.ingest import _resize_crop, _to_rgb

    try:
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG":
            im.draft(None, (size, size))  # ingest decodes JPEGs with the same DCT-domain downscale
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"{where}: not a readable image ({type(e).__name__})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # unreadable EXIF: keep the pixels as stored, like ingest
    return np.asarray(_resize_crop(_to_rgb(im), size), dtype=np.uint8)


def _image_bytes(row: pd.Series, i: int) -> tuple[bytes, str]:
    path = row.get("path")
    if isinstance(path, str) and path:
        try:
            return Path(path).read_bytes(), path
        except OSError as e:
            raise ValueError(f"row {i}: cannot read {path} ({e.strerror or type(e).__name__})") from None
    image = row.get("image")
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), f"row {i}"
    if isinstance(image, str) and image:
        try:
            return base64.b64decode(image, validate=True), f"row {i}"
        except (binascii.Error, ValueError):
            raise ValueError(f"row {i}: column 'image' is not valid base64") from None
    raise ValueError(f"row {i}: needs a 'path' (image file) or an 'image' (base64 bytes) value")


class SoupClassifier(mlflow.pyfunc.PythonModel):
    """Loads the soup checkpoint folder from the model's artifacts and classifies images."""
    _skip_type_hint_validation = True  # the explicit signature() checks inputs; no type-hint wrapper


    def load_context(self, context) -> None:
        import torch

        from ich.checkpoint import load_checkpoint
        from ich.data import AugmentConfig
        from ich.models import create_model

        state_dict, meta = load_checkpoint(context.artifacts[ARTIFACT])  # safetensors only
        self.classes = list(meta.class_names)
        self.image_size = int(meta.extra.get("image_size", meta.img_size))  # the dataset's stored size
        self.aug = AugmentConfig(img_size=meta.img_size, eval_crop_pct=float(meta.extra.get("eval_crop_pct", 1.0)))
        self.model = create_model(meta.architecture, meta.num_classes, meta.img_size)
        self.model.load_state_dict(state_dict)
        self.model.eval()
        self.torch = torch

    def predict(self, context, model_input, params=None):
        from ich.data import eval_transform

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "path" not in frame.columns and "image" not in frame.columns:
            raise ValueError(f"input needs a 'path' or an 'image' column, got {list(frame.columns)}")
        pixels = []
        for i, (_, row) in enumerate(frame.iterrows()):
            row = row.where(row.notna(), None)  # a missing cell reads as None, not NaN
            data, where = _image_bytes(row, i)
            pixels.append(decode_image(data, self.image_size, where))
        probs = np.zeros((0, len(self.classes)))
        if pixels:
            with self.torch.no_grad():
                x = eval_transform(self.torch.from_numpy(np.stack(pixels)), self.aug)
                probs = self.torch.softmax(self.model(x).float(), dim=1).numpy().astype(np.float64)
        top = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
        return pd.DataFrame({
            "class": [self.classes[k] for k in top],
            "confidence": [float(probs[i, k]) for i, k in enumerate(top)],
            "probabilities": [row.tolist() for row in probs],
        })


def signature():
    """Both input columns optional (one per row is enough); list-of-floats probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec(DataType.string, "path", required=False),
                     ColSpec(DataType.string, "image", required=False)])
    outputs = Schema([ColSpec(DataType.string, "class"), ColSpec(DataType.double, "confidence"),
                      ColSpec(Array(DataType.double), "probabilities")])
    return ModelSignature(inputs=inputs, outputs=outputs)


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


def example_image(pixels: np.ndarray) -> str:
    """A (S, S, 3) uint8 image as base64 PNG: the input example of the REST API."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def log_pyfunc(ckpt_dir: str | Path, *, name: str, tags: dict[str, str] | None = None,
               example_pixels: np.ndarray | None = None):
    """Log the soup at ckpt_dir as a pyfunc model of the active run; returns MLflow's ModelInfo."""
    example = None if example_pixels is None else pd.DataFrame({"image": [example_image(example_pixels)]})
    with _quiet_logging():
        return mlflow.pyfunc.log_model(
            name=name, python_model=SoupClassifier(), artifacts={ARTIFACT: str(ckpt_dir)}, code_paths=CODE_PATHS,
            signature=signature(), input_example=example, pip_requirements=pip_requirements(),
            tags={k: str(v) for k, v in (tags or {}).items()}, model_type="soup-pyfunc",
            metadata={"classes": _classes(ckpt_dir)})


@contextlib.contextmanager
def _quiet_logging():
    """MLflow's warning about pickled python_model objects is noise here: the pickled object is our own
    small class, the weights travel as safetensors."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _classes(ckpt_dir: str | Path) -> list[str]:
    from ich.checkpoint import read_meta
    return list(read_meta(ckpt_dir).class_names)


# ---------------------------------------------------------------------------------------------- safe loading

# What a pickled SoupClassifier may reference. Anything else in python_model.pkl means the model is not ours.
ALLOWED_PICKLE_GLOBALS = {("soups.pyfunc", "SoupClassifier"), ("mlflow.models.signature", "_TypeHints"),
                          ("copyreg", "_reconstructor"), ("builtins", "object")}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}


class UntrustedModel(ValueError):
    """A pyfunc model that is not one of this project's soups (or was altered); never loaded."""


def pickle_globals(data: bytes, where: str) -> set[tuple[str, str]]:
    """The (module, name) pairs a pickle would import, read with pickletools: nothing is executed."""
    import pickletools
    found, recent = set(), []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "MEMOIZE":
                continue
            if op.name in ("GLOBAL", "INST"):
                found.add(tuple(arg.split(" ", 1)))
            elif op.name == "STACK_GLOBAL":
                if len(recent) < 2 or not all(o in _STRING_OPS for o, _ in recent[-2:]):
                    raise UntrustedModel(f"{where}: pickle imports a name built indirectly; refusing")
                found.add((recent[-2][1], recent[-1][1]))
            recent.append((op.name, arg))
    except ValueError as e:
        if isinstance(e, UntrustedModel):
            raise
        raise UntrustedModel(f"{where}: not a valid pickle ({e})") from None
    return found


def verify_soup_model(local: str | Path) -> None:
    """Check, without unpickling or importing anything from it, that a pyfunc folder is one of our soups:
    the python_function flavour of mlflow.pyfunc.model, a pickle that references only SoupClassifier, and
    bundled code identical to the installed project's."""
    import yaml
    local = Path(local)
    try:
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        flavor = mlmodel["flavors"]["python_function"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise UntrustedModel(f"{local}: not an MLflow pyfunc model (no python_function flavour in MLmodel)") from None
    if flavor.get("loader_module") != "mlflow.pyfunc.model" or not flavor.get("python_model"):
        raise UntrustedModel(f"{local}: pyfunc loader {flavor.get('loader_module')!r} is not a soup's")
    pkl = local / flavor["python_model"]
    names = pickle_globals(pkl.read_bytes(), str(pkl))
    if names - ALLOWED_PICKLE_GLOBALS:
        raise UntrustedModel(f"{pkl}: references {sorted(names - ALLOWED_PICKLE_GLOBALS)[0]}; not a soup, refusing")
    code = local / flavor.get("code", "code") if flavor.get("code") else None
    if code is not None and code.is_dir():
        for f in code.rglob("*"):
            if f.is_file() and f.suffix in (".py", ".pyc", ".so", ".pth"):
                mine = PACKAGE_ROOT / f.relative_to(code)
                if f.suffix != ".py" or not mine.is_file() or mine.read_bytes() != f.read_bytes():
                    raise UntrustedModel(f"{f}: bundled code differs from the installed project; refusing")


def load_soup_model(uri: str):
    """Download (if remote), verify, then load a soup's pyfunc model."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    local = Path(uri)
    if not local.is_dir():
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        except (MlflowException, OSError) as e:
            raise UntrustedModel(f"{uri}: cannot download model ({str(e).splitlines()[0]})") from None
    verify_soup_model(local)
    return mlflow.pyfunc.load_model(str(local))  # security: verified above: our class, our code, safetensors weights
