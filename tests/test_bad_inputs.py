"""Bad input through the real command lines: a non-zero exit, exactly one stderr line that names the item
and the problem, and nothing already written lost or half-written.

Most cases call `sweeps.cli.main` / `sweeps.coatnet.main` in-process (the same code as the `ich` and
`python sweeps/coatnet.py` entry points, without the interpreter start); the ones that need their own
process (Ray, the MLflow client of `ich soup` / `ich predict`) run as subprocesses.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.imagegen import class_image, make_bomb, make_simple_folder, save_as

ROOT = Path(__file__).resolve().parent.parent
CLASSES10 = {f"c{i}": 4 for i in range(10)}


# ---------------------------------------------------------------------------------------------- helpers

def run_main(main, argv, capsys) -> tuple[int, list[str], str]:
    """(exit status, non-empty stderr lines, stdout) of an in-process CLI main."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, [line for line in err.splitlines() if line.strip()], out


def ich(capsys, *argv):
    from sweeps.cli import main
    return run_main(main, argv, capsys)


def sweep(capsys, *argv):
    from sweeps.job import main
    return run_main(main, argv, capsys)


def run_proc(args, env_extra=None, timeout=240) -> tuple[int, list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env = {k: v for k, v in env.items() if v is not None}  # None: unset it
    p = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, [line for line in p.stderr.splitlines() if line.strip()], p.stdout


def assert_one_line(result, prefix: str, *names: str) -> str:
    rc, lines, _ = result
    assert rc == 2, f"exit {rc}, stderr: {lines}"
    assert len(lines) == 1, f"want exactly one stderr line, got {len(lines)}:\n" + "\n".join(lines[-15:])
    line = unicodedata.normalize("NFC", lines[0])
    assert line.startswith(prefix), line
    for name in names:
        assert unicodedata.normalize("NFC", name) in line, f"{name!r} not named in: {line}"
    return line


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temp folders of an interrupted ingest or checkpoint write (.<name>.tmp-*, .<name>.old-*)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp" in p.name or ".old" in p.name))


def ingest_args(src, out, *extra):
    return ["ingest", src, out, "--size", "16", "--workers", "1", "--quiet", *extra]


# ---------------------------------------------------------------------------------------------- ingest

def _truncated_jpeg(path: Path) -> None:
    save_as(class_image(1, 32, np.random.default_rng(1)), path, "jpeg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _not_an_image(path: Path) -> None:
    path.write_text("Đờn ca tài tử: lyrics, not a photo\n")


def _bomb(path: Path) -> None:
    make_bomb(path)


def _thin(path: Path) -> None:
    Image.new("L", (100_000, 1), 128).save(path, "PNG")  # ~370 bytes; a whole-image resize wanted ~24 GiB


def _tall(path: Path) -> None:
    Image.new("L", (1, 100_000), 128).save(path, "PNG")


def _huge(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    os.truncate(path, 60 * 2**20)  # sparse: over the 50 MiB default cap without using the disk


BROKEN = [("truncated.jpg", _truncated_jpeg, "truncated"), ("empty.jpg", _zero_bytes, "zero bytes"),
          ("notes.png", _not_an_image, "not an image"), ("bomb.png", _bomb, "decompression bomb"),
          ("thin.png", _thin, "extreme aspect ratio"), ("tall.png", _tall, "extreme aspect ratio"),
          ("huge.png", _huge, "too large")]


@pytest.mark.parametrize("filename, maker, reason", BROKEN, ids=[b[2].replace(" ", "_") for b in BROKEN])
def test_broken_file_is_skipped_with_its_reason(tmp_path, capsys, filename, maker, reason):
    src = make_simple_folder(tmp_path / "src", {"a": 3, "b": 3})
    maker(src / "a" / filename)
    rc, err, out = ich(capsys, *ingest_args(src, tmp_path / "out"))
    assert rc == 0 and err == [], err
    assert f"skipped a/{filename}: {reason}" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {"path": f"a/{filename}", "reason": reason} in manifest["skipped"]
    assert sum(manifest["num_images"].values()) == 6


@pytest.mark.parametrize("filename, maker, reason", BROKEN, ids=[b[2].replace(" ", "_") for b in BROKEN])
def test_broken_file_fails_a_strict_ingest(tmp_path, capsys, filename, maker, reason):
    src = make_simple_folder(tmp_path / "src", {"a": 3, "b": 3})
    maker(src / "a" / filename)
    result = ich(capsys, *ingest_args(src, tmp_path / "out", "--strict"))
    assert_one_line(result, "ich ingest: error:", filename, reason)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("filename, maker, reason", BROKEN, ids=[b[2].replace(" ", "_") for b in BROKEN])
def test_strict_ingest_function_names_the_first_skipped_file(tmp_path, filename, maker, reason):
    """ingest(strict=True), what `ich ingest --strict` calls: the first file (by path) that would be skipped
    fails it, with its reason and how many there are."""
    from ich.ingest import IngestError, ingest
    src = make_simple_folder(tmp_path / "src", {"a": 3, "b": 3})
    maker(src / "a" / f"00-{filename}")  # sorts before a/000.png
    (src / "b" / "zz_copy.png").write_bytes((src / "a" / "000.png").read_bytes())  # 2 x conflicting labels
    with pytest.raises(IngestError) as e:
        ingest(src, tmp_path / "out", size=16, workers=1, progress=False, strict=True)
    message = str(e.value)
    assert message == f"{src / 'a' / f'00-{filename}'}: {reason} (strict: 3 files would be skipped)"
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_odd_but_valid_images_are_converted(tmp_path, capsys):
    """CMYK JPEG, 16-bit grey PNG, RGBA, palette with transparency, grey+alpha: accepted, stored as RGB."""
    src = make_simple_folder(tmp_path / "src", {"a": 3, "b": 3})
    rng = np.random.default_rng(3)
    for fmt, ext in (("cmyk_jpeg", "jpg"), ("png16", "png"), ("rgba_png", "png"), ("palette_png", "png")):
        save_as(class_image(0, 24, rng), src / "a" / f"odd_{fmt}.{ext}", fmt)
    Image.fromarray(class_image(1, 24, rng)).convert("LA").save(src / "b" / "odd_la.png")
    Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.int32), "I").save(src / "b" / "odd_i32.tif")
    rc, err, out = ich(capsys, *ingest_args(src, tmp_path / "out"))
    assert rc == 0 and err == [], err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == [] and sum(manifest["num_images"].values()) == 12
    assert sum(manifest["counts"][s]["a"] for s in ("train", "val", "test")) == 7


@pytest.mark.timeout(60)
def test_symlink_loops_do_not_hang(tmp_path, capsys):
    src = make_simple_folder(tmp_path / "src", {"a": 3, "b": 3})
    os.symlink(src, src / "a" / "loop_dir")  # a folder link back to the root
    os.symlink(src / "b" / "self1", src / "b" / "self2")  # a file link loop
    os.symlink(src / "b" / "self2", src / "b" / "self1")
    rc, err, out = ich(capsys, *ingest_args(src, tmp_path / "out"))
    assert rc == 0 and err == [], err
    assert "skipped b/self1: unreadable" in out and "skipped b/self2: unreadable" in out
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_images"]["train"] >= 2


@pytest.mark.parametrize("case, names", [
    ("empty_class", ["'rỗng'", "no usable images"]),
    ("one_image_class", ["'một'", "1 usable image"]),
    ("nfc_nfd_twins", ["Hát bội", "NFC", "NFD", "different Unicode forms"]),
    ("missing_source", ["nowhere", "does not exist"]),
    ("no_images", ["no image files found"]),
])
def test_dataset_errors_name_the_item(tmp_path, capsys, case, names):
    src = tmp_path / "src"
    if case == "empty_class":
        make_simple_folder(src, {"a": 3})
        (src / "rỗng").mkdir()
    elif case == "one_image_class":
        make_simple_folder(src, {"a": 3, "một": 1})
    elif case == "nfc_nfd_twins":
        make_simple_folder(src, {"Hát bội": 3, unicodedata.normalize("NFD", "Hát bội"): 3})
    elif case == "missing_source":
        src = tmp_path / "nowhere"
    elif case == "no_images":
        (src / "a").mkdir(parents=True)
    assert_one_line(ich(capsys, *ingest_args(src, tmp_path / "out")), "ich ingest: error:", *names)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_same_image_in_two_classes(tmp_path, capsys):
    src = make_simple_folder(tmp_path / "src", {"a": 3, "b": 3})
    (src / "b" / "copy_of_a0.png").write_bytes((src / "a" / "000.png").read_bytes())
    rc, err, out = ich(capsys, *ingest_args(src, tmp_path / "out"))
    assert rc == 2 and len(err) == 1 and "class 'a' has 2 usable images" in err[0], (rc, err)  # a lost one: too few
    src2 = make_simple_folder(tmp_path / "src2", {"a": 4, "b": 3})
    (src2 / "b" / "copy_of_a0.png").write_bytes((src2 / "a" / "000.png").read_bytes())
    rc, err, out = ich(capsys, *ingest_args(src2, tmp_path / "out2"))
    assert rc == 0 and err == []
    assert "skipped a/000.png: conflicting labels" in out and "skipped b/copy_of_a0.png: conflicting labels" in out


def test_same_image_in_two_classes_fails_a_strict_ingest(tmp_path, capsys):
    src = make_simple_folder(tmp_path / "src", {"a": 4, "b": 3})
    (src / "b" / "copy_of_a0.png").write_bytes((src / "a" / "000.png").read_bytes())
    assert_one_line(ich(capsys, *ingest_args(src, tmp_path / "out", "--strict")), "ich ingest: error:",
                    "a/000.png", "conflicting labels")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_failed_reingest_with_overwrite_keeps_the_dataset(tmp_path, capsys):
    good = make_simple_folder(tmp_path / "good", {"a": 3, "b": 3})
    out = tmp_path / "out"
    assert ich(capsys, *ingest_args(good, out))[0] == 0
    before = snapshot(out)
    bad = make_simple_folder(tmp_path / "bad", {"a": 3, "b": 3})
    (bad / "b" / "001.png").write_bytes(b"")
    (bad / "b" / "002.png").write_text("no")  # b keeps one image: fails after decoding everything
    assert_one_line(ich(capsys, *ingest_args(bad, out, "--overwrite")), "ich ingest: error:", "'b'", "1 usable image")
    assert snapshot(out) == before and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------- sweep config

@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory) -> Path:
    """10 classes x 4 images, ingested at 32 px."""
    from ich.ingest import ingest
    root = tmp_path_factory.mktemp("bad-inputs-ds")
    make_simple_folder(root / "src", CLASSES10, size=32)
    ingest(root / "src", root / "ds", size=32, workers=1, progress=False)
    return root / "ds"


@pytest.fixture(scope="module")
def other_ds(tmp_path_factory) -> Path:
    from ich.ingest import ingest
    root = tmp_path_factory.mktemp("bad-inputs-other")
    make_simple_folder(root / "src", CLASSES10, size=32, seed=7)
    ingest(root / "src", root / "ds", size=32, workers=1, progress=False)
    return root / "ds"


def _config(tmp_path, **edits) -> Path:
    from tests.fixtures_sweep import write_sweep_config
    return write_sweep_config(tmp_path, "bad-config", **edits)


@pytest.mark.parametrize("edits, names", [
    ({"model: coatnet_tiny_ich": "model: coatnet_nope_224"}, ["unknown model", "coatnet_nope_224"]),
    ({"lr: {loguniform: [3.0e-4, 1.5e-3]}": "lr: {loguniform: [1.5e-3, 3.0e-4]}"}, ["search.lr", "no valid point"]),
    ({"mixup: {uniform: [0.0, 0.2]}": "mixup: {choice: []}"}, ["search.mixup", "no valid point"]),
    ({"seed: {randint: [0, 100000]}": "not_an_option: {randint: [0, 100000]}"}, ["search.not_an_option",
                                                                                "not a training option"]),
], ids=["unknown_model", "empty_range", "empty_choice", "unknown_option"])
def test_bad_sweep_config(tmp_path, capsys, tiny_ds, edits, names):
    config = _config(tmp_path, **edits)
    text = config.read_text()
    assert all(new in text for new in edits.values()), "the edit did not apply"
    assert_one_line(sweep(capsys, "--config", config, "--data", tiny_ds, "--no-soups"), "sweep: error:",
                    config.name, *names)


def test_missing_dataset(tmp_path, capsys):
    assert_one_line(sweep(capsys, "--config", _config(tmp_path), "--data", tmp_path / "no-such-ds", "--no-soups"),
                    "sweep: error:", "no-such-ds", "does not exist")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_impossible_resources(tmp_path, tiny_ds):
    """cpus_per_trial 64 on this machine: refused once Ray says what it has, not left waiting forever."""
    result = run_proc(["sweeps/coatnet.py", "--config", _config(tmp_path), "--data", tiny_ds, "--no-soups",
                       "--cpus-per-trial", "64"],
                      # Never contacted: the check comes before any MLflow call.
                      env_extra={"ICH_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
                                 "RAY_ADDRESS": None})
    # Ray's own start-up log lines (timestamped INFO/WARNING from ray) are the only other lines allowed;
    # no traceback, and exactly one error line, the last.
    rc, lines, out = result
    ray_log = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) [\w.]+\.py:\d+ -- ")
    assert_one_line((rc, [line for line in lines if not ray_log.match(line)], out), "sweep: error:",
                    "cpus_per_trial=64", "this machine has", "CPUs")
    assert lines[-1].startswith("sweep: error:")


# ---------------------------------------------------------------------------------------------- checkpoints

def _coatnet_state(num_classes=10):
    from ich.models import create_model
    torch.manual_seed(0)
    return create_model("coatnet_tiny_ich", num_classes, 32).state_dict()


def _meta(num_classes=10, class_names=None, **kw):
    from ich.checkpoint import CheckpointMeta
    return CheckpointMeta(architecture="coatnet_tiny_ich", img_size=32, num_classes=num_classes,
                          class_names=class_names if class_names is not None else sorted(CLASSES10),
                          dataset_fingerprint="x", init_fingerprint="y", epoch=1, **kw)


def train_args(ds, out, *extra):
    return ["train", ds, "--out", out, "--epochs", "1", "--batch-size", "8", *extra]


def test_init_with_a_tensor_of_the_wrong_shape(tmp_path, capsys, tiny_ds):
    from safetensors.torch import save_file
    state = _coatnet_state()
    state["stem.conv1.weight"] = torch.zeros(8, 3, 5, 5)
    save_file(state, str(tmp_path / "bad.safetensors"))
    line = assert_one_line(ich(capsys, *train_args(tiny_ds, tmp_path / "out", "--init", tmp_path / "bad.safetensors")),
                           "ich train: error:", "bad.safetensors", "stem.conv1.weight", "shape")
    assert "(8, 3, 5, 5)" in line and not (tmp_path / "out").exists()


def test_init_from_another_architecture(tmp_path, capsys, tiny_ds):
    import timm
    from safetensors.torch import save_file
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(tmp_path / "resnet.safetensors"))
    assert_one_line(ich(capsys, *train_args(tiny_ds, tmp_path / "out", "--init", tmp_path / "resnet.safetensors")),
                    "ich train: error:", "resnet.safetensors", "do not fit")
    assert not (tmp_path / "out").exists()


class _Tripwire:
    """Unpickling this creates the folder `marker`: proof that something unpickled the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle"])
def test_pickle_renamed_safetensors_is_refused_unread(tmp_path, capsys, monkeypatch, tiny_ds, kind):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"w": [1.0], "trip": _Tripwire(marker)}, protocol=4)
    pickle.loads(payload)  # the tripwire is live
    assert marker.is_dir()
    marker.rmdir()
    path = tmp_path / "that.safetensors"
    if kind == "torch_zip":
        torch.save({**_coatnet_state(), "trip": _Tripwire(marker)}, path)
    else:
        path.write_bytes(payload)

    def no_unpickling(*a, **k):
        raise AssertionError("something tried to unpickle the file")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    assert_one_line(ich(capsys, *train_args(tiny_ds, tmp_path / "out", "--init", path)), "ich train: error:",
                    "that.safetensors", "not a safetensors file")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_safetensors(tmp_path, capsys, tiny_ds):
    from ich.checkpoint import save_checkpoint
    ck = tmp_path / "ck"
    save_checkpoint(ck, _coatnet_state(), _meta())
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line(ich(capsys, *train_args(tiny_ds, tmp_path / "out", "--init", ck)), "ich train: error:",
                    "model.safetensors", "safetensors")


def test_init_with_nan_weights(tmp_path, capsys, tiny_ds):
    from ich.checkpoint import save_checkpoint
    state = _coatnet_state()
    state["head.fc.weight"][0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan_ck", state, _meta())
    assert_one_line(ich(capsys, *train_args(tiny_ds, tmp_path / "out", "--init", tmp_path / "nan_ck")),
                    "ich train: error:", "nan_ck", "NaN")
    assert not (tmp_path / "out").exists()


def test_init_checkpoint_whose_metadata_disagrees(tmp_path, capsys, tiny_ds):
    from ich.checkpoint import save_checkpoint
    ck = tmp_path / "ck"
    save_checkpoint(ck, _coatnet_state(), _meta())
    meta = json.loads((ck / "checkpoint.json").read_text())
    meta["class_names"] = meta["class_names"][:9]  # num_classes stays 10
    (ck / "checkpoint.json").write_text(json.dumps(meta))
    assert_one_line(ich(capsys, *train_args(tiny_ds, tmp_path / "out", "--init", ck)), "ich train: error:",
                    "ck", "num_classes=10", "9")
    assert not (tmp_path / "out").exists()


def test_resume_with_a_state_from_another_dataset(tmp_path, capsys, tiny_ds, other_ds):
    from ich.data import load_dataset
    from ich.train import TrainConfig, Trainer
    Trainer(TrainConfig(epochs=1, batch_size=8), load_dataset(other_ds)).save_state(tmp_path / "state")
    before = snapshot(tmp_path / "state")
    assert_one_line(ich(capsys, *train_args(tiny_ds, tmp_path / "out", "--resume", tmp_path / "state")),
                    "ich train: error:", "state", "another dataset")
    assert snapshot(tmp_path / "state") == before and not (tmp_path / "out").exists()


def test_train_unknown_model_and_missing_dataset(tmp_path, capsys, tiny_ds):
    assert_one_line(ich(capsys, *train_args(tiny_ds, tmp_path / "out", "--model", "coatnet_nope")),
                    "ich train: error:", "coatnet_nope", "unknown model")
    assert_one_line(ich(capsys, *train_args(tmp_path / "no-ds", tmp_path / "out")), "ich train: error:", "no-ds")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- soup, predict

@pytest.mark.integration
def test_soup_unknown_experiment(tmp_path, mlflow_server):
    result = run_proc(["-m", "sweeps.cli", "soup", "--experiment", "nope-no-such-experiment"],
                      env_extra={"MLFLOW_TRACKING_URI": mlflow_server, "ICH_HOME": str(tmp_path / "home")})
    assert_one_line(result, "ich soup: error:", "nope-no-such-experiment")


@pytest.mark.integration
def test_predict_unknown_registered_model(tmp_path, mlflow_server):
    img = tmp_path / "img.png"
    save_as(class_image(0, 16, np.random.default_rng(0)), img, "png")
    result = run_proc(["-m", "sweeps.cli", "predict", "--model", "models:/nope@champion", img],
                      env_extra={"MLFLOW_TRACKING_URI": mlflow_server, "ICH_HOME": str(tmp_path / "home")})
    assert_one_line(result, "ich predict: error:", "models:/nope@champion")
