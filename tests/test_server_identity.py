"""The local MLflow server is who server.json claims (issue 23 item 2).

server.json was trusted on its own: a copied ICH_HOME reused the original's server (so sweeps wrote into another
store), and `ich ui --stop` killed the process group of any pid whose command line held "mlflow". The one start lock
was machine-wide in /tmp with no timeout. Now a record is trusted only when its data_dir is this one and its pid is
the process started then, leading its own session, running the exact `mlflow server` command for this store (and,
to be reused, listening on the recorded port); anything else is stale, said in one line, never reused or
signalled. Locks are per user (under the data folder, the port lock in the user's runtime folder) and give up after
ICH_LOCK_TIMEOUT_S naming their holder. Real `mlflow server` processes; every process a test starts is ended by the
pid it recorded.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def _env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "ICH_HOME": str(home), **extra}


def _ich_ui(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.cli", "ui", "--data-dir", str(home), *args], cwd=ROOT,
                          env=_env(home, **env), capture_output=True, text=True, timeout=300)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _end(proc: subprocess.Popen) -> None:
    """End a process this test started, by its pid (and its own session's group, which only it leads)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL) if os.getpgid(proc.pid) == proc.pid else proc.kill()
    proc.wait(10)


def _write_record(home: Path, record: dict) -> None:
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    (home / "mlflow" / "server.json").write_text(json.dumps(record))


def test_a_copied_home_does_not_reuse_the_original_server(mlflow_server_handle, tmp_path, monkeypatch, capsys):
    from soups.tracking_server import _read_record, ensure_tracking_uri, free_port, health_ok, stop_local_server
    from soups import tracking_server
    monkeypatch.setattr(tracking_server, "DEFAULT_PORT", free_port())  # never 5000, which others may be starting
    original = Path(mlflow_server_handle.data_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # Control: the original home reuses its server.
    assert ensure_tracking_uri(original, quiet=True) == mlflow_server_handle.uri
    assert capsys.readouterr().err == ""

    copy = tmp_path / "copy"
    shutil.copytree(original / "mlflow", copy / "mlflow", ignore=shutil.ignore_patterns("artifacts", "*.lock"))
    forged = dict(_read_record(copy), data_dir=str(copy))  # the record edited to name the copy: still not its server
    for record, why in ((_read_record(copy), f"it is the record of {original}, not of {copy}"),
                        (forged, "is not the MLflow server of this store")):
        _write_record(copy, record)
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        try:
            uri = ensure_tracking_uri(copy, quiet=True)
            err = capsys.readouterr().err.splitlines()
            assert uri != mlflow_server_handle.uri and health_ok(uri)
            assert len(err) == 1 and "server.json is stale" in err[0] and why in err[0], err
            assert _read_record(copy)["data_dir"] == str(copy) and _read_record(copy)["uri"] == uri
        finally:
            assert stop_local_server(copy)
    assert health_ok(mlflow_server_handle.uri)  # the original server was left alone


def test_stop_signals_only_a_server_it_proves(tmp_path):
    """Forged records (a `sleep` leading its own session, a python whose command line says mlflow, the real
    server's pid with another start time) are stale: --stop leaves each process alive. Control: the real record
    stops the server it names."""
    from soups.supervise import start_time
    from soups.tracking_server import _read_record, free_port, health_ok, start_server
    home = tmp_path / "home"
    port = free_port()
    fakes = [subprocess.Popen(["sleep", "300"], start_new_session=True),
             subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "mlflow", "server",
                               "--backend-store-uri", f"sqlite:///{home}/mlflow/mlflow.db"], start_new_session=True)]
    server = None
    try:
        for fake in fakes:
            assert _alive(fake.pid)
            _write_record(home, {"pid": fake.pid, "start_time": start_time(fake.pid), "port": port,
                                 "uri": f"http://127.0.0.1:{port}", "data_dir": str(home.resolve())})
            out = _ich_ui(home, "--stop")
            assert out.returncode == 0 and "no local MLflow server was running" in out.stdout, out.stderr
            assert len(out.stderr.splitlines()) == 1 and "stale" in out.stderr and str(fake.pid) in out.stderr
            assert _alive(fake.pid)
        assert b"mlflow" in Path(f"/proc/{fakes[1].pid}/cmdline").read_bytes()  # what the old check accepted

        server = start_server(home, port=free_port())
        record = _read_record(home)
        _write_record(home, {**record, "start_time": record["start_time"] + 1})  # as if the pid were recycled
        out = _ich_ui(home, "--stop")
        assert "started at another time" in out.stderr and _alive(server.pid) and health_ok(server.uri)

        _write_record(home, record)  # control: the true record
        out = _ich_ui(home, "--stop")
        assert out.returncode == 0 and "MLflow server stopped" in out.stdout and out.stderr == "", out.stderr
        server.process.wait(30)
        assert not health_ok(server.uri) and not (home / "mlflow" / "server.json").exists()
    finally:
        for proc in fakes + ([server.process] if server else []):
            _end(proc)


HOLD = ("import sys; from pathlib import Path; from soups.tracking_server import {lock}\n"
        "with {lock}({arg}):\n    print('held', flush=True); sys.stdin.read()")


def _holder(lock: str, arg: str, env: dict) -> subprocess.Popen:
    """Another process holding one of the project's locks (its own code) until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(lock=lock, arg=arg)], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_start_lock_times_out_naming_its_holder(tmp_path):
    home = tmp_path / "home"
    holder = _holder("_start_lock", f"Path({str(home)!r})", _env(home))
    try:
        lock = home / "mlflow" / "server.lock"
        assert lock.is_file() and lock.stat().st_mode & 0o777 == 0o600  # per user, under the data folder
        began = time.monotonic()
        out = _ich_ui(home, ICH_LOCK_TIMEOUT_S="2")
        took = time.monotonic() - began
        assert out.returncode == 2 and 2 <= took < 60, (out.returncode, took, out.stderr)
        [line] = out.stderr.splitlines()
        assert str(lock) in line and f"held by pid {holder.pid} " in line and "Traceback" not in out.stderr, line
        holder.stdin.close()  # control: released, the same command starts the server
        holder.wait(30)
        out = _ich_ui(home, ICH_LOCK_TIMEOUT_S="2")
        assert out.returncode == 0 and "MLflow UI: http://127.0.0.1:" in out.stdout, out.stderr
    finally:
        _end(holder)
        _ich_ui(home, "--stop")


def test_the_port_lock_is_this_users_and_times_out(tmp_path, monkeypatch):
    """A held port lock makes a start give up after ICH_LOCK_TIMEOUT_S naming its holder; CONTROL: released, the
    same lock is taken at once and names this process. The runtime folder must be this user's, 0700."""
    from soups.tracking_server import MlflowServerError, _port_lock, _runtime_dir, start_server
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run" / "ich").mkdir(parents=True, mode=0o755)
    os.chmod(tmp_path / "run" / "ich", 0o755)  # others may list and swap its files
    with pytest.raises(MlflowServerError, match=r"run/ich is not a private folder of this user \(uid \d+\); remove it"):
        _runtime_dir()
    os.chmod(tmp_path / "run" / "ich", 0o700)
    runtime = _runtime_dir()
    assert runtime.stat().st_uid == os.getuid() and runtime.stat().st_mode & 0o777 == 0o700
    holder = _holder("_port_lock", "", _env(tmp_path))
    try:
        monkeypatch.setenv("ICH_LOCK_TIMEOUT_S", "1")
        with pytest.raises(MlflowServerError, match=f"mlflow-port.lock is held by pid {holder.pid} "):
            start_server(tmp_path / "home")
        holder.stdin.close()  # control: released, the lock is this process's within the same timeout
        holder.wait(30)
        with _port_lock():
            assert (runtime / "mlflow-port.lock").read_text().startswith(f"{os.getpid()} (")
    finally:
        _end(holder)


def test_a_record_whose_server_does_not_listen_on_its_port_is_not_used(tmp_path, monkeypatch):
    """server.json right in all but the socket: its pid leads its own session and runs the exact `mlflow server`
    command for this store, but that session does not listen on the recorded port, where another process answers
    /health. That answer is never used: one line, exit as a refusal, and the store's (hung) server is not doubled.
    CONTROL: with the socket check as it was before 4b2f10b (/health alone, _session_listens bypassed), the record is
    trusted and the other process's URI is returned: sweeps would write into whatever answers there."""
    import http.server
    import threading

    from soups import tracking_server
    from soups.supervise import start_time
    from soups.tracking_server import MlflowServerError, _server_command, ensure_tracking_uri, free_port

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass
    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Health)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    port, home = impostor.server_address[1], (tmp_path / "home").resolve()
    uri = f"http://127.0.0.1:{port}"
    (tmp_path / "hold.py").write_text("import time\ntime.sleep(300)\n")
    # argv [python, hold.py, <the exact server command>]: what an `mlflow server` started by its script shows
    command = _server_command(home, port, "127.0.0.1", None)
    fake = subprocess.Popen([sys.executable, str(tmp_path / "hold.py"), *command], start_new_session=True)
    try:
        for _ in range(100):  # Popen returns once exec began; /proc's cmdline is empty until the kernel has set it up
            if Path(f"/proc/{fake.pid}/cmdline").read_bytes():
                break
            time.sleep(0.05)
        _write_record(home, {"pid": fake.pid, "start_time": start_time(fake.pid), "port": port, "uri": uri,
                             "data_dir": str(home), "backend_store_uri": None})
        assert tracking_server._unproven(home, tracking_server._read_record(home)) is None  # pid and command prove it
        assert tracking_server.health_ok(uri) and not tracking_server._session_listens(fake.pid, port)
        monkeypatch.setattr(tracking_server, "HEALTH_TIMEOUT_S", 2.0)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # restored after the test; empty: the local server is chosen
        with monkeypatch.context() as m:
            m.setattr(tracking_server, "_session_listens", lambda sid, port: True)
            assert ensure_tracking_uri(home, quiet=True) == uri  # CONTROL: the old check trusts the answer
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
        with pytest.raises(MlflowServerError) as refused:
            ensure_tracking_uri(home, quiet=True)
        assert str(refused.value) == (f"MLflow server (pid {fake.pid}) did not answer {uri}/health within 2 s; see "
                                      f"{home}/mlflow/server.log; stop it with `ich ui --stop`")
        assert os.environ["MLFLOW_TRACKING_URI"] == "" and _alive(fake.pid)
    finally:
        _end(fake)
        impostor.shutdown()
        impostor.server_close()
