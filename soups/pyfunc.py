"""Serving a soup: an MLflow pyfunc model that classifies base64-encoded images (or, when allowed, files).

The model is logged as MLflow Models-from-Code: its `python_model` is this project's own module file
soups/served_model.py, its weights are a checkpoint folder artifact (model.safetensors + checkpoint.json).
Nothing in it is a pickle. The sha256 of the weights and of checkpoint.json are recorded as tags of the
LoggedModel at logging time. Before `ich predict` or `ich serve` loads a soup pyfunc model,
`verify_soup_model` checks the whole MLmodel against an allowlist, every file of the folder, the code file
against the installed one and the weights against the recorded sha256; `ich predict` then builds
SoupClassifier itself (nothing from the model folder is imported), `ich serve` hands the verified copy to
MLflow's scoring server (soups/serving_app.py). (The champion rule reads the soup's own checkpoint record, sha256-verified by
soups.registry, not this model.)

Input: a pandas DataFrame with an `image` column (base64 bytes, for REST calls) or a `path` column (image
files). The `path` column is refused unless the server was given a root folder (ICH_SERVE_PATH_ROOT or
`ich serve --path-root`): then only regular files under that root, up to the size cap, are read. Each
image is checked from its header first (pixel count, aspect ratio; decompression-bomb warnings are
errors), then decoded like `ich ingest` stores it and preprocessed like training evaluates it.
Output: one row per image with `class` (name), `confidence` and `probabilities` (class order).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
import numpy as np
import pandas as pd

from ich.checkpoint import CheckpointError
from soups.tags import TAG_CODE_SHA256, TAG_META_SHA256, TAG_SHA256  # noqa: F401 (the first two: used below)

ARTIFACT = "soup"  # name of the checkpoint folder among the pyfunc model's artifacts
CODE_FILE = Path(__file__).resolve().with_name("served_model.py")  # the model's python_model (Models-from-Code)
WEIGHTS_FILE, META_FILE = "model.safetensors", "checkpoint.json"
TAG_WEIGHTS_SHA256 = TAG_SHA256  # the same tag the registry records on checkpoints

# Serving inputs: bounded before anything is decoded or resized.
PATH_ROOT_ENV = "ICH_SERVE_PATH_ROOT"  # unset: the `path` column is refused
MAX_BYTES_ENV = "ICH_SERVE_MAX_BYTES"
DEFAULT_MAX_BYTES = 20 << 20  # one image file or decoded base64 value
MAX_PIXELS = 40_000_000  # width x height from the header; a 40 MP RGB image is 120 MB once decoded
# Per request: rows, and the sum over rows of bytes read and of header pixels (one path named 100 times is read
# 100 times). Checked for every row before any is decoded, so a refused request costs header reads only.
MAX_ROWS_ENV, DEFAULT_MAX_ROWS = "ICH_SERVE_MAX_ROWS", 256
MAX_REQUEST_BYTES_ENV, DEFAULT_MAX_REQUEST_BYTES = "ICH_SERVE_MAX_REQUEST_BYTES", 64 << 20
MAX_REQUEST_PIXELS_ENV, DEFAULT_MAX_REQUEST_PIXELS = "ICH_SERVE_MAX_REQUEST_PIXELS", 100_000_000
MAX_ASPECT_RATIO = 20.0  # longer side / shorter side; a 100000x1 image would ask for a ~24 GiB resize


# ---------------------------------------------------------------------------------------------- inputs

class RequestRefused(ValueError):
    """A request the served model refuses (one line naming the row or the cap). The scoring server answers an
    MlflowException with its message alone (400); any other exception would carry a stack trace to the client."""

    def as_mlflow(self) -> "RefusedByServer":
        return RefusedByServer(str(self))


class RefusedByServer(MlflowException, ValueError):
    """What predict raises for a refused request: a 400 for the scoring server, a ValueError for in-process
    callers (`ich predict` prints its one line)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _env_cap(environ, name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    try:
        cap = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r}: not a whole number") from None
    if cap < 1:
        raise ValueError(f"{name}={raw!r}: must be at least 1")
    return cap


@dataclass(frozen=True)
class InputPolicy:
    """What a served model may read: `path` values only under path_root (None: never), at most max_bytes per
    image; per request at most max_rows rows, max_request_bytes bytes and max_request_pixels header pixels."""
    path_root: Path | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_rows: int = DEFAULT_MAX_ROWS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS

    @classmethod
    def from_env(cls, environ=None) -> "InputPolicy":
        environ = os.environ if environ is None else environ
        caps = dict(max_bytes=_env_cap(environ, MAX_BYTES_ENV, DEFAULT_MAX_BYTES),
                    max_rows=_env_cap(environ, MAX_ROWS_ENV, DEFAULT_MAX_ROWS),
                    max_request_bytes=_env_cap(environ, MAX_REQUEST_BYTES_ENV, DEFAULT_MAX_REQUEST_BYTES),
                    max_request_pixels=_env_cap(environ, MAX_REQUEST_PIXELS_ENV, DEFAULT_MAX_REQUEST_PIXELS))
        raw_root = environ.get(PATH_ROOT_ENV, "").strip()
        if not raw_root:
            return cls(None, **caps)
        root = Path(os.path.realpath(raw_root))
        if not root.is_dir():
            raise ValueError(f"{PATH_ROOT_ENV}={raw_root!r}: not a folder")
        return cls(root, **caps)


def _inside(path: str, root: Path) -> bool:
    return os.path.commonpath([path, str(root)]) == str(root)


def read_confined(path: str, policy: InputPolicy, where: str) -> bytes:
    """The bytes of a regular file under policy.path_root, at most policy.max_bytes; anything else refused
    before it is opened (FIFOs, devices such as /dev/zero, symlinks that leave the root, oversized files)."""
    if policy.path_root is None:
        raise ValueError(f"{where}: the 'path' column is off on this server; send the image as base64 in "
                         f"'image' (or start the server with --path-root / {PATH_ROOT_ENV})")
    root = policy.path_root
    real = os.path.realpath(root / path)  # an absolute path stays as it is; symlinks resolved
    if not _inside(real, root):
        raise ValueError(f"{where}: {path} is outside the allowed root {root}")
    try:
        st = os.stat(real)
    except OSError as e:
        raise ValueError(f"{where}: cannot read {path} ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{where}: {path} is not a regular file")
    if st.st_size > policy.max_bytes:
        raise ValueError(f"{where}: {path} is {st.st_size} bytes, over the {policy.max_bytes}-byte cap")
    try:  # O_NONBLOCK: a FIFO swapped in after the stat cannot block the open
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{where}: cannot read {path} ({e.strerror or type(e).__name__})") from None
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else real
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not _inside(opened, root):
            raise ValueError(f"{where}: {path} changed while being opened; refusing")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(policy.max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > policy.max_bytes:
        raise ValueError(f"{where}: {path} is over the {policy.max_bytes}-byte cap")
    return data


def check_image_header(data: bytes, where: str) -> int:
    """Refuse, from the header alone, images whose decode or resize would be unbounded: decompression-bomb
    warnings are errors, and pixel count and aspect ratio are capped before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{where}: decompression bomb (over Pillow's pixel limit); refusing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"{where}: not a readable image ({type(e).__name__})") from None
    if w < 1 or h < 1:
        raise ValueError(f"{where}: empty image ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ValueError(f"{where}: {w}x{h} is {w * h} pixels, over the {MAX_PIXELS} limit; refusing")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ValueError(f"{where}: {w}x{h} has an aspect ratio over {MAX_ASPECT_RATIO:g}:1; refusing before resizing")
    return w * h


def request_images(frame: pd.DataFrame, policy: InputPolicy) -> list[tuple[bytes, str]]:
    """A request's rows -> checked image bytes and names, every row and the request's totals within the policy's
    caps before anything is decoded; else RequestRefused naming the row or the cap."""
    if "path" not in frame.columns and "image" not in frame.columns:
        raise RequestRefused(f"input needs a 'path' or an 'image' column, got {list(frame.columns)}")
    if len(frame) > policy.max_rows:
        raise RequestRefused(f"{len(frame)} rows, over the {policy.max_rows}-row cap per request ({MAX_ROWS_ENV})")
    images, total_bytes, total_pixels = [], 0, 0
    for i, (_, row) in enumerate(frame.iterrows()):
        row = row.where(row.notna(), None)  # a missing cell reads as None, not NaN
        try:
            data, where, pixels = _image_bytes(row, i, policy)
        except ValueError as e:
            raise RequestRefused(str(e)) from None
        total_bytes, total_pixels = total_bytes + len(data), total_pixels + pixels
        if total_bytes > policy.max_request_bytes:
            raise RequestRefused(f"rows 0-{i}: {total_bytes} bytes, over the {policy.max_request_bytes}-byte cap per "
                                 f"request ({MAX_REQUEST_BYTES_ENV})")
        if total_pixels > policy.max_request_pixels:
            raise RequestRefused(f"rows 0-{i}: {total_pixels} pixels, over the {policy.max_request_pixels}-pixel cap "
                                 f"per request ({MAX_REQUEST_PIXELS_ENV})")
        images.append((data, where))
    return images


def _image_bytes(row: pd.Series, i: int, policy: InputPolicy) -> tuple[bytes, str, int]:
    """One row's image bytes (read under the policy), the name to show in errors and its header's pixel count."""
    path, image = row.get("path"), row.get("image")
    if isinstance(path, str) and path:
        data, where = read_confined(path, policy, f"row {i}"), f"row {i} ({path})"
    elif isinstance(image, (bytes, bytearray)):
        data, where = bytes(image), f"row {i}"
    elif isinstance(image, str) and image:
        if len(image) > 4 * (policy.max_bytes // 3 + 1):
            raise ValueError(f"row {i}: image is {len(image)} characters of base64, over the "
                             f"{policy.max_bytes}-byte cap")
        try:
            data, where = base64.b64decode(image, validate=True), f"row {i}"
        except (binascii.Error, ValueError):
            raise ValueError(f"row {i}: column 'image' is not valid base64") from None
    else:
        raise ValueError(f"row {i}: needs an 'image' (base64 bytes) or a 'path' (image file) value")
    if len(data) > policy.max_bytes:
        raise ValueError(f"{where}: image is {len(data)} bytes, over the {policy.max_bytes}-byte cap")
    return data, where, check_image_header(data, where)


def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """Image bytes -> (size, size, 3) uint8, the way `ich ingest` stores a photo (ich.decode.decode_image)."""
    from ich.decode import decode_image as decode
    return decode(data, size, where)


# ---------------------------------------------------------------------------------------------- the model

class SoupClassifier(mlflow.pyfunc.PythonModel):
    """Loads the soup checkpoint folder from the model's artifacts and classifies images."""
    _skip_type_hint_validation = True  # the explicit signature() checks inputs; no type-hint wrapper

    def load_context(self, context) -> None:
        import torch

        from ich.checkpoint import load_checkpoint
        from ich.models import model_for_checkpoint
        from ich.preprocess import Preprocess

        self.policy = InputPolicy.from_env()  # the server's environment decides what `path` may read
        state_dict, meta = load_checkpoint(context.artifacts[ARTIFACT])  # bounded, typed metadata; safetensors only
        self.classes = list(meta.class_names)
        self.preprocess = Preprocess.from_meta(meta)  # what training evaluated with (ich/preprocess.py)
        self.model = model_for_checkpoint(state_dict, meta, context.artifacts[ARTIFACT])  # misfit: one line
        self.torch = torch

    def predict(self, context, model_input, params=None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            images = request_images(frame, self.policy)
            probs = self.probabilities(images)
        except ValueError as e:  # refused, or an image that fails to decode: a 400 with the one line
            raise RequestRefused(str(e)).as_mlflow() from None
        except Exception as e:  # ours to debug, not the client's to read: the trace goes to the server's log only
            traceback.print_exc()
            raise MlflowException(f"internal error ({type(e).__name__}); see the server's log") from None
        top = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
        return pd.DataFrame({
            "class": [self.classes[k] for k in top],
            "confidence": [float(probs[i, k]) for i, k in enumerate(top)],
            "probabilities": [row.tolist() for row in probs],
        })

    def probabilities(self, images: list[tuple[bytes, str]]) -> np.ndarray:
        """Checked image bytes -> (N, classes) probabilities: the one decode + preprocess + forward step."""
        return self.softmax(self.logits(images))

    def logits(self, images: list[tuple[bytes, str]]) -> np.ndarray:
        """Checked image bytes -> (N, classes) float32 logits (`ich predict --json` prints both from one pass)."""
        from PIL import Image

        from ich.preprocess import image_logits

        if not images:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        with warnings.catch_warnings():  # the header was checked; a decoder that still warns is refused
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return image_logits(self.model, self.preprocess, images)  # ich.preprocess: the one path

    def softmax(self, logits: np.ndarray) -> np.ndarray:
        return self.torch.softmax(self.torch.from_numpy(logits), dim=1).numpy().astype(np.float64)


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


def _sha256(path: str | Path) -> str:
    from ich.checkpoint import sha256_file
    return sha256_file(path)


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
        model_type="soup-pyfunc", metadata={"classes": _classes(ckpt_dir)})
    sign_logged(info.model_id)
    return info


def sign_logged(model_id: str) -> dict[str, str]:
    """Sign a logged soup pyfunc model as it is stored: MLflow writes the folder (MLmodel with the model id, the
    python_model file, requirements.txt, conda.yaml, python_env.yaml, the input example, the checkpoint) and uploads
    it inside log_model, so the manifest is taken from one download of exactly what a verifier will download."""
    from mlflow import MlflowClient

    from soups import registry, signing

    client = MlflowClient()
    with tempfile.TemporaryDirectory(prefix="ich-sign-") as tmp:
        local = _download_model(model_id, Path(tmp) / "model", f"model {model_id}")
        tags = registry.call_with_retry(f"get model {model_id}", client.get_logged_model, model_id).tags or {}
        signature_tags = signing.sign(model_id, tags, local)
    registry.call_with_retry(f"sign model {model_id}", client.set_logged_model_tags, model_id, signature_tags)
    return signature_tags


def _classes(ckpt_dir: str | Path) -> list[str]:
    from ich.checkpoint import read_meta
    return list(read_meta(ckpt_dir).class_names)


# ---------------------------------------------------------------------------------------------- verified loading

class UntrustedModel(CheckpointError):
    """A pyfunc model that is not one of this project's soups (or was altered); never loaded. One line naming
    the model and what is wrong (a CheckpointError, so the CLI shows it as a user error, exit 2)."""


# Every file a soup model folder may hold (the checkpoint folder's name under artifacts/ varies).
TEXT_FILES = ("conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
              "serving_input_example.json", "registered_model_meta")
PYFUNC_KEYS = {"artifacts", "cloudpickle_version", "code", "env", "loader_module", "model_code_path",
               "python_version", "streamable"}
TOP_KEYS = {"artifact_path", "flavors", "is_signature_from_type_hint", "metadata", "mlflow_version", "model_id",
            "model_size_bytes", "model_uuid", "prompts", "run_id", "saved_input_example_info", "signature",
            "type_hint_from_example", "utc_time_created"}
CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"
INPUT_EXAMPLE_INFO = {"artifact_path": "input_example.json", "pandas_orient": "split",
                      "serving_input_path": "serving_input_example.json", "type": "dataframe"}
MAX_MLMODEL_BYTES = 1 << 20
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".bin", ".dill", ".cloudpickle")


def _is_pickle(path: Path) -> bool:
    """A pickle by name or by its first bytes (protocol 2+ starts with PROTO: 0x80, then 2..5)."""
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _check_mlmodel(local: Path, label: str) -> str:
    """The whole MLmodel against the allowlist; returns the checkpoint folder's path inside the model."""
    import json

    import yaml

    def refuse(what: str):
        raise UntrustedModel(f"{label}: MLmodel {what}; refusing")

    path = local / "MLmodel"
    if path.is_symlink() or not path.is_file():
        raise UntrustedModel(f"{label}: no MLmodel file; not an MLflow model, refusing")
    if path.stat().st_size > MAX_MLMODEL_BYTES:
        refuse(f"is over {MAX_MLMODEL_BYTES} bytes")
    try:
        mlmodel = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError):  # RecursionError: nested ~1,000 deep
        refuse("is not valid YAML")
    if not isinstance(mlmodel, dict):
        refuse("is not a mapping")
    if set(mlmodel) - TOP_KEYS:
        refuse(f"has unexpected key {sorted(set(mlmodel) - TOP_KEYS)[0]!r}")
    flavors = mlmodel.get("flavors")
    if not isinstance(flavors, dict) or set(flavors) != {"python_function"}:
        refuse(f"flavors {sorted(flavors) if isinstance(flavors, dict) else flavors!r} are not just python_function")
    pyfunc = flavors["python_function"]
    if not isinstance(pyfunc, dict):
        refuse("python_function is not a mapping")
    if set(pyfunc) - PYFUNC_KEYS:
        refuse(f"python_function has unexpected key {sorted(set(pyfunc) - PYFUNC_KEYS)[0]!r}")
    if pyfunc.get("loader_module") != CODE_MODEL_LOADER:
        refuse(f"loader_module {pyfunc.get('loader_module')!r} is not {CODE_MODEL_LOADER}")
    code_path = pyfunc.get("model_code_path")
    if not isinstance(code_path, str) or os.path.basename(code_path) != CODE_FILE.name:
        refuse(f"model_code_path {code_path!r} is not this project's {CODE_FILE.name}")
    if pyfunc.get("code") is not None:
        refuse(f"python_function code {pyfunc.get('code')!r} (bundled code dirs) is not allowed")
    if pyfunc.get("env") != {"conda": "conda.yaml", "virtualenv": "python_env.yaml"}:
        refuse(f"python_function env {pyfunc.get('env')!r} is not a soup's")
    if pyfunc.get("streamable") is not False:
        refuse("python_function streamable is not false")
    for key in ("python_version", "cloudpickle_version"):
        if key in pyfunc and not isinstance(pyfunc[key], str):
            refuse(f"python_function {key} is not a string")
    artifacts = pyfunc.get("artifacts")
    entry = artifacts.get(ARTIFACT) if isinstance(artifacts, dict) and set(artifacts) == {ARTIFACT} else None
    folder = entry.get("path") if isinstance(entry, dict) and set(entry) <= {"path", "uri"} else None
    parts = folder.split("/") if isinstance(folder, str) else []
    if len(parts) != 2 or parts[0] != "artifacts" or parts[1] in ("", ".", "..") or "\\" in parts[1]:
        refuse(f"python_function artifacts {artifacts!r} are not one '{ARTIFACT}' checkpoint folder")
    metadata = mlmodel.get("metadata")
    classes = metadata.get("classes") if isinstance(metadata, dict) and set(metadata) == {"classes"} else None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        refuse(f"metadata {metadata!r} is not a soup's (a list of class names)")
    if mlmodel.get("saved_input_example_info", INPUT_EXAMPLE_INFO) != INPUT_EXAMPLE_INFO:
        refuse("saved_input_example_info is not a soup's")
    if mlmodel.get("prompts") is not None or mlmodel.get("is_signature_from_type_hint", False) is not False \
            or mlmodel.get("type_hint_from_example", False) is not False:
        refuse("has prompts or type-hint settings a soup does not have")
    for key in ("artifact_path", "mlflow_version", "model_id", "model_uuid", "run_id", "utc_time_created"):
        if key in mlmodel and not isinstance(mlmodel[key], (str, type(None))):
            refuse(f"{key} is not a string")
    if not isinstance(mlmodel.get("model_size_bytes", 0), int):
        refuse("model_size_bytes is not a number")
    sig = mlmodel.get("signature")
    ours = signature().to_dict()
    try:
        same = isinstance(sig, dict) and set(sig) == set(ours) and all(
            (json.loads(sig[k]) if sig[k] else None) == (json.loads(ours[k]) if ours[k] else None) for k in ours)
    except (TypeError, ValueError):
        same = False
    if not same:
        refuse("signature is not a soup's")
    return folder


def _check_env_files(local: Path, label: str) -> None:
    """requirements.txt, conda.yaml's pip list and python_env.yaml's dependencies hold plain requirements only:
    MLflow reads them when `ich serve` loads the model and follows `-r`/`-c` includes (itself: RecursionError; a
    FIFO: a hang; /dev/zero: unbounded memory), so an include, an option or a URL is refused. python_env.yaml's one
    `-r requirements.txt` is MLflow's own line and the file it names is checked here."""
    import yaml

    def check(line: str, where: str) -> None:
        text = line.split("#", 1)[0].strip()
        if text and (text.startswith("-") or "://" in text or text.startswith((".", "/", "~")) or " @ " in text):
            raise UntrustedModel(f"{label}: {where} line {text[:80]!r} is an include, an option or a URL "
                                 "(only plain requirements are allowed); refusing")

    def load(name: str):
        try:
            return yaml.safe_load((local / name).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError):
            raise UntrustedModel(f"{label}: {name} is not valid YAML; refusing") from None

    if (local / "requirements.txt").is_file():
        try:
            lines = (local / "requirements.txt").read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UntrustedModel(f"{label}: requirements.txt is not UTF-8 text; refusing") from None
        for line in lines:
            check(line, "requirements.txt")
    if (local / "python_env.yaml").is_file():
        env = load("python_env.yaml")
        deps = env.get("dependencies") if isinstance(env, dict) else None
        for dep in deps or []:
            if dep != "-r requirements.txt":
                check(str(dep), "python_env.yaml")
    if (local / "conda.yaml").is_file():
        env = load("conda.yaml")
        for dep in (env.get("dependencies") if isinstance(env, dict) else None) or []:
            for line in (dep.get("pip") or []) if isinstance(dep, dict) else [dep]:
                check(str(line), "conda.yaml")


def verify_soup_model(local: str | Path, recorded: dict[str, str] | None, label: str) -> Path:
    """Check, without importing or unpickling anything from it, that a model folder is one of our soups:
    the whole MLmodel against the allowlist, every file (no pickles, no symlinks, nothing unexpected), the
    code file against the installed project's, and, when `recorded` (the LoggedModel's tags) is given, the
    weights and metadata against the sha256 recorded at logging time. Returns the checkpoint folder."""
    local = Path(local)
    folder = _check_mlmodel(local, label)
    allowed = {"MLmodel", CODE_FILE.name, *TEXT_FILES, f"{folder}/{WEIGHTS_FILE}", f"{folder}/{META_FILE}"}
    for dirpath, dirnames, filenames in os.walk(local):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(local).as_posix()
            if path.is_symlink():
                raise UntrustedModel(f"{label}: {rel} is a symlink; refusing")
            if path.is_dir():
                if rel not in ("artifacts", folder):  # refused before os.walk descends (a 1,100-deep tree recursed out)
                    raise UntrustedModel(f"{label}: unexpected folder {rel} (not part of a soup model); refusing")
                continue
            if not path.is_file():
                raise UntrustedModel(f"{label}: {rel} is not a regular file; refusing")
            if _is_pickle(path):
                raise UntrustedModel(f"{label}: {rel} is a pickle (a soup model holds none); refusing")
            if rel not in allowed:
                raise UntrustedModel(f"{label}: unexpected file {rel} (not part of a soup model); refusing")
    for rel in ("MLmodel", CODE_FILE.name, f"{folder}/{WEIGHTS_FILE}", f"{folder}/{META_FILE}"):
        if not (local / rel).is_file():
            raise UntrustedModel(f"{label}: {rel} is missing; refusing")
    _check_env_files(local, label)
    if (local / CODE_FILE.name).read_bytes() != CODE_FILE.read_bytes():
        raise UntrustedModel(f"{label}: {CODE_FILE.name} differs from the installed soups/{CODE_FILE.name} "
                             f"(sha256 {_sha256(local / CODE_FILE.name)[:12]}…); refusing")
    if recorded is not None:
        for rel, tag in ((f"{folder}/{WEIGHTS_FILE}", TAG_WEIGHTS_SHA256), (f"{folder}/{META_FILE}", TAG_META_SHA256)):
            want = recorded.get(tag)
            if not want:
                raise UntrustedModel(f"{label}: no {tag} recorded at logging time; refusing")
            actual = _sha256(local / rel)
            if actual != want:
                raise UntrustedModel(f"{label}: {rel} sha256 {actual[:12]}… is not the {want[:12]}… recorded at "
                                     f"logging time; refusing")
    return local / folder


@dataclass(frozen=True)
class ModelSource:
    """Where a soup model comes from: what to call it, where to download it, the tags recorded when logged."""
    label: str
    local: Path | None = None  # a local folder (nothing recorded to check the weights against)
    model_id: str | None = None
    recorded: dict[str, str] | None = None
    note: str | None = None  # e.g. an alias on an older version than the newest signed one (a rollback)


def resolve_model(uri: str) -> ModelSource:
    """models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-ID or a local folder -> its LoggedModel and tags.
    Whatever a registered version's `source` says, the model downloaded is its LoggedModel's own."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        if "://" in uri or uri.startswith("runs:"):
            raise UntrustedModel(f"{uri}: serve a registered soup (models:/NAME@ALIAS) or a local folder; refusing")
        if not Path(uri).is_dir():
            raise UntrustedModel(f"{uri}: no such model folder")
        return ModelSource(label=uri, local=Path(uri))
    client = MlflowClient()
    spec = uri[len("models:/"):].strip("/")
    try:
        if spec.startswith("m-") and "/" not in spec and "@" not in spec:
            model_id, label = spec, uri
        else:
            alias = None
            if "@" in spec:
                name, alias = spec.rsplit("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            elif spec.count("/") == 1:
                name, number = spec.split("/")
                version = client.get_model_version(name, number)
            else:
                raise UntrustedModel(f"{uri}: not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
            label = f"{uri} (version {version.version})"
            # The registry links a version to its LoggedModel through `source` (models:/m-…).
            source = version.source or ""
            model_id = version.model_id or (source[len("models:/"):] if source.startswith("models:/m-") else None)
            if not model_id or "/" in model_id:
                raise UntrustedModel(f"{label}: source {source!r} is not a logged soup model (models:/m-…); refusing")
        logged = client.get_logged_model(model_id)
        note = _rollback_note(client, uri, name, version) if not spec.startswith("m-") and alias else None
    except MlflowException as e:
        raise UntrustedModel(f"{uri}: {str(e).splitlines()[0]}") from None
    from soups.registry import artifact_location_problem
    if (problem := artifact_location_problem(logged.artifact_location, client.tracking_uri)) is not None:
        raise UntrustedModel(f"{label}: {problem}")  # before anything is downloaded from it
    return ModelSource(label=label, model_id=model_id, recorded=dict(logged.tags or {}), note=note)


def _rollback_note(client, uri: str, name: str, version) -> str | None:
    """One note when the alias points at a version older than the newest one signed by a trusted key: allowed
    (any version that verifies may be served; rolling back is how a bad champion is undone), and said."""
    from soups import signing

    trusted = signing.trusted_keys()
    newer = [v for v in client.search_model_versions(f"name = '{name}'") if int(v.version) > int(version.version)]
    for v in sorted(newer, key=lambda v: -int(v.version)):
        source = v.source or ""
        model_id = v.model_id or (source[len("models:/"):] if source.startswith("models:/m-") else None)
        if not model_id or "/" in model_id:
            continue
        tags = client.get_logged_model(model_id).tags or {}
        if tags.get(signing.TAG_SIGNATURE) and tags.get(signing.TAG_SIGNED_BY) in trusted:
            return (f"note: {uri} is version {version.version}; version {v.version} is newer and signed by a trusted "
                    "key (a rollback: allowed, the older version is verified like any other)")
    return None


def _download_model(model_id: str, dst: Path, label: str) -> Path:
    """models:/<model_id> under dst; returns the local model folder."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # refusals stay one line on stderr
    try:
        got = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}", dst_path=str(dst))
    except (MlflowException, OSError) as e:
        raise UntrustedModel(f"{label}: cannot download model ({str(e).splitlines()[0]})") from None
    finally:
        if quiet is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet
    return Path(got)


def fetch_verified(uri: str, dst: str | Path) -> tuple[ModelSource, Path, Path]:
    """Download a soup model under dst (a folder of ours) and verify it; returns (source, model folder,
    checkpoint folder). What is used afterwards is exactly this verified copy."""
    import shutil

    from soups import signing

    source = resolve_model(uri)
    local = Path(dst) / "verified-model"  # not an importable name: nothing can `import` it from a cwd
    if source.local is not None:
        verify_soup_model(source.local, None, source.label)  # before copying: no FIFO or device is opened
        shutil.copytree(source.local, local, symlinks=True)
    else:
        local = _download_model(source.model_id, local, source.label)
    ckpt = verify_soup_model(local, source.recorded, source.label)
    # The tags above are anyone's to rewrite: what proves the model is the owner's signature over its id, every
    # file (env files included) and those tags (docs/design.md#14). A local folder is the user's own files.
    if source.model_id is not None:
        signing.verify(source.model_id, source.recorded or {}, local, label=source.label)
    if source.note:
        print(source.note, file=sys.stderr)
    return source, local, ckpt


def load_soup_model(uri: str) -> SoupClassifier:
    """Download, verify, then build SoupClassifier from the verified weights; nothing from the model folder
    is imported or unpickled (MLflow's loader is not used)."""
    from mlflow.pyfunc import PythonModelContext

    with tempfile.TemporaryDirectory(prefix="ich-model-") as tmp:
        source, _, ckpt = fetch_verified(uri, tmp)
        model = SoupClassifier()
        try:
            model.load_context(PythonModelContext(artifacts={ARTIFACT: str(ckpt)}, model_config=None))
        except CheckpointError as e:
            raise named_by_model(e, ckpt, source.label) from None
    return model


def named_by_model(error: CheckpointError, ckpt: Path, label: str) -> CheckpointError:
    """A refusal about the verified private copy's checkpoint, named by the model it came from (the copy's path is
    a temporary folder, gone when the line is read)."""
    return CheckpointError(str(error).replace(str(ckpt), f"{label}: {ckpt.parent.name}/{ckpt.name}"))
