"""`--resume` restores Tune state only from under the storage root (issue 13, item 3).

`Tuner.restore` unpickles `tuner.pkl` from the folder named by the sweep run's `ich.tune_path` tag, and
anyone who can write MLflow tags can change that tag. These tests plant a `tuner.pkl` whose unpickling
would create a marker file, point the tag at it (directly, through `..`, through a symlink inside the
root) on the session's real MLflow server, and show that `--resume` refuses in one line with exit code 2
and that the marker never appears.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_sweep import write_sweep_config

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker file proves code ran at load time."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_tune_state(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))  # what Tuner.can_restore looks for


def _sweep_run_tagged(client, experiment: str, tune_path: str) -> str:
    exp_id = client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=f"{experiment}-planted", tags={
        "ich.kind": "sweep", "ich.sweep": experiment, "ich.tune_path": tune_path})
    client.set_terminated(run.info.run_id, "FAILED")  # an interrupted sweep, the kind --resume continues
    return run.info.run_id


def test_payload_is_live(tmp_path):
    """Control: the planted pickle does create its marker when unpickled (in a separate process)."""
    marker = tmp_path / "control-marker"
    blob = pickle.dumps(_Payload(marker))
    subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=blob, check=True, timeout=60)
    assert marker.exists()


def test_resume_refuses_tune_path_outside_storage_root(tmp_path, mlflow_server, mlflow_client, digits_dataset):
    """The user's path: `python sweeps/coatnet.py --resume` with a tag pointing at a foreign folder."""
    storage, foreign, home = tmp_path / "ray_results", tmp_path / "elsewhere" / "evil-sweep", tmp_path / "home"
    storage.mkdir()
    home.mkdir()
    marker = foreign.parent / "PWNED"
    _plant_tune_state(foreign, marker)
    run_id = _sweep_run_tagged(mlflow_client, "resume-root-foreign", str(foreign))
    config = write_sweep_config(tmp_path, "resume-root-foreign")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ICH_STORAGE")}
    env.update(MLFLOW_TRACKING_URI=mlflow_server, ICH_HOME=str(home))
    out = subprocess.run([sys.executable, str(ROOT / "sweeps" / "coatnet.py"), "--config", str(config),
                          "--data", str(digits_dataset), "--storage", str(storage), "--no-soups", "--resume"],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("sweep: error: --resume: ich.tune_path "), lines[0]
    assert str(foreign) in lines[0] and run_id in lines[0] and f"is outside the storage root '{storage}'" in lines[0]
    assert "Ray Tune state at" not in out.stdout  # nothing got as far as Tune
    assert not marker.exists()
    assert mlflow_client.get_run(run_id).info.status == "FAILED"  # not marked running either


@pytest.mark.parametrize("how", ["dotdot", "symlink", "prefix"])
def test_resume_refuses_disguised_paths(how, tmp_path, mlflow_server, mlflow_client, digits_dataset, capsys,
                                        monkeypatch):
    """`root/../x`, `root/link` -> outside, and `root-evil/` (a string prefix of the root) are all outside."""
    from sweeps.job import main
    storage, home = tmp_path / "ray_results", tmp_path / "home"
    storage.mkdir()
    home.mkdir()
    foreign = {"dotdot": tmp_path / "elsewhere", "symlink": tmp_path / "elsewhere",
               "prefix": tmp_path / "ray_results-evil"}[how] / "evil-sweep"
    marker = tmp_path / f"PWNED-{how}"
    _plant_tune_state(foreign, marker)
    if how == "symlink":
        (storage / "link").symlink_to(foreign.parent, target_is_directory=True)
    tag = {"dotdot": f"{storage}/../elsewhere/evil-sweep", "symlink": f"{storage}/link/evil-sweep",
           "prefix": str(foreign)}[how]
    assert (Path(tag) / "tuner.pkl").is_file()  # the tag does reach the planted state
    experiment = f"resume-root-{how}"
    _sweep_run_tagged(mlflow_client, experiment, tag)
    monkeypatch.setenv("ICH_HOME", str(home))
    monkeypatch.setenv("ICH_STORAGE", str(storage))  # the root from the environment this time
    config = write_sweep_config(tmp_path, experiment)
    rc = main(["--config", str(config), "--data", str(digits_dataset), "--no-soups", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("sweep: error: --resume: ich.tune_path "), err
    assert f"is outside the storage root '{storage}'" in err
    assert not marker.exists()


def test_resume_accepts_tune_path_under_root(tmp_path, mlflow_server, mlflow_client):
    """Control: the check passes a tag that is under the root, also through a symlinked root."""
    from sweeps.resume import find_resume_run
    real = tmp_path / "real_results"
    (real / "my-sweep-1").mkdir(parents=True)
    (tmp_path / "results").symlink_to(real, target_is_directory=True)
    run_id = _sweep_run_tagged(mlflow_client, "resume-root-ok", str(real / "my-sweep-1"))
    exp_id = mlflow_client.get_experiment_by_name("resume-root-ok").experiment_id
    run = find_resume_run(mlflow_client, exp_id, "resume-root-ok", "resume-root-ok", str(tmp_path / "results"))
    assert run.info.run_id == run_id


@pytest.mark.parametrize("path, root, inside", [
    ("/srv/rr/sweep-1", "/srv/rr", True),
    ("/srv/rr/sweep-1", "/srv/rr/", True),
    ("file:///srv/rr/sweep-1", "/srv/rr", True),
    ("/srv/rr", "/srv/rr", False),  # the root itself is no sweep's folder
    ("/srv/rr/../x/sweep-1", "/srv/rr", False),
    ("/srv/rr-evil/sweep-1", "/srv/rr", False),
    ("/srv/x/sweep-1", "/srv/rr", False),
    ("file://evil.host/srv/rr/sweep-1", "/srv/rr", False),
    ("s3://bucket/rr/sweep-1", "/srv/rr", False),
    ("/srv/rr/sweep-1", "s3://bucket/rr", False),
    ("s3://bucket/rr/sweep-1", "s3://bucket/rr", True),
    ("S3://bucket/rr/sweep-1", "s3://bucket/rr/", True),
    ("s3://bucket/sweep-1", "s3://bucket", True),
    ("s3://other/rr/sweep-1", "s3://bucket/rr", False),
    ("s3://bucket/rr-evil/sweep-1", "s3://bucket/rr", False),
    ("s3://bucket/rr/../evil/sweep-1", "s3://bucket/rr", False),
    ("s3://bucket/rr/%2E%2E/evil", "s3://bucket/rr", False),
    ("s3://bucket/rr//sweep-1", "s3://bucket/rr", False),
    ("s3://bucket/rr/sweep-1?endpoint_override=evil.host", "s3://bucket/rr", False),
    ("s3://bucket/rr/sweep-1?region=eu", "s3://bucket/rr?region=eu", True),
    ("gs://bucket/rr/sweep-1", "s3://bucket/rr", False),
    ("s3://bucket/rr", "s3://bucket/rr", False),
])
def test_under_storage_root(path, root, inside):
    from sweeps.resume import under_storage_root
    assert under_storage_root(path, root) is inside
