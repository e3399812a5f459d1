"""Exit status is the truth (docs/design.md#17, issue 25 item 1): a sweep whose trials failed after their retries
builds what it can from the others, prints one summary line and exits 3; --allow-failed-trials N accepts losses.

The real failing sweep is tests/test_schedule.py's scheduled one (one sweep for the claim, run as cron runs it):
the failing trial is planted with the trainer's test hook ICH_FAULTS=mid_epoch:1:fail (exactly one trial of the
sweep, the first to reach its first optimizer step, raises at every attempt, so it fails after its retry; no luck
involved); it exits 3, logs this line, builds soups of the other trial only and tags the sweep run. Here: the
decision and the line (pure), the flag's check, and the control on the session's tiny sweep (no failure: exit 0)."""
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


def _trial_statuses(client, name) -> dict[str, str]:
    exp = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([exp], f"tags.`ich.kind` = 'trial' AND tags.`ich.sweep` = '{name}'")
    return {r.data.tags["ich.trial"]: r.info.status for r in runs}


def test_allow_failed_trials_accepts_the_loss():
    """Control of the failing sweep's decision: the same count of failed trials, accepted, exits 0 and the line
    says so (the flag reaching the config: test_allow_failed_trials_is_checked; a real failing sweep:
    test_schedule.py's scheduled one)."""
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
