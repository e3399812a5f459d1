"""Controls for issue 23's findings 4, 7c and 7e: each test first shows the payload doing its harm where the guard
is not (MLflow's own loader, Python's os.walk, ingest with its refusal taken out), then the project's guard refusing
the same input in one line. Without the control half a refusal assert could pass against a harmless payload.

- Finding 4: MLflow follows `-r` in a model's requirements.txt when `ich serve` loads the model
  (soups/serve/app.py -> scoring_server.load_model_with_mlflow_config -> mlflow.pyfunc.load_model ->
  _get_pip_requirements_from_model_path -> requirements_utils._parse_requirements): `-r requirements.txt` recurses
  out, `-r <FIFO>` blocks until a writer comes. verify_soup_model refuses both folders without opening the FIFO.
- Finding 7c: a 1,100-level empty folder tree in a model folder; os.walk, as the pre-0f9cfba check walked it, raises
  RecursionError on Python 3.11; verify_soup_model refuses it in one line.
- Finding 7e: a class folder named with ESC/CR/BEL; ingest without its refusal writes the raw name into the dataset's
  classes (what training copies into checkpoint.json and the pre-0f9cfba `ich predict` printed raw); ingest refuses
  it in one line and writes nothing.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from tests.test_attacks import png_bytes, tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A soup pyfunc model folder as `ich serve` writes it around a verified soup (save_pyfunc: no server), verified."""
    from soups.serve.pyfunc_folder import save_pyfunc
    from soups.serve.verify import verify_soup_model
    base = tmp_path_factory.mktemp("finding-controls")
    folder = save_pyfunc(tiny_checkpoint(base / "src" / "soup"), base / "model")
    verify_soup_model(folder, None, "control")  # the folder as written is a soup model
    return folder


def _planted(model: Path, folder: Path, requirements: str) -> Path:
    shutil.copytree(model, folder)
    (folder / "requirements.txt").write_text(requirements)
    return folder


def _in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    """fn(*args) in a daemon thread; its result or exception lands in the returned dict."""
    got: dict = {}

    def run():
        try:
            got["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - the test looks at what was raised
            got["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


def _unblock(fifo: Path) -> None:
    """Open the FIFO's write end and close it: a reader blocked in open() returns and reads EOF."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: no reader has it open (nothing is blocked on it)
        pass


# ---------------------------------------------------------------------------------------------- finding 4

def test_mlflow_follows_a_self_include_and_the_guard_refuses_it(model, tmp_path):
    """CONTROL: the loader `ich serve`'s app calls recurses out on `-r requirements.txt` (the issue: RecursionError
    after "verified"); verify_soup_model refuses the same folder in one line."""
    from mlflow.pyfunc import _get_pip_requirements_from_model_path
    from mlflow.pyfunc.scoring_server import load_model_with_mlflow_config

    from soups.serve.verify import UntrustedModel, verify_soup_model
    folder = _planted(model, tmp_path / "self", "torch\n-r requirements.txt\n")
    with pytest.raises(RecursionError):  # CONTROL: MLflow's requirement reader follows the include, forever
        _get_pip_requirements_from_model_path(str(folder))
    with pytest.raises(RecursionError):  # ... and that is what loading the model for serving runs
        load_model_with_mlflow_config(str(folder))
    with pytest.raises(UntrustedModel) as refused:
        verify_soup_model(folder, None, "planted")
    assert str(refused.value) == ("planted: requirements.txt line '-r requirements.txt' is an include, an option or a "
                                  "URL (only plain requirements are allowed); refusing")


def test_mlflow_blocks_on_an_included_fifo_and_the_guard_never_opens_it(model, tmp_path):
    """CONTROL: MLflow's loader blocks in open() of a FIFO named by `-r` (the issue: `ich serve` hung before
    /health) until a writer comes; verify_soup_model refuses the folder in one line without opening the FIFO (it
    returns while no writer exists)."""
    from mlflow.pyfunc.scoring_server import load_model_with_mlflow_config

    from soups.serve.verify import UntrustedModel, verify_soup_model
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = _planted(model, tmp_path / "fifo-model", f"-r {fifo}\n")
    loader, _ = _in_thread(load_model_with_mlflow_config, str(folder))
    try:
        loader.join(2)
        assert loader.is_alive()  # CONTROL: still inside open(fifo) after 2 s
    finally:
        _unblock(fifo)
    loader.join(60)
    assert not loader.is_alive()  # it was the FIFO that held it: given EOF, the load went on
    guard, got = _in_thread(verify_soup_model, folder, None, "planted")
    try:
        guard.join(30)
        assert not guard.is_alive(), "verify_soup_model opened the FIFO"
    finally:
        _unblock(fifo)
    assert isinstance(got.get("error"), UntrustedModel), got
    assert str(got["error"]) == (f"planted: requirements.txt line '-r {fifo}' is an include, an option or a URL "
                                 "(only plain requirements are allowed); refusing")


# ---------------------------------------------------------------------------------------------- finding 7c

def _deep_tree(top: Path, levels: int) -> Path:
    deepest = top
    for _ in range(levels):  # one mkdir at a time: os.makedirs recurses on the parents
        deepest /= "d"
        deepest.mkdir()
    return deepest


def _remove_tree(top: Path, deepest: Path) -> None:
    while deepest != top:  # bottom up, without recursion: shutil.rmtree (pytest's cleanup) recurses out too
        deepest.rmdir()
        deepest = deepest.parent


def test_a_1100_level_folder_tree_recurses_os_walk_out_and_is_refused_in_one_line(model, tmp_path):
    """CONTROL: os.walk over the folder, as verify_soup_model walked it before 0f9cfba (descending into every
    folder, checking files only), raises RecursionError on Python 3.11 (os.walk recurses once per level; 3.12's is
    iterative); verify_soup_model refuses the folder in one line before descending."""
    from soups.serve.verify import UntrustedModel, verify_soup_model
    folder = tmp_path / "deep-model"
    shutil.copytree(model, folder)
    deepest = _deep_tree(folder, 1100)
    try:
        if sys.version_info < (3, 12):
            with pytest.raises(RecursionError):  # CONTROL: the old check's walk
                for _ in os.walk(folder):
                    pass
        with pytest.raises(UntrustedModel) as refused:
            verify_soup_model(folder, None, "planted")
    finally:
        _remove_tree(folder, deepest)
    assert str(refused.value) == "planted: unexpected folder d (not part of a soup model); refusing"
    verify_soup_model(folder, None, "control")  # the tree was all that was wrong


# ---------------------------------------------------------------------------------------------- finding 7e

EVIL = "b\x1b[2K\rall good\x07"  # erase the line, back to column 0, "all good", bell


def _ingest(src: Path, out: Path) -> tuple[int, list[str], str]:
    from sweeps.cli import main
    err, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
        rc = main(["ingest", str(src), str(out), "--size", "32", "--quiet", "--workers", "1"])
    return rc, err.getvalue().strip().splitlines(), stdout.getvalue()


def test_a_control_character_class_name_reaches_the_dataset_raw_without_the_ingest_refusal(tmp_path):
    """CONTROL: with ingest's refusal taken out, the class folder named ESC[2K CR "all good" BEL is ingested (exit 0)
    and its raw name is one of the dataset's classes, what training copies into checkpoint.json's class_names; the
    line the pre-0f9cfba `ich predict` printed for it (`{path}: {class}`) then erases itself on a terminal and shows
    "all good". With the refusal: one escaped line, exit 2, nothing written."""
    import ich.ingest
    from ich.errors import printable
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    for cls in ("a", EVIL):
        (src / cls).mkdir(parents=True)
        for i in range(4):
            (src / cls / f"{i}.png").write_bytes(png_bytes(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)))
    with mock.patch.object(ich.ingest, "_refuse_control_chars", lambda rel, src: None):
        rc, err, _ = _ingest(src, tmp_path / "unguarded")
    assert rc == 0 and err == [], err
    classes = json.loads((tmp_path / "unguarded" / "manifest.json").read_text())["classes"]
    assert EVIL in classes  # CONTROL: the raw bytes are in the dataset
    old_line = f"photo.png: {EVIL}  ({EVIL}: 0.900)"  # sweeps/cli.py before 0f9cfba: print(f"{path}: {classes[top]}")
    assert "\x1b[2K\r" in old_line and printable(EVIL) != EVIL and "\x1b" not in printable(EVIL)

    rc, err, out = _ingest(src, tmp_path / "out")
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"ich ingest: error: {src}: the name {EVIL!r} holds control characters; rename it (nothing was "
                      "written)")
    assert not any(c in err[0] + out for c in "\x1b\r\x07") and not (tmp_path / "out").exists()
