"""Serving the champion: `ich serve` (verify, then `mlflow models serve` on the verified copy) answers images
on loopback with class names and probabilities equal to the trainer's eval logits softmaxed; `ich predict`
does the same from the command line. The attacks it refuses are in tests/test_attacks.py."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.served import expected_probabilities, wait_served
import requests

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
MODEL = "models:/tiny-sweep-soup@champion"
PARITY_TOL = 1e-6  # float32 logits softmaxed: the served and reference answers differ by rounding only


@pytest.fixture(scope="module")
def champion(tiny_sweep, mlflow_server):
    """The tiny sweep's champion soup (built here if no other test built it yet)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    mlflow_client = MlflowClient(mlflow_server)
    try:
        return mlflow_client.get_model_version_by_alias("tiny-sweep-soup", "champion")
    except MlflowException:
        from soups.orchestrate import SoupOptions, run_soups
        run_soups(SoupOptions(experiment="tiny-sweep", scope="across", recipe="greedy", n_resamples=200))
        return mlflow_client.get_model_version_by_alias("tiny-sweep-soup", "champion")


def _digit_pngs(tiny_sweep, n=4) -> list[Path]:
    images = Path(tiny_sweep["data"]).parent / "images"
    return [sorted((images / d).glob("*.png"))[0] for d in ("0", "3", "7", "9")][:n]


def test_ich_serve_answers_images(champion, tiny_sweep, mlflow_server, tmp_path):
    from soups.serve.verify import fetch_verified
    from soups.tracking_server import free_port
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("ich")), "serve", "--model", MODEL, "--port",
                               str(port)], env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
                                                "ICH_SERVE_MAX_ROWS": "4"},
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_served(url, server, tmp_path / "serve.log")
        pngs = _digit_pngs(tiny_sweep)  # 4 rows: at the row cap, answered (the control of the refusal below)
        payload = {"dataframe_split": {"columns": ["image"],
                                       "data": [[base64.b64encode(p.read_bytes()).decode()] for p in pngs]}}
        answer = requests.post(f"{url}/invocations", json=payload, timeout=120)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        (ROOT / "test-artifacts").mkdir(exist_ok=True)
        (ROOT / "test-artifacts" / "served-prediction.json").write_text(json.dumps(predictions, indent=1))
        assert len(predictions) == len(pngs)
        for p in predictions:
            assert p["class"] in [str(d) for d in range(10)]
            assert abs(sum(p["probabilities"]) - 1) < 1e-4 and len(p["probabilities"]) == 10
        correct = sum(p["class"] == png.parent.name for p, png in zip(predictions, pngs))
        assert correct >= 2, predictions  # a soup at ~85% val should get most of four clear digits
        # Train/serve parity: served probabilities = softmax of the trainer's eval logits for the same image, the
        # reference written out with PIL/torchvision from the checkpoint's recorded numbers (tests/served.py).
        _, _, ckpt = fetch_verified(MODEL, tmp_path)
        served = np.array([p["probabilities"] for p in predictions])
        reference = np.array([expected_probabilities(ckpt, png) for png in pngs])
        assert np.abs(served - reference).max() <= PARITY_TOL, np.abs(served - reference).max()
        # Control: the same reference with one recorded number wrong (mean, centre crop, the stored size the
        # decode resizes to) misses the served answers by far more than the tolerance.
        pre = json.loads((ckpt / "checkpoint.json").read_text())["preprocess"]
        stored = pre["stored_size"] or json.loads((ckpt / "checkpoint.json").read_text())["img_size"]
        for wrong in ({"mean": [m + 0.1 for m in pre["mean"]]}, {"crop_pct": pre["crop_pct"] * 0.85},
                      {"stored_size": stored + 4}):
            off = np.array([expected_probabilities(ckpt, png, **wrong) for png in pngs])
            assert np.abs(served - off).max() > 100 * PARITY_TOL, (wrong, np.abs(served - off).max())
        # A bad request is an error answer, not a crash of the server; the path column is off by default.
        bad = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["image"], "data": [["!!"]]}},
                            timeout=60)
        assert bad.status_code == 400 and server.poll() is None
        assert "not valid base64" in bad.text and "stack_trace" not in bad.json() and "Traceback" not in bad.text
        # One row over the server's cap: one 400 naming the cap, no stack trace (issue 23 item 3).
        over = requests.post(f"{url}/invocations", timeout=60, json={"dataframe_split": {
            "columns": ["image"], "data": payload["dataframe_split"]["data"] * 2}})
        assert over.status_code == 400 and "8 rows, over the 4-row cap per request" in over.text, over.text[:500]
        assert "stack_trace" not in over.json() and "Traceback" not in over.text
        by_path = requests.post(f"{url}/invocations", timeout=60,
                                json={"dataframe_split": {"columns": ["path"], "data": [[str(pngs[0])]]}})
        assert by_path.status_code >= 400 and "the 'path' column is off" in by_path.text
    finally:
        server.send_signal(15)  # `ich serve` stops the scoring server it started and removes its verified copy
        try:
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, 9)
    assert "verified models:/tiny-sweep-soup@champion (version" in (tmp_path / "serve.log").read_text()


def test_ich_predict_cli(champion, tiny_sweep, mlflow_server):
    pngs = _digit_pngs(tiny_sweep, 2)
    out = subprocess.run([str(Path(sys.executable).with_name("ich")), "predict", "--model", MODEL, *map(str, pngs)],
                         env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith(tuple(map(str, pngs)))]
    assert len(lines) == 2 and all(": " in l and "(" in l for l in lines), out.stdout
    missing = subprocess.run([str(Path(sys.executable).with_name("ich")), "predict", "--model",
                              "models:/no-such-model@champion", str(pngs[0])],
                             env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "no-such-model" in missing.stderr
