"""Serving is bounded per request (issue 23 item 3): at most max_rows rows, and over all rows at most
max_request_bytes bytes read and max_request_pixels header pixels, checked for every row before any image is
decoded. The attacks: one path named many times (each row reads the file again), and small 1-bit PNGs whose
headers promise many pixels. Each refusal has its control: the same request one row shorter passes.

On a tiny soup model behind MLflow's own scoring server app (in process, driven as ASGI: no server): with the caps
raised through their variables the same requests decode every image (decode calls counted), and at the defaults none;
MLflow's app answers an exception from the model with its `stack_trace` (server paths, code lines) where ours answers
one line without; a request's decoding stops at its time budget (MLflow's MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, after
which the client has had its 504), counted in decoded images on a fake clock, never in wall time."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from soups.serve import inputs
from soups.serve.inputs import InputPolicy, RefusedByServer, RequestRefused, request_images


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


# ------------------------------------------------------------------------------------------ a model behind MLflow's app

@pytest.fixture(scope="module")
def pyfunc(tmp_path_factory):
    """A tiny soup pyfunc model (save_model, as tests/test_fuzz.py makes it) loaded by MLflow's loader."""
    import mlflow.pyfunc

    from soups.serve.log import pip_requirements
    from soups.serve.model import ARTIFACT, CODE_FILE, signature
    from tests.test_attacks import tiny_checkpoint
    base = tmp_path_factory.mktemp("serving-bounds")
    ckpt = tiny_checkpoint(base / "soup")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    mlflow.pyfunc.save_model(str(base / "model"), python_model=str(CODE_FILE), artifacts={ARTIFACT: str(ckpt)},
                             signature=signature(), pip_requirements=pip_requirements())
    return mlflow.pyfunc.load_model(str(base / "model"))


@pytest.fixture
def decodes(monkeypatch):
    """Every image the model decodes (ich.preprocess.decode_images' calls of decode_image), counted; on_decode
    runs after each (a test's fake clock)."""
    import ich.preprocess
    seen = {"count": 0, "on_decode": lambda: None}
    real = ich.preprocess.decode_image

    def counted(data, size, where):
        out = real(data, size, where)
        seen["count"] += 1
        seen["on_decode"]()
        return out
    monkeypatch.setattr(ich.preprocess, "decode_image", counted)
    return seen


def _post(app, body: bytes) -> tuple[int, dict]:
    """POST /invocations to an ASGI app in process; (status, JSON answer)."""
    async def call():
        sent, pending, never = [], [{"type": "http.request", "body": body, "more_body": False}], asyncio.Event()

        async def receive():
            if pending:
                return pending.pop(0)
            await never.wait()

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/invocations", "raw_path": b"/invocations", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        await app(scope, receive, send)
        return sent
    sent = asyncio.run(call())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def _split(column: str, values: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": [column], "data": [[v] for v in values]}}).encode()


def test_mlflow_answers_with_a_stack_trace_where_ours_answers_one_line(pyfunc, monkeypatch):
    """CONTROL: MLflow's scoring server app answers an exception from the model (what the model raised before
    801f71d: a plain ValueError for a refused row) with `stack_trace`, the server's paths and code lines. Ours: the
    same body is one 400 without it; an unexpected error is one line naming its type; a body MLflow's parser recurses
    out on (no answer: uvicorn's 500) is one 400 from soups.serve.app."""
    from mlflow.pyfunc import scoring_server

    from soups.serve.app import bounded_bodies, max_body_bytes
    mlflow_app = scoring_server.init(pyfunc)
    ours = bounded_bodies(mlflow_app, max_body_bytes(InputPolicy()))
    bad = _split("image", ["not base64!"])
    with monkeypatch.context() as m:
        m.setattr(RequestRefused, "as_mlflow", lambda self: self)  # the refusal stays a plain ValueError
        status, answer = _post(mlflow_app, bad)
    assert status == 400 and "Traceback (most recent call last)" in answer["stack_trace"]  # CONTROL
    assert "site-packages/mlflow/pyfunc/scoring_server" in answer["stack_trace"]
    status, answer = _post(ours, bad)
    assert status == 400 and "stack_trace" not in answer
    assert answer["message"].endswith("Error: row 0: column 'image' is not valid base64"), answer

    with monkeypatch.context() as m:
        m.setattr(pyfunc.unwrap_python_model(), "probabilities",
                  lambda images: (_ for _ in ()).throw(RuntimeError("at /srv/secret/line 7")))
        status, answer = _post(ours, _split("image", [base64.b64encode(_png(8, 8)).decode()]))
    assert status == 500 and "stack_trace" not in answer and "/srv/secret" not in json.dumps(answer)
    assert answer["message"].endswith("internal error (RuntimeError); see the server's log"), answer

    deep = b'{"dataframe_split": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RecursionError):  # CONTROL: MLflow's parser, unguarded
        _post(mlflow_app, deep)
    status, answer = _post(ours, deep)
    assert (status, answer) == (400, {"error_code": "BAD_REQUEST",
                                      "message": "Invalid input: request body nested over 32 levels deep"})


def test_with_the_caps_raised_every_huge_or_repeated_image_is_decoded(pyfunc, decodes, tmp_path, monkeypatch):
    """CONTROL for the request caps: the issue's requests, scaled down, decode every row once their cap is raised
    through its variable (3 bilevel 36 MP PNGs: 108 MP decoded; one path named 6 times: 6 reads, 6 decodes); at the
    default pixel cap, and at a byte cap of 5 reads, they are refused with no image decoded."""
    model = pyfunc.unwrap_python_model()
    bomb = _png(6000, 6000, mode="1")
    frame = pd.DataFrame({"image": [base64.b64encode(bomb).decode()] * 3})
    monkeypatch.setattr(model, "policy", InputPolicy.from_env({"ICH_SERVE_MAX_REQUEST_PIXELS": "200000000"}))
    assert len(model.predict(None, frame)) == 3 and decodes["count"] == 3  # CONTROL: all 108 MP decoded
    decodes["count"] = 0
    monkeypatch.setattr(model, "policy", InputPolicy.from_env({}))
    with pytest.raises(RefusedByServer, match=r"^rows 0-2: 108000000 pixels, over the 100000000-pixel cap"):
        model.predict(None, frame)
    assert decodes["count"] == 0

    (tmp_path / "photo.png").write_bytes(_png(300, 200))
    size = (tmp_path / "photo.png").stat().st_size
    frame = pd.DataFrame({"path": ["photo.png"] * 6})
    env = {"ICH_SERVE_PATH_ROOT": str(tmp_path), "ICH_SERVE_MAX_REQUEST_BYTES": str(5 * size)}
    monkeypatch.setattr(model, "policy", InputPolicy.from_env({**env, "ICH_SERVE_MAX_REQUEST_BYTES": str(6 * size)}))
    assert len(model.predict(None, frame)) == 6 and decodes["count"] == 6  # CONTROL: every row read and decoded
    decodes["count"] = 0
    monkeypatch.setattr(model, "policy", InputPolicy.from_env(env))
    with pytest.raises(RefusedByServer, match=rf"^rows 0-5: {6 * size} bytes, over the {5 * size}-byte cap"):
        model.predict(None, frame)
    assert decodes["count"] == 0


def test_decoding_stops_at_the_request_time_budget(pyfunc, decodes, monkeypatch):
    """Item 3's budget: MLflow's timeout middleware answers 504 after MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT seconds
    and leaves the work running in its thread; the images of a request past that budget are not decoded. On a fake
    clock that advances 1 s per decoded image: a 3-s budget decodes 4 of 10 images and stops with one line; CONTROL:
    MLflow's default 60 s decodes all 10. Through the app, the budget counts from the request's arrival."""
    from mlflow.pyfunc import scoring_server

    from soups.serve.app import bounded_bodies, max_body_bytes
    model = pyfunc.unwrap_python_model()
    clock = {"now": 1000.0}
    monkeypatch.setattr(inputs, "now", lambda: clock["now"])
    decodes["on_decode"] = lambda: clock.__setitem__("now", clock["now"] + 1)
    frame = pd.DataFrame({"image": [base64.b64encode(_png(8, 8)).decode()] * 10})
    assert InputPolicy.from_env({}).budget_s == 60
    monkeypatch.setattr(model, "policy", InputPolicy.from_env({}))
    assert len(model.predict(None, frame)) == 10 and decodes["count"] == 10  # CONTROL
    decodes["count"] = 0
    monkeypatch.setattr(model, "policy", InputPolicy.from_env({"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "3"}))
    with pytest.raises(RefusedByServer) as refused:
        model.predict(None, frame)
    assert str(refused.value) == ("request over its 3-s time budget (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT); stopped "
                                  "after 4 of 10 images")
    assert decodes["count"] == 4

    # Through the app: the clock reads 0 when the request arrives and 100 once the model is called (a long parse, a
    # queue): the 60-s budget has passed before the first image; counted from the model's call it would not have.
    decodes["count"], clock["now"], predict = 0, 0.0, model.predict

    def called_late(*args, **kwargs):
        clock["now"] = 100.0
        return predict(*args, **kwargs)
    monkeypatch.setattr(model, "predict", called_late)
    monkeypatch.setattr(model, "policy", InputPolicy.from_env({}))
    app = bounded_bodies(scoring_server.init(pyfunc), max_body_bytes(InputPolicy()))
    status, answer = _post(app, _split("image", [base64.b64encode(_png(8, 8)).decode()] * 2))
    assert status == 400 and "stack_trace" not in answer and decodes["count"] == 0, answer
    assert answer["message"].endswith("Error: request over its 60-s time budget "
                                      "(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT); stopped after 0 of 2 images"), answer
