"""A served soup's inputs, bounded before anything is decoded or resized: `InputPolicy` (what a server may read,
from its environment), the request's rows -> checked image bytes (`request_images`), and the decode `ich ingest` uses.

Input: a pandas DataFrame with an `image` column (base64 bytes, for REST calls) or a `path` column (image
files). The `path` column is refused unless the server was given a root folder (ICH_SERVE_PATH_ROOT or
`ich serve --path-root`): then only regular files under that root, up to the size cap, are read. Each
image is checked from its header first (pixel count, aspect ratio; decompression-bomb warnings are
errors), then decoded like `ich ingest` stores it and preprocessed like training evaluates it. A request's decoding
stops once its time budget (MLflow's own MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, after which the scoring server has
answered 504) has passed: the rest of its images are not decoded and the work ends with one refusal line.
"""
from __future__ import annotations

import base64
import binascii
import contextvars
import io
import os
import stat
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
import numpy as np
import pandas as pd

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
# Per request: seconds from its arrival (REQUEST_STARTED, set by soups/serve/app.py; else from request_images) until
# its images stop being decoded. MLflow's timeout middleware answers 504 then but leaves the work running.
BUDGET_ENV, DEFAULT_BUDGET_S = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", 60  # MLflow's variable and default
REQUEST_STARTED: contextvars.ContextVar[float | None] = contextvars.ContextVar("ich_request_started", default=None)


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
    image; per request at most max_rows rows, max_request_bytes bytes and max_request_pixels header pixels, and
    images decoded for at most budget_s seconds."""
    path_root: Path | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_rows: int = DEFAULT_MAX_ROWS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    budget_s: int = DEFAULT_BUDGET_S

    @classmethod
    def from_env(cls, environ=None) -> "InputPolicy":
        environ = os.environ if environ is None else environ
        caps = dict(max_bytes=_env_cap(environ, MAX_BYTES_ENV, DEFAULT_MAX_BYTES),
                    max_rows=_env_cap(environ, MAX_ROWS_ENV, DEFAULT_MAX_ROWS),
                    max_request_bytes=_env_cap(environ, MAX_REQUEST_BYTES_ENV, DEFAULT_MAX_REQUEST_BYTES),
                    max_request_pixels=_env_cap(environ, MAX_REQUEST_PIXELS_ENV, DEFAULT_MAX_REQUEST_PIXELS),
                    budget_s=_env_cap(environ, BUDGET_ENV, DEFAULT_BUDGET_S))
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


def now() -> float:
    """The request budget's clock, time.monotonic (a function of this module: a test can give the budget its own)."""
    return time.monotonic()


class BudgetedImages(list):
    """A request's checked (bytes, name) images. Iterating them is the decode loop (ich.preprocess.decode_images):
    once the request's deadline has passed, the next image is not handed out and RequestRefused names the budget."""

    def __init__(self, images, deadline: float, budget_s: int):
        super().__init__(images)
        self.deadline, self.budget_s = deadline, budget_s

    def __iter__(self):
        for i, image in enumerate(super().__iter__()):
            if now() > self.deadline:
                raise RequestRefused(f"request over its {self.budget_s}-s time budget ({BUDGET_ENV}); stopped after "
                                     f"{i} of {len(self)} images")
            yield image


def request_images(frame: pd.DataFrame, policy: InputPolicy) -> BudgetedImages:
    """A request's rows -> checked image bytes and names, every row and the request's totals within the policy's
    caps before anything is decoded; else RequestRefused naming the row or the cap. Their decoding stops at the
    request's time budget (BudgetedImages)."""
    started = REQUEST_STARTED.get()
    deadline = (now() if started is None else started) + policy.budget_s
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
    return BudgetedImages(images, deadline, policy.budget_s)


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
