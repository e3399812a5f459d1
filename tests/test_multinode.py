"""A real two-node Ray cluster on this machine, token auth on, the sweep submitted with `ray job submit`.

Both nodes run on 127.0.0.1 with one CPU each, so two concurrent trials must land on different nodes; the
node of every trial is recorded on its MLflow run (ich.node_id)."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_sweep import write_sweep_config
from tests.test_sweep import _trial_runs, assert_exactly_once

pytestmark = [pytest.mark.integration, pytest.mark.multinode]
ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    from soups.tracking_server import free_port
    return free_port()


@pytest.fixture
def two_node_cluster(tmp_path, mlflow_server):
    gcs, dash, temp = _free_port(), _free_port(), Path("/tmp") / f"ray-mn-{secrets.token_hex(3)}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "MLFLOW_TRACKING_URI": mlflow_server, "ICH_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    # Two nodes on one machine, beside the test session's own Ray: no default port may be shared.
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    own_ports = lambda: ["--dashboard-agent-listen-port", str(_free_port()),  # noqa: E731
                         "--dashboard-agent-grpc-port", str(_free_port()), "--runtime-env-agent-port",
                         str(_free_port()), "--metrics-export-port", str(_free_port())]
    groups: list[int] = []
    try:
        groups.append(_ray_start(["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                                  str(dash), "--include-dashboard", "true", "--temp-dir", str(temp),
                                  "--ray-client-server-port", str(_free_port()),
                                  "--resources", json.dumps({"head_node": 1}), *common, *own_ports()], env))
        groups.append(_ray_start(["--address", f"127.0.0.1:{gcs}", "--resources", json.dumps({"second_node": 1}),
                                  *common, *own_ports()], env))
        yield {"env": env, "gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        _stop_cluster(groups)


def _ray_start(args: list[str], env: dict) -> int:
    """`ray start` in a session of its own; returns its process group, which all its daemons keep."""
    p = subprocess.Popen([RAY, "start", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    out, _ = p.communicate(timeout=240)
    if p.returncode:
        _stop_cluster([p.pid])
        raise RuntimeError(f"ray start {' '.join(args[:2])} failed:\n{out.decode(errors='replace')[-3000:]}")
    return p.pid


def _stop_cluster(groups: list[int]) -> None:
    """Stop this cluster's processes only (`ray stop` would also stop the test session's own Ray, and a
    driver whose GCS dies exits): signal the process groups of its `ray start` commands."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while wait and time.time() < deadline and any(_group_alive(g) for g in groups):
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sweep_submitted_as_a_job_spreads_over_two_nodes(two_node_cluster, mlflow_client, digits_dataset, tmp_path):
    env = two_node_cluster["env"]
    # The cluster really has two nodes, and a client without the token is refused.
    deadline = time.time() + 90
    while True:  # the autoscaler's status catches up with a joining node after a few seconds
        status = subprocess.run([RAY, "status", "--address", two_node_cluster["gcs"]], env=env, capture_output=True,
                                text=True, timeout=60)
        if status.stdout.count(" node_") >= 2 or time.time() > deadline:
            break
        time.sleep(2)
    assert status.stdout.count(" node_") >= 2, status.stdout
    # The cluster refuses (HTTP 401/403) a client without the token and one with another token. The client sends
    # no header at all with auth off (and a HOME without ~/.ray/auth_token), so the refusal is the cluster's.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    (tmp_path / "home-no-token").mkdir()
    no_token.update(RAY_AUTH_MODE="disabled", HOME=str(tmp_path / "home-no-token"))
    wrong_token = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for client_env, refusal in ((no_token, "Unauthorized: Missing authentication token"),
                                (wrong_token, "Forbidden: Invalid authentication token")):
        refused = subprocess.run([RAY, "job", "list", "--address", two_node_cluster["dashboard"]], env=client_env,
                                 capture_output=True, text=True, timeout=60)
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "AuthenticationError" in said and refusal in said, said[-3000:]

    # Two trials on two one-CPU nodes: run at once, they must land on different nodes. Two epochs each (ASHA's grace
    # period = epochs: nobody stopped), a one-epoch warm start and one soup family keep the 2 shared cores' time
    # for what is claimed here: the job, the spread, exactly-once records and soups.
    config = write_sweep_config(tmp_path, "multi-node", **{
        "num_samples: 4": "num_samples: 2", "grace_period: 1": "grace_period: 2", "epochs: 3": "epochs: 2",
        "warm_start: {epochs: 4": "warm_start: {epochs: 1"})
    config.write_text(config.read_text() + "soups:\n  scope: across\n  recipe: uniform\n  bn: average\n")
    for attempt in range(10):  # the head's job agent may still be starting on a loaded machine
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", two_node_cluster["dashboard"], "--submission-id",
             f"ich-multinode-{attempt}", "--", sys.executable, str(ROOT / "sweeps" / "coatnet.py"), "--config",
             str(config), "--data", str(digits_dataset)],
            env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
        log = submit.stdout + submit.stderr
        if "No available agent" not in log:
            break
        time.sleep(6)
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    (ROOT / "test-artifacts" / "multinode-job.log").write_text(log)
    assert submit.returncode == 0 and "succeeded" in log.lower(), log[-4000:]

    exp = mlflow_client.get_experiment_by_name("multi-node").experiment_id
    runs = _trial_runs(mlflow_client, exp, "multi-node")
    assert len(runs) == 2
    nodes = {r.data.tags["ich.node_id"] for r in runs}
    spread = {n: sum(r.data.tags["ich.node_id"] == n for r in runs) for n in nodes}
    (ROOT / "test-artifacts" / "multinode-spread.json").write_text(json.dumps(spread, indent=1))
    print("trials per node:", spread)
    assert len(nodes) == 2, spread
    # grace_period = epochs: ASHA stops nobody, so every trial ran its 2 epochs and has 2 records.
    assert all(r.info.status == "FINISHED" for r in runs), [(r.data.tags["ich.trial"], r.info.status) for r in runs]
    assert_exactly_once(mlflow_client, exp, "multi-node", {r.data.tags["ich.trial"]: 2 for r in runs})
    soup_runs = mlflow_client.search_runs([exp], "tags.`ich.kind` = 'soup'")
    assert soup_runs, "no soup runs after the multi-node sweep"
