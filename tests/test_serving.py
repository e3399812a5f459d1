"""Serving the champion: `mlflow models serve` on loopback answers images with class names and
probabilities; `ich predict` does the same from the command line."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
MODEL = "models:/tiny-sweep-soup@champion"


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


def test_mlflow_models_serve_answers_images(champion, tiny_sweep, mlflow_server, tmp_path):
    from sweeps.mlflow_server import free_port
    port = free_port()
    # As a user runs it: with the venv's bin on PATH (the scoring server execs `uvicorn`).
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", MODEL,
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline and server.poll() is None:
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        pngs = _digit_pngs(tiny_sweep)
        payload = {"dataframe_split": {"columns": ["image"],
                                       "data": [[base64.b64encode(p.read_bytes()).decode()] for p in pngs]}}
        answer = requests.post(f"{url}/invocations", json=payload, timeout=120)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        (ROOT / "test-artifacts").mkdir(exist_ok=True)
        (ROOT / "test-artifacts" / "served-prediction.json").write_text(json.dumps(predictions, indent=1))
        assert len(predictions) == len(pngs)
        for p, truth in zip(predictions, [p.parent.name for p in pngs]):
            assert p["class"] in [str(d) for d in range(10)]
            assert abs(sum(p["probabilities"]) - 1) < 1e-4 and len(p["probabilities"]) == 10
        correct = sum(p["class"] == png.parent.name for p, png in zip(predictions, pngs))
        assert correct >= 2, predictions  # a soup at ~85% val should get most of four clear digits
        # A bad request is an error answer, not a crash of the server.
        bad = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["image"], "data": [["!!"]]}},
                            timeout=60)
        assert bad.status_code >= 400 and server.poll() is None
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


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
