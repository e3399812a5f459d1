"""Signed, not tagged (issue 23 item 1, docs/design.md#14): what is souped or served carries the owner's ed25519
signature over its model id, every file of its folder and the tags that give it meaning.

Pure: the manifest is canonical and stable; tampering any file or signed tag, adding a file, or replaying a
signature onto another model id breaks verification; the key is made once (0600 in a 0700 folder) even when
processes race to make it. On the session's real `mlflow server`, with only the REST API (MlflowClient over HTTP,
no key): (a) the issue's attack, a LoggedModel whose checkpoint.json has reversed class names with ich.meta_sha256
re-pinned, registered and `champion` moved to it, is refused by `ich predict` in one line, exit 2; control: the old
guard (verify_soup_model's sha pins) passes it and its answers are the reversed names; (b) a rewritten checkpoint
with re-pinned tags is refused as a soup ingredient (control: the untouched one is accepted); (c) a version signed
by another key is refused (control: accepted with --trust-key, and with `ich key trust`); (d) with no key at all,
one line says how to make or import one. Rolling `champion` back to an older signed version is served, with a
note. An env file with an include is refused (issue 23 item 3), signed or not.
"""
from __future__ import annotations

import base64
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from soups.store import signing
from soups.store.tags import TAG_META_SHA256, TAG_SHA256, TAG_SIGNATURE, TAG_SIGNED_BY

ICH = str(Path(sys.executable).with_name("ich"))
CLASSES = ["Ca trù", "Hát xoan", "Quan họ", "Đờn ca tài tử"]  # even: reversing moves every name
MODEL = "signed-soup"


# ---------------------------------------------------------------------------------------------- pure

def _folder(root: Path) -> Path:
    (root / "artifacts" / "soup").mkdir(parents=True)
    (root / "MLmodel").write_text("flavors: {}\n")
    (root / "artifacts" / "soup" / "model.safetensors").write_bytes(b"\x00" * 64)
    (root / "artifacts" / "soup" / "checkpoint.json").write_text(json.dumps({"class_names": CLASSES}))
    return root


TAGS = {"ich.kind": "checkpoint", "ich.sweep": "s", "ich.trial": "t1", "ich.epoch": "2", TAG_SHA256: "ab" * 32,
        "ich.architecture": "coatnet_tiny_ich", "ich.dataset_fingerprint": "d", "ich.init_fingerprint": "i",
        "mlflow.user": "not signed: MLflow's own"}


@pytest.fixture
def key(tmp_path, monkeypatch):
    monkeypatch.setenv("ICH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    return signing.own_key()


def test_manifest_is_canonical_and_stable(tmp_path):
    files = signing.folder_hashes(_folder(tmp_path / "m"))
    one = signing.manifest("m-1", TAGS, files)
    again = signing.manifest("m-1", dict(reversed(list(TAGS.items()))), dict(reversed(list(files.items()))))
    assert one == again  # key order does not matter
    doc = json.loads(one)
    assert one == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert doc["version"] == signing.MANIFEST_VERSION and doc["model_id"] == "m-1"
    assert set(doc["files"]) == {"MLmodel", "artifacts/soup/model.safetensors", "artifacts/soup/checkpoint.json"}
    assert "mlflow.user" not in doc["tags"] and doc["tags"]["ich.trial"] == "t1"
    # Stable across versions of this code: a signature made today verifies tomorrow.
    assert signing.manifest("m-1", {"ich.kind": "soup"}, {"a": "00"}) == \
        b'{"files":{"a":"00"},"model_id":"m-1","tags":{"ich.kind":"soup"},"version":1}'


def test_key_is_private_and_made_once(key, tmp_path):
    path = signing.key_path()
    assert path == tmp_path / "home" / "keys" / "signing_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert signing.key_id(signing.own_key().public_key()) == signing.key_id(key.public_key())  # read, not made again
    path.chmod(0o644)
    with pytest.raises(signing.SigningKeyError, match="chmod 600"):
        signing.own_key()


def _race(path: str, queue) -> None:
    queue.put(signing.key_id(signing.own_key(path).public_key()))


def test_racing_processes_make_one_key(tmp_path):
    path = tmp_path / "keys" / "signing_key"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(path), queue)) for _ in range(8)]
    for p in procs:
        p.start()
    ids = {queue.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(timeout=60)
    assert len(ids) == 1 and sorted(os.listdir(path.parent)) == ["signing_key"]  # no temporary file left


def test_tampering_any_file_or_signed_tag_or_replaying_fails(key, tmp_path):
    folder = _folder(tmp_path / "m")
    tags = {**TAGS, **signing.sign("m-1", TAGS, folder)}
    trusted = {signing.key_id(key.public_key()): key.public_key()}
    assert signing.verify("m-1", tags, folder, trusted=trusted) == tags[TAG_SIGNED_BY]  # control: verifies
    tags["mlflow.user"] = "someone else"  # not a signed tag: still verifies
    signing.verify("m-1", tags, folder, trusted=trusted)

    for rel in ("MLmodel", "artifacts/soup/model.safetensors", "artifacts/soup/checkpoint.json"):
        copy = tmp_path / f"edit-{rel.replace('/', '_')}"
        shutil.copytree(folder, copy)
        with open(copy / rel, "ab") as f:
            f.write(b" ")
        with pytest.raises(signing.SignatureError, match="signature does not match its files or tags"):
            signing.verify("m-1", tags, copy, trusted=trusted)
    extra = tmp_path / "extra"
    shutil.copytree(folder, extra)
    (extra / "requirements.txt").write_text("torch\n")
    with pytest.raises(signing.SignatureError, match="does not match"):
        signing.verify("m-1", tags, extra, trusted=trusted)
    signing.verify("m-1", {**tags, "ich.gc": "deleted", "ich.superseded_by": "m-9"}, folder, trusted=trusted)
    for tag in [k for k in TAGS if k.startswith("ich.")] + ["ich.wise_ft.alpha"]:  # changed, or added after
        forged = {**tags, tag: tags.get(tag, "") + "x"}
        with pytest.raises(signing.SignatureError, match="does not match"):
            signing.verify("m-1", forged, folder, trusted=trusted)
    with pytest.raises(signing.SignatureError, match="does not match"):  # replayed onto another model id
        signing.verify("m-2", tags, folder, trusted=trusted)
    with pytest.raises(signing.SignatureError, match="not signed"):
        signing.verify("m-1", {k: v for k, v in tags.items() if k != TAG_SIGNATURE}, folder, trusted=trusted)
    other = signing.own_key(tmp_path / "other" / "key")
    with pytest.raises(signing.SignatureError, match=f"signed by an untrusted key '{tags[TAG_SIGNED_BY]}'"):
        signing.verify("m-1", tags, folder, trusted={signing.key_id(other.public_key()): other.public_key()})
    with pytest.raises(signing.SigningKeyError, match="ich key show.*ich key trust KEY"):
        signing.verify("m-1", tags, folder, trusted={})


def test_a_signer_given_a_key_file_never_makes_one(tmp_path):
    """A trial signs with the driver's key file (sweeps/trainable.py): a missing one is one line, never a new key
    (which would sign with a key nobody trusts). Control: a key file that exists signs."""
    folder = _folder(tmp_path / "m")
    with pytest.raises(signing.SigningKeyError, match=f"no signing key at {tmp_path / 'missing'}"):
        signing.sign("m-1", TAGS, folder, key_file=tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    made = signing.own_key(tmp_path / "made")
    assert signing.sign("m-1", TAGS, folder, key=made)[TAG_SIGNED_BY] == signing.key_id(made.public_key())


def test_trusted_keys_are_own_file_and_given(tmp_path, monkeypatch):
    monkeypatch.setenv("ICH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    monkeypatch.setattr(signing, "_given", {})
    assert signing.trusted_keys() == {}  # verifying never makes a key
    assert not signing.key_path().exists()
    a, b, c = (signing.own_key(tmp_path / n).public_key() for n in "abc")
    kid, new = signing.add_trusted(signing.public_text(a))
    assert new and not signing.add_trusted(signing.public_text(a))[1]
    (tmp_path / "b.pub").write_text("# the owner's key\n" + signing.public_text(b) + "\n")
    signing.trust([str(tmp_path / "b.pub")])
    assert set(signing.trusted_keys()) == {kid, signing.key_id(b)}
    own = signing.own_key()
    assert set(signing.trusted_keys()) == {kid, signing.key_id(b), signing.key_id(own.public_key())}
    signing.use_only([signing.public_text(c)])  # a Ray task: exactly the driver's
    try:
        assert set(signing.trusted_keys()) == {signing.key_id(c)}
    finally:
        signing.use_only(None)


# ---------------------------------------------------------------------------------------------- on a real server

def _tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    import torch

    from ich.checkpoint import CheckpointMeta, save_checkpoint
    from ich.models import create_model
    torch.manual_seed(seed)
    model = create_model("coatnet_tiny_ich", len(CLASSES), 32)
    meta = CheckpointMeta(architecture="coatnet_tiny_ich", img_size=32, num_classes=len(CLASSES), class_names=CLASSES,
                          dataset_fingerprint="signing", init_fingerprint="signing", epoch=1,
                          extra={"image_size": 36, "eval_crop_pct": 0.875, "sweep": "signing", "trial": "t0"})
    save_checkpoint(folder, model.state_dict(), meta)
    return folder


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """This module's ICH_HOME: the owner's key is made here on first use (by the first model it signs)."""
    path = tmp_path_factory.mktemp("signing-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICH_HOME", str(path))
        mp.delenv(signing.KEY_ENV, raising=False)
        yield path


def _log_soup(client, experiment_id: str, ckpt: Path, key_file: Path | None = None):
    """A soup pyfunc model as versions were registered before 2026-12-08 (soups.serve.log.log_pyfunc), signed by the
    own key or by the key in key_file; returns (run_id, model_id)."""
    import mlflow

    from soups.serve.log import log_pyfunc
    before = os.environ.get(signing.KEY_ENV)
    if key_file is not None:
        os.environ[signing.KEY_ENV] = str(key_file)
    try:
        with mlflow.start_run(experiment_id=experiment_id) as run:
            info = log_pyfunc(ckpt, name="pyfunc", example_pixels=np.zeros((36, 36, 3), np.uint8),
                              tags={"ich.kind": "soup-pyfunc"})
    finally:
        if key_file is not None:
            os.environ.pop(signing.KEY_ENV) if before is None else os.environ.__setitem__(signing.KEY_ENV, before)
    return run.info.run_id, info.model_id


def _register(client, model_id: str, run_id: str, alias: str | None = None) -> str:
    version = client.create_model_version(MODEL, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
    if alias:
        client.set_registered_model_alias(MODEL, alias, version.version)
    return version.version


@pytest.fixture(scope="module")
def served(home, mlflow_server, tmp_path_factory):
    """A signed soup pyfunc registered as MODEL version 1 with alias `champion`."""
    import mlflow
    from mlflow import MlflowClient
    client = MlflowClient(mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    experiment_id = client.create_experiment("signing")
    ckpt = _tiny_checkpoint(tmp_path_factory.mktemp("signing-soup") / "soup")
    run_id, model_id = _log_soup(client, experiment_id, ckpt)
    client.create_registered_model(MODEL)
    _register(client, model_id, run_id, "champion")
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_id}",
                                                      dst_path=str(tmp_path_factory.mktemp("signed-model"))))
    return {"client": client, "experiment_id": experiment_id, "run_id": run_id, "model_id": model_id,
            "folder": folder, "ckpt": ckpt}


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    from PIL import Image
    path = tmp_path_factory.mktemp("signing-images") / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def _ich(*args: str, mlflow_server: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "ICH_HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop(signing.KEY_ENV, None)
    return subprocess.run([ICH, *args], env=env, capture_output=True, text=True, timeout=300)


def _one_line(out: subprocess.CompletedProcess, command: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f"ich {command}: error: "), out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


def _forge(served, folder: Path, tags: dict) -> str:
    """The attacker: with the REST API only, a new LoggedModel holding `folder`, tagged `tags`, READY."""
    from mlflow.entities import LoggedModelStatus
    client = served["client"]
    model = client.create_logged_model(served["experiment_id"], name="pyfunc", source_run_id=served["run_id"],
                                       tags=tags, model_type="soup-pyfunc")
    client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def _answer(ckpt: Path, image_file: Path) -> str:
    """The class a soup checkpoint folder answers for the image, through SoupClassifier with no check at all."""
    from mlflow.pyfunc import PythonModelContext

    from soups.serve.model import SoupClassifier
    model = SoupClassifier()
    model.load_context(PythonModelContext(artifacts={"soup": str(ckpt)}, model_config=None))
    probs = model.probabilities([(image_file.read_bytes(), str(image_file))])
    return model.classes[int(probs[0].argmax())]


def _refused_by_predict_and_serve(uri: str, version: str, image_file: Path, mlflow_server: str, home: Path) -> None:
    """`ich predict` and `ich serve` (before any server starts) refuse the version in one line: bad signature."""
    from soups.tracking_server import free_port
    for command in (["predict", "--model", uri, str(image_file)],
                    ["serve", "--model", uri, "--port", str(free_port())]):
        refused = _ich(*command, mlflow_server=mlflow_server, home=home)
        line = _one_line(refused, command[0])
        assert f"{uri} (version {version})" in line and "signature does not match its files or tags" in line
        assert not refused.stdout


def test_issue_attack_reversed_classes_repinned_and_aliased_is_refused(served, home, image_file, mlflow_server,
                                                                       tmp_path):
    from ich.checkpoint import sha256_file
    from soups.serve.verify import resolve_model, verify_soup_model
    client = served["client"]
    # Control first: the owner's champion is served.
    ok = _ich("predict", "--model", f"models:/{MODEL}@champion", "--json", str(image_file), mlflow_server=mlflow_server,
              home=home)
    assert ok.returncode == 0, ok.stderr[-3000:]
    honest = json.loads(ok.stdout.strip().splitlines()[-1])

    folder = tmp_path / "forged"
    shutil.copytree(served["folder"], folder)
    meta = next((folder / "artifacts").iterdir()) / "checkpoint.json"
    doc = json.loads(meta.read_text())
    doc["class_names"] = list(reversed(doc["class_names"]))
    meta.write_text(json.dumps(doc))
    tags = dict(client.get_logged_model(served["model_id"]).tags)
    tags[TAG_META_SHA256] = sha256_file(meta)  # re-pinned, as the issue's attacker did
    forged_id = _forge(served, folder, tags)
    version = _register(client, forged_id, served["run_id"], "champion")
    uri = f"models:/{MODEL}@champion"
    try:
        # CONTROL: the guard that existed (the sha pins in the tags) passes the forged model, and what it would
        # serve answers the reversed names: the attack works against it.
        source = resolve_model(uri)
        assert source.model_id == forged_id
        ckpt = verify_soup_model(folder, source.recorded, source.label)
        forged_answer = _answer(ckpt, image_file)
        assert forged_answer == CLASSES[::-1][CLASSES.index(honest["class"])] and forged_answer != honest["class"]
        _refused_by_predict_and_serve(uri, version, image_file, mlflow_server, home)
    finally:
        client.set_registered_model_alias(MODEL, "champion", "1")


def test_rollback_to_an_older_signed_version_is_served_with_a_note(served, home, image_file, mlflow_server):
    client = served["client"]
    run_id, model_id = _log_soup(client, served["experiment_id"], served["ckpt"])  # a newer signed version
    newer = _register(client, model_id, run_id)
    out = _ich("predict", "--model", f"models:/{MODEL}@champion", str(image_file), mlflow_server=mlflow_server,
               home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    notes = [line for line in out.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: models:/{MODEL}@champion is version 1; version {newer} is newer and signed by a trusted "
                     "key (a rollback: allowed, the older version is verified like any other)"]
    control = _ich("predict", "--model", f"models:/{MODEL}/{newer}", str(image_file), mlflow_server=mlflow_server,
                   home=home)
    assert control.returncode == 0 and "note:" not in control.stderr


def test_a_version_signed_by_another_key_is_refused_until_trusted(served, home, image_file, mlflow_server, tmp_path):
    client = served["client"]
    other = tmp_path / "other-home" / "keys" / "signing_key"
    other_public = signing.public_text(signing.own_key(other).public_key())
    run_id, model_id = _log_soup(client, served["experiment_id"], served["ckpt"], key_file=other)
    version = _register(client, model_id, run_id)
    uri = f"models:/{MODEL}/{version}"
    line = _one_line(_ich("predict", "--model", uri, str(image_file), mlflow_server=mlflow_server, home=home),
                     "predict")
    assert f"signed by an untrusted key '{signing.key_id(signing.own_key(other).public_key())}'" in line
    (tmp_path / "owner.pub").write_text(other_public + "\n")
    for trust in (other_public.split()[0], str(tmp_path / "owner.pub")):  # the key itself, or a file holding it
        out = _ich("predict", "--model", uri, "--trust-key", trust, str(image_file), mlflow_server=mlflow_server,
                   home=home)
        assert out.returncode == 0, out.stderr[-3000:]
    assert _ich("predict", "--model", uri, str(image_file), mlflow_server=mlflow_server, home=home).returncode == 2
    trusted_home = tmp_path / "trusting-home"
    shutil.copytree(home, trusted_home)
    added = _ich("key", "trust", other_public, mlflow_server=mlflow_server, home=trusted_home)
    assert added.returncode == 0 and "trusted: key" in added.stdout
    out = _ich("predict", "--model", uri, str(image_file), mlflow_server=mlflow_server, home=trusted_home)
    assert out.returncode == 0, out.stderr[-3000:]


def test_no_key_says_how_to_make_or_import_one(served, image_file, mlflow_server, tmp_path):
    empty = tmp_path / "new-home"
    empty.mkdir()
    line = _one_line(_ich("predict", "--model", f"models:/{MODEL}@champion", str(image_file),
                          mlflow_server=mlflow_server, home=empty), "predict")
    assert "no trusted signing key" in line and "`ich key show`" in line and "`ich key trust KEY`" in line
    assert not (empty / "keys").exists()  # verifying made no key
    shown = _ich("key", "show", mlflow_server=mlflow_server, home=empty)
    assert shown.returncode == 0 and (empty / "keys" / "signing_key").is_file()
    # Control: the owner's public key, imported, is enough.
    owner = signing.public_text(signing.own_key().public_key())
    assert _ich("key", "trust", owner, mlflow_server=mlflow_server, home=empty).returncode == 0
    out = _ich("predict", "--model", f"models:/{MODEL}@champion", str(image_file), mlflow_server=mlflow_server,
               home=empty)
    assert out.returncode == 0, out.stderr[-3000:]


def test_an_include_in_an_env_file_is_refused_signed_or_not(served, tmp_path):
    """Issue 23 item 3: MLflow follows `-r` when it loads a model, so verify_soup_model refuses includes, options
    and URLs in requirements.txt / conda.yaml / python_env.yaml (control: the folder as logged passes)."""
    from soups.serve.verify import UntrustedModel, verify_soup_model
    recorded = dict(served["client"].get_logged_model(served["model_id"]).tags)
    verify_soup_model(served["folder"], recorded, "control")
    for name, text in (("requirements.txt", "torch\n-r requirements.txt\n"), ("requirements.txt", "-c /dev/zero\n"),
                       ("requirements.txt", "https://example.invalid/x.whl\n"),
                       ("requirements.txt", "--index-url http://x\n"),
                       ("python_env.yaml", "python: 3.11\ndependencies:\n- -r /dev/zero\n"),
                       ("conda.yaml", "dependencies:\n- pip:\n  - -r requirements.txt\n")):
        folder = tmp_path / f"env-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(served["folder"], folder)
        (folder / name).write_text(text)
        with pytest.raises(UntrustedModel, match=f"{name} line .* is an include, an option or a URL"):
            verify_soup_model(folder, recorded, "planted")


# ---------------------------------------------------------------------------------------------- soup ingredients

def test_rewritten_checkpoint_is_refused_as_a_soup_ingredient(home, mlflow_client, tmp_path):
    """(b) A checkpoint LoggedModel forged with the REST API: checkpoint.json rewritten (its metrics and class
    names), the weights' tag re-pinned after swapping them, the signature tags copied. The soups' pull refuses it
    (CheckpointPool skips it, naming the model and the reason); control: the untouched checkpoint is accepted."""
    from mlflow.entities import LoggedModelStatus

    from ich.checkpoint import sha256_file
    from soups.store import registry
    from soups.pull import CheckpointPool
    experiment_id = registry.get_or_create_experiment(mlflow_client, "signing-ingredients")
    run_id = mlflow_client.create_run(experiment_id).info.run_id
    honest = _tiny_checkpoint(tmp_path / "honest")
    honest_id = registry.log_checkpoint(mlflow_client, (experiment_id, run_id), honest)
    tags = dict(mlflow_client.get_logged_model(honest_id).tags)
    assert tags[TAG_SIGNATURE] and tags[TAG_SIGNED_BY]

    forged = tmp_path / "forged"
    shutil.copytree(honest, forged)
    doc = json.loads((forged / "checkpoint.json").read_text())
    doc["class_names"] = list(reversed(doc["class_names"]))
    doc["metrics"] = {"val_accuracy": 0.99}
    (forged / "checkpoint.json").write_text(json.dumps(doc))
    _tiny_checkpoint(tmp_path / "other-weights", seed=7)
    shutil.copy(tmp_path / "other-weights" / "model.safetensors", forged / "model.safetensors")
    tags[TAG_SHA256] = sha256_file(forged / "model.safetensors")  # re-pinned
    model = mlflow_client.create_logged_model(experiment_id, name="t0-e001", source_run_id=run_id, tags=tags,
                                              model_type="checkpoint")
    mlflow_client.log_model_artifacts(model.model_id, str(forged))
    mlflow_client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)

    records = {m: registry.get_model_record(mlflow_client, m) for m in (honest_id, model.model_id)}
    # Control: the forged record passes every check that existed (sha256, safetensors, finite, tags vs meta).
    folder = registry.download_checkpoint(mlflow_client, records[model.model_id], tmp_path / "control")
    with pytest.raises(signing.SignatureError, match="signature does not match"):
        registry.verify_pulled(records[model.model_id], folder)
    import unittest.mock
    with unittest.mock.patch.object(signing, "verify", lambda *a, **k: "unchecked"):
        registry.verify_pulled(records[model.model_id], folder)  # the old guard alone lets it in

    with pytest.warns(RuntimeWarning, match=f"skipping checkpoint .*{model.model_id}.*signature does not match"):
        pool = CheckpointPool(mlflow_client, [(records[honest_id], 0.5), (records[model.model_id], 0.99)],
                              tmp_path / "pulled")
        got = {m: pool.get(records[m]) for m in records}
    assert got[honest_id] is not None and got[model.model_id] is None
    assert [s["model_id"] for s in pool.skipped] == [model.model_id]
    assert base64.b64decode(tags[TAG_SIGNATURE])  # the copied signature is a real one: it just is not this model's


def test_issue_attack_on_a_registered_soup_record_is_refused(served, home, image_file, mlflow_server, tmp_path):
    """A version is the soup's own record now (soups/champion.py registers the LoggedModel `ich soup` logged): the
    issue's attack on that form. A copy of the record with reversed class names keeps the weights' sha256 tag true,
    is registered and `champion` moved to it. CONTROL: every check but the signature passes it (sha256, finite
    safetensors, tags against checkpoint.json) and its answers are the reversed names; `ich predict` and `ich serve`
    refuse it in one line. (Last in the module: it adds versions, which the rollback test above counts.)"""
    import unittest.mock

    from mlflow.entities import LoggedModelStatus

    from ich.checkpoint import read_meta, sha256_file
    from soups.serve.verify import resolve_model
    from soups.store import registry
    from soups.store.tags import KIND_SOUP, model_tags
    client, honest = served["client"], served["ckpt"]
    tags = model_tags(read_meta(honest), kind=KIND_SOUP, sha256=sha256_file(honest / "model.safetensors"),
                      trial="soup")
    soup_id = registry.log_soup_model(client, experiment_id=served["experiment_id"], run_id=served["run_id"],
                                      ckpt_dir=honest, name="greedy", tags=tags, metrics={})
    _register(client, soup_id, served["run_id"], "champion")
    uri = f"models:/{MODEL}@champion"
    try:
        ok = _ich("predict", "--model", uri, "--json", str(image_file), mlflow_server=mlflow_server, home=home)
        assert ok.returncode == 0, ok.stderr[-3000:]  # the owner's soup record is served
        honest_class = json.loads(ok.stdout.strip().splitlines()[-1])["class"]

        folder = tmp_path / "forged"
        shutil.copytree(honest, folder)
        doc = json.loads((folder / "checkpoint.json").read_text())
        doc["class_names"] = list(reversed(doc["class_names"]))
        (folder / "checkpoint.json").write_text(json.dumps(doc))
        forged = client.create_logged_model(served["experiment_id"], name="greedy", source_run_id=served["run_id"],
                                            tags=dict(client.get_logged_model(soup_id).tags), model_type=KIND_SOUP)
        client.log_model_artifacts(forged.model_id, str(folder))
        client.finalize_logged_model(forged.model_id, LoggedModelStatus.READY)
        version = _register(client, forged.model_id, served["run_id"], "champion")

        source = resolve_model(uri)
        assert source.record is not None and source.model_id == forged.model_id
        ckpt = registry.download_checkpoint(client, source.record, tmp_path / "control")
        with unittest.mock.patch.object(signing, "verify", lambda *a, **k: None):
            registry.verify_pulled(source.record, ckpt)  # CONTROL: without the signature, nothing else objects
        forged_answer = _answer(ckpt, image_file)
        assert forged_answer == CLASSES[::-1][CLASSES.index(honest_class)] and forged_answer != honest_class
        _refused_by_predict_and_serve(uri, version, image_file, mlflow_server, home)
    finally:
        client.set_registered_model_alias(MODEL, "champion", "1")
