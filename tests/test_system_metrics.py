"""System metrics on trial runs (issue 24 item 2): MLflow's own monitor samples CPU, memory, disk and network (and
the GPU, where nvidia-ml-py sees one) into every trial run as `system/*` metrics, every `system_metrics` seconds
of the sweep config; off in the CPU configs, on in the GPU ones. The monitor is the one the trainable starts
(sweeps/trainable.system_monitor), on a real `mlflow server`."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from ich.errors import ConfigError
from sweeps import trainable
from sweeps.config import load_config
from sweeps.trainable import SweepContext, system_metrics_interval, system_monitor

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "sweeps" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_gpu_configs_sample_system_metrics_and_cpu_configs_do_not(path):
    cfg = load_config(str(path))
    if cfg.gpus_per_trial > 0:
        assert cfg.system_metrics > 0, f"{path.name}: a GPU config without system metrics"
    else:
        assert cfg.system_metrics == 0, f"{path.name}: a CPU demo config samples system metrics"


def _ctx(uri: str, experiment_id: str, seconds: float) -> SweepContext:
    return SweepContext(sweep="sysmetrics", experiment_id=experiment_id, parent_run_id="", tracking_uri=uri, train={},
                        system_metrics_s=seconds)


def _system_keys(client, run_id: str) -> set[str]:
    return {k for k in client.get_run(run_id).data.metrics if k.startswith("system/")}


@pytest.mark.integration
def test_a_trial_run_gets_system_metrics_from_mlflows_monitor(mlflow_server, mlflow_client):
    from soups.store import registry
    eid = registry.get_or_create_experiment(mlflow_client, "system-metrics")
    on = mlflow_client.create_run(eid, run_name="on").info.run_id
    off = mlflow_client.create_run(eid, run_name="off").info.run_id  # control: the same wait, the monitor off
    assert system_monitor(off, _ctx(mlflow_server, eid, 0)) is None
    monitor = system_monitor(on, _ctx(mlflow_server, eid, 0.5))
    assert monitor is not None
    time.sleep(2.0)
    monitor.finish()
    keys = _system_keys(mlflow_client, on)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys
    history = mlflow_client.get_metric_history(on, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and [m.step for m in history] == sorted({m.step for m in history})  # one per sample
    assert _system_keys(mlflow_client, off) == set()

    # A retried trial (a new start on the same run) continues the steps instead of overwriting them.
    again = system_monitor(on, _ctx(mlflow_server, eid, 0.5))
    time.sleep(1.2)
    again.finish()
    steps = [m.step for m in mlflow_client.get_metric_history(on, "system/cpu_utilization_percentage")]
    assert len(steps) > len(history) and len(set(steps)) == len(steps), steps


def test_without_psutil_the_sweep_says_so_once_and_runs_on(monkeypatch, capsys):
    class Cfg:
        system_metrics = 10

    assert system_metrics_interval(Cfg) == 10  # control: psutil is installed here (the [system] extra)
    monkeypatch.setattr(trainable, "system_metrics_missing", lambda: "system_metrics needs psutil")
    assert system_metrics_interval(Cfg) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sweep: system_metrics needs psutil; trials run without system metrics"]


def test_a_negative_interval_is_one_line():
    class Cfg:
        system_metrics = -1

    with pytest.raises(ConfigError, match=r"system_metrics: -1 seconds"):
        system_metrics_interval(Cfg)
