"""`ich report` opens no database a run tag names (issue 23 item 4).

A sweep run's ich.optuna_storage tag is anyone's to write. Following it, the report created
`sqlite+pysqlite:////some/path.db` with Optuna's tables, added tables to a copy of mlflow.db, and would have
connected out to a PostgreSQL URL. Now it opens only the storage given on its command line or the project's own
store ($ICH_HOME/optuna.db), read-only; any other tag is shown in a note. Real MLflow server (the session's), a
sweep run and one checkpoint LoggedModel made by hand, real SQLite files; each refusal has its control.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import threading
import uuid

import optuna
import pytest

from tests.test_report_snapshot import snapshot_and_preds  # noqa: F401  (fixture: a hand-built snapshot)

optuna.logging.set_verbosity(optuna.logging.WARNING)
SWEEP = "tagged-sweep"


def _state(path) -> tuple:
    """What reading must not change: existence, bytes, mtime, and the folder's file names (no journal left)."""
    if not path.exists():
        return (False, sorted(os.listdir(path.parent)))
    return (True, hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns,
            sorted(os.listdir(path.parent)))


def _tables(path) -> set[str]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _study(url: str, n: int = 3) -> None:
    study = optuna.create_study(study_name=SWEEP, storage=url, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 0.0, 1.0), n_trials=n)


@pytest.fixture
def tagged(mlflow_client, mlflow_server, tmp_path, monkeypatch):
    """An experiment with one sweep run and one checkpoint; returns (set the tag, read the snapshot)."""
    from mlflow.entities import LoggedModelStatus

    from soups.report.snapshot import read_snapshot
    from soups.store.tags import (KIND_CHECKPOINT, TAG_ARCHITECTURE, TAG_EPOCH, TAG_KIND, TAG_OPTUNA_STORAGE, TAG_SHA256,
                                  TAG_SWEEP, TAG_TRIAL)
    monkeypatch.setenv("ICH_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    experiment = f"optuna-tag-{uuid.uuid4().hex[:8]}"
    exp_id = mlflow_client.create_experiment(experiment)
    run = mlflow_client.create_run(exp_id, tags={TAG_KIND: "sweep", TAG_SWEEP: SWEEP})
    model = mlflow_client.create_logged_model(
        exp_id, name="ckpt", source_run_id=run.info.run_id,
        tags={TAG_KIND: KIND_CHECKPOINT, TAG_SWEEP: SWEEP, TAG_TRIAL: "t0", TAG_EPOCH: "1", TAG_SHA256: "0" * 64,
              TAG_ARCHITECTURE: "coatnet_tiny_ich"})
    mlflow_client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)

    def read(tag: str | None, given: str | None = None):
        if tag is not None:
            mlflow_client.set_tag(run.info.run_id, TAG_OPTUNA_STORAGE, tag)
        return read_snapshot(experiment, tracking_uri=mlflow_server, optuna_storage=given)[1]
    return read


def test_a_pysqlite_tag_creates_nothing(tagged, tmp_path):
    target = tmp_path / "planted" / "x.db"
    target.parent.mkdir()
    tag = f"sqlite+pysqlite:///{target}"
    before = _state(target)
    snap = tagged(tag)
    assert _state(target) == before and not target.exists()
    assert snap.optuna is None
    [note] = [n for n in snap.notes if "Optuna" in n]
    assert tag in note and "not followed" in note
    # Control: following the tag as before created the file with Optuna's tables.
    with pytest.raises(KeyError):
        optuna.load_study(study_name=SWEEP, storage=tag)
    assert target.exists() and "studies" in _tables(target)


def test_a_tag_to_a_copy_of_mlflow_db_changes_nothing(tagged, tmp_path, mlflow_server_handle):
    mlflow_db = mlflow_server_handle.data_dir / "mlflow" / "mlflow.db"
    copy, control = tmp_path / "copy" / "mlflow.db", tmp_path / "control" / "mlflow.db"
    for path in (copy, control):
        path.parent.mkdir()
        shutil.copy2(mlflow_db, path)
    before = _state(copy)
    snap = tagged(f"sqlite:///{copy}")
    assert _state(copy) == before and snap.optuna is None
    assert any(f"sqlite:///{copy}" in n and "not followed" in n for n in snap.notes)
    # Given on the command line it is opened, read-only: a note that it is no study database, still not a byte changed.
    snap = tagged(None, given=f"sqlite:///{copy}")
    assert _state(copy) == before and snap.optuna is None
    assert any("cannot be read" in n and "no such table" in n for n in snap.notes), snap.notes
    # Control: Optuna's ordinary opening (what following the tag did) adds its tables to the copy.
    plain = _tables(control)
    # It fails on mlflow.db's alembic_version (MLflow's, not Optuna's), after adding its tables.
    with pytest.raises(RuntimeError, match="table schema"):
        optuna.load_study(study_name=SWEEP, storage=f"sqlite:///{control}")
    assert len(_tables(control) - plain) >= 10


def test_a_postgresql_tag_connects_nowhere(tagged):
    """A listening socket stands in for the database: the tag makes no connection; given on the command line
    (control) the same URL is connected to."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.5)
        url = f"postgresql+psycopg2://ich@127.0.0.1:{listener.getsockname()[1]}/optuna"
        snap = tagged(url)
        assert snap.optuna is None and any(url in n and "not followed" in n for n in snap.notes)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody knocked

        knocked = []
        listener.settimeout(60)

        def answer_once():  # accept and hang up: the driver's connect fails fast
            conn, _ = listener.accept()
            knocked.append(conn.getpeername())
            conn.close()
        t = threading.Thread(target=answer_once, daemon=True)
        t.start()
        snap = tagged(None, given=url)
        t.join(10)
        assert knocked and snap.optuna is None and any("cannot be read" in n for n in snap.notes), snap.notes


def test_the_study_given_or_in_the_own_store_is_read(tagged, tmp_path):
    """Controls: the same study given with --optuna-storage, or in $ICH_HOME/optuna.db named by the tag, is read
    (its trials appear), and reading it changes no byte of it."""
    from ich.home import own_optuna_storage

    elsewhere = tmp_path / "studies" / "optuna.db"
    elsewhere.parent.mkdir()
    _study(f"sqlite:///{elsewhere}", n=3)
    before = _state(elsewhere)
    snap = tagged(f"sqlite:///{elsewhere}")  # the tag alone: shown, not read
    assert snap.optuna is None
    snap = tagged(f"sqlite:///{elsewhere}", given=f"sqlite:///{elsewhere}")
    assert snap.optuna is not None and len(snap.optuna.trials) == 3 and snap.optuna.direction == "maximize"
    assert _state(elsewhere) == before

    own = tmp_path / "home" / "optuna.db"
    _study(own_optuna_storage(), n=4)
    before = _state(own)
    snap = tagged(f"sqlite:///{tmp_path}/home/../home/optuna.db")  # the own store, however spelt
    assert snap.optuna is not None and len(snap.optuna.trials) == 4
    assert not [n for n in snap.notes if "Optuna" in n] and _state(own) == before


def test_the_report_shows_the_tag_as_text(tagged, tmp_path, snapshot_and_preds):  # noqa: F811
    """The refused tag reaches the report's Notes, as text."""
    from soups.report.build import compute_report
    from soups.report.render import render_markdown

    tag = f"sqlite+pysqlite:///{tmp_path}/planted.db"
    notes = tagged(tag).notes
    snap, preds = snapshot_and_preds
    snap.optuna, snap.notes = None, notes
    out = tmp_path / "report"
    out.mkdir()
    report = compute_report(snap, preds, out, n_resamples=50)
    md = render_markdown(report.title, report.sections)
    assert report.summary["optuna"] is None
    assert any(tag in line and "not followed" in line for line in md.splitlines() if line.startswith("- "))
    assert not (tmp_path / "planted.db").exists()
