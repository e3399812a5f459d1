"""`ich ui --optuna` (issue 24 item 3): optuna-dashboard on the sweep's Optuna study storage, started and stopped
the way `ich ui` runs the MLflow UI.

A real Optuna study in a temp SQLite file where sweeps keep theirs (<data dir>/optuna.db), `ich ui --optuna` run as
a user runs it (a subprocess of the venv's `ich`), its page and API fetched over HTTP from 127.0.0.1, then
`ich ui --optuna --stop` and the process checked gone. Under CI=true a missing optuna-dashboard fails, never skips
(tests/conftest.py::require_service)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import require_service

ROOT = Path(__file__).resolve().parent.parent
ICH = Path(sys.executable).parent / "ich"
STUDY = "ich-optuna-ui-test"


@pytest.fixture(scope="module")
def dashboard_installed():
    try:
        import optuna_dashboard  # the head extra; `make install` installs it
    except ImportError as e:
        require_service(f"optuna-dashboard is not installed ({e}); `make install` installs it with the head extra")
    if not (Path(sys.executable).parent / "optuna-dashboard").exists():
        require_service("optuna-dashboard's executable is missing next to the venv's python")
    return optuna_dashboard.__version__


def _ich(*args: str, home: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "ICH_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(ICH), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _get(url: str) -> tuple[int, str, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on port, from /proc/net/tcp (IPv4)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:
            found.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def _make_study(db: Path, n_trials: int = 3) -> None:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{db}", direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True), n_trials=n_trials)


def test_ich_ui_optuna_serves_the_sweeps_study_on_loopback_and_stops(tmp_path, dashboard_installed):
    from sweeps.optuna_ui import stop_dashboard
    home = tmp_path / "home"
    home.mkdir()
    _make_study(home / "optuna.db")  # where sweeps/study.py keeps the sweep's study by default
    pid = None
    try:
        started = _ich("ui", "--optuna", "--data-dir", str(home), home=home)
        assert started.returncode == 0, started.stdout + started.stderr
        m = re.search(r"^Optuna dashboard: (http://127\.0\.0\.1:(\d+)) \(study storage sqlite:///(\S+);",
                      started.stdout, re.M)
        assert m, started.stdout + started.stderr
        uri, port = m.group(1), int(m.group(2))
        assert Path(m.group(3)) == home / "optuna.db"
        record = json.loads((home / "optuna-dashboard" / "server.json").read_text())
        pid = record["pid"]
        assert record["uri"] == uri and _alive(pid)
        assert b"optuna-dashboard" in Path(f"/proc/{pid}/cmdline").read_bytes() and os.getsid(pid) == pid
        assert _listening_addresses(port) == {"127.0.0.1"}  # loopback only

        # optuna-dashboard's own API lists the study by name; its page is the dashboard's app
        status, ctype, body = _get(f"{uri}/api/studies")
        assert status == 200 and "json" in ctype
        assert [s["study_name"] for s in json.loads(body)["study_summaries"]] == [STUDY]
        study_id = json.loads(body)["study_summaries"][0]["study_id"]
        status, _, body = _get(f"{uri}/api/studies/{study_id}")
        assert status == 200 and len(json.loads(body)["trials"]) == 3
        status, ctype, page = _get(f"{uri}/")  # redirected to /dashboard
        assert status == 200 and "text/html" in ctype and "<title>Optuna Dashboard</title>" in page

        again = _ich("ui", "--optuna", "--data-dir", str(home), home=home)  # reused, not a second one
        assert again.returncode == 0 and f"Optuna dashboard: {uri} " in again.stdout, again.stdout + again.stderr
        assert json.loads((home / "optuna-dashboard" / "server.json").read_text())["pid"] == pid

        stopped = _ich("ui", "--optuna", "--stop", "--data-dir", str(home), home=home)
        assert stopped.returncode == 0 and stopped.stdout.strip() == "Optuna dashboard stopped", stopped.stdout
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"optuna-dashboard pid {pid} still runs after --stop"
        with pytest.raises(urllib.error.URLError):
            _get(f"{uri}/api/studies")
        assert not (home / "optuna-dashboard" / "server.json").exists()
        control = _ich("ui", "--optuna", "--stop", "--data-dir", str(home), home=home)
        assert control.stdout.strip() == "no Optuna dashboard was running", control.stdout
    finally:
        stop_dashboard(home)
        assert pid is None or not _alive(pid)


def test_a_missing_study_database_or_dashboard_is_one_line(tmp_path, monkeypatch, dashboard_installed):
    """A typo in --storage starts nothing (and creates no empty database); no optuna-dashboard next to the
    interpreter says how to install it."""
    missing = tmp_path / "no" / "such.db"
    r = _ich("ui", "--optuna", "--data-dir", str(tmp_path), "--storage", f"sqlite:///{missing}", home=tmp_path)
    assert r.returncode == 2 and "no Optuna study database at" in r.stderr, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not missing.exists() and not (tmp_path / "optuna-dashboard" / "server.json").exists()

    # A stale record (the pid now belongs to another process: a reboot, a crash) is neither reused nor signalled.
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        record = tmp_path / "optuna-dashboard" / "server.json"
        record.parent.mkdir(exist_ok=True)
        record.write_text(json.dumps({"pid": other.pid, "start_time": 1, "command": ["sleep", "60"], "port": 1,
                                      "uri": "http://127.0.0.1:1", "storage": "sqlite:///x.db"}))
        r = _ich("ui", "--optuna", "--stop", "--data-dir", str(tmp_path), home=tmp_path)
        assert r.stdout.strip() == "no Optuna dashboard was running" and other.poll() is None, r.stdout + r.stderr
        assert not record.exists()
    finally:
        other.kill()
        other.wait()

    from sweeps import optuna_ui
    monkeypatch.setattr(optuna_ui.sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(optuna_ui.OptunaUiError, match="pip install optuna-dashboard"):
        optuna_ui.dashboard_executable()


def test_the_storage_comes_from_the_sweep_runs_tag_only_when_it_is_the_data_folders_own(tmp_path, mlflow_server):
    """--sweep-run: the run's ich.optuna_storage tag (what sweeps/study.py tagged the sweep with) when it names the
    data folder's study database; a tag naming another is shown, never followed; no tag says so; --storage wins."""
    import mlflow

    from soups.store.tags import TAG_OPTUNA_STORAGE
    from sweeps.optuna_ui import OptunaUiError, storage_url
    own = f"sqlite:///{tmp_path / 'optuna.db'}"
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment(f"optuna-ui-{time.time_ns()}")
    tagged = client.create_run(exp, tags={TAG_OPTUNA_STORAGE: own}).info.run_id
    elsewhere = client.create_run(exp, tags={TAG_OPTUNA_STORAGE: "postgresql://ich:secret@db.example/x"}).info.run_id
    untagged = client.create_run(exp).info.run_id
    assert storage_url(tmp_path) == own
    assert storage_url(tmp_path, sweep_run=tagged) == own
    assert storage_url(tmp_path, storage="sqlite:///x.db", sweep_run=elsewhere) == "sqlite:///x.db"
    with pytest.raises(OptunaUiError, match="shown, never followed") as e:
        storage_url(tmp_path, sweep_run=elsewhere)
    assert "postgresql://ich:***@db.example/x" in str(e.value) and "secret" not in str(e.value)
    with pytest.raises(OptunaUiError, match=f"no {TAG_OPTUNA_STORAGE} tag"):
        storage_url(tmp_path, sweep_run=untagged)


def test_ich_ui_help_shows_optuna():
    r = subprocess.run([sys.executable, "-m", "sweeps.cli", "ui", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--optuna" in r.stdout and "optuna-dashboard" in r.stdout, r.stdout + r.stderr
