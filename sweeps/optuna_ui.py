"""`ich ui --optuna`: optuna-dashboard on the sweep's Optuna study storage, run the way `ich ui` runs the MLflow UI.

    <data_dir>/optuna-dashboard/server.json   {pid, start_time, command, port, uri, storage} of the running dashboard
    <data_dir>/optuna-dashboard/server.log    its output

The storage: --storage URL, else sweeps/study.py's default (sqlite:///<data_dir>/optuna.db); --sweep-run checks that
the run's ich.optuna_storage tag names that one (a tag naming another is shown, never followed: anyone who can write
a tag could point the dashboard at any database). The dashboard listens on 127.0.0.1 unless --host says otherwise
(it has no login: anyone who reaches it can read and edit the study), runs in its own session so it outlives the
command, and a later `ich ui --optuna` reuses it when the record proves it (the pid leads its own session, started
at the recorded time, runs the recorded command, and /api/studies answers); `ich ui --optuna --stop` stops a proven
one only (SIGTERM to its process group, SIGKILL after 15 s). A stale record is dropped, its pid never signalled.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from ich.errors import IchError
from ich.home import ich_home
from soups.tracking_server import _pid_alive, _port_free, _port_lock, _stop_pid, free_port, read_json_record

DEFAULT_PORT = 8080
HEALTH_TIMEOUT_S = 60.0
INSTALL_HINT = "pip install optuna-dashboard (`make install` installs it with the head extra)"


class OptunaUiError(IchError):
    """The Optuna dashboard could not be started, found or stopped; the message says why in one line."""


def _dir(data_dir: Path) -> Path:
    return Path(data_dir) / "optuna-dashboard"


def _record_path(data_dir: Path) -> Path:
    return _dir(data_dir) / "server.json"


def _read_record(data_dir: Path) -> dict:
    return read_json_record(_record_path(data_dir))


@contextmanager
def _lock(data_dir: Path):
    """Two commands at once on one data folder end up sharing one dashboard (or stopping it once)."""
    _dir(data_dir).mkdir(parents=True, exist_ok=True)
    with open(_dir(data_dir) / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def shown(storage: str) -> str:
    """The storage URL as printed: a password is masked."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", storage)


def dashboard_executable() -> str:
    exe = Path(sys.executable).parent / "optuna-dashboard"
    if not exe.exists():
        raise OptunaUiError(f"optuna-dashboard is not installed next to {sys.executable}: {INSTALL_HINT}")
    return str(exe)


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22); None without /proc."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _is_recorded_dashboard(record: dict) -> bool:
    """The recorded pid is still the dashboard this project started: alive, leading its own session, started at the
    recorded time and running the recorded command. A recycled pid (after a reboot, or a crash) fails one of them
    and is never reused nor signalled."""
    pid, command = record.get("pid"), record.get("command")
    if not isinstance(pid, int) or not isinstance(command, list) or not _pid_alive(pid):
        return False
    try:
        if os.getsid(pid) != pid:
            return False
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return False
    return [c.decode(errors="replace") for c in cmdline][-len(command):] == command and (
        record.get("start_time") == _start_time(pid))


def studies_answer(uri: str, timeout: float = 2.0) -> list[dict] | None:
    """The dashboard's study list (GET /api/studies), or None when nothing answers there as optuna-dashboard."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy answers for 127.0.0.1
    try:
        with opener.open(f"{uri}/api/studies", timeout=timeout) as response:
            body = json.loads(response.read())
    except (OSError, ValueError):
        return None
    studies = body.get("study_summaries") if isinstance(body, dict) else None
    return studies if isinstance(studies, list) else None


def storage_url(data_dir: Path, storage: str | None = None, sweep_run: str | None = None) -> str:
    """--storage, else the sweep run's ich.optuna_storage tag, else sweeps/study.py's default for data_dir."""
    if storage:
        return storage
    if sweep_run:
        from mlflow import MlflowClient

        from soups.store.tags import TAG_OPTUNA_STORAGE
        from soups.tracking_server import ensure_tracking_uri
        ensure_tracking_uri(data_dir, quiet=True)
        url = MlflowClient().get_run(sweep_run).data.tags.get(TAG_OPTUNA_STORAGE)
        if not url:
            raise OptunaUiError(f"run {sweep_run} has no {TAG_OPTUNA_STORAGE} tag (a grid sweep, or a storage URL "
                                "with a password, which is not recorded): give --storage")
        if url != _own_storage(data_dir):  # anyone who can write a tag could point the dashboard anywhere
            raise OptunaUiError(f"run {sweep_run}'s {TAG_OPTUNA_STORAGE} names {shown(url)}, not this data folder's "
                                f"{_own_storage(data_dir)}; a tag is shown, never followed: give --storage to open it")
        return url
    return _own_storage(data_dir)


def _own_storage(data_dir: Path) -> str:
    """sweeps/study.py's default: the study database of the data folder's sweeps."""
    from sweeps.study import optuna_storage_url
    return optuna_storage_url(SimpleNamespace(optuna_storage=None), Path(data_dir))


def _check_storage(storage: str) -> None:
    if storage.startswith("sqlite:///"):
        path = Path(storage[len("sqlite:///"):])
        if not path.is_file():  # a typo must not create an empty study database
            raise OptunaUiError(f"no Optuna study database at {path} (a sweep creates it; --storage names another)")


def _running(data_dir: Path) -> dict | None:
    record = _read_record(data_dir)
    pid, uri = record.get("pid"), record.get("uri")
    if not isinstance(uri, str) or not _is_recorded_dashboard(record):
        return None
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while studies_answer(uri) is None:
        if not _pid_alive(pid):
            return None
        if time.monotonic() > deadline:
            raise OptunaUiError(f"the Optuna dashboard (pid {pid}) does not answer {uri}/api/studies; stop it with "
                                "`ich ui --optuna --stop`")
        time.sleep(0.25)
    return record


def start_dashboard(data_dir: Path, storage: str, *, host: str = "127.0.0.1", port: int | None = None,
                    timeout: float = HEALTH_TIMEOUT_S) -> dict:
    """Start a detached optuna-dashboard on storage and wait until /api/studies answers; its record."""
    exe = dashboard_executable()
    _check_storage(storage)
    folder = _dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "server.log"
    with _port_lock():  # one start at a time picks a port on this machine (shared with the MLflow server's starts)
        if port is None:
            port = DEFAULT_PORT if _port_free(DEFAULT_PORT, host) else free_port()
        elif not _port_free(port, host):
            raise OptunaUiError(f"port {port} on {host} is already in use; cannot start the Optuna dashboard there")
        uri = f"http://{host}:{port}"
        command = [exe, storage, "--host", host, "--port", str(port), "--server", "wsgiref"]
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting optuna-dashboard {shown(storage)} "
                      f"on {uri}\n".encode())
            log.flush()
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # cwd kept: a relative sqlite path means the same
        deadline = time.monotonic() + timeout
        while studies_answer(uri) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                _stop_pid(process.pid, process, 5.0)
                raise OptunaUiError(f"the Optuna dashboard (pid {process.pid}) "
                                    f"{'exited' if process.returncode is not None else 'did not answer'} "
                                    f"before answering {uri}/api/studies; see {log_path}")
            time.sleep(0.25)
    record = {"pid": process.pid, "start_time": _start_time(process.pid), "command": command, "port": port,
              "uri": uri, "storage": storage, "data_dir": str(data_dir)}
    _record_path(data_dir).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def ensure_dashboard(data_dir: Path, storage: str, *, host: str = "127.0.0.1", port: int | None = None) -> dict:
    """The running dashboard of data_dir if it shows the same storage; else a new one."""
    with _lock(data_dir):
        record = _running(data_dir)
        if record:
            if record.get("storage") != storage:
                raise OptunaUiError(f"the Optuna dashboard of {data_dir} already shows "
                                    f"{shown(record.get('storage', '?'))} at {record['uri']}; stop it with "
                                    "`ich ui --optuna --stop` first")
            return record
        return start_dashboard(data_dir, storage, host=host, port=port)


def stop_dashboard(data_dir: Path) -> bool:
    """Stop the recorded dashboard of data_dir; True if one was running."""
    with _lock(data_dir):
        record = _read_record(data_dir)
        pid = record.get("pid")
        running = _is_recorded_dashboard(record)
        if running:
            _stop_pid(pid, None, 15.0)
        _record_path(data_dir).unlink(missing_ok=True)
    return running


def run(*, data_dir: str | None, stop: bool, storage: str | None, sweep_run: str | None, host: str,
        port: int | None) -> int:
    """`ich ui --optuna` (and `--stop`)."""
    data_dir = Path(data_dir).resolve() if data_dir else ich_home()
    if stop:
        print("Optuna dashboard stopped" if stop_dashboard(data_dir) else "no Optuna dashboard was running")
        return 0
    url = storage_url(data_dir, storage, sweep_run)
    record = ensure_dashboard(data_dir, url, host=host, port=port)
    print(f"Optuna dashboard: {record['uri']} (study storage {shown(url)}; `ich ui --optuna --stop` stops it)",
          flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: the dashboard has no login; anyone who reaches {host}:{record['port']} can read and edit the "
              "study", flush=True)
    return 0
