"""Faults survived (issue: reliability): a trial process SIGKILLed mid-epoch, the MLflow server down for
~10 s mid-sweep. After each: exactly one record per (trial, epoch) that completed, none lost.
(The killed driver + --resume case is in test_sweep.py, an altered artifact in the soup tests.)"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.fixtures_sweep import sweep_args, write_sweep_config
from tests.test_sweep import _all_checkpoint_models, _trial_runs, assert_exactly_once

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONGER = {"num_samples: 4": "num_samples: 2", "grace_period: 1": "grace_period: 4", "epochs: 3": "epochs: 4"}


def _run_in_thread(config, data, home):
    from sweeps.coatnet import run_sweep
    box = {}

    def target():
        try:
            box["summary"] = run_sweep(sweep_args(config, data), home)
        except BaseException as e:  # surfaced by the test
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_trial_process_killed_mid_epoch_is_retried_from_its_checkpoint(ray_local, mlflow_client, digits_dataset,
                                                                      ich_home):
    config = write_sweep_config(ich_home, "kill-trial", **LONGER)
    thread, box = _run_in_thread(config, digits_dataset, ich_home)
    exp = _wait_for(lambda: (e := mlflow_client.get_experiment_by_name("kill-trial")) and e.experiment_id, 120,
                    "the experiment")

    def victim():  # a trial with one checkpoint in MLflow, mid-way through its next epoch
        for m in _all_checkpoint_models(mlflow_client, exp, "kill-trial"):
            if m.tags["ich.epoch"] == "1":
                run = mlflow_client.get_run(m.source_run_id)
                return run.data.tags["ich.trial"], int(run.data.tags["ich.pid"])
    trial, pid = _wait_for(victim, 180, "a first checkpoint")
    time.sleep(0.3)  # into epoch 2
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive(), "sweep did not finish"
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    assert all(t["status"] == "FINISHED" and t["epochs"] == 4 for t in summary["trials"]), summary["trials"]
    assert_exactly_once(mlflow_client, exp, "kill-trial", {t["trial"]: 4 for t in summary["trials"]})
    run = [r for r in _trial_runs(mlflow_client, exp, "kill-trial") if r.data.tags["ich.trial"] == trial][0]
    assert int(run.data.tags["ich.pid"]) != pid  # it really ran again in another process
    history = mlflow_client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # resumed after epoch 1, nothing trained twice


def test_mlflow_server_down_for_10s_mid_sweep(ray_local, digits_dataset, ich_home, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from sweeps.mlflow_server import free_port, start_server
    port = free_port()
    server = start_server(tmp_path / "mlflow", port=port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    client = MlflowClient(server.uri)
    config = write_sweep_config(ich_home, "server-down", **LONGER)
    thread, box = _run_in_thread(config, digits_dataset, ich_home)
    try:
        exp = _wait_for(lambda: (e := client.get_experiment_by_name("server-down")) and e.experiment_id, 120,
                        "the experiment")
        _wait_for(lambda: len(_all_checkpoint_models(client, exp, "server-down")) >= 1, 180, "a first checkpoint")
        server.stop()
        down_at = time.time()
        time.sleep(10)
        server = start_server(tmp_path / "mlflow", port=port)
        print(f"server was down {time.time() - down_at:.1f} s")
        thread.join(timeout=400)
        assert not thread.is_alive(), "sweep did not finish"
        assert "error" not in box, box.get("error")
        summary = box["summary"]
        assert all(t["status"] == "FINISHED" and t["epochs"] == 4 for t in summary["trials"]), summary["trials"]
        assert_exactly_once(client, exp, "server-down", {t["trial"]: 4 for t in summary["trials"]})
    finally:
        server.stop()
