"""Tracking that reaches every node (docs/design.md#10).

Unit tests of the pure decision (tracking URI + node addresses in, use or refuse out); the sweep's wiring on
a local Ray; and, in network namespaces, that a worker machine cannot reach the head's loopback, so the
sweep refuses a loopback URI on a two-machine Ray in one line (tests/test_schedule_cluster.py shares the
cluster).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from soups.tracking_server import password_in_uri
from sweeps.cluster import decide_tracking, is_loopback_host

ROOT = Path(__file__).resolve().parent.parent
HEAD, WORKER = "10.87.0.2", "10.87.0.3"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "localhost", "LOCALHOST", "api.localhost", "::1",
                                  "[::1]", "0.0.0.0", "ip6-localhost"])
def test_loopback_hosts(host):
    assert is_loopback_host(host)


@pytest.mark.parametrize("host", ["10.87.0.2", "192.0.2.2", "mlflow.internal", "fd00::2", "[fd00::2]", "localhostx"])
def test_routable_hosts(host):
    assert not is_loopback_host(host)


def test_loopback_uri_refused_when_ray_spans_two_machines():
    d = decide_tracking("http://127.0.0.1:5000", [HEAD, WORKER], HEAD)
    assert d.action == "refuse"
    assert d.message == (f"MLFLOW_TRACKING_URI is http://127.0.0.1:5000 (loopback) but Ray spans 2 machines "
                         f"({HEAD}, {WORKER}); set MLFLOW_TRACKING_URI to an address every node reaches, "
                         f"e.g. http://{HEAD}:5000")
    assert "\n" not in d.message


@pytest.mark.parametrize("uri", ["http://localhost:5000", "http://0.0.0.0:5000", "https://[::1]:5000/",
                                 "http://user@127.0.0.1:5000"])
def test_every_loopback_spelling_refused(uri):
    assert decide_tracking(uri, [HEAD, WORKER], HEAD).action == "refuse"


def test_a_name_that_resolves_to_loopback_only_is_loopback():
    d = decide_tracking("http://myhost:5000", [HEAD, WORKER], HEAD, host_ips=["127.0.1.1"])
    assert d.action == "refuse" and "(loopback)" in d.message
    assert decide_tracking("http://myhost:5000", [HEAD, WORKER], HEAD, host_ips=[HEAD]).action == "use"


def test_unset_uri_refused_on_a_cluster_with_the_flag_named():
    d = decide_tracking(None, [HEAD, WORKER], HEAD, autostarted_uri="http://127.0.0.1:5000")
    assert d.action == "refuse" and d.message.startswith("MLFLOW_TRACKING_URI is not set")
    assert f"http://{HEAD}:5000" in d.message and "--mlflow-host auto" in d.message
    # --mlflow-host: the project's server on the head's routable address is fine.
    assert decide_tracking(None, [HEAD, WORKER], HEAD, autostarted_uri=f"http://{HEAD}:5000").action == "use"


def test_a_cluster_scaled_to_zero_workers_counts_as_a_cluster():
    """cluster.yaml's GPU workers start at zero: at sweep start only the head is alive."""
    d = decide_tracking("http://127.0.0.1:5000", [HEAD], HEAD, can_grow=True)
    assert d.action == "refuse" and "autoscaler can add nodes" in d.message
    assert decide_tracking(f"http://{HEAD}:5000", [HEAD], HEAD, can_grow=True).action == "use"
    # A cluster bound to loopback cannot grow onto another machine.
    assert decide_tracking("http://127.0.0.1:5000", ["127.0.0.1"], "127.0.0.1", can_grow=True).action == "use"


@pytest.mark.parametrize("nodes,driver", [([HEAD], HEAD), (["127.0.0.1", "127.0.0.1"], "127.0.0.1"),
                                          ([HEAD, "127.0.0.1"], HEAD), ([], HEAD)])
def test_one_machine_keeps_the_embedded_default(nodes, driver):
    assert decide_tracking("http://127.0.0.1:5000", nodes, driver).action == "use"
    assert decide_tracking(None, nodes, driver, autostarted_uri="http://127.0.0.1:5000") == \
        decide_tracking("http://127.0.0.1:5000", nodes, driver)
    assert decide_tracking("sqlite:///x.db", nodes, driver).uri == "sqlite:///x.db"


@pytest.mark.parametrize("uri", ["sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns",
                                 "postgresql://u@db/mlflow"])
def test_stores_on_this_machine_refused_on_a_cluster(uri):
    d = decide_tracking(uri, [HEAD, WORKER], HEAD)
    assert d.action == "refuse" and "a store on this machine" in d.message


@pytest.mark.parametrize("uri", [f"http://{HEAD}:5000", "https://mlflow.example.org", "databricks"])
def test_routable_uris_used_on_a_cluster(uri):
    assert decide_tracking(uri, [HEAD, WORKER], HEAD).action == "use"


def test_password_in_uri_refused_everywhere():
    for nodes in ([HEAD], [HEAD, WORKER]):
        d = decide_tracking(f"http://admin:s3cret@{HEAD}:5000", nodes, HEAD)
        assert d.action == "refuse" and "s3cret" not in d.message and "MLFLOW_TRACKING_PASSWORD" in d.message
    assert password_in_uri("http://admin@h:5000") is None


def test_worker_runtime_env_carries_no_tracking_uri_or_credentials():
    """The job's runtime_env is what the dashboard shows: MLflow knobs only, nothing secret, no URI."""
    from sweeps.cluster import WORKER_ENV
    assert WORKER_ENV and not [k for k in WORKER_ENV if any(s in k for s in ("URI", "USER", "PASS", "TOKEN"))]
    source = (ROOT / "sweeps" / "cluster.py").read_text()
    assert source.count("runtime_env=") == 1 and 'runtime_env={"env_vars": dict(WORKER_ENV)}' in source


@pytest.mark.integration
def test_sweep_refuses_a_password_in_the_uri_before_starting_anything(tmp_path, digits_dataset):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_TRACKING_URI="http://admin:s3cret@127.0.0.1:9/", ICH_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, str(ROOT / "sweeps" / "coatnet.py"), "--data", str(digits_dataset),
                          "--no-soups"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("sweep: error: MLFLOW_TRACKING_URI carries a password"), \
        out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "s3cret" not in out.stderr + out.stdout


@pytest.mark.integration
def test_mlflow_host_auto_serves_on_this_machines_routable_address(tmp_path, monkeypatch):
    """--mlflow-host auto: with no MLFLOW_TRACKING_URI the project's server listens on the outward address,
    which the decision accepts on a cluster; a loopback server of the same store is not silently reused."""
    from soups.tracking_server import (MlflowServerError, health_ok, initial_tracking_uri, outward_ip,
                                      stop_local_server)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ip = outward_ip()
    if is_loopback_host(ip):
        pytest.fail("this machine has no default route: no routable address to serve on")
    try:
        uri, started = initial_tracking_uri(tmp_path, "auto")
        assert started and uri.startswith(f"http://{ip}:") and health_ok(uri)
        assert decide_tracking(None, [ip, "10.87.0.3"], ip, autostarted_uri=uri).action == "use"
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        with pytest.raises(MlflowServerError, match="already runs at"):
            initial_tracking_uri(tmp_path, None)  # same store, asked for loopback: say so, do not reuse
    finally:
        stop_local_server(tmp_path)


@pytest.mark.integration
def test_local_resource_check_only_for_a_ray_started_here(ray_local, tmp_path):
    """A sweep that joins a running cluster (RAY_ADDRESS, `ray job submit`, `ray submit`) skips the local
    resource check: a cluster scaled to zero GPU workers has no GPU until a trial asks for one."""
    import ray

    from sweeps.cluster import ray_started_here
    assert ray_started_here()  # the session's Ray was started by this process
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    probe = ("import ray; ray.init(); from sweeps.cluster import ray_started_here; "
             "from sweeps.init_weights import check_resources; from types import SimpleNamespace as S; "
             "check_resources(S(cpus_per_trial=1, gpus_per_trial=1), ray_started_here()); "
             "print('joined', ray_started_here())")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "joined False" in out.stdout, out.stderr[-3000:]


@pytest.mark.integration
def test_two_data_folders_starting_at_once_get_two_servers(tmp_path, monkeypatch):
    """Both starts see the default port free; the second must not trust the first one's /health and write
    into its store (found running two demos with different ICH_HOME at once)."""
    import threading

    from mlflow import MlflowClient

    from soups import tracking_server
    monkeypatch.setattr(tracking_server, "DEFAULT_PORT", tracking_server.free_port())
    handles, errors = {}, []

    def start(name: str) -> None:
        try:
            handles[name] = tracking_server.start_server(tmp_path / name)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        a, b = handles["a"], handles["b"]
        assert a.port != b.port and tracking_server.DEFAULT_PORT in (a.port, b.port)
        MlflowClient(a.uri).create_experiment("only-in-a")
        assert MlflowClient(b.uri).get_experiment_by_name("only-in-a") is None
        assert MlflowClient(a.uri).get_experiment_by_name("only-in-a") is not None
    finally:
        for h in handles.values():
            h.stop()
