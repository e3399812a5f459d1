"""Faults survived (issue: reliability): the MLflow server down for ~10 s mid-sweep. After it: exactly one record
per (trial, epoch) that completed, none lost, and the proof that the fault path ran: how many MLflow calls were
retried. (A trial process SIGKILLed mid-epoch shares the retry sweep of test_sweep.py, with the raised faults; the
killed driver + --resume case is there too, an altered artifact in the soup tests.)"""
from __future__ import annotations

import threading
import time

import pytest

from tests.fixtures_sweep import sweep_args, write_sweep_config
from tests.test_sweep import _all_checkpoint_models, _trial_runs, assert_exactly_once

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONGER = {"num_samples: 4": "num_samples: 2", "grace_period: 1": "grace_period: 4", "epochs: 3": "epochs: 4"}


def _run_in_thread(config, data, home):
    from sweeps.job import run_sweep
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


def test_mlflow_server_down_for_10s_mid_sweep(ray_local, digits_dataset, ich_home, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from soups.store import retry
    from soups.tracking_server import free_port, start_server
    port = free_port()
    server = start_server(tmp_path / "mlflow", port=port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    client = MlflowClient(server.uri)
    config = write_sweep_config(ich_home, "server-down", **LONGER)
    driver_retries = retry.retry_count()
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
        # The trials met the outage: their MLflow calls failed and were tried again (counted by the registry's
        # retry wrapper, in the trial and in its upload process), not merely finished after it.
        retried = {r.data.tags["ich.trial"]: sum(m.value for m in client.get_metric_history(r.info.run_id,
                                                                                              "mlflow_retries"))
                   for r in _trial_runs(client, exp, "server-down")}
        print(f"MLflow calls retried by trials: {retried}; by the driver: {retry.retry_count() - driver_retries}")
        assert sum(retried.values()) >= 1, retried
    finally:
        server.stop()


# ------------------------------------------------------------------------ the upload process and retry counts

def test_retried_calls_are_counted():
    from soups.store import retry
    before = retry.retry_count()

    def refused():
        raise ConnectionRefusedError("connection refused")
    with pytest.raises(retry.RegistryError, match="failed 3 times"):
        retry.call_with_retry("flaky call", refused, retry=retry.RetryPolicy(attempts=3, base_s=0.01))
    assert retry.retry_count() - before == 2  # three attempts: two retries
    with pytest.raises(ValueError):  # not transient: no retry, nothing counted
        retry.call_with_retry("bad call", lambda: int("x"), retry=retry.RetryPolicy(attempts=3, base_s=0.01))
    assert retry.retry_count() - before == 2


@pytest.mark.integration
def test_upload_process_logs_checkpoints_and_ends_with_its_worker(mlflow_server, mlflow_client, tmp_path, capfd):
    """The trial's upload process (a plain subprocess, no multiprocessing): answers in order, turns a failed
    upload into one line, and exits quietly when its worker closes the pipe."""
    from soups.store import registry
    from sweeps.uploader import UploadError, UploadProcess
    from tests.test_registry import make_checkpoint
    exp = registry.get_or_create_experiment(mlflow_client, "upload-process")
    run_id = mlflow_client.create_run(exp).info.run_id
    ckpt_dir, sha, _ = make_checkpoint(tmp_path, "trial_up", 1, seed=1, sweep="upload-process")
    run = [exp, run_id]
    process = UploadProcess()
    good = process.submit(mlflow_server, run=run, folder=ckpt_dir)
    model_id = good.result()
    assert str(mlflow_client.get_logged_model(model_id).status) in ("READY", "LoggedModelStatus.READY")
    assert mlflow_client.get_logged_model(model_id).tags["ich.sha256"] == sha
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    bad = process.submit(mlflow_server, run=run, folder=not_a_checkpoint)
    with pytest.raises(UploadError, match=r"^CheckpointError: .*not a checkpoint folder") as refused:
        bad.result()
    assert "\n" not in str(refused.value)
    assert process.submit(mlflow_server, run=run, folder=ckpt_dir).result() == model_id  # still serving, exactly once
    assert process.retries == 0
    process._proc.stdin.close()  # what the worker's exit does
    assert process._proc.wait(timeout=30) == 0
    assert "Traceback" not in capfd.readouterr().err
