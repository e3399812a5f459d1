"""checkpoint.json bounded and typed, and the other one-line refusals of issue 23 (findings 6 and 7).

Each case was reproduced on the code before this change (stored_size 60000: MemoryError; img_size 20000: torch
asked for 19.5 TB; "abc", 1e999, 0: ValueError/OverflowError tracebacks; architecture resnet18: a ResNet built from
the file's word, then a load_state_dict traceback; 200,000-deep JSON: RecursionError; a class name with ESC/CR:
printed raw, exit 0; a 2 GB sparse "png": read whole, 2.9 GB RSS; a ParseError from a server: a traceback; names
with control characters: ingested and printed raw). Now each is one line naming the file, exit 2, through the
same `main` the `ich` command runs; controls show the planted case is live without the guard.
"""
from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from ich.checkpoint import (ARCHITECTURES_ENV, MAX_STORED_SIZE, CheckpointError, allowed_architectures, read_meta)
from ich.errors import error_line
from sweeps.cli import main
from tests.test_attacks import png_bytes, tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def predict(model: Path | str, image: Path) -> tuple[int, list[str], str]:
    """`ich predict --model MODEL IMAGE` through the CLI's own main, in this process: (rc, stderr lines, stdout)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["predict", "--model", str(model), str(image)])
    return rc, err.getvalue().strip().splitlines(), out.getvalue()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("bounds")
    ckpt = tiny_checkpoint(base / "ckpt")
    image = base / "photo.png"
    image.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)))
    return {"ckpt": ckpt, "image": image, "meta": json.loads((ckpt / "checkpoint.json").read_text())}


def planted(good, tmp_path, edit=None, raw: str | None = None) -> Path:
    import shutil
    folder = tmp_path / "planted"
    shutil.copytree(good["ckpt"], folder)
    if raw is None:
        meta = json.loads(json.dumps(good["meta"]))
        edit(meta)
        raw = json.dumps(meta, ensure_ascii=False)
    (folder / "checkpoint.json").write_text(raw, encoding="utf-8")
    return folder


def _set(key, value):
    def edit(m):
        if key.startswith("preprocess."):
            m["preprocess"][key.split(".", 1)[1]] = value
        else:
            m[key] = value
    return edit


def _classes(n):
    return lambda m: m.update(num_classes=n, class_names=[f"c{i}" for i in range(n)])


# The issue's values, each refused in one line naming the checkpoint and the field.
ISSUE_CASES = {
    "stored_size 60000": (_set("preprocess.stored_size", 60000), "preprocess.stored_size must be 0 or a whole number"),
    "img_size 20000": (_set("img_size", 20000), "img_size must be a whole number from 32 to 1024, got 20000"),
    "img_size abc": (_set("img_size", "abc"), "img_size must be a whole number from 32 to 1024, got 'abc'"),
    "img_size 1e999": ("1e999", "img_size must be a whole number from 32 to 1024, got inf"),
    "img_size 0": (_set("img_size", 0), "img_size must be a whole number from 32 to 1024, got 0"),
    "img_size true": (_set("img_size", True), "img_size must be a whole number from 32 to 1024, got True"),
    "img_size 32.0": (_set("img_size", 32.0), "img_size must be a whole number from 32 to 1024, got 32.0"),
    "img_size NaN": ("NaN", "img_size must be a whole number from 32 to 1024, got nan"),
    "num_classes 20000": (_classes(20000), "num_classes must be a whole number from 1 to 10000, got 20000"),
    "num_classes 4 vs 3 names": (_set("num_classes", 4), "num_classes=4 but class_names has 3 entries"),
    "architecture resnet18": (_set("architecture", "resnet18"), "architecture 'resnet18' is not one of the project's"),
    "class name with ESC/CR": (_set("class_names", ["\x1b[2K\rall good", "b", "c"]),
                               r"a class name must be a string of 1 to 256 printable characters, got '\x1b[2K\rall good'"),
    "class name not a string": (_set("class_names", [1, 2, 3]), "a class name must be a string"),
    "class names repeated": (_set("class_names", ["a", "a", "b"]), "class_names repeat a name"),
    "format_version true": (_set("format_version", True), "format_version True, expected one of 1, 2"),
    "epoch -1": (_set("epoch", -1), "epoch must be a whole number from 0 to"),
}


@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_unbounded_or_mistyped_metadata_is_one_line(case, good, tmp_path):
    edit, message = ISSUE_CASES[case]
    if isinstance(edit, str):  # a JSON token json.dumps would not write: the file's text is edited
        folder = planted(good, tmp_path, raw=json.dumps(good["meta"]).replace('"img_size": 32', f'"img_size": {edit}'))
    else:
        folder = planted(good, tmp_path, edit)
    rc, err, out = predict(folder, good["image"])
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith(f"ich predict: error: {folder}: ") and message in err[0], err[0]
    assert out == ""


def test_control_the_unchanged_checkpoint_predicts(good):
    rc, err, out = predict(good["ckpt"], good["image"])
    assert rc == 0 and err == [] and str(good["image"]) in out


def test_the_bounds_are_inclusive(good, tmp_path):
    """Controls: the largest stored size and class count the bounds allow are read (the cases above are one past)."""
    meta = read_meta(planted(good, tmp_path, _set("preprocess.stored_size", MAX_STORED_SIZE)))
    assert meta.preprocess["stored_size"] == MAX_STORED_SIZE
    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "checkpoint.json").write_text(json.dumps({**good["meta"], "num_classes": 10_000,
                                                        "class_names": [f"c{i}" for i in range(10_000)]}))
    assert read_meta(folder).num_classes == 10_000


def test_deep_json_is_refused_before_parsing(good, tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(RecursionError):  # control: what json.loads did with it (a traceback in `ich predict`)
        json.loads(deep)
    for raw in (deep, json.dumps(good["meta"])[:-1] + ', "extra2": ' + deep + "}"):
        folder = planted(good, tmp_path / str(len(raw)), raw=raw)
        rc, err, _ = predict(folder, good["image"])
        assert rc == 2 and len(err) == 1 and "JSON nested over 32 levels deep; refusing to parse it" in err[0], err
    # nesting inside strings is text, not depth: a class name of 100 brackets is read (control)
    meta = read_meta(planted(good, tmp_path / "text", _set("class_names", ["[" * 100, "b", "c"])))
    assert meta.class_names[0] == "[" * 100


def test_metadata_longer_than_the_bound_is_not_read_whole(good, tmp_path):
    folder = planted(good, tmp_path, lambda m: m["extra"].update(padding="x" * (2 << 20)))
    with pytest.raises(CheckpointError, match=r"checkpoint.json: 1048577 bytes, over the 1048576-byte limit"):
        read_meta(folder)


def test_architecture_allowlist_covers_the_configs_and_is_extended_by_the_environment(good, tmp_path, monkeypatch):
    names = set()
    for config in (ROOT / "sweeps" / "configs").glob("*.yaml"):
        for line in config.read_text().splitlines():  # `model: NAME`, `model: [A, B]`, `model: {choice: [A, B]}`
            key, _, value = line.split("#", 1)[0].strip().partition(":")
            if key == "model" and value.strip():
                value = yaml.safe_load(value)
                value = value.get("choice") if isinstance(value, dict) else value
                names.update([value] if isinstance(value, str) else value)
    assert names and names <= set(allowed_architectures()), names - set(allowed_architectures())
    # Extended: the name passes the allowlist, and the tiny CoAtNet's weights do not fit a ResNet-18: one line.
    monkeypatch.setenv(ARCHITECTURES_ENV, " resnet18 ,other")
    assert allowed_architectures()[-2:] == ("resnet18", "other")
    folder = planted(good, tmp_path, _set("architecture", "resnet18"))
    rc, err, _ = predict(folder, good["image"])
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"ich predict: error: {folder}: weights do not fit resnet18 (3 classes, 32 px) "
                             "(unexpected keys, e.g."), err[0]


def test_weights_that_do_not_fit_are_one_line_naming_the_checkpoint(good, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from ich.models import create_model
    folder = planted(good, tmp_path, lambda m: None)
    state = load_file(folder / "model.safetensors")
    state["head.fc.weight"] = torch.zeros(4, state["head.fc.weight"].shape[1])  # a 4-class head under 3 class names
    state["head.fc.bias"] = torch.zeros(4)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(RuntimeError, match="size mismatch for head.fc.weight"):  # control: the old path's traceback
        create_model("coatnet_tiny_ich", 3, 32).load_state_dict(state)
    rc, err, _ = predict(folder, good["image"])
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"ich predict: error: {folder}: weights do not fit coatnet_tiny_ich (3 classes, 32 px): "
                      f"head.fc.weight has shape (4, 128), the model's is (3, 128)"), err[0]
    # Another architecture's weights (a ResNet's) under the CoAtNet's metadata.
    save_file(create_model("resnet_tiny_ich", 3).state_dict(), str(folder / "model.safetensors"))
    rc, err, _ = predict(folder, good["image"])
    assert rc == 2 and len(err) == 1 and "weights do not fit coatnet_tiny_ich" in err[0], err


# Runs `ich predict` (the CLI's main) in a fresh interpreter that reports its own peak RSS above its size before
# the call (as tests/test_bounds.py measures ingest). Prints one JSON line.
PROBE = r"""
import contextlib, io, json, sys
from sweeps.cli import main
import ich.models, soups.serve.verify  # what predict imports (~600 MB with torch and MLflow): before, not measured
def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
before = rss_kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset this process's peak RSS
err, out = io.StringIO(), io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    rc = main(["predict", "--model", sys.argv[1], sys.argv[2]])
print(json.dumps({"rc": rc, "err": err.getvalue(), "extra_mb": (rss_kb("VmHWM") - before) / 1024}))
"""


def _probe(model: Path, image: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(model), str(image)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_sparse_2gb_png_is_refused_from_its_size_unread(good, tmp_path):
    sparse = tmp_path / "sparse.png"
    sparse.write_bytes(good["image"].read_bytes())
    os.truncate(sparse, 2 << 30)  # a valid PNG header, then 2 GB of holes: costs no disk
    result = _probe(good["ckpt"], sparse)
    assert result["rc"] == 2 and result["err"].count("\n") == 1, result
    assert f"ich predict: error: {sparse}: 2147483648 bytes, over the 52428800-byte cap on an image file; not read" \
        in result["err"]
    assert result["extra_mb"] < 100, result  # HEAD read it whole: +2.9 GB
    # Control: a 40 MB sparse png under the cap is read whole and predicted; the probe sees those 40 MB.
    os.truncate(sparse, 40 << 20)
    result = _probe(good["ckpt"], sparse)
    assert result["rc"] == 0 and result["extra_mb"] > 40, result


def _ingest(src: Path, out: Path) -> tuple[int, list[str], str]:
    err, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
        rc = main(["ingest", str(src), str(out), "--size", "32", "--quiet", "--workers", "1"])
    return rc, err.getvalue().strip().splitlines(), stdout.getvalue()


@pytest.mark.parametrize("where", ["class folder", "file", "subfolder"])
def test_names_with_control_characters_are_refused_at_ingest(where, tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    evil = "b\x1b[2K\rall good\x07"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(4):
            (src / cls / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)))
    rc, err, _ = _ingest(src, tmp_path / "control")  # control: the clean folder ingests
    assert rc == 0 and err == []
    if where == "class folder":
        (src / "b").rename(src / evil)
        shown = repr(evil)
    elif where == "file":
        (src / "a" / "0.png").rename(src / "a" / "x\rEVIL.png")
        shown = repr("a/x\rEVIL.png")
    else:
        (src / "a" / "sub\x1b[31m").mkdir()
        (src / "a" / "0.png").rename(src / "a" / "sub\x1b[31m" / "0.png")
        shown = repr("a/sub\x1b[31m")
    rc, err, out = _ingest(src, tmp_path / "out")
    assert rc == 2 and len(err) == 1, err
    assert err[0] == f"ich ingest: error: {src}: the name {shown} holds control characters; rename it (nothing was " \
                     "written)", err[0]
    assert "\x1b" not in err[0] + out and "\r" not in err[0] + out and not (tmp_path / "out").exists()


def test_error_lines_escape_control_characters():
    line = error_line("ich predict", ValueError("model 'x\x1b[2K\x07': bad\r\nall good"))
    assert line == r"ich predict: error: model 'x\x1b[2K\x07': bad all good"


# ---------------------------------------------------------------------------------------------- a garbled server

PROTOBUF_MISMATCH = b'{"model_version": {"version": {"x": 1}, "aliases": 5}}'  # JSON MLflow cannot read as protobuf
NOT_JSON = b"<html>not json"


def _garbled_server(body: bytes) -> http.server.ThreadingHTTPServer:
    """Answers every MLflow REST call with 200 and `body`."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("body,raised,message", [
    (PROTOBUF_MISMATCH, ("google.protobuf.json_format", "ParseError"),
     "{uri}: the MLflow server's answer is not a valid MLflow response (Failed to parse model_version field"),
    (NOT_JSON, ("mlflow.exceptions", "MlflowException"),
     "models:/x@champion: API request to endpoint was successful but the response body was not in a valid JSON"),
])
def test_a_malformed_server_response_is_one_line_for_predict(body, raised, message, good, tmp_path, monkeypatch):
    server = _garbled_server(body)
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        from mlflow import MlflowClient
        with pytest.raises(Exception) as caught:  # control: what MLflow's client raises (ParseError: HEAD's traceback)
            MlflowClient(uri).get_model_version_by_alias("x", "champion")
        assert (type(caught.value).__module__, type(caught.value).__name__) == raised
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        # an earlier test of the session may have called mlflow.set_tracking_uri (in-process `ich soup` does), whose
        # global wins over the variable: unset it for this test, as in a fresh `ich predict` process
        monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
        monkeypatch.setenv("ICH_HOME", str(tmp_path / "home"))
        rc, err, _ = predict("models:/x@champion", good["image"])
    finally:
        server.shutdown()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("ich predict: error: " + message.format(uri=uri)), err[0]


def test_a_server_answering_non_json_fails_ich_soup_in_one_line_without_retrying(tmp_path, monkeypatch):
    import mlflow.tracking._tracking_service.utils as tracking_utils

    from soups.store import retry
    server = _garbled_server(NOT_JSON)
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    retries = retry.retry_count()
    # `ich soup` in-process sets MLflow's process-global URI to this server, shut down below: restored after the
    # test, or a later test's MlflowClient() talks to a dead port (seen: test_artifact_location, test_given_init).
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("ICH_HOME", str(tmp_path / "home"))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(["soup", "--experiment", "x"])
            except SystemExit as e:  # cmd_soup exits 2 itself (exit_on_user_error) after its line
                rc = e.code
    finally:
        server.shutdown()
    lines = err.getvalue().strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines  # HEAD: 13 retry warnings over 96 s, then the line
    assert lines[0].startswith("ich soup: error: MLflow get experiment 'x': API request to endpoint was successful "
                               "but the response body was not in a valid JSON format"), lines[0]
    assert retry.retry_count() == retries
    # Control: a refused connection is still transient (retried), only the garbled answer is not.
    import requests
    assert retry.is_transient(requests.ConnectionError("refused"))


def test_a_sweep_of_an_architecture_outside_the_allowlist_is_refused_before_it_starts(monkeypatch):
    from ich.errors import ConfigError
    from sweeps.config import load_config
    with pytest.raises(ConfigError, match=r"model 'resnet18' is not one of the project's architectures; add it to "
                                          r"\$ICH_ALLOWED_ARCHITECTURES"):
        load_config(ROOT / "sweeps" / "configs" / "cpu.yaml", sets=["train.model=resnet18", "search.model=null"])
    monkeypatch.setenv(ARCHITECTURES_ENV, "resnet18")  # control: allowed, the same config loads
    cfg = load_config(ROOT / "sweeps" / "configs" / "cpu.yaml", sets=["train.model=resnet18", "search.model=null"])
    assert "resnet18" in cfg.models
