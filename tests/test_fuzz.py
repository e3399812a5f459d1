"""Fuzzing what `ich predict` and `ich serve` read (issue 23 item 6): a few hundred generated bad checkpoint.json,
MLmodel and request bodies (seeded mutations: wrong types, huge numbers, deep nesting, long strings, control
characters, missing keys, wrong shapes), each refused in one line (exit 2) or one 400, no traceback, peak RSS
bounded, nothing written outside the test's own folders.

Most cases go in-process through the CLI's own `main` (what the `ich` command runs); a handful through real `ich
predict` processes, and the request bodies through one real `ich serve`. Controls: the valid checkpoint, model
folder and request go through the same harness and are accepted.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from sweeps.cli import main
from tests.served import wait_served
from tests.test_attacks import png_bytes, tiny_checkpoint

pytestmark = [pytest.mark.integration]
ICH = str(Path(sys.executable).with_name("ich"))
SEED = 23
MAX_EXTRA_MB = 400  # peak RSS of this process above its size before the in-process cases (a model is ~1 MB)
MAX_SERVER_MB = 2048  # peak RSS of the scoring server after every body (idle, with the tiny model: ~0.9 GB)
DEEP = 100_000  # nesting of the deep cases: Python's parsers recurse out at ~1,000


# ---------------------------------------------------------------------------------------------- the bad values

def _huge_int_text(digits: int = 5000) -> str:
    return "9" * digits


# Invalid for the field they replace, whatever the rest of the file says. Raw JSON tokens that json.dumps would not
# write (NaN, 1e999, 5,000-digit integers) are RawToken and spliced into the text.
class RawToken(str):
    pass


NOT_WHOLE = ["32", 32.5, 31, 1025, -1, 0, True, False, None, 10**30, 2**63, [], {}, [32], {"v": 32},
             RawToken("1e999"), RawToken("NaN"), RawToken("-Infinity"), RawToken(_huge_int_text())]
BAD_TEXT = [None, 1, 1.5, True, [], {}, ["x"], "", "x" * 300, "ok\x1b[2Kall good", "a\rb", "bell\x07", "nul\x00",
            "line\u2028break", "bidi\u202eevil"]
FIELD_VALUES = {
    "architecture": [None, 123, True, [], {}, "", "x" * 300, "resnet18", "vit_giant_patch14_224", "../etc/passwd",
                     "coatnet_tiny_ich\x1b", "COATNET_TINY_ICH", " coatnet_tiny_ich"],
    "img_size": NOT_WHOLE,
    "num_classes": ["3", 3.0, 0, -3, 4, 2, True, None, 10**6, [], {}, RawToken("3e0"), RawToken(_huge_int_text())],
    "class_names": [None, "abc", 3, {}, [], ["a", "b"], ["a", "b", "c", "d"], ["a", "b", 3], ["a", "b", None],
                    ["a", "b", ""], ["a", "b", "x" * 300], ["a", "a", "b"], ["a", "b", ["c"]], ["a", "b", {"c": 1}],
                    ["a", "b", "\x1b[2K\rall good"], ["a", "b", "c\x07"], ["a", "b", "c\u202e"]],
    "dataset_fingerprint": BAD_TEXT,
    "init_fingerprint": BAD_TEXT,
    "epoch": [-1, "1", 1.5, True, None, 10**7, [], {}, RawToken("NaN"), RawToken(_huge_int_text())],
    "metrics": [[], "x", 1, None, {"val": "x"}, {"": 1.0}, {"v\x1b": 1.0}, {"x" * 300: 1.0}, {"v": [1]},
                {"v": True}, {"v": {}}],
    "extra": [[], "x", 1, None, True],
    "format_version": [0, 3, "2", True, None, 2.5, [], {}],
    "preprocess": [None, [], "x", 1, {}],
    "preprocess.mean": [None, [0.5, 0.5], [0.5] * 4, ["a", 0.5, 0.5], [True, 0.5, 0.5], 0.5, "x",
                        [RawToken("NaN"), 0.5, 0.5], [RawToken("1e999"), 0.5, 0.5]],
    "preprocess.std": [[0.5, 0.0, 0.5], [-1, 0.5, 0.5], [0.5], "x", None, [RawToken("Infinity"), 0.5, 0.5]],
    "preprocess.crop_pct": [0, 1.5, -0.5, "x", True, None, [], RawToken("NaN"), RawToken("1e999")],
    "preprocess.interpolation": ["lanczos", 1, None, "", "bilinear\x1b", []],
    "preprocess.stored_size": [-1, 2049, 60000, "36", 36.0, True, [], {}, RawToken("1e999"),
                               RawToken(_huge_int_text())],
    "preprocess.source": [1, [], {}, "x" * 300],
}
REQUIRED = ["architecture", "img_size", "num_classes", "class_names", "dataset_fingerprint", "init_fingerprint",
            "epoch", "preprocess", "preprocess.mean", "preprocess.std", "preprocess.crop_pct",
            "preprocess.interpolation"]


def _set_path(meta: dict, key: str, value) -> None:
    if key.startswith("preprocess.") and isinstance(meta.get("preprocess"), dict):
        meta["preprocess"][key.split(".", 1)[1]] = value
    else:
        meta[key] = value


def _dumps_with_raw(meta: dict) -> str:
    """json.dumps, with RawToken values spliced in as they are (NaN, 1e999, 5,000-digit integers)."""
    raws: dict[str, str] = {}

    def mark(v):
        if isinstance(v, RawToken):
            raws[f"@@raw{len(raws)}@@"] = str(v)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v
    text = json.dumps(mark(meta), ensure_ascii=False)
    for marker, raw in raws.items():
        text = text.replace(json.dumps(marker), raw)
    return text


def meta_cases(good: dict, rng: random.Random) -> list[tuple[str, bytes]]:
    """(name, checkpoint.json bytes): every field x each of its bad values, each required key missing, an unknown
    key, raw-text mutations, then seeded random combinations of two or three bad fields."""
    cases = []

    def edited(*edits) -> bytes:
        meta = json.loads(json.dumps(good))
        for key, value in edits:
            _set_path(meta, key, value)
        return _dumps_with_raw(meta).encode("utf-8")

    for key, values in FIELD_VALUES.items():
        for i, value in enumerate(values):
            cases.append((f"{key}={str(value)[:30]!r}#{i}", edited((key, value))))
    for key in REQUIRED:
        meta = json.loads(json.dumps(good))
        if "." in key:
            del meta["preprocess"][key.split(".", 1)[1]]
        else:
            del meta[key]
        cases.append((f"missing {key}", json.dumps(meta).encode()))
    text = json.dumps(good)
    deep = "[" * DEEP + "]" * DEEP
    cases += [
        ("unknown key", edited(("surprise", 1))),
        ("unknown preprocess key", edited(("preprocess.surprise", 1))),
        ("deep whole file", deep.encode()),
        ("deep in extra", text.replace('"extra": {', f'"extra": {{"x": {deep}, ').encode()),
        ("deep objects", ('{"a":' * DEEP + "1" + "}" * DEEP).encode()),
        ("33 deep", text.replace('"extra": {', '"extra": {"x": ' + "[" * 33 + "]" * 33 + ", ").encode()),
        ("over 1 MiB", text.replace('"extra": {', '"extra": {"pad": "' + "x" * (1 << 20) + '", ').encode()),
        ("truncated", text[: len(text) // 2].encode()),
        ("empty", b""),
        ("not UTF-8", text.encode().replace(b'"epoch"', b'"ep\xff\xfeoch"')),
        ("UTF-16", text.encode("utf-16")),
        ("a list", b"[]"),
        ("a string", b'"checkpoint"'),
        ("null", b"null"),
        ("a number", b"1e999"),
        ("huge number alone", _huge_int_text(100_000).encode()),
        ("binary", bytes(rng.randrange(256) for _ in range(4096))),
    ]
    fields = list(FIELD_VALUES)
    for i in range(60):
        picks = rng.sample(fields, rng.choice((2, 3)))
        edits = [(k, rng.choice(FIELD_VALUES[k])) for k in picks]
        cases.append((f"combo {i}: {', '.join(k for k, _ in edits)}", edited(*edits)))
    return cases


def weight_cases(ckpt: Path) -> list[tuple[str, dict | None, bytes | None]]:
    """(name, checkpoint.json edits, safetensors bytes or None): weights that do not fit what the metadata says."""
    import torch
    from safetensors.torch import load_file, save

    from ich.models import create_model
    state = load_file(ckpt / "model.safetensors")
    four = dict(state, **{"head.fc.weight": torch.zeros(4, 128), "head.fc.bias": torch.zeros(4)})
    nan = dict(state, **{"head.fc.bias": torch.full((3,), float("nan"))})
    missing = {k: v for k, v in state.items() if k != "head.fc.bias"}
    extra = dict(state, **{"evil.weight": torch.zeros(2)})
    torch.manual_seed(0)
    return [
        ("a 4-class head", None, save(four)),
        ("a ResNet's weights", None, save(create_model("resnet_tiny_ich", 3).state_dict())),
        ("a missing key", None, save(missing)),
        ("an extra key", None, save(extra)),
        ("NaN weights", None, save(nan)),
        ("empty weights", None, b""),
        ("truncated weights", None, (ckpt / "model.safetensors").read_bytes()[:1000]),
        ("a pickle", None, b"\x80\x04\x95" + b"\x00" * 64),
        ("the metadata says resnet_tiny_ich", {"architecture": "resnet_tiny_ich"}, None),
        ("the metadata says vit_tiny_ich", {"architecture": "vit_tiny_ich"}, None),
        ("the metadata says 64 px", {"img_size": 64}, None),
        ("the metadata says 4 classes", {"num_classes": 4, "class_names": ["a", "b", "c", "d"]}, None),
    ]


def mlmodel_cases(mlmodel: dict, rng: random.Random) -> list[tuple[str, bytes]]:
    """(name, MLmodel bytes) a soup model folder may not hold."""
    bad = [None, 1, True, "x" * 10_000, [], {}, "ok\x1b[2K", {"a": [1, {"b": None}]}]
    edits = {
        "flavors": bad + [{"python_function": {}, "sklearn": {}}],
        "flavors.python_function": bad,
        "flavors.python_function.loader_module": bad + ["mlflow.sklearn", "os"],
        "flavors.python_function.model_code_path": bad + ["/tmp/evil.py", "../model.py.bak"],
        "flavors.python_function.code": ["code", ["code"], 1, {"x": 1}],
        "flavors.python_function.env": bad + [{"conda": "../conda.yaml", "virtualenv": "python_env.yaml"}],
        "flavors.python_function.streamable": [True, None, "false", 0, []],
        "flavors.python_function.artifacts": bad + [{"soup": {"path": "../x"}}, {"soup": {"path": "/etc"}},
                                                    {"soup": {"path": "artifacts/.."}}, {"x": {"path": "a/b"}}],
        "flavors.python_function.python_version": [1, [], {}, True],
        "metadata": bad[:5] + [{"classes": [1, 2]}, {"classes": "abc"}, {"classes": ["a"], "x": 1}],
        "signature": bad + [{"inputs": "[]", "outputs": "[]", "params": None}, {"inputs": "{{{"}],
        "saved_input_example_info": [1, "x", {"artifact_path": "../../etc/passwd"}],
        "mlflow_version": [1, [], {}, True],
        "model_size_bytes": ["x", [], {}, None],
        "prompts": ["x", [1]],
        "is_signature_from_type_hint": [True, "yes"],
        "surprise": [1],
    }
    cases = []

    def edited(key: str, value) -> dict:
        m = json.loads(json.dumps(mlmodel))
        *parents, last = key.split(".")
        node = m
        for p in parents:
            node = node[p]
        node[last] = value
        return m

    for key, values in edits.items():
        for i, value in enumerate(values):
            cases.append((f"{key}={str(value)[:30]!r}#{i}", yaml.safe_dump(edited(key, value)).encode()))
    for key in ("flavors", "metadata", "signature"):
        m = json.loads(json.dumps(mlmodel))
        del m[key]
        cases.append((f"missing {key}", yaml.safe_dump(m).encode()))
    for key in ("loader_module", "model_code_path", "env", "artifacts", "streamable"):
        m = json.loads(json.dumps(mlmodel))
        del m["flavors"]["python_function"][key]
        cases.append((f"missing python_function.{key}", yaml.safe_dump(m).encode()))
    cases += [
        ("deep flow YAML", b"metadata: " + b"[" * DEEP + b"]" * DEEP),
        ("deep mapping YAML", b"a: " + b"{b: " * 2000 + b"1" + b"}" * 2000),
        ("over 1 MiB", b"metadata: '" + b"x" * (1 << 20) + b"'"),
        ("not YAML", b"flavors: [unclosed\n  - {"),
        ("a YAML list", b"- 1\n- 2\n"),
        ("empty", b""),
        ("not UTF-8", b"flavors: \xff\xfe"),
        ("a python tag", b"flavors: !!python/object/apply:os.system ['true']"),
        ("binary", bytes(rng.randrange(256) for _ in range(4096))),
    ]
    return cases


# ---------------------------------------------------------------------------------------------- fixtures, harness

@pytest.fixture(scope="module")
def soup(tmp_path_factory) -> dict:
    """A tiny soup checkpoint, its pyfunc model folder as log_pyfunc writes it (save_model: no server) and an image."""
    import mlflow.pyfunc
    import pandas as pd

    from soups.serve.log import example_image, pip_requirements
    from soups.serve.model import ARTIFACT, CODE_FILE, signature
    from soups.serve.verify import verify_soup_model
    base = tmp_path_factory.mktemp("fuzz")
    ckpt = tiny_checkpoint(base / "src" / "soup")
    model = base / "model"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    mlflow.pyfunc.save_model(str(model), python_model=str(CODE_FILE), artifacts={ARTIFACT: str(ckpt)},
                             signature=signature(), pip_requirements=pip_requirements(),
                             input_example=pd.DataFrame({"image": [example_image(np.zeros((36, 36, 3), np.uint8))]}),
                             metadata={"classes": json.loads((ckpt / "checkpoint.json").read_text())["class_names"]})
    verify_soup_model(model, None, "fuzz")  # the control: the folder is a soup model
    image = base / "photo.png"
    image.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)))
    return {"ckpt": ckpt, "model": model, "image": image, "base": base,
            "meta": json.loads((ckpt / "checkpoint.json").read_text()),
            "mlmodel": yaml.safe_load((model / "MLmodel").read_text())}


def run_main(argv: list[str]) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue().strip().splitlines(), out.getvalue()


def _peak_rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(pid)


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.fixture
def confined(tmp_path, monkeypatch):
    """The working folder, TMPDIR and ICH_HOME are empty folders of this test: what a case writes shows there."""
    places = {name: tmp_path / name for name in ("cwd", "tmp", "home")}
    for p in places.values():
        p.mkdir()
    monkeypatch.chdir(places["cwd"])
    monkeypatch.setenv("TMPDIR", str(places["tmp"]))
    monkeypatch.setattr(tempfile, "tempdir", str(places["tmp"]))
    monkeypatch.setenv("ICH_HOME", str(places["home"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield places
    written = {name: sorted(str(q.relative_to(p)) for q in p.rglob("*")) for name, p in places.items()}
    assert written == {name: [] for name in places}, written


def _assert_refused(rc, err, out, prog: str, folder: Path, name: str) -> None:
    assert rc == 2 and len(err) == 1, (name, rc, err[-5:])
    assert err[0].startswith(f"ich {prog}: error: ") and str(folder) in err[0], (name, err[0][:300])
    assert "Traceback" not in err[0] and len(err[0]) < 2000 and "\x1b" not in err[0], (name, err[0][:300])
    assert "verified" not in out, (name, out)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------- in-process cases

def test_fuzzed_checkpoints_are_refused_by_predict_in_one_line(soup, tmp_path, confined):
    rng = random.Random(SEED)
    cases = meta_cases(soup["meta"], rng)
    weights = weight_cases(soup["ckpt"])
    assert len(cases) + len(weights) >= 250
    rc, err, out = run_main(["predict", "--model", str(soup["ckpt"]), str(soup["image"])])  # control
    assert rc == 0 and err == [] and str(soup["image"]) in out
    before = _rss_kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset this process's peak RSS
    for i, (name, raw) in enumerate(cases):
        folder = tmp_path / "cases" / f"{i:03d}"
        folder.mkdir(parents=True)
        os.link(soup["ckpt"] / "model.safetensors", folder / "model.safetensors")
        (folder / "checkpoint.json").write_bytes(raw)
        rc, err, out = run_main(["predict", "--model", str(folder), str(soup["image"])])
        _assert_refused(rc, err, out, "predict", folder, name)
        assert _listing(folder) == ["checkpoint.json", "model.safetensors"], name
    for i, (name, edits, weights_bytes) in enumerate(weights):
        folder = tmp_path / "weights" / f"{i:03d}"
        folder.mkdir(parents=True)
        meta = {**soup["meta"], **(edits or {})}
        (folder / "checkpoint.json").write_text(json.dumps(meta))
        if weights_bytes is None:
            os.link(soup["ckpt"] / "model.safetensors", folder / "model.safetensors")
        else:
            (folder / "model.safetensors").write_bytes(weights_bytes)
        rc, err, out = run_main(["predict", "--model", str(folder), str(soup["image"])])
        _assert_refused(rc, err, out, "predict", folder, name)
    extra_mb = (_rss_kb("VmHWM") - before) / 1024
    assert extra_mb < MAX_EXTRA_MB, extra_mb


@pytest.fixture
def no_server_starts(monkeypatch):
    """`ich serve` would start its server here: a case that got that far fails the test instead of serving."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"ich serve accepted the model and would start {args[0]}")
    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_fuzzed_model_folders_are_refused_by_serve_in_one_line(soup, tmp_path, confined, no_server_starts):
    rng = random.Random(SEED + 1)
    cases = [("MLmodel " + name, "MLmodel", raw) for name, raw in mlmodel_cases(soup["mlmodel"], rng)]
    meta = meta_cases(soup["meta"], random.Random(SEED))
    cases += [("checkpoint.json " + name, "artifacts/soup/checkpoint.json", raw)
              for name, raw in random.Random(SEED + 2).sample(meta, 40)]
    assert len(cases) >= 150
    with pytest.raises(AssertionError, match="would start"):  # control: the unchanged folder gets to the server
        run_main(["serve", "--model", str(soup["model"]), "--port", "1"])
    before = _rss_kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    for i, (name, rel, raw) in enumerate(cases):
        folder = tmp_path / "models" / f"{i:03d}"
        shutil.copytree(soup["model"], folder, copy_function=os.link)
        (folder / rel).unlink()
        (folder / rel).write_bytes(raw)
        listing = _listing(folder)
        rc, err, out = run_main(["serve", "--model", str(folder), "--port", "1"])
        _assert_refused(rc, err, out, "serve", folder, name)
        if rel != "MLmodel":  # ich predict loads the same verified copy: the same refusal, named by the folder
            rc, err, out = run_main(["predict", "--model", str(folder), str(soup["image"])])
            _assert_refused(rc, err, out, "predict", folder, name)
            assert err[0].startswith(f"ich predict: error: {folder}: artifacts/soup"), err[0]
        assert _listing(folder) == listing, name
    # A 1,100-level empty folder tree inside the model folder (os.walk recursed out on HEAD).
    folder = tmp_path / "models" / "deep-tree"
    shutil.copytree(soup["model"], folder, copy_function=os.link)
    here = os.getcwd()
    os.chdir(folder)
    try:
        for _ in range(1100):
            os.mkdir("d")
            os.chdir("d")
        os.chdir(here)
        rc, err, out = run_main(["serve", "--model", str(folder), "--port", "1"])
    finally:
        os.chdir(here)
        deepest = folder
        while (deepest / "d").is_dir():
            deepest /= "d"
        while deepest != folder:  # bottom up, without recursion: shutil.rmtree (pytest's cleanup) recurses out too
            deepest.rmdir()
            deepest = deepest.parent
    _assert_refused(rc, err, out, "serve", folder, "deep tree")
    assert "unexpected folder d (not part of a soup model)" in err[0]
    extra_mb = (_rss_kb("VmHWM") - before) / 1024
    assert extra_mb < MAX_EXTRA_MB, extra_mb


# ---------------------------------------------------------------------------------------------- real processes

def body_cases(png: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """(name, request body) the server must answer with a 400."""
    good = base64.b64encode(png).decode()

    def split(columns, data) -> bytes:
        return json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode()

    bomb = io.BytesIO()
    from PIL import Image
    Image.new("1", (7000, 7000)).save(bomb, format="PNG")  # 49 MP from a few kB: over the 40 MP header limit
    strip = io.BytesIO()
    Image.new("RGB", (2000, 10)).save(strip, format="PNG")
    cases = [
        ("deep array", b"[" * DEEP + b"]" * DEEP),
        ("deep in dataframe_split", b'{"dataframe_split": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
        ("deep objects", b'{"a":' * DEEP + b"1" + b"}" * DEEP),
        ("33 deep", b'{"dataframe_split": {"columns": ["image"], "data": ' + b"[" * 33 + b"]" * 33 + b"}}"),
        ("5,000-digit integer", split(["image"], [[1]]).replace(b"[[1]]", b"[[" + _huge_int_text().encode() + b"]]")),
        ("not JSON", b"{{{not json"),
        ("empty", b""),
        ("truncated", split(["image"], [[good]])[:100]),
        ("not UTF-8", b'{"dataframe_split": "\xff\xfe"}'),
        ("a list", b"[1, 2, 3]"),
        ("a string", b'"x"'),
        ("null", b"null"),
        ("unknown key", b'{"surprise": 1}'),
        ("two formats", json.dumps({"dataframe_split": {}, "instances": []}).encode()),
        ("split not a mapping", b'{"dataframe_split": 5}'),
        ("columns not a list", json.dumps({"dataframe_split": {"columns": "image", "data": [[good]]}}).encode()),
        ("columns and data disagree", split(["image", "path"], [[good]])),
        ("no image column", split(["photo"], [[good]])),
        ("image an integer", split(["image"], [[5]])),
        ("image null", split(["image"], [[None]])),
        ("image a list", split(["image"], [[[1, 2]]])),
        ("image empty", split(["image"], [[""]])),
        ("image not base64", split(["image"], [["!!not base64!!"]])),
        ("image base64 of text", split(["image"], [[base64.b64encode(b"hello").decode()]])),
        ("image truncated png", split(["image"], [[base64.b64encode(png[:60]).decode()]])),
        ("image over the byte cap", split(["image"], [[base64.b64encode(b"\x89PNG" + b"0" * 300_000).decode()]])),
        ("image a pixel bomb", split(["image"], [[base64.b64encode(bomb.getvalue()).decode()]])),
        ("image a thin strip", split(["image"], [[base64.b64encode(strip.getvalue()).decode()]])),
        ("image with control characters", split(["image"], [["\x1b[2K\rall good"]])),
        ("path column (off)", split(["path"], [["/etc/passwd"]])),
        ("rows over the cap", split(["image"], [[good]] * 9)),
        ("records of integers", json.dumps({"dataframe_records": [{"image": 5}]}).encode()),
        ("inputs of numbers", json.dumps({"inputs": {"image": [[1, 2]]}}).encode()),
        ("instances of nulls", json.dumps({"instances": [{"image": None}]}).encode()),
        ("NaN image", b'{"dataframe_split": {"columns": ["image"], "data": [[NaN]]}}'),
        ("Infinity image", b'{"dataframe_split": {"columns": ["image"], "data": [[-Infinity]]}}'),
    ]
    for i in range(40):  # random bytes, and valid bodies with random bytes overwritten
        if i % 2:
            cases.append((f"random bytes {i}", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000)))))
        else:
            body = bytearray(split(["image"], [[good]]))
            for _ in range(rng.randrange(1, 8)):
                body[rng.randrange(len(body))] = rng.choice(b'{}[]",:\\\x00\x1b\xff')
            cases.append((f"mangled body {i}", bytes(body)))
    return cases


def test_fuzzed_requests_and_a_few_cli_runs_are_refused(soup, tmp_path):
    from soups.tracking_server import free_port
    env = {**os.environ, "ICH_HOME": str(tmp_path / "home"), "ICH_SERVE_MAX_ROWS": "8",
           "ICH_SERVE_MAX_BYTES": "200000", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    port = free_port()
    log = tmp_path / "serve.log"
    server = subprocess.Popen([ICH, "serve", "--model", str(soup["model"]), "--port", str(port)], env=env,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    # Meanwhile a handful of real `ich predict` processes on planted checkpoints (the in-process cases' harness,
    # here as the user runs it) and their control.
    planted = {}
    for name, edit in (("deep", lambda t: "[" * DEEP + "]" * DEEP),
                       ("ESC class", lambda t: t.replace("Ca trù", "\\u001b[2K"))):
        folder = tmp_path / "planted" / name.replace(" ", "-")
        shutil.copytree(soup["ckpt"], folder)
        (folder / "checkpoint.json").write_text(edit((soup["ckpt"] / "checkpoint.json").read_text()))
        planted[name] = folder
    planted["control"] = soup["ckpt"]
    procs = {name: subprocess.Popen([ICH, "predict", "--model", str(folder), str(soup["image"])], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, folder in planted.items()}
    try:
        for name, p in procs.items():
            out, err = p.communicate(timeout=300)
            if name == "control":
                assert p.returncode == 0 and str(soup["image"]) in out, err[-2000:]
            else:
                _assert_refused(p.returncode, err.strip().splitlines(), out, "predict", planted[name], name)
        url = f"http://127.0.0.1:{port}"
        wait_served(url, server, log)
        good = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(soup["image"].read_bytes()).decode()]]}})
        headers = {"Content-Type": "application/json"}
        assert requests.post(f"{url}/invocations", data=good, headers=headers, timeout=120).status_code == 200
        cases = body_cases(soup["image"].read_bytes(), random.Random(SEED + 3))
        assert len(cases) >= 70
        for name, body in cases:
            answer = requests.post(f"{url}/invocations", data=body, headers=headers, timeout=120)
            assert answer.status_code == 400, (name, answer.status_code, answer.text[:300])
            assert "stack_trace" not in answer.text and "Traceback" not in answer.text, (name, answer.text[:300])
        # Control, after all of them: the server still answers a valid request.
        assert requests.post(f"{url}/invocations", data=good, headers=headers, timeout=120).status_code == 200
        assert server.poll() is None
        scoring = [int(pid) for pid in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
        assert len(scoring) == 1  # the uvicorn process `ich serve` started
        peak_mb = _peak_rss_kb(scoring[0]) / 1024
        assert peak_mb < MAX_SERVER_MB, peak_mb  # the scoring server's own peak (torch and MLflow: ~0.9 GB)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
    assert "Traceback" not in log.read_text()
