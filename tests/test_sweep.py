"""The sweep on a real local Ray and a real MLflow server (issue: the sweep)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.fixtures_sweep import sweep_args, write_sweep_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _records(client, experiment_id, sweep):
    from soups.store.registry import search_checkpoints
    return search_checkpoints(client, [experiment_id], sweep=sweep)


def _all_checkpoint_models(client, experiment_id, sweep):
    """Every READY checkpoint LoggedModel, without the registry's de-duplication (to catch doubles)."""
    models, token = [], None
    while True:
        page = client.search_logged_models([experiment_id], filter_string=f"tags.`ich.sweep` = '{sweep}' AND "
                                           "tags.`ich.kind` = 'checkpoint'", max_results=500, page_token=token)
        models += [m for m in page if str(m.status) in ("READY", "LoggedModelStatus.READY")]
        token = page.token
        if not token:
            return models


def _trial_runs(client, experiment_id, sweep):
    return client.search_runs([experiment_id], f"tags.`ich.kind` = 'trial' AND tags.`ich.sweep` = '{sweep}'")


def assert_exactly_once(client, experiment_id, sweep, trials_epochs: dict[str, int]):
    """One READY record per (trial, epoch) for epochs 1..n of every trial, nothing else."""
    models = _all_checkpoint_models(client, experiment_id, sweep)
    keys = Counter((m.tags["ich.trial"], int(m.tags["ich.epoch"])) for m in models)
    doubles = {k: n for k, n in keys.items() if n > 1}
    assert not doubles, f"duplicate checkpoint records: {doubles}"
    expected = {(t, e) for t, n in trials_epochs.items() for e in range(1, n + 1)}
    assert set(keys) == expected, f"missing {sorted(expected - set(keys))}, extra {sorted(set(keys) - expected)}"


def ready_ids(client, experiment_id, sweep) -> dict[tuple[str, int], str]:
    """(trial, epoch) -> the model id of its READY checkpoint record."""
    return {(m.tags["ich.trial"], int(m.tags["ich.epoch"])): m.model_id
            for m in _all_checkpoint_models(client, experiment_id, sweep)}


def starts(client, run_id) -> list[int]:
    """The epoch each (re)start of a trial resumed from, in start order (metric resumed_from_epoch)."""
    history = client.get_metric_history(run_id, "resumed_from_epoch")
    assert sorted(m.step for m in history) == list(range(len(history))), history  # one row per start
    return [int(m.value) for m in sorted(history, key=lambda m: m.step)]


def test_every_checkpoint_recorded_once_with_metrics_and_sha(tiny_sweep, mlflow_client, tmp_path):
    from soups.store.registry import download_checkpoint
    from ich.checkpoint import sha256_file
    exp, sweep = tiny_sweep["experiment_id"], tiny_sweep["experiment"]
    trials = {t["trial"]: t["epochs"] for t in tiny_sweep["trials"]}
    assert len(trials) == 4
    # ASHA (grace 1, reduction 2, 3 epochs) stops trials after epoch 1 or 2; the best one runs all 3.
    assert set(trials.values()) <= {1, 2, 3} and max(trials.values()) == 3, trials
    assert_exactly_once(mlflow_client, exp, sweep, trials)
    records = _records(mlflow_client, exp, sweep)
    for r in records:
        assert {"val_accuracy", "val_macro_f1", "val_loss"} <= set(r.metrics), r.metrics
        assert 0.0 <= r.metrics["val_accuracy"] <= 1.0
    # The recorded sha256 matches the downloaded weights (a sample, to keep it quick).
    for r in records[:3]:
        folder = download_checkpoint(mlflow_client, r, tmp_path)
        assert sha256_file(folder / "model.safetensors") == r.sha256 == r.tags["ich.sha256"]


def test_trials_leave_no_checkpoint_folders(tiny_sweep):
    """Each epoch's checkpoint is written to a temporary folder, uploaded and reported to Tune, then removed; also
    when the report ends the trial (ASHA's stop, the last epoch), where Tune leaves tune.report by SystemExit.
    Before that was handled, every trial of every sweep left its last checkpoint in /tmp (681 folders here)."""
    import tempfile
    trials = [t["trial"] for t in tiny_sweep["trials"]]
    assert len(trials) == 4

    def left() -> list[Path]:
        return sorted(p for t in trials for p in Path(tempfile.gettempdir()).glob(f"ich-{t}-e*"))
    deadline = time.monotonic() + 60  # a stopped trial's thread finishes after Tune has moved on
    while left() and time.monotonic() < deadline:
        time.sleep(1)
    assert left() == []


def test_trials_are_children_with_statuses(tiny_sweep, mlflow_client):
    exp, sweep = tiny_sweep["experiment_id"], tiny_sweep["experiment"]
    runs = _trial_runs(mlflow_client, exp, sweep)
    assert len(runs) == 4
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == tiny_sweep["parent_run_id"]
        assert run.data.params["model"] == "coatnet_tiny_ich"
        assert "ich.node" in run.data.tags
    by_trial = {r.data.tags["ich.trial"]: r for r in runs}
    for t in tiny_sweep["trials"]:
        run = by_trial[t["trial"]]
        expected = "FINISHED" if t["epochs"] >= 3 else "KILLED"
        assert run.info.status == expected, (t, run.info.status)
        if expected == "KILLED":
            assert run.data.tags["ich.status"] == "stopped by ASHA"
    parent = mlflow_client.get_run(tiny_sweep["parent_run_id"])
    assert parent.info.status == "FINISHED"
    # Every trial started from the shared warm-start init, recorded once as an init model.
    inits = mlflow_client.search_logged_models([exp], filter_string=f"tags.`ich.kind` = 'init' AND tags.`ich.sweep` = '{sweep}'")
    assert len(inits) == 1
    fps = {r.init_fingerprint for r in _records(mlflow_client, exp, sweep)}
    assert fps == {inits[0].tags["ich.sha256"]}


def test_retry_after_failure_keeps_exactly_once(ray_local, mlflow_client, digits_dataset, ich_home, monkeypatch):
    """Each trial fails three times, on purpose, at three points (test hooks in the trainable, not timing):
    1. when epoch 2 starts, right after epoch 1 was reported to Tune: the retry must resume from epoch 1;
    2. when epoch 2's checkpoint is READY in MLflow but not yet reported to Tune: the retry resumes from epoch 1
       again, trains epoch 2 again, and must keep the one record of epoch 2 already in MLflow;
    3. the trial's process SIGKILLs itself mid-way through epoch 3, right after epoch 2 was reported: the retry
       runs in another process and resumes from epoch 2 (one sweep for the three claims)."""
    from sweeps.job import run_sweep
    monkeypatch.setenv("ICH_FAULTS", "epoch_start:2,before_report:2,mid_epoch:3:kill")
    config = write_sweep_config(ich_home, "retry-sweep", **{"num_samples: 4": "num_samples: 2",
                                                             "grace_period: 1": "grace_period: 3",
                                                             "max_failures: 2": "max_failures: 3"})
    summary = run_sweep(sweep_args(config, digits_dataset), ich_home)
    exp = summary["experiment_id"]
    assert all(t["status"] == "FINISHED" and t["epochs"] == 3 for t in summary["trials"]), summary["trials"]
    faults = ich_home / "faults" / "retry-sweep"
    fired = {p.name for p in faults.iterdir()}
    trials = {t["trial"] for t in summary["trials"]}
    assert fired == {f"{point}-{t}" for point in ("epoch_start", "before_report", "mid_epoch") for t in trials}, fired
    assert_exactly_once(mlflow_client, exp, "retry-sweep", {t: 3 for t in trials})
    ids = ready_ids(mlflow_client, exp, "retry-sweep")
    for run in _trial_runs(mlflow_client, exp, "retry-sweep"):
        trial = run.data.tags["ich.trial"]
        # Where each start began: fresh, twice from the epoch-1 checkpoint, then after the kill from epoch 2's (a
        # retry that ignored its checkpoint and retrained from the init would log 0 here, whatever the records say).
        assert starts(mlflow_client, run.info.run_id) == [0, 1, 1, 2], trial
        killed = json.loads((faults / f"mid_epoch-{trial}").read_text())
        assert int(run.data.tags["ich.pid"]) != killed["pid"]  # after the kill it really ran again, in another process
        # The epoch-2 record READY when the second fault fired is still the one (the replay found it).
        ready_at_fault = json.loads((faults / f"before_report-{trial}").read_text())["model_id"]
        assert ids[(trial, 2)] == ready_at_fault, (trial, ids[(trial, 2)], ready_at_fault)
        # One metric row per epoch: the replayed epoch 2 logged nothing twice.
        history = mlflow_client.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == [1, 2, 3], history

    # A resume of the finished sweep adds nothing.
    before = len(_all_checkpoint_models(mlflow_client, summary["experiment_id"], "retry-sweep"))
    run_sweep(sweep_args(config, digits_dataset, "--resume"), ich_home)
    assert len(_all_checkpoint_models(mlflow_client, summary["experiment_id"], "retry-sweep")) == before


def test_killed_driver_resumes_without_duplicates(ray_local, mlflow_server, mlflow_client, digits_dataset, ich_home):
    """SIGKILL the sweep's driver mid-sweep, then `--resume`: the sweep completes, every record once."""
    import ray
    config = write_sweep_config(ich_home, "resume-sweep", **{"num_samples: 4": "num_samples: 3",
                                                              "grace_period: 1": "grace_period: 3"})
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": mlflow_server,
           "ICH_HOME": str(ich_home)}
    cmd = [sys.executable, str(ROOT / "sweeps" / "coatnet.py"), "--config", str(config), "--data", str(digits_dataset),
           "--no-soups"]
    log = open(ich_home / "resume-sweep-1.log", "w")
    driver = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    exp = None
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None:  # kill once some checkpoints are in MLflow
        e = mlflow_client.get_experiment_by_name("resume-sweep")
        if e is not None:
            exp = e.experiment_id
            if len(_all_checkpoint_models(mlflow_client, exp, "resume-sweep")) >= 2:
                break
        time.sleep(0.5)
    assert driver.poll() is None, "the sweep ended before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = ready_ids(mlflow_client, exp, "resume-sweep")
    assert 2 <= len(before) < 9, before

    out = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = _trial_runs(mlflow_client, exp, "resume-sweep")
    assert len(runs) == 3
    assert all(r.info.status == "FINISHED" for r in runs), [(r.data.tags["ich.trial"], r.info.status) for r in runs]
    assert_exactly_once(mlflow_client, exp, "resume-sweep", {r.data.tags["ich.trial"]: 3 for r in runs})
    # The records logged before the kill are still the READY ones: same ids, none replaced by the resume.
    after = ready_ids(mlflow_client, exp, "resume-sweep")
    assert {k: after.get(k) for k in before} == before
    # A restart resumes from a checkpoint the trial had before the kill (Tune's saved state may lag the
    # records by an epoch or two, so the replay re-trains those and finds their records: the ids above).
    for run in runs:
        trial = run.data.tags["ich.trial"]
        had = max([e for t, e in before if t == trial], default=0)
        assert all(0 <= e <= had for e in starts(mlflow_client, run.info.run_id)[1:]), (trial, had)
        # Every epoch has its val figure. A SIGKILL can land between an upload's metrics and its finalize: the
        # replay then logs that epoch's row again, and it must be the same figure (the replay is bit for bit).
        history = mlflow_client.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted({m.step for m in history}) == [1, 2, 3], history
        by_step: dict[int, set[float]] = {}
        for m in history:
            by_step.setdefault(m.step, set()).add(m.value)
        assert all(len(v) == 1 for v in by_step.values()), history


def test_bad_sweep_configs_fail_with_one_line(tmp_path, digits_dataset):
    from ich.errors import ConfigError
    from sweeps.config import load_config
    base = yaml.safe_load(write_sweep_config(tmp_path, "bad").read_text())
    cases = {
        "unknown model": ({"train": {**base["train"], "model": "coatnet_99"}}, "unknown model 'coatnet_99'"),
        "empty choice": ({"search": {"lr": {"choice": []}}}, "no valid point"),
        "empty range": ({"search": {"lr": {"loguniform": [1e-3, 1e-4]}}}, "holds no valid point"),
        "test metric": ({"metric": "test_accuracy"}, "must be a val_ metric"),
        "unknown option": ({"train": {"lrr": 1}}, "train.lrr is not a training option"),
    }
    for name, (edit, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump({**base, **edit}))
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    # Through the entry script: a missing dataset and impossible resources exit 2 with one line.
    cfg = write_sweep_config(tmp_path, "bad2")
    for extra, message in ((["--data", str(tmp_path / "nope")], "does not exist"),):
        out = subprocess.run([sys.executable, str(ROOT / "sweeps" / "coatnet.py"), "--config", str(cfg), *extra],
                             capture_output=True, text=True, cwd=ROOT, timeout=120,
                             env={**os.environ, "ICH_HOME": str(tmp_path / "home")})
        assert out.returncode == 2, out.stderr[-2000:]
        lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
        assert message in lines[-1] and len(lines) == 1, out.stderr
