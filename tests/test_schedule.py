"""Scheduled experiments: `ich schedule` writes the job, two runs back to back extend one sweep."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import optuna
import pytest

from ich.cli import main as ich_main
from tests.fixtures_sweep import write_sweep_config
from tests.test_sweep import _trial_runs, assert_exactly_once

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_schedule_writes_cron_and_systemd(tmp_path, digits_dataset, monkeypatch, capsys):
    monkeypatch.setenv("ICH_HOME", str(tmp_path))
    assert ich_main(["schedule", "--experiment", "nightly", "--data", str(digits_dataset), "--every", "30 2 * * *",
                     "--address", "http://127.0.0.1:8265"]) == 0
    script = (tmp_path / "schedules" / "nightly.sh").read_text()
    assert "ray job submit --address http://127.0.0.1:8265" in script and "RAY_AUTH_MODE=token" in script
    assert "--experiment nightly" in script and "flock -n 9" in script
    assert (tmp_path / "schedules" / "nightly.cron").read_text().startswith("30 2 * * * ")
    assert ich_main(["schedule", "--experiment", "nightly", "--data", str(digits_dataset),
                     "--systemd", "*-*-* 02:30:00"]) == 0
    timer = (tmp_path / "schedules" / "ich-sweep-nightly.timer").read_text()
    assert "OnCalendar=*-*-* 02:30:00" in timer
    assert ich_main(["schedule", "--experiment", "x", "--data", str(tmp_path)]) == 2  # not a dataset
    assert "not a dataset" in capsys.readouterr().err


def test_two_scheduled_runs_extend_one_sweep(ray_local, mlflow_server, mlflow_client, digits_dataset, tmp_path):
    """Run the scheduled job twice: new trials each time, one Optuna study continued, soups over all
    checkpoints, `champion` moved only when the new best soup beats it on val."""
    import ray
    home = tmp_path / "home"
    config = write_sweep_config(tmp_path, "sched", **{"grace_period: 1": "grace_period: 2",
                                                       "epochs: 3": "epochs: 2"})
    env = {**os.environ, "ICH_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server,
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    subprocess.run([str(Path(os.sys.executable).with_name("ich")), "schedule", "--experiment", "sched", "--config",
                    str(config), "--data", str(digits_dataset), "--num-samples", "2"], env=env, check=True)
    script = home / "schedules" / "sched.sh"
    study = lambda: optuna.load_study(study_name="sched", storage=f"sqlite:///{home / 'optuna.db'}")  # noqa: E731
    exp = None
    seen_trials: list[set] = []
    for run in (1, 2):
        out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
        log = (home / "schedules" / "sched.log").read_text()
        assert out.returncode == 0, log[-4000:]
        exp = mlflow_client.get_experiment_by_name("sched").experiment_id
        trials = {r.data.tags["ich.trial"] for r in _trial_runs(mlflow_client, exp, "sched")}
        seen_trials.append(trials)
        assert len(trials) == 2 * run  # two new trials per run, none repeated
        assert len(study().trials) == 2 * run  # one Optuna study, continued
    assert seen_trials[0] < seen_trials[1]
    configs = [tuple(sorted(t.params.items())) for t in study().trials]
    assert len(set(configs)) == len(configs)  # the continued study did not replay the first proposals
    assert_exactly_once(mlflow_client, exp, "sched", {t: 2 for t in seen_trials[1]})

    # Soups of run 2 used the checkpoints of all four trials; the alias followed the rule.
    versions = sorted(mlflow_client.search_model_versions("name = 'sched-soup'"), key=lambda v: int(v.version))
    record = [{"run": i + 1, "trials_so_far": len(seen_trials[i]), "new_version": v.version,
               "val_macro_f1": v.tags.get("ich.val_macro_f1"), "decision": v.tags.get("ich.champion_decision"),
               "reason": v.tags.get("ich.champion_reason")} for i, v in enumerate(versions)]
    artifacts = Path(__file__).resolve().parent.parent / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "schedule.json").write_text(json.dumps(record, indent=1))
    assert len(versions) == 2
    assert versions[0].tags["ich.champion_decision"] == "moved"  # no champion yet
    champion = mlflow_client.get_model_version_by_alias("sched-soup", "champion")
    new_val = float(versions[1].tags["ich.val_macro_f1"])
    old_val = float(versions[0].tags["ich.val_macro_f1"])
    expected = "moved" if new_val > old_val else "kept"
    assert versions[1].tags["ich.champion_decision"] == expected, versions[1].tags
    assert champion.version == (versions[1].version if expected == "moved" else versions[0].version)
    latest_across = mlflow_client.search_runs([exp], "tags.`ich.kind` = 'soup' AND tags.`ich.scope` = 'across'",
                                              order_by=["attributes.start_time DESC"], max_results=1)[0]
    table = mlflow_client.download_artifacts(latest_across.info.run_id, "", str(tmp_path / "a"))
    text = "".join(p.read_text() for p in Path(table).rglob("*.csv"))
    assert sum(t in text for t in seen_trials[1]) == 4, "the across soup of run 2 did not see all four trials"
