"""Exit status is the truth (docs/design.md#17, issue 25 item 1): a sweep whose trials failed after their retries
builds what it can from the others, prints one summary line and exits 3; --allow-failed-trials N accepts losses.

Real parts: the session's local Ray and `mlflow server`, real sweeps of 2 trials x 2 epochs. The failing trial is
planted with the trainer's test hook ICH_FAULTS=mid_epoch:1:fail: exactly one trial of the sweep (the first to
reach its first optimizer step claims it) raises at every attempt, so it fails after its retry; no luck involved.
(The scheduled job carrying the status to its log: tests/test_schedule.py.)"""
from __future__ import annotations

from pathlib import Path

import pytest

from sweeps.job import EXIT_TRIALS_FAILED, failed_trials_line, main, sweep_exit_code
from tests.fixtures_sweep import write_sweep_config

pytestmark = pytest.mark.integration

# 2 trials x 2 epochs (a trajectory of one checkpoint makes no soup), one retry each, a 1-epoch warm start, no
# ASHA stop: as small as a sweep with soups gets.
SMALL = {"num_samples: 4": "num_samples: 2", "epochs: 3": "epochs: 2", "max_failures: 2": "max_failures: 1",
         "grace_period: 1": "grace_period: 2", "{epochs: 4,": "{epochs: 1,"}
PLANTED = "mid_epoch:1:fail"


def _sweep(name: str, home: Path, data: Path, *extra: str) -> int:
    config = write_sweep_config(home, name, **SMALL)
    return main(["--config", str(config), "--data", str(data), "--no-report", *extra])


def _failed_claim(home: Path, name: str) -> str:
    """The trial the planted fault chose (it writes its id when it claims the fault)."""
    return (home / "faults" / name / "mid_epoch-failing-trial").read_text()


def _summary_lines(err: str, name: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"sweep {name}: ") and "trials failed" in line]


def _soup_runs(client, name):
    exp = client.get_experiment_by_name(name).experiment_id
    return client.search_runs([exp], f"tags.`ich.kind` = 'soup' AND tags.`ich.sweep` = '{name}'")


def _trial_statuses(client, name) -> dict[str, str]:
    exp = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([exp], f"tags.`ich.kind` = 'trial' AND tags.`ich.sweep` = '{name}'")
    return {r.data.tags["ich.trial"]: r.info.status for r in runs}


def test_a_failed_trial_makes_the_sweep_exit_3_after_soups_of_the_other(ray_local, mlflow_client, digits_dataset,
                                                                         ich_home, monkeypatch, capsys):
    monkeypatch.setenv("ICH_FAULTS", PLANTED)
    assert _sweep("exit-failed", ich_home, digits_dataset) == EXIT_TRIALS_FAILED == 3
    err = capsys.readouterr().err
    failed = _failed_claim(ich_home, "exit-failed")
    lines = _summary_lines(err, "exit-failed")
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    assert line.startswith("sweep exit-failed: 1 of 2 trials failed after 1 retries: "), line
    assert f"{failed} (RuntimeError: injected fault: trial {failed} fails at mid_epoch of epoch 1" in line, line
    assert "soups built from the 1 others" in line and line.endswith("exit 3 (--allow-failed-trials 1 to accept)")
    assert "Traceback" not in err
    # What could be built was built: soups of the good trial, and only of it.
    statuses = _trial_statuses(mlflow_client, "exit-failed")
    assert statuses[failed] == "FAILED" and list(statuses.values()).count("FINISHED") == 1, statuses
    soups = _soup_runs(mlflow_client, "exit-failed")
    assert soups, "no soup was built from the good trial"
    exp = mlflow_client.get_experiment_by_name("exit-failed").experiment_id
    sweep_run = mlflow_client.search_runs([exp], "tags.`ich.kind` = 'sweep'")[0]
    assert sweep_run.data.tags["ich.failed_trials"] == failed


def test_allow_failed_trials_accepts_the_loss():
    """Control of the test above, on its decision: the same count of failed trials, accepted, exits 0 and the line
    says so (the flag reaching the config: test_allow_failed_trials_is_checked; a real failing sweep: above)."""
    class Cfg:
        max_failures, allow_failed_trials = 1, 1
    rows = [{"trial": "a1", "status": "FAILED", "error": "RuntimeError: injected fault"},
            {"trial": "b2", "status": "FINISHED", "error": None}]
    assert sweep_exit_code(1, 0) == EXIT_TRIALS_FAILED and sweep_exit_code(1, 1) == 0 and sweep_exit_code(2, 1) == 3
    line = failed_trials_line("sweep s", rows, Cfg, built="soups built from the 1 others", exit_code=0)
    assert line.endswith("accepted by --allow-failed-trials 1, exit 0"), line


def test_a_sweep_without_failures_exits_0_and_says_nothing_of_failures(tiny_sweep, mlflow_client):
    """Control on the session's tiny sweep (no fault planted): exit code 0, no failed trial, no fault claimed."""
    assert tiny_sweep["exit_code"] == 0 and tiny_sweep["failed_trials"] == []
    assert not (tiny_sweep["home"] / "faults" / tiny_sweep["experiment"]).exists()
    # ASHA may stop a trial (KILLED): stopped is not failed
    assert set(_trial_statuses(mlflow_client, tiny_sweep["experiment"]).values()) <= {"FINISHED", "KILLED"}


def test_allow_failed_trials_is_checked(tmp_path, capsys):
    """Bad input: one line, exit 2, before anything starts."""
    config = write_sweep_config(tmp_path, "bad-allow", **SMALL)
    assert main(["--config", str(config), "--data", str(tmp_path), "--allow-failed-trials", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "allow_failed_trials must be a whole number >= 0, not -1" in err, err


def test_summary_line_names_each_failed_trial_once():
    """Pure: the line's parts (several failures, the accepted case)."""
    class Cfg:
        max_failures, allow_failed_trials = 2, 0
    rows = [{"trial": "a1", "status": "FAILED", "error": "FloatingPointError: training diverged at epoch 3"},
            {"trial": "b2", "status": "FINISHED", "error": None},
            {"trial": "c3", "status": "FAILED", "error": "ValueError: x"}]
    line = failed_trials_line("sweep s", rows, Cfg, built="soups built from the 1 others", exit_code=3)
    assert line == ("sweep s: 2 of 3 trials failed after 2 retries: a1 (FloatingPointError: training diverged at "
                    "epoch 3), c3 (ValueError: x); soups built from the 1 others; exit 3 "
                    "(--allow-failed-trials 2 to accept)")
    assert "\n" not in line
