"""Serving is bounded per request (issue 23 item 3): at most max_rows rows, and over all rows at most
max_request_bytes bytes read and max_request_pixels header pixels, checked for every row before any image is
decoded. The attacks: one path named many times (each row reads the file again), and small 1-bit PNGs whose
headers promise many pixels. Each refusal has its control: the same request one row shorter passes."""
from __future__ import annotations

import io

import pandas as pd
import pytest
from PIL import Image

from soups.serve.inputs import InputPolicy, RequestRefused, request_images


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_rows_over_the_cap_are_refused_in_one_line():
    png = _png(8, 8)
    policy = InputPolicy(max_rows=3)
    assert len(request_images(pd.DataFrame({"image": [png] * 3}), policy)) == 3  # control
    with pytest.raises(RequestRefused, match=r"^4 rows, over the 3-row cap per request \(ICH_SERVE_MAX_ROWS\)$"):
        request_images(pd.DataFrame({"image": [png] * 4}), policy)


def test_one_path_named_again_and_again_counts_every_read(tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(_png(300, 200))
    size = photo.stat().st_size
    policy = InputPolicy(path_root=tmp_path, max_request_bytes=10 * size)
    assert len(request_images(pd.DataFrame({"path": ["photo.png"] * 10}), policy)) == 10  # control
    with pytest.raises(RequestRefused, match=rf"^rows 0-10: {11 * size} bytes, over the {10 * size}-byte cap"):
        request_images(pd.DataFrame({"path": ["photo.png"] * 11}), policy)


def test_small_bilevel_pngs_promising_many_pixels_are_refused_before_decoding():
    bomb = _png(6000, 6000, mode="1")  # 36 MP under the per-image 40 MP limit, a few kB of PNG
    assert len(bomb) < 20_000
    policy = InputPolicy()  # the defaults: 100 MP per request
    assert len(request_images(pd.DataFrame({"image": [bomb] * 2}), policy)) == 2  # control: 72 MP pass
    with pytest.raises(RequestRefused, match=r"^rows 0-2: 108000000 pixels, over the 100000000-pixel cap"):
        request_images(pd.DataFrame({"image": [bomb] * 3}), policy)


def test_caps_come_from_the_environment_and_bad_values_are_one_line():
    policy = InputPolicy.from_env({"ICH_SERVE_MAX_ROWS": "5", "ICH_SERVE_MAX_REQUEST_BYTES": "1000",
                                   "ICH_SERVE_MAX_REQUEST_PIXELS": "99"})
    assert (policy.max_rows, policy.max_request_bytes, policy.max_request_pixels) == (5, 1000, 99)
    assert InputPolicy.from_env({}).max_rows == 256
    with pytest.raises(ValueError, match=r"^ICH_SERVE_MAX_ROWS='0': must be at least 1$"):
        InputPolicy.from_env({"ICH_SERVE_MAX_ROWS": "0"})


def test_a_refusal_becomes_an_mlflow_error_without_a_stack_trace():
    from mlflow.exceptions import MlflowException
    e = RequestRefused("4 rows, over the 3-row cap per request").as_mlflow()
    assert isinstance(e, MlflowException) and isinstance(e, ValueError) and e.get_http_status_code() == 400
    assert "stack_trace" not in e.serialize_as_json()
