"""Scheduled experiments and tracking on a real two-machine cluster: network namespaces with sshd, `ray up` of
the project's cluster.yaml (local provider, token auth), tests/netns.py.

- Two runs of the job script that `ich schedule --address` installs, each under cron's bare environment
  (`env -i HOME=... PATH=/usr/bin:/bin SHELL=/bin/sh`), extend one sweep: the second adds trials to the
  same sweep and Optuna study (no proposal replayed), trials run on the worker machine, every epoch recorded
  once, soups are rebuilt over all four trials and `champion` moves only when the new soup beats it on val.
  (These two runs serve every two-runs claim; tests/test_schedule.py runs no pair of its own.)
- The worker machine cannot reach the head's loopback; the sweep refuses a loopback tracking URI there in
  one line and hands no trial 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.fixtures_sweep import write_sweep_config
from tests.netns import node_exec  # ns_ray_cluster: the session's namespace cluster, from conftest.py
from tests.test_sweep import assert_exactly_once

pytestmark = [pytest.mark.integration, pytest.mark.launcher, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
ICH = str(Path(sys.executable).with_name("ich"))
ARTIFACTS = ROOT / "test-artifacts"


def _client(launched):
    """An MLflow client of the cluster's tracking server, with the admin's credentials from the environment."""
    from mlflow import MlflowClient
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = launched.admin
    return MlflowClient(launched.mlflow_uri)


def _shared_inputs(launched, digits_dataset, name: str, **edits) -> tuple[Path, Path]:
    """Dataset and sweep config where every node sees them at the same path (the nodes' /tmp is private)."""
    folder = launched.cluster.shared / name
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "digits-ds"
    if not data.exists():
        shutil.copytree(digits_dataset, data)
    return data, write_sweep_config(folder, name, **edits)


def _trial_runs(client, experiment_id: str, sweep: str):
    return client.search_runs([experiment_id], f"tags.`ich.kind` = 'trial' AND tags.`ich.sweep` = '{sweep}'")


@pytest.fixture
def cleanup_mlflow_env():
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_loopback_unreachable_from_the_worker_and_refused(ns_ray_cluster, digits_dataset, cleanup_mlflow_env):
    launched = ns_ray_cluster
    c = launched.cluster
    # 1. A server on the head's loopback answers on the head and not from the worker machine (its 127.0.0.1
    #    is its own); the head's routable address does answer from the worker.
    port = "18765"
    node_exec(c.head, ["bash", "-c", f"timeout 120 {sys.executable} -m http.server {port} --bind 127.0.0.1 "
                                     ">/dev/null 2>&1 </dev/null & disown"], timeout=30)
    probe = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]
    deadline = time.time() + 60
    while node_exec(c.head, [*probe, f"http://127.0.0.1:{port}/"]).stdout != "200" and time.time() < deadline:
        time.sleep(1)
    seen = {"head -> head loopback": node_exec(c.head, [*probe, f"http://127.0.0.1:{port}/"]).stdout,
            "worker -> head loopback": node_exec(c.worker, [*probe, f"http://127.0.0.1:{port}/"]).stdout,
            "worker -> head MLflow": node_exec(c.worker, [*probe, f"{launched.mlflow_uri}/health"]).stdout}
    assert seen["head -> head loopback"] == "200", seen
    assert seen["worker -> head loopback"] == "000", seen  # nothing answers: uploads would go nowhere
    assert seen["worker -> head MLflow"] not in ("000", ""), seen

    # 2. The sweep, run on the head as `ray submit` runs it, with a loopback URI: one line, no trial.
    data, config = _shared_inputs(launched, digits_dataset, "loopback-refused")
    command = (f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port} python ~/ich-soups/sweeps/coatnet.py "
               f"--config {config} --data {data} --no-soups")
    out = launched.ray("exec", str(launched.yaml), command, check=False, timeout=600)
    text = out.stdout + out.stderr
    errors = [ln for ln in text.splitlines() if "sweep: error:" in ln]
    expected = (f"sweep: error: MLFLOW_TRACKING_URI is http://127.0.0.1:{port} (loopback) but Ray spans 2 machines "
                f"({c.head.addr}, {c.worker.addr}); set MLFLOW_TRACKING_URI to an address every node reaches, "
                f"e.g. http://{c.head.addr}:5000")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "tracking-loopback.json").write_text(json.dumps({"reachability": seen, "refusal": errors}, indent=1))
    assert out.returncode != 0 and len(errors) == 1 and errors[0].strip().endswith(expected), text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    exp = _client(launched).get_experiment_by_name("loopback-refused")
    assert exp is None or not _trial_runs(_client(launched), exp.experiment_id, "loopback-refused")


@pytest.mark.timeout(2700)  # two whole scheduled runs (sweep + soups) on 2 shared cores
def test_two_cron_runs_extend_one_sweep_on_the_cluster(ns_ray_cluster, digits_dataset, tmp_path, cleanup_mlflow_env):
    launched = ns_ray_cluster
    c = launched.cluster
    data, config = _shared_inputs(launched, digits_dataset, "sched-cluster",
                                  **{"grace_period: 1": "grace_period: 2", "epochs: 3": "epochs: 2",
                                     "warm_start: {epochs: 4": "warm_start: {epochs: 1"})
    # Greedy soups across the trials: what this test claims of them (the champion rule, run 2's soup seeing all four
    # trials); within-trial soups and the other recipes have tests of their own, so the 2 shared cores skip them.
    config.write_text(config.read_text() + "soups:\n  scope: across\n  recipe: greedy\n")
    home = tmp_path / "ich-home"  # this machine's: job script, lock and log
    client = _client(launched)
    study_db = c.head.home / "ich-home" / "optuna.db"  # ICH_HOME of the head (cluster.yaml's env.sh)
    record: dict = {"runs": []}
    with launched.dashboard() as jobs_api:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env["ICH_HOME"] = str(home)
        made = subprocess.run([ICH, "schedule", "--experiment", "sched-cluster", "--config", str(config), "--data",
                               str(data), "--num-samples", "2", "--every", "*/30 * * * *", "--address", jobs_api,
                               "--token-path", str(launched.token_path)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert made.returncode == 0, made.stderr
        cron = (home / "schedules" / "sched-cluster.cron").read_text()
        command = cron.rsplit("  # ich-schedule ", 1)[0].split(" ", 5)[5]  # what cron hands /bin/sh
        cron_env = [f"HOME={launched.client_home}", "PATH=/usr/bin:/bin", "SHELL=/bin/sh"]
        seen: list[set] = []
        for run in (1, 2):
            t0 = time.time()
            out = subprocess.run(["env", "-i", *cron_env, "/bin/sh", "-c", command], capture_output=True, text=True,
                                 timeout=1500)
            log = (home / "schedules" / "sched-cluster.log").read_text()
            assert out.returncode == 0, log[-5000:]
            assert log.count("succeeded") >= run, log[-5000:]
            exp = client.get_experiment_by_name("sched-cluster").experiment_id
            trials = _trial_runs(client, exp, "sched-cluster")
            seen.append({r.data.tags["ich.trial"] for r in trials})
            study = optuna.load_study(study_name="sched-cluster", storage=f"sqlite:///{study_db}")
            record["runs"].append({"run": run, "seconds": round(time.time() - t0), "trials": len(seen[-1]),
                                   "study_trials": len(study.trials),
                                   "nodes": sorted({r.data.tags.get("ich.node", "?") for r in trials})})
            assert len(seen[-1]) == 2 * run and len(study.trials) == 2 * run, record
        jobs = launched.ray("job", "list", "--address", jobs_api, timeout=120).stdout
    record["jobs"] = jobs[-3000:]
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "schedule-cluster.json").write_text(json.dumps(record, indent=1))

    assert seen[0] < seen[1]
    # Trials ran on the worker machine (the head advertises 0 CPUs): every one of them.
    assert record["runs"][1]["nodes"] and all(n.endswith("/" + c.worker.addr) for n in record["runs"][1]["nodes"]), \
        record
    # The submitted job: the project's code shipped as the working dir, a relative entrypoint, no credentials.
    assert "entrypoint='python sweeps/coatnet.py --experiment sched-cluster" in jobs, jobs[-2000:]
    assert "gcs://_ray_pkg_" in jobs and str(sys.executable) not in jobs, jobs[-2000:]
    # The dashboard's job records carry no credentials and no tracking URI (trials get it in the sweep context).
    assert launched.admin[1] not in jobs and "MLFLOW_TRACKING_URI" not in jobs and "PASSWORD" not in jobs
    # Soups rebuilt by each run, the second over the checkpoints of all four trials.
    versions = sorted(client.search_model_versions("name = 'sched-cluster-soup'"), key=lambda v: int(v.version))
    assert len(versions) == 2, [v.version for v in versions]

    # What the local twin of this test asserted (merged here: one pair of scheduled runs for both): the continued
    # study did not replay the first proposals, every trial's epochs recorded once, the alias followed the rule,
    # and the across soup of run 2 saw all four trials.
    configs = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(configs)) == len(configs), configs
    assert_exactly_once(client, exp, "sched-cluster", {t: 2 for t in seen[1]})  # grace_period = epochs = 2
    record["versions"] = [{"run": i + 1, "new_version": v.version, "val_macro_f1": v.tags.get("ich.val_macro_f1"),
                           "decision": v.tags.get("ich.champion_decision"),
                           "reason": v.tags.get("ich.champion_reason")} for i, v in enumerate(versions)]
    (ARTIFACTS / "schedule-cluster.json").write_text(json.dumps(record, indent=1))
    assert versions[0].tags["ich.champion_decision"] == "moved"  # no champion yet
    champion = client.get_model_version_by_alias("sched-cluster-soup", "champion")
    new_val = float(versions[1].tags["ich.val_macro_f1"])
    old_val = float(versions[0].tags["ich.val_macro_f1"])
    expected = "moved" if new_val > old_val else "kept"
    assert versions[1].tags["ich.champion_decision"] == expected, versions[1].tags
    assert champion.version == (versions[1].version if expected == "moved" else versions[0].version)
    latest_across = client.search_runs([exp], "tags.`ich.kind` = 'soup' AND tags.`ich.scope` = 'across'",
                                       order_by=["attributes.start_time DESC"], max_results=1)[0]
    table = client.download_artifacts(latest_across.info.run_id, "", str(tmp_path / "across"))
    text = "".join(p.read_text() for p in Path(table).rglob("*.csv"))
    assert sum(t in text for t in seen[1]) == 4, "the across soup of run 2 did not see all four trials"
