"""What the head's basic-auth password cache saves: the time of one REST call against the cluster's MLflow server
(`mlflow server --app-name basic-auth`, the basic_auth.ini cluster.yaml writes) with the cache on (the default,
auth_cache_ttl_seconds = 60) and off (ICH_MLFLOW_AUTH_CACHE_S=0), side by side in one run.

    python -m bench.auth_cache [--calls 60] [--rounds 3]

Two real servers on 127.0.0.1 (SQLite, temp folder), each started with the config file the head's own
`printf ... > ~/ich-mlflow/basic_auth.ini` line writes. The calls are the kind a sweep makes (log a metric, read a
run, search runs), by the admin user with its password, alternating between the servers in rounds so that load on
the machine hits both alike. Without the cache every call pays MLflow's scrypt password check on the server.
Goal: cached / uncached time per call <= 0.25 (one sweep's soups make hundreds of calls: on the namespace cluster
the soup step of a 2-trial sweep took 43 s against 7 s on a local server without auth).

Importable: `write_head_auth_ini(home, env)`, `measure(...) -> dict`, `figures(result)`, `main()`.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ADMIN, PASSWORD = "admin", "bench-admin-password-1234"
GOAL = 0.25


def write_head_auth_ini(home: Path, env: dict[str, str]) -> Path:
    """Run cluster.yaml's `( umask 077; printf '[mlflow]...' > ~/ich-mlflow/basic_auth.ini )` with HOME=home; the
    file it wrote."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    server = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    write = re.search(r"\( umask 077; printf '\[mlflow\].*?basic_auth\.ini \)", server, re.S)
    if write is None:
        raise RuntimeError("cluster.yaml: the head does not write ~/ich-mlflow/basic_auth.ini")
    (home / "ich-mlflow").mkdir(parents=True, exist_ok=True)
    full_env = {"PATH": os.environ["PATH"], "HOME": str(home), "MLFLOW_TRACKING_USERNAME": ADMIN, **env}
    subprocess.run(["bash", "-c", write.group(0)], env=full_env, check=True, timeout=30)
    return home / "ich-mlflow" / "basic_auth.ini"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    ini = write_head_auth_ini(home, env)
    port = _free_port()
    server_env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
                  "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "bench-only"}
    server_env.pop("MLFLOW_TRACKING_URI", None)
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    log = open(home / "server.log", "ab")
    process = subprocess.Popen(
        [mlflow, "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--serve-artifacts",
         "--artifacts-destination", str(home / "artifacts")],
        env=server_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited {process.returncode}; see {home / 'server.log'}")
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).read()
            return process, uri
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {uri} did not answer /health in 120 s")


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _time_calls(client, run_id: str, experiment_id: str, calls: int) -> float:
    """Seconds per call of a sweep-like mix: log a metric, read the run, search the experiment's runs."""
    t0 = time.perf_counter()
    for i in range(calls):
        match i % 3:
            case 0:
                client.log_metric(run_id, "loss", 1.0 / (i + 1), step=i)
            case 1:
                client.get_run(run_id)
            case _:
                client.search_runs([experiment_id], max_results=5)
    return (time.perf_counter() - t0) / calls


def measure(calls: int = 60, rounds: int = 3) -> dict:
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = ADMIN, PASSWORD
    from mlflow import MlflowClient

    per_call: dict[str, list[float]] = {"cached": [], "uncached": []}
    with tempfile.TemporaryDirectory(prefix="ich-auth-bench-") as tmp:
        servers = {}
        try:
            servers["cached"] = _start(Path(tmp) / "cached", {})
            servers["uncached"] = _start(Path(tmp) / "uncached", {"ICH_MLFLOW_AUTH_CACHE_S": "0"})
            targets = {}
            for name, (_, uri) in servers.items():
                client = MlflowClient(uri)
                experiment_id = client.create_experiment("auth-bench")
                targets[name] = (client, client.create_run(experiment_id).info.run_id, experiment_id)
                _time_calls(*targets[name], 3)  # warm: connections, the first password check
            for _ in range(rounds):
                for name, target in targets.items():
                    per_call[name].append(_time_calls(*target, calls))
        finally:
            for process, _ in servers.values():
                _stop(process)
    cached, uncached = statistics.median(per_call["cached"]), statistics.median(per_call["uncached"])
    return {"calls": calls, "rounds": rounds, "cached_s": cached, "uncached_s": uncached,
            "ratio": cached / uncached, "per_round": per_call}


def figures(result: dict) -> list[tuple[str, str, str]]:
    return [
        ("REST call, password cache on / off (ratio)", f"{result['ratio']:.3f}", f"<= {GOAL}"),
        ("REST call with the cache (ms)", f"{result['cached_s'] * 1e3:.1f}", "info"),
        ("REST call without it (ms)", f"{result['uncached_s'] * 1e3:.1f}", "info"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.calls, args.rounds)
    for name, measured, goal in figures(result):
        print(f"{name:48s} {measured:>10s}   goal {goal}")


if __name__ == "__main__":
    main()
