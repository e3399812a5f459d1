"""The head's MLflow server is supervised (soups/supervise.py, started by cluster.yaml): killed, it comes back on
the same store, and a call made during the outage rides it out with the registry's default retries; the
supervisor stops it on SIGTERM and when the process it watches ends (the head's gcs_server: `ray stop`,
hence `ray down`); it gives up after too many exits. The namespace cluster test (tests/test_launcher.py)
kills the head's server mid-sweep the same way."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import pytest

from soups import supervise
from soups.store import retry
from soups.tracking_server import SERVER_ENV, _mlflow_executable, free_port, health_ok
from tests.test_multinode import _group_alive  # one copy of the process-group probe

pytestmark = pytest.mark.integration

WAIT_S = 180.0  # bound on a server start here (one uvicorn process, a busy 2-core machine)


# ------------------------------------------------------------------------------------------ pure parts

def test_restart_delay_backs_off_and_is_capped():
    assert [supervise.restart_delay(n, 2.0, 30.0) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]


def test_recent_exits_forget_exits_older_than_the_window():
    exits = deque([0.0, 100.0, 650.0, 700.0])
    assert supervise.recent_exits(exits, 695.0, 600.0) == 3 and list(exits) == [100.0, 650.0, 700.0]
    assert supervise.recent_exits(exits, 1500.0, 600.0) == 0


def test_default_retry_window_outlasts_a_supervised_restart():
    """One MLflow call keeps retrying at least as long as the supervisor's first restart delay plus the start-up
    time the project allows a server; control: one attempt fewer falls short (the window is not oversized)."""
    assert retry.SERVER_RESTART_S == supervise.FIRST_DELAY_S + 90.0
    policy = retry.DEFAULT_RETRY
    assert policy.total_wait() >= retry.SERVER_RESTART_S
    shorter = retry.RetryPolicy(attempts=policy.attempts - 1, base_s=policy.base_s, max_s=policy.max_s)
    assert shorter.total_wait() < retry.SERVER_RESTART_S


# ------------------------------------------------------------------------------------------ processes

def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _wait(predicate, timeout: float = WAIT_S, what: str = "") -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.25)
    return time.monotonic() - t0


def _server_command(store: Path, port: int) -> list[str]:
    """cluster.yaml's `mlflow server` line, on loopback and a local store (no basic auth: not what is tested)."""
    return [_mlflow_executable(), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(store / "artifacts")]


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **SERVER_ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env,
                                cwd=Path(__file__).resolve().parent.parent, start_new_session=True)


def _supervised(store: Path, port: int, pid_file: Path, *extra: str) -> subprocess.Popen:
    # As cluster.yaml starts it: python -m soups.supervise --pid-file ... --while-alive <pid> -- mlflow server ...
    return _start([sys.executable, "-m", "soups.supervise", "--pid-file", str(pid_file), *extra, "--",
                   *_server_command(store, port)], store / "server.log")


def test_killed_server_comes_back_on_the_same_store_and_ray_stop_ends_it(tmp_path):
    from mlflow import MlflowClient
    store = tmp_path / "store"
    store.mkdir()
    port, pid_file = free_port(), tmp_path / "server.pid"
    uri = f"http://127.0.0.1:{port}"
    gcs = subprocess.Popen(["sleep", "600"], start_new_session=True)  # stands in for the head's gcs_server
    sup = _supervised(store, port, pid_file, "--while-alive", str(gcs.pid))
    try:
        _wait(lambda: health_ok(uri), what=f"{uri}/health")
        assert pid_file.read_text().strip() == str(sup.pid) and os.getpgid(sup.pid) == sup.pid
        client = MlflowClient(tracking_uri=uri)
        exp = client.create_experiment("before-the-kill")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "val_acc", 0.5)

        [server] = _children(sup.pid)
        os.killpg(server, signal.SIGKILL)  # the whole server (mlflow CLI + uvicorn) dies at once
        _wait(lambda: not _group_alive(server), timeout=30, what="the killed server's group to go")
        # A call made during the outage, with the registry's default retries, gets its answer once it is back.
        got = retry.call_with_retry("get run", client.get_run, run.info.run_id)
        assert got.data.metrics == {"val_acc": 0.5}
        [again] = _children(sup.pid)
        assert again != server
        assert client.get_experiment_by_name("before-the-kill").experiment_id == exp  # same store
        log = (store / "server.log").read_text()
        assert f"pid {server} exited -9; restart 1/{supervise.MAX_RESTARTS} in 2 s" in log, log[-3000:]

        # `ray stop` ends gcs_server: the supervisor stops the server and exits 0.
        gcs.kill()
        gcs.wait()
        assert sup.wait(timeout=60) == 0
        assert not _group_alive(again) and not health_ok(uri)
        assert not pid_file.exists()
        assert f"process {gcs.pid} (--while-alive) ended: stopping pid {again}" in (store / "server.log").read_text()
    finally:
        for p in (sup, gcs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_control_a_plain_server_stays_down_when_killed(tmp_path):
    """Without the supervisor (cluster.yaml's old `setsid ... exec mlflow server`) nothing brings it back: after
    longer than the supervisor's restart delay plus a start-up measured here, nothing listens on the port."""
    store = tmp_path / "store"
    store.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    plain = _start(_server_command(store, port), store / "server.log")
    try:
        startup = _wait(lambda: health_ok(uri), what=f"{uri}/health")
        os.killpg(plain.pid, signal.SIGKILL)
        plain.wait()
        time.sleep(supervise.FIRST_DELAY_S + 2 * startup)  # a supervised server would have answered by now
        assert not health_ok(uri)
        assert not _group_alive(plain.pid)
    finally:
        if _group_alive(plain.pid):
            os.killpg(plain.pid, signal.SIGKILL)


def test_supervisor_stops_its_command_on_sigterm(tmp_path):
    pid_file = tmp_path / "pid"
    sup = _start([sys.executable, "-m", "soups.supervise", "--pid-file", str(pid_file), "--", "sleep", "600"],
                 tmp_path / "log")
    try:
        _wait(lambda: pid_file.exists() and _children(sup.pid), timeout=60, what="the supervised command")
        [child] = _children(sup.pid)
        os.kill(sup.pid, signal.SIGTERM)
        assert sup.wait(timeout=60) == 0
        assert not _group_alive(child) and not pid_file.exists()
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)


def test_supervisor_gives_up_after_too_many_exits(tmp_path):
    """A command that keeps failing is restarted max-restarts times, then the supervisor exits 1 and says why."""
    log = tmp_path / "log"
    sup = _start([sys.executable, "-m", "soups.supervise", "--max-restarts", "2", "--first-delay-s", "0.1", "--",
                  sys.executable, "-c", "import sys; print('started', flush=True); sys.exit(3)"], log)
    assert sup.wait(timeout=120) == 1
    text = log.read_text()
    assert text.count("started\n") == 3, text
    assert "exited 3; restart 1/2" in text and "exited 3; restart 2/2" in text
    assert "3 exits within 600 s: giving up" in text, text


def test_supervisor_refuses_to_run_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "soups.supervise", "--pid-file", str(tmp_path / "pid")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "python -m soups.supervise: error: no command to supervise: give it after --"
