"""Session fixtures for integration tests: a real local Ray and one tiny real sweep (4 trials x 3 epochs).

The sweep runs once per session against the session's real `mlflow server` (tests/conftest.py) and is
shared by the sweep, soup and report tests; treat what it recorded as read-only.
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pytest

TINY_SWEEP_YAML = """
experiment: {experiment}
metric: val_macro_f1
mode: max
num_samples: 4
max_concurrent: 2
cpus_per_trial: 1
max_failures: 2
seed: 0
train:
  model: coatnet_tiny_ich
  img_size: 32
  batch_size: 64
  epochs: 3
  schedule: cosine_restarts
  restart_period: 2
  hflip: 0.0
  scale_min: 0.5
  rand_augment_n: 1
  random_erasing: 0.0
  eval_crop_pct: 1.0
search:
  lr: {{loguniform: [3.0e-4, 1.5e-3]}}
  weight_decay: {{loguniform: [1.0e-3, 5.0e-2]}}
  label_smoothing: {{uniform: [0.0, 0.1]}}
  mixup: {{uniform: [0.0, 0.2]}}
  rand_augment_magnitude: {{uniform: [6.0, 27.0]}}  # torchvision's bins 0..30: timm's old m 2-9
  seed: {{randint: [0, 100000]}}
asha:
  grace_period: 1
  reduction_factor: 2
init:
  warm_start: {{epochs: 4, lr: 2.0e-3, schedule: cosine}}
"""


def write_sweep_config(folder: Path, experiment: str, **edits) -> Path:
    text = TINY_SWEEP_YAML.format(experiment=experiment)
    for old, new in edits.items():
        text = text.replace(old, new)
    path = folder / f"{experiment}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def sweep_args(config: Path, data: Path, *extra: str) -> argparse.Namespace:
    from sweeps.job import parse_args
    return parse_args(["--config", str(config), "--data", str(data), "--no-soups", *extra])


@pytest.fixture(scope="session")
def ray_local(mlflow_server):
    """A real local Ray (2 CPUs) for the session, started after MLFLOW_TRACKING_URI is set."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def ich_home(tmp_path_factory, monkeypatch_session) -> Path:
    home = tmp_path_factory.mktemp("ich-home")
    monkeypatch_session.setenv("ICH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="session")
def tiny_sweep(ray_local, mlflow_server, digits_dataset, ich_home):
    """Run the tiny sweep once; returns run_sweep's summary plus the experiment name and config path."""
    from sweeps.job import run_sweep
    config = write_sweep_config(ich_home, "tiny-sweep")
    summary = run_sweep(sweep_args(config, digits_dataset), ich_home)
    return {**summary, "experiment": "tiny-sweep", "config": config, "home": ich_home, "data": digits_dataset}


# Small enough for minutes on 2 cores, big enough for ASHA to stop a trial and for soups to have ingredients.
DEMO_EDITS = {"num_samples: 4": "num_samples: 3", "epochs: 3": "epochs: 2", "epochs: 4, lr": "epochs: 1, lr"}


@pytest.fixture(scope="session")
def demo_sweep_output(mlflow_server, digits_dataset, tmp_path_factory) -> dict:
    """`ich sweep --demo` run once as a user's cron or `ray job logs` sees it (a subprocess, stdout a pipe, its own
    ICH_HOME and local Ray, the session's MLflow server, experiment `face-output`): sweep, soups (--set
    soups.scope=across) and report. Shared by the quiet-logs test (no traceback) and the CLI-face test (a line
    per trial, no Ray noise, the record complete): one sweep for both claims. Ray's log deduplication is off so
    that no repeated traceback hides behind "[repeated 3x across cluster]". Returns rc and the combined output."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    home = tmp_path_factory.mktemp("demo-sweep-home")
    config = write_sweep_config(home, "face-output", **DEMO_EDITS)
    env = {**os.environ, "ICH_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server, "RAY_DEDUP_LOGS": "0",
           "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, never the test session's
    out = subprocess.run([sys.executable, "-m", "sweeps.cli", "sweep", "--demo", "--config", str(config), "--data",
                          str(digits_dataset), "--set", "soups.scope=across"], env=env, cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=840)
    (root / "test-artifacts").mkdir(exist_ok=True)
    (root / "test-artifacts" / "cli-face-output.log").write_text(out.stdout)
    return {"returncode": out.returncode, "stdout": out.stdout, "experiment": "face-output"}
