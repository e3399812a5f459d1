"""Controls for issue 23's findings 4 and 7c: each test first shows the payload doing its harm where the guard
is not (MLflow's own loader, Python's os.walk), then the project's guard refusing
the same input in one line. Without the control half a refusal assert could pass against a harmless payload.

- Finding 4: MLflow follows `-r` in a model's requirements.txt when `ich serve` loads the model
  (soups/serve/app.py -> scoring_server.load_model_with_mlflow_config -> mlflow.pyfunc.load_model ->
  _get_pip_requirements_from_model_path -> requirements_utils._parse_requirements): `-r requirements.txt` recurses
  out, `-r <FIFO>` blocks until a writer comes. verify_soup_model refuses both folders without opening the FIFO.
- Finding 7c: a 1,100-level empty folder tree in a model folder; os.walk, as the pre-0f9cfba check walked it, raises
  RecursionError on Python 3.11; verify_soup_model refuses it in one line.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest

from tests.test_attacks import tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A soup pyfunc model folder as log_pyfunc writes it (mlflow.pyfunc.save_model: no server), verified."""
    import mlflow.pyfunc

    from soups.serve.log import pip_requirements
    from soups.serve.model import ARTIFACT, CODE_FILE, signature
    from soups.serve.verify import verify_soup_model
    base = tmp_path_factory.mktemp("finding-controls")
    ckpt = tiny_checkpoint(base / "src" / "soup")
    folder = base / "model"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    mlflow.pyfunc.save_model(str(folder), python_model=str(CODE_FILE), artifacts={ARTIFACT: str(ckpt)},
                             signature=signature(), pip_requirements=pip_requirements(),
                             metadata={"classes": json.loads((ckpt / "checkpoint.json").read_text())["class_names"]})
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
