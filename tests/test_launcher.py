"""The production path as users run it: `ray up` of the project's own cluster.yaml (on-prem `local` provider)
on two SSH "machines" (network namespaces with sshd, tests/netns.py), `ray submit cluster.yaml
sweeps/coatnet.py`, the `ray dashboard` tunnel with token auth (a client without the token refused; the `ray job
submit` runs through it are tests/test_schedule_cluster.py's, on the same session cluster), `ray down`.

Asserts: trials ran on the worker node (ich.node tag = the worker's address), one checkpoint per (trial, epoch)
in MLflow for every epoch Tune's results show although the head's MLflow server was killed mid-sweep (its
supervisor started it again), soups built, workers log with a non-admin MLflow user and hold no admin
credential; `ray down` exits 0 and leaves no raylet/gcs_server/MLflow server in the nodes (`ns_ray_cluster`
checks it before any kill; the test shows the check sees them while the cluster runs), and the namespace cluster
leaves nothing behind (the `ns_cluster` fixture fails the session otherwise; the small test at the end proves
that check on a process left running in a node; tests/test_netns_cleanup.py covers a killed test run)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import netns
from tests.fixtures_sweep import write_sweep_config

pytestmark = [pytest.mark.integration, pytest.mark.launcher]


def _mlflow(launched: netns.Launched, monkeypatch):
    from mlflow import MlflowClient
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", launched.admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", launched.admin[1])
    return MlflowClient(tracking_uri=launched.mlflow_uri)


def tune_epochs(storage, sweep: str) -> dict[str, int]:
    """trial id -> the last epoch it reported to Tune, read from the sweep's Tune folder on the shared storage
    (<storage>/<sweep>-<time>/<trial>/result.json: one JSON line per report)."""
    [tune_dir] = [d for d in storage.iterdir() if d.name.startswith(sweep + "-2")]  # not <sweep>-job-...
    epochs = {}
    for result in tune_dir.glob("*/result.json"):
        for line in result.read_text().splitlines():
            row = json.loads(line)
            epochs[row["trial_id"]] = max(epochs.get(row["trial_id"], 0), int(row["epoch"]))
    return epochs


def _supervised_server(cluster: netns.NsCluster) -> list[tuple[int, int]]:
    """(supervisor, server) outer pids of the head's MLflow server: the supervisor cluster.yaml starts, seen from
    outside the node by its command line, and its child."""
    found = []
    for pid, cmd in netns.mlflow_processes(cluster):
        if "soups.supervise" in cmd:
            found += [(pid, int(k)) for task in Path(f"/proc/{pid}/task").iterdir()
                      for k in (task / "children").read_text().split()]
    return found


def _kill_head_mlflow_server(cluster: netns.NsCluster) -> int:
    """SIGKILL the head's MLflow server, its whole process group (mlflow CLI + uvicorn), as an OOM kill or crash
    would end it; returns its outer pid."""
    [(_, server)] = _supervised_server(cluster)
    os.killpg(server, signal.SIGKILL)
    print(f"killed the head's MLflow server (outer pid {server}) mid-sweep")
    return server


def _wait_first_checkpoint(client, submit: subprocess.Popen, timeout: float = 1200) -> None:
    """Poll MLflow until the sweep's first checkpoint LoggedModel is READY (or the sweep ended)."""
    from tests.test_sweep import _all_checkpoint_models
    deadline = time.time() + timeout
    while submit.poll() is None and time.time() < deadline:
        exp = client.get_experiment_by_name("launcher")
        if exp and _all_checkpoint_models(client, exp.experiment_id, "launcher"):
            return
        time.sleep(2)
    raise AssertionError(f"no checkpoint recorded before the sweep ended (exit {submit.poll()}) or within {timeout} s")


def _save(name: str, text: str) -> None:
    (netns.ROOT / "test-artifacts").mkdir(exist_ok=True)
    (netns.ROOT / "test-artifacts" / name).write_text(text)


# ray up + worker (~5 min here) and a sweep on a busy 2-core machine: above the suite's 15-min default.
@pytest.mark.timeout(2400)
def test_ray_up_submit_and_token_auth_on_ssh_nodes(ns_ray_cluster, monkeypatch):
    from tests.test_sweep import _all_checkpoint_models, _trial_runs, assert_exactly_once
    t0 = time.time()
    launched, cluster = ns_ray_cluster, ns_ray_cluster.cluster
    _save("launcher-ray-up.log", launched.up_log)
    assert "MLflow tracking server: http://" + cluster.head.addr in launched.up_log
    assert "MLflow worker user: ich-worker (not an admin)" in launched.up_log
    # Control of the fixture's after-`ray down` check: it sees Ray's daemons while the cluster runs.
    running = netns.ray_processes(cluster)
    assert sum("(raylet)" in p for p in running) == 2 and any("(gcs_server)" in p for p in running), running
    # ... and the head's supervised MLflow server (also gone after `ray down`).
    assert len(_supervised_server(cluster)) == 1, netns.mlflow_processes(cluster)

    # 1. `ray submit cluster.yaml sweeps/coatnet.py -- ...`: the driver runs on the head over SSH.
    # Two epochs and a one-epoch warm start: enough for a checkpoint before and after the server is killed, ASHA's
    # rung at epoch 1, and exactly-once over several epochs; the 2 shared cores spend no more on training.
    config = write_sweep_config(cluster.shared, "launcher", **{"epochs: 3": "epochs: 2",
                                                               "warm_start: {epochs: 4": "warm_start: {epochs: 1"})
    # One soup family (uniform across the trials' best checkpoints) keeps the soups step short on 2 CPUs.
    config.write_text(config.read_text() + "soups:\n  scope: across\n  recipe: uniform\n  bn: average\n")
    # Mid-sweep, once the first checkpoint is recorded, the head's MLflow server is killed: its supervisor starts it
    # again and the trials' and driver's calls ride the outage out (soups/store/retry.py's retry window).
    client = _mlflow(launched, monkeypatch)
    log = cluster.base / "launcher-ray-submit.log"
    with open(log, "w") as out:
        submit = subprocess.Popen([netns.RAY, "submit", str(launched.yaml), "sweeps/coatnet.py", "--", "--demo",
                                   "--config", str(config), "--num-samples", "2", "--experiment", "launcher"],
                                  env=launched.env, cwd=launched.src, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    netns.register_pid(cluster, submit.pid)
    try:
        _wait_first_checkpoint(client, submit)
        killed = _kill_head_mlflow_server(cluster)
        assert submit.poll() is None, "the sweep ended before the server was killed: nothing was tested"
        submit.wait(timeout=1500)
    finally:
        if submit.poll() is None:
            os.killpg(submit.pid, signal.SIGKILL)
            submit.wait()
        _save("launcher-ray-submit.log", log.read_text(errors="replace"))
    assert submit.returncode == 0, log.read_text(errors="replace")[-5000:]
    server_log = (cluster.head.home / "ich-mlflow" / "server.log").read_text(errors="replace")
    _save("launcher-mlflow-server.log", server_log)
    assert "exited -9; restart 1/" in server_log, server_log[-3000:]  # the supervisor logs pids inside the node
    [(_, restarted)] = _supervised_server(cluster)
    assert restarted != killed

    exp = client.get_experiment_by_name("launcher").experiment_id
    runs = _trial_runs(client, exp, "launcher")
    assert len(runs) == 2
    nodes = sorted({r.data.tags["ich.node"] for r in runs})
    print("trial nodes:", nodes)
    assert all(n.endswith("/" + cluster.worker.addr) for n in nodes), nodes
    # Expected epochs from Tune's own results (not from the MLflow store under test: a lost last epoch there
    # would lower both sides).
    epochs = tune_epochs(cluster.shared / "ray-results", "launcher")
    assert sorted(epochs) == sorted(r.data.tags["ich.trial"] for r in runs), (epochs, runs)
    assert all(n >= 1 for n in epochs.values()), epochs
    assert_exactly_once(client, exp, "launcher", epochs)
    assert len(_all_checkpoint_models(client, exp, "launcher")) == sum(epochs.values())
    soups = client.search_runs([exp], "tags.`ich.kind` = 'soup'")
    assert soups, "no soup runs after `ray submit`"
    t_submit = time.time() - t0

    # 2. The `ray dashboard` tunnel with token auth: no token, no entry. The jobs submitted through it (`ray job submit`
    # of the project as working dir, trials on the worker) are tests/test_schedule_cluster.py's two scheduled runs on
    # this same cluster: one sweep per claim.
    with launched.dashboard() as url:
        no_token = {k: v for k, v in launched.env.items() if not k.startswith("RAY_AUTH_TOKEN")}
        no_token["RAY_AUTH_TOKEN_PATH"] = str(cluster.base / "no-such-token")
        refused = subprocess.run([netns.RAY, "job", "list", "--address", url], env=no_token, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode != 0
        assert "auth" in (refused.stdout + refused.stderr).lower(), refused.stderr[-2000:]
        # Control: the same call with the token is let in.
        allowed = launched.ray("job", "list", "--address", url, timeout=120, check=False)
        assert allowed.returncode == 0, (allowed.stdout + allowed.stderr)[-2000:]

    # 3. Least privilege: the workers' MLflow user is not an admin, and no worker file holds the admin password.
    from mlflow.server import get_app_client
    auth = get_app_client("basic-auth", tracking_uri=launched.mlflow_uri)
    assert auth.get_user("ich-worker").is_admin is False
    assert auth.get_user(launched.admin[0]).is_admin is True
    worker_env = netns.ssh(cluster, cluster.worker, "echo $MLFLOW_TRACKING_USERNAME", check=True).stdout.split()
    assert worker_env[-1:] == ["ich-worker"], worker_env
    leak = netns.ssh(cluster, cluster.worker, f"grep -rl {launched.admin[1]} ~/.ich ~/.bashrc")
    assert leak.returncode == 1 and not leak.stdout.strip(), f"admin password on the worker: {leak.stdout}"
    head_files = netns.ssh(cluster, cluster.head, "grep -c MLFLOW_TRACKING_PASSWORD ~/.ich/admin.env && "
                           f"! grep -q {launched.admin[1]} ~/.ich/secrets.env")
    assert head_files.returncode == 0, head_files.stdout + head_files.stderr
    # A worker cannot administer MLflow: creating a user with its credentials is refused.
    escalate = netns.ssh(cluster, cluster.worker, "python -c \"import os; from mlflow.server import get_app_client; "
                         "get_app_client('basic-auth', tracking_uri=os.environ['MLFLOW_TRACKING_URI'])"
                         ".create_user('intruder', 'intruder-password-123')\"", timeout=180)
    refusal = escalate.stdout + escalate.stderr
    assert escalate.returncode != 0 and "users/create failed with error code 403" in refusal, refusal[-2000:]

    timings = {"ray_up_s": round(launched.up_seconds), "worker_ready_s": round(launched.ready_seconds),
               "ray_submit_sweep_s": round(t_submit), "test_body_s": round(time.time() - t0)}
    _save("launcher-timings.json", json.dumps(timings, indent=1))
    print("launcher timings:", timings)


def test_teardown_check_sees_a_process_left_in_a_node():
    """The leftover check that guards the launcher test: a daemon detached inside a node (as Ray's are) is
    seen while the node runs and gone after destroy_cluster, with the namespaces, veths and bridge."""
    why = netns.missing_prerequisites()
    if why:
        from tests.conftest import require_service
        require_service(f"namespace cluster: {why}")
    c = netns.create_cluster()
    try:
        netns.ssh(c, c.worker, "setsid sleep 600 >/dev/null 2>&1 < /dev/null &", check=True)
        time.sleep(0.5)
        during = netns.leftovers(c)
        assert any("(sleep)" in x for x in during), during
        assert any("(sshd)" in x for x in during), during
    finally:
        left = netns.destroy_cluster(c)
    assert left == [], left
    assert c.head.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not c.base.exists()
