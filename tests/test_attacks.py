"""Attacks on serving, as someone with write access to the MLflow registry would try them (issue 13).

Each attack is planted in a registered version of a real soup pyfunc model on a real `mlflow server`: a new
LoggedModel carrying the legit model's tags (an attacker copies them), its files altered, registered and
aliased. `ich predict` and `ich serve` must each refuse in one line naming the model and what is wrong
(exit 2), and the marker file the attack's payload would create must never appear. Every attack has a
control proving its payload live without the guards: MLflow's own loader on the planted folders creates the
marker for the code and pickle attacks; the hidden and extra-flavor pickles create it when unpickled (in a
child process: a test may unpickle only its own tripwires, tests/test_security.py); the swapped weights and the
edited metadata, loaded unverified, change the answers.

Serving inputs are bounded: thin and tall images, decompression bombs, FIFOs, /dev/zero, paths outside the
configured root and oversized files are each refused in one line, in under 1 CPU s and 200 MB (CPU time, not
wall: a loaded machine cannot stretch it; a planted slow case fails the bound).
"""
from __future__ import annotations

import base64
import io
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.served import expected_probabilities, wait_served
import requests
import yaml

pytestmark = [pytest.mark.integration]
ROOT = Path(__file__).resolve().parent.parent
ICH = str(Path(sys.executable).with_name("ich"))
MODEL = "attack-soup"
CLASSES = ["Ca trù", "Hát xoan", "Quan họ"]


# ---------------------------------------------------------------------------------------------- payloads

class _Tripwire:
    """Unpickling this creates the marker file (what a real attacker would replace with anything)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tripwire_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Tripwire(marker), protocol=4)


def evil_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')\n"


def _edit_mlmodel(folder: Path, edit) -> None:
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    edit(mlmodel)
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def _ckpt(folder: Path) -> Path:
    return next((folder / "artifacts").iterdir())


def plant_code_path(folder: Path, marker: Path) -> None:
    (folder / "evil.py").write_text(evil_code(marker))
    _edit_mlmodel(folder, lambda m: m["flavors"]["python_function"].update(model_code_path="evil.py"))


def plant_code_swap(folder: Path, marker: Path) -> None:
    code = folder / "model.py"
    code.write_text(evil_code(marker) + code.read_text())


def plant_data_redirect(folder: Path, marker: Path) -> None:
    sub = folder / "sub"
    sub.mkdir()
    (sub / "python_model.pkl").write_bytes(tripwire_pickle(marker))
    (sub / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {
        "loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl", "env": {"conda": "conda.yaml"}}}}))
    _edit_mlmodel(folder, lambda m: m["flavors"]["python_function"].update(data="sub"))


def plant_pickle_model(folder: Path, marker: Path) -> None:
    (folder / "python_model.pkl").write_bytes(tripwire_pickle(marker))
    (folder / "model.py").unlink()

    def edit(m):
        flavor = m["flavors"]["python_function"]
        flavor.pop("model_code_path")
        flavor.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    _edit_mlmodel(folder, edit)


def plant_hidden_pickle(folder: Path, marker: Path) -> None:
    (_ckpt(folder) / "tokenizer.json").write_bytes(tripwire_pickle(marker))  # a pickle under a harmless name


def plant_loader_module(folder: Path, marker: Path) -> None:
    (folder / "code").mkdir()
    (folder / "code" / "evil_loader.py").write_text(evil_code(marker) + "def _load_pyfunc(path, config=None):\n"
                                                    "    raise SystemExit('evil loader ran')\n")
    _edit_mlmodel(folder, lambda m: m["flavors"]["python_function"].update(loader_module="evil_loader", code="code"))


def plant_code_shadow(folder: Path, marker: Path) -> None:
    """A bundled code dir that MLflow puts first on sys.path: its soups/serve/inputs.py shadows the installed one
    (model.py and the loader are untouched)."""
    package = folder / "code" / "soups"
    (package / "serve").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "serve" / "__init__.py").write_text("")
    (package / "serve" / "inputs.py").write_text(evil_code(marker) + "import mlflow.pyfunc\n\n\n"
                                       "class SoupClassifier(mlflow.pyfunc.PythonModel):\n"
                                       "    def predict(self, context, model_input, params=None):\n"
                                       "        return model_input\n")
    _edit_mlmodel(folder, lambda m: m["flavors"]["python_function"].update(code="code"))


def plant_extra_flavor(folder: Path, marker: Path) -> None:
    (folder / "data").mkdir()
    (folder / "data" / "model.pth").write_bytes(tripwire_pickle(marker))
    _edit_mlmodel(folder, lambda m: m["flavors"].update(pytorch={"model_data": "data", "pytorch_version": "2.5.0"}))


def plant_swapped_weights(folder: Path, marker: Path) -> None:
    from safetensors.torch import load_file, save_file
    weights = _ckpt(folder) / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, str(weights))


def plant_meta_edit(folder: Path, marker: Path) -> None:
    meta = _ckpt(folder) / "checkpoint.json"
    d = json.loads(meta.read_text())
    d["class_names"] = list(reversed(d["class_names"]))  # every answer mislabelled
    meta.write_text(json.dumps(d))


# name -> (plant, what the one-line refusal must say, whether MLflow's own loader would run the payload)
ATTACKS = {
    "code-path": (plant_code_path, "MLmodel model_code_path 'evil.py' is not this project's model.py", True),
    "code-swap": (plant_code_swap, "model.py differs from the installed soups/serve/model.py", True),
    "data-redirect": (plant_data_redirect, "MLmodel python_function has unexpected key 'data'", True),
    "pickle-model": (plant_pickle_model, "MLmodel python_function has unexpected key 'python_model'", True),
    "hidden-pickle": (plant_hidden_pickle, "tokenizer.json is a pickle", False),
    "loader-module": (plant_loader_module, "MLmodel loader_module 'evil_loader' is not", True),
    "code-shadow": (plant_code_shadow, "MLmodel python_function code 'code' (bundled code dirs) is not allowed", True),
    "extra-flavor": (plant_extra_flavor, "MLmodel flavors ['python_function', 'pytorch'] are not just "
                                         "python_function", False),
    "swapped-weights": (plant_swapped_weights, "model.safetensors sha256", False),
    "meta-edit": (plant_meta_edit, "checkpoint.json sha256", False),
}


# ---------------------------------------------------------------------------------------------- fixtures

def tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    import torch

    from ich.checkpoint import CheckpointMeta, save_checkpoint
    from ich.models import create_model
    torch.manual_seed(seed)
    model = create_model("coatnet_tiny_ich", len(CLASSES), 32)
    meta = CheckpointMeta(architecture="coatnet_tiny_ich", img_size=32, num_classes=len(CLASSES), class_names=CLASSES,
                          dataset_fingerprint="attacks", init_fingerprint="attacks", epoch=0,
                          extra={"image_size": 36, "eval_crop_pct": 0.875})
    save_checkpoint(folder, model.state_dict(), meta)
    return folder


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def legit(mlflow_server, tmp_path_factory):
    """A soup pyfunc model logged by the project's own log_pyfunc and registered as MODEL@legit."""
    import mlflow
    from mlflow import MlflowClient

    from soups.serve.log import log_pyfunc
    client = MlflowClient(mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    experiment = client.get_experiment(client.create_experiment("attacks"))
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("attack-soup") / "soup")
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        info = log_pyfunc(ckpt, name="pyfunc", example_pixels=np.zeros((36, 36, 3), np.uint8),
                          tags={"ich.kind": "soup-pyfunc"})
    client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, source=f"models:/{info.model_id}", run_id=run.info.run_id,
                                          model_id=info.model_id)
    client.set_registered_model_alias(MODEL, "legit", version.version)
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{info.model_id}",
                                                      dst_path=str(tmp_path_factory.mktemp("legit-model"))))
    return {"client": client, "experiment_id": experiment.experiment_id, "run_id": run.info.run_id,
            "model_id": info.model_id, "folder": folder, "ckpt": ckpt}


def plant(legit, name: str, marker: Path, scratch: Path) -> str:
    """Register a copy of the legit model with `name`'s attack planted; returns its models:/ URI."""
    from mlflow.entities import LoggedModelStatus
    client = legit["client"]
    folder = scratch / name
    shutil.copytree(legit["folder"], folder)
    ATTACKS[name][0](folder, marker)
    tags = dict(client.get_logged_model(legit["model_id"]).tags)  # the attacker copies the recorded sha256 too
    model = client.create_logged_model(legit["experiment_id"], name="pyfunc", source_run_id=legit["run_id"],
                                       tags=tags, model_type="soup-pyfunc")
    client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    version = client.create_model_version(MODEL, source=f"models:/{model.model_id}", run_id=legit["run_id"],
                                          model_id=model.model_id)
    client.set_registered_model_alias(MODEL, name, version.version)
    return f"models:/{MODEL}@{name}"


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("attack-images") / "digit.png"
    path.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)))
    return path


def _env(mlflow_server: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


# ---------------------------------------------------------------------------------------------- attacks

@pytest.mark.parametrize("attack", list(ATTACKS))
def test_planted_attack_is_refused_by_predict_and_serve(attack, legit, image_file, mlflow_server, tmp_path):
    marker = tmp_path / f"{attack}.marker"
    uri = plant(legit, attack, marker, tmp_path)
    env = _env(mlflow_server)
    from soups.tracking_server import free_port
    commands = {"predict": [ICH, "predict", "--model", uri, str(image_file)],
                "serve": [ICH, "serve", "--model", uri, "--port", str(free_port())]}
    # Both at once (two cores); a serve that wrongly accepted would not return: the timeout fails the test.
    procs = {k: subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True) for k, c in commands.items()}
    results = {}
    try:
        for k, p in procs.items():
            out, err = p.communicate(timeout=240)
            results[k] = (p.returncode, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
    expected = ATTACKS[attack][1]
    for k, (rc, out, err) in results.items():
        lines = err.strip().splitlines()
        assert rc == 2, (k, rc, out[-2000:], err[-3000:])
        assert len(lines) == 1, (k, err)
        assert lines[0].startswith(f"ich {k}: error: {uri} (version ") and expected in lines[0], (k, lines[0])
        assert "Traceback" not in err and "verified" not in out
    (ROOT / "test-artifacts" / "attacks").mkdir(parents=True, exist_ok=True)
    (ROOT / "test-artifacts" / "attacks" / f"{attack}.txt").write_text(
        results["predict"][2].strip() + "\n" + results["serve"][2].strip() + "\n")
    assert not marker.exists()


def test_planted_payloads_are_live_under_mlflows_own_loader(legit, mlflow_server, tmp_path):
    """Control: the payloads above do run when MLflow's loader is handed the planted folders directly (with
    pickles allowed, as MLflow < 3.x did by default), so the refusals above are what stops them."""
    live = [name for name, (_, _, runs) in ATTACKS.items() if runs]
    markers = {name: tmp_path / f"{name}.marker" for name in live}
    for name in live:
        folder = tmp_path / name
        shutil.copytree(legit["folder"], folder)
        ATTACKS[name][0](folder, markers[name])
    # One fresh process per folder (as a server would be): a module imported by one load cannot mask another.
    script = "import sys, mlflow.pyfunc\ntry:\n    mlflow.pyfunc.load_model(sys.argv[1])\nexcept BaseException:\n    pass\n"
    env = {**_env(mlflow_server), "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / n)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in live]
    errors = [p.communicate(timeout=300)[1][-1500:] for p in procs]
    ran = sorted(n for n, m in markers.items() if m.exists())
    assert ran == sorted(live), dict(zip(live, errors))


# Unpickles a planted tripwire the way a loader that trusted it would (the pytorch flavor torch.loads its
# model_data with pickle): in a fresh child process, whose only effect is the marker file.
UNPICKLE = {"hidden-pickle": "import pickle, sys\npickle.load(open(sys.argv[1], 'rb'))\n",
            "extra-flavor": "import sys, torch\ntorch.load(sys.argv[1], weights_only=False)\n"}
PICKLE_FILES = {"hidden-pickle": lambda f: _ckpt(f) / "tokenizer.json", "extra-flavor": lambda f: f / "data" / "model.pth"}


WRONG_ANSWERS = ("swapped-weights", "meta-edit")  # payload: wrong answers (control: loaded unverified)


def test_every_attack_has_a_control():
    under_mlflow = [n for n, (_, _, runs) in ATTACKS.items() if runs]
    controlled = [*under_mlflow, *UNPICKLE, *WRONG_ANSWERS]
    assert sorted(controlled) == sorted(ATTACKS) and len(controlled) == len(ATTACKS) == 10


def test_planted_pickles_are_live_when_unpickled(legit, tmp_path):
    """Control of hidden-pickle and extra-flavor (MLflow's loader never opens those files, so the control above
    cannot show them): unpickled, the planted bytes create the marker."""
    for name, script in UNPICKLE.items():
        folder, marker = tmp_path / name, tmp_path / f"{name}.marker"
        shutil.copytree(legit["folder"], folder)
        ATTACKS[name][0](folder, marker)
        assert not marker.exists()
        p = subprocess.run([sys.executable, "-c", script, str(PICKLE_FILES[name](folder))], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        # torch.load runs the payload while reading the legacy header, then calls the file corrupt: the marker
        # is what counts, not how the loader ended.
        assert marker.exists(), (name, p.returncode, p.stderr[-2000:])


def test_planted_weights_and_metadata_change_the_answers_when_unverified(legit, image_file, tmp_path):
    """Control of swapped-weights and meta-edit (their payload is wrong answers, not code): the planted checkpoint
    loaded without the recorded sha256 gives other probabilities, or other class names for the same indices."""
    from ich.checkpoint import read_meta
    legit_probs = expected_probabilities(legit["ckpt"], image_file)
    folders = {}
    for name in WRONG_ANSWERS:
        folders[name] = tmp_path / name
        shutil.copytree(legit["folder"], folders[name])
        ATTACKS[name][0](folders[name], tmp_path / f"{name}.marker")
    swapped = expected_probabilities(_ckpt(folders["swapped-weights"]), image_file)
    assert np.abs(swapped - legit_probs).max() > 1e-4, (swapped, legit_probs)
    names = read_meta(_ckpt(folders["meta-edit"])).class_names
    assert list(names) == list(reversed(CLASSES)) and names[0] != CLASSES[0] and names[2] != CLASSES[2]


def test_legit_model_has_no_pickle_and_its_code_is_ours(legit):
    from soups.serve.model import CODE_FILE
    from soups.serve.verify import resolve_model, verify_soup_model
    files = sorted(p.relative_to(legit["folder"]).as_posix() for p in legit["folder"].rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".pkl")], files
    assert (legit["folder"] / "model.py").read_bytes() == CODE_FILE.read_bytes()
    flavor = yaml.safe_load((legit["folder"] / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    source = resolve_model(f"models:/{MODEL}@legit")
    ckpt = verify_soup_model(legit["folder"], source.recorded, source.label)
    assert (ckpt / "model.safetensors").read_bytes() == (legit["ckpt"] / "model.safetensors").read_bytes()


def test_legit_model_predicts(legit, image_file, mlflow_server):
    out = subprocess.run([ICH, "predict", "--model", f"models:/{MODEL}@legit", "--json", str(image_file)],
                         env=_env(mlflow_server), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["class"] in CLASSES and abs(sum(row["probabilities"]) - 1) < 1e-6
    assert row["probabilities"] == pytest.approx(expected_probabilities(legit["ckpt"], image_file), abs=1e-6)


def test_ich_serve_answers_on_loopback_and_refuses_bad_inputs(legit, image_file, mlflow_server, tmp_path):
    from soups.tracking_server import free_port
    port = free_port()
    root = tmp_path / "allowed"
    root.mkdir()
    shutil.copy(image_file, root / "ok.png")
    (tmp_path / "secret.png").write_bytes(image_file.read_bytes())
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([ICH, "serve", "--model", f"models:/{MODEL}@legit", "--port", str(port),
                               "--path-root", str(root)], env=_env(mlflow_server), stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_served(url, server, tmp_path / "serve.log")
        encoded = base64.b64encode(image_file.read_bytes()).decode()
        answer = requests.post(f"{url}/invocations", timeout=120,
                               json={"dataframe_split": {"columns": ["image"], "data": [[encoded]]}})
        assert answer.status_code == 200, answer.text
        served = answer.json()["predictions"][0]
        assert served["probabilities"] == pytest.approx(expected_probabilities(legit["ckpt"], image_file), abs=1e-6)
        by_path = requests.post(f"{url}/invocations", timeout=60,
                                json={"dataframe_split": {"columns": ["path"], "data": [["ok.png"]]}})
        assert by_path.status_code == 200 and by_path.json()["predictions"][0]["class"] == served["class"]
        thin = base64.b64encode(png_bytes(np.zeros((1, 100000, 3), np.uint8))).decode()
        for column, value, says in (("path", str(tmp_path / "secret.png"), "outside the allowed root"),
                                    ("path", "/dev/zero", "outside the allowed root"),
                                    ("image", thin, "aspect ratio over 20:1")):
            bad = requests.post(f"{url}/invocations", timeout=60,
                                json={"dataframe_split": {"columns": [column], "data": [[value]]}})
            assert 400 <= bad.status_code < 500 and says in bad.text, (column, bad.status_code, bad.text[:500])
        assert server.poll() is None
        sockets = [l.split() for l in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        listening = [f[1] for f in sockets if f[1].endswith(f":{port:04X}") and f[3] == "0A"]  # 0A: LISTEN
        assert listening == [f"0100007F:{port:04X}"], listening  # 127.0.0.1 only
    finally:
        server.send_signal(signal.SIGTERM)  # ich serve stops the server it started, then removes its copy
        server.wait(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            requests.get(f"{url}/ping", timeout=1)
            time.sleep(0.5)
        except requests.RequestException:
            break
    else:
        pytest.fail("the scoring server outlived `ich serve`")
    assert "verified models:/attack-soup@legit (version" in (tmp_path / "serve.log").read_text()


# ---------------------------------------------------------------------------------------------- bounded inputs

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a few bytes: the pixels are never there)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _peak_growth(fn) -> tuple[float, float, str]:
    """(CPU seconds, peak RSS growth in MB, error message) of fn(), which must raise ValueError. CPU time of this
    process (process_time), not wall: a loaded machine cannot stretch it. The kernel's peak-RSS mark is reset
    first (/proc/self/clear_refs), so the peak is this call's own."""
    def status(key: str) -> int:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key))
        return int(line.split()[1]) * 1024
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    start = time.process_time()
    with pytest.raises(ValueError) as error:
        fn()
    seconds = time.process_time() - start
    return seconds, (status("VmHWM:") - before) / 2**20, str(error.value)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from mlflow.pyfunc import PythonModelContext

    from soups.serve.model import SoupClassifier
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("bounded") / "soup")
    model = SoupClassifier()
    model.load_context(PythonModelContext(artifacts={"soup": str(ckpt)}, model_config=None))
    return model


def test_bounded_inputs_each_refused_fast_and_small(classifier, tmp_path):
    import pandas as pd
    from PIL import Image

    from soups.serve.inputs import InputPolicy
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "fifo.png")
    (root / "ok.png").write_bytes(png_bytes(np.zeros((40, 40, 3), np.uint8)))
    (root / "big.png").write_bytes(b"\0" * (2 << 20))
    (tmp_path / "outside.png").write_bytes(png_bytes(np.zeros((40, 40, 3), np.uint8)))
    os.symlink(tmp_path / "outside.png", root / "escape.png")
    os.symlink("/dev/zero", root / "zero.png")
    thin, tall = png_bytes(np.zeros((1, 100000), np.uint8)), png_bytes(np.zeros((100000, 1), np.uint8))
    assert len(thin) < 1000 and Image.open(io.BytesIO(thin)).size == (100000, 1)

    def b64(data: bytes) -> pd.DataFrame:
        return pd.DataFrame({"image": [base64.b64encode(data).decode()]})
    confined = InputPolicy(path_root=Path(os.path.realpath(root)), max_bytes=1 << 20)
    off = InputPolicy()
    cases = {  # name -> (policy, input, what the one-line error must say)
        "thin 100000x1": (off, b64(thin), "100000x1 has an aspect ratio over 20:1; refusing before resizing"),
        "tall 1x100000": (off, b64(tall), "1x100000 has an aspect ratio over 20:1; refusing before resizing"),
        "bomb 30000x30000": (off, b64(_png_header_only(30000, 30000)), "decompression bomb"),
        "9000x9000 header": (off, b64(_png_header_only(9000, 9000)), "81000000 pixels, over the 40000000 limit"),
        "path column off": (off, pd.DataFrame({"path": [str(root / "ok.png")]}), "the 'path' column is off"),
        "/dev/zero, root /": (InputPolicy(path_root=Path("/")), pd.DataFrame({"path": ["/dev/zero"]}),
                              "/dev/zero is not a regular file"),
        "/dev/zero": (confined, pd.DataFrame({"path": ["/dev/zero"]}), "outside the allowed root"),
        "FIFO": (confined, pd.DataFrame({"path": ["fifo.png"]}), "fifo.png is not a regular file"),
        "outside root": (confined, pd.DataFrame({"path": [str(tmp_path / "outside.png")]}), "outside the allowed root"),
        "dotdot": (confined, pd.DataFrame({"path": ["../outside.png"]}), "outside the allowed root"),
        "symlink escape": (confined, pd.DataFrame({"path": ["escape.png"]}), "outside the allowed root"),
        "symlink to /dev/zero": (confined, pd.DataFrame({"path": ["zero.png"]}), "outside the allowed root"),
        "over the size cap": (confined, pd.DataFrame({"path": ["big.png"]}), "over the 1048576-byte cap"),
        "base64 over the cap": (confined, b64(b"\0" * (2 << 20)), "over the 1048576-byte cap"),
    }
    def allocate_then_fail():
        block = np.ones(300 << 20, np.uint8)  # the meter sees a 300 MB peak (so the bound below can fail)
        raise ValueError(f"{block.sum()} bytes")
    assert _peak_growth(allocate_then_fail)[1] > 250

    def burn_then_fail():
        start = time.process_time()
        while time.process_time() - start < 1.2:  # the meter sees 1.2 CPU s (so the time bound can fail)
            pass
        raise ValueError("slow")
    assert _peak_growth(burn_then_fail)[0] > 1.0
    figures = {}
    for name, (policy, frame, says) in cases.items():
        classifier.policy = policy
        seconds, mb, message = _peak_growth(lambda: classifier.predict(None, frame))
        figures[name] = {"cpu_seconds": round(seconds, 4), "peak_rss_growth_mb": round(mb, 1), "error": message}
        assert says in message and "\n" not in message, (name, message)
        assert seconds < 1.0 and mb < 200, (name, figures[name])  # CPU s (see _peak_growth)
    classifier.policy = confined
    assert len(classifier.predict(None, pd.DataFrame({"path": ["ok.png"]}))) == 1  # what is allowed still works
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    (ROOT / "test-artifacts" / "bounded-inputs.json").write_text(json.dumps(figures, indent=1, ensure_ascii=False))


def test_local_model_folder_with_a_symlink_or_fifo_is_refused_without_opening_it(legit, tmp_path):
    from soups.serve.verify import UntrustedModel, fetch_verified
    linked, fifo = tmp_path / "linked", tmp_path / "fifo"
    for folder in (linked, fifo):
        shutil.copytree(legit["folder"], folder)
    (linked / "model.py").unlink()
    os.symlink(ROOT / "soups" / "serve" / "model.py", linked / "model.py")  # even a link to our own file
    os.mkfifo(fifo / "requirements.txt.tmp")
    # Opening a FIFO for reading blocks until a writer comes (control: a thread that opens it is still blocked
    # after 1 s, however loaded the machine). fetch_verified runs in a thread too: it must come back (a 120 s
    # ceiling detects a hang, not a speed); a blocked reader is released by opening the write end.
    def returns(call, within_s: float) -> bool:
        done = threading.Event()

        def run():
            try:
                call()
            finally:
                done.set()
        threading.Thread(target=run, daemon=True).start()
        if done.wait(timeout=within_s):
            return True
        try:
            os.close(os.open(fifo / "requirements.txt.tmp", os.O_WRONLY | os.O_NONBLOCK))  # release the reader
        except OSError:
            pass
        done.wait(timeout=30)
        return False

    def open_fifo():
        with open(fifo / "requirements.txt.tmp", "rb"):
            pass
    assert not returns(open_fifo, 1.0)  # control
    for folder, says in ((linked, "model.py is a symlink"), (fifo, "requirements.txt.tmp is not a regular file")):
        errors = []

        def verify():
            try:
                fetch_verified(str(folder), tmp_path / f"copy-{folder.name}")
            except UntrustedModel as e:
                errors.append(str(e))
        assert returns(verify, 120), "fetch_verified blocked (it opened the FIFO)"
        assert len(errors) == 1 and re.search(says, errors[0]), errors


def test_ich_serve_refuses_a_path_root_that_is_not_a_folder(tmp_path, capsys):
    from sweeps.cli import main
    assert main(["serve", "--model", str(tmp_path), "--path-root", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ich serve: error: ") and "not a folder" in err[0], err
