"""The objective study's pieces (bench/objective_study.py) on the digits, with the smallest budget.

Two real sweeps (objective single and trajectory_soup) on the session's real local Ray and `mlflow server`, their
soups, the best soups pulled back from MLflow and compared on the same images. Checks the table's shape and that
every interval holds its point estimate; not the sign of anything (a smoke budget decides nothing).
Digits only: the study's Fashion-MNIST never runs in tests.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.objective_study import (HEADER, METRICS, OBJECTIVES, SPLITS, Budget, figures, markdown_table, paired,
                                   study_dataset, sweep_yaml, table_rows)

SMOKE = Budget(num_samples=2, max_concurrent=2, epochs=2, restart_period=1, grace_period=1, reduction_factor=2,
               warm_start_epochs=1, n_resamples=100)


def _holds(c: dict) -> bool:
    return all(math.isfinite(c[k]) for k in ("point", "low", "high")) and c["low"] <= c["point"] <= c["high"]


def test_sweep_configs_differ_only_in_objective(tmp_path):
    a = sweep_yaml("x", "single", SMOKE, 0, tmp_path / "init", 0.0)
    b = sweep_yaml("x", "trajectory_soup", SMOKE, 0, tmp_path / "init", 0.0)
    diff = [(la, lb) for la, lb in zip(a.splitlines(), b.splitlines()) if la != lb]
    assert diff == [("objective: single", "objective: trajectory_soup")]


def test_paired_intervals_on_known_predictions():
    """Pure statistics: b is right on 20 more of 200 images than a, so a - b is -10 points, inside its interval."""
    rng = np.random.default_rng(0)
    y = {s: rng.integers(0, 4, 200) for s in SPLITS}
    b = {s: y[s].copy() for s in SPLITS}
    a = {s: np.where(np.arange(200) < 20, (y[s] + 1) % 4, y[s]) for s in SPLITS}
    d = paired(y, a, b, 4, 200)
    for s in SPLITS:
        assert d[s]["accuracy"]["point"] == pytest.approx(-0.10)
        assert _holds(d[s]["accuracy"]) and d[s]["accuracy"]["high"] < 0
        assert (d[s]["mcnemar"]["a_right_b_wrong"], d[s]["mcnemar"]["a_wrong_b_right"]) == (0, 20)
    f = figures(y, b, 4, 200)
    assert f["test"]["accuracy"] == {"point": 1.0, "low": 1.0, "high": 1.0}


@pytest.mark.integration  # not `slow`: runs in `make test`
def test_study_smoke_on_digits(digits_dataset, mlflow_server, ray_local, ich_home):
    result = study_dataset("digits", digits_dataset, budget=SMOKE, seed=0, home=ich_home, tracking_uri=mlflow_server,
                           prefix="smoke-study-")
    assert set(result["objectives"]) == set(OBJECTIVES)
    for objective, row in result["objectives"].items():
        assert row["objective"] == objective
        assert row["recheck_abs_diff"] < 1e-9, "the best soup pulled back from MLflow scores what the soups recorded"
        assert 1 <= row["epochs_trained"] <= SMOKE.num_samples * SMOKE.epochs
        assert len(row["trials"]) == SMOKE.num_samples
        assert row["best_soup"]["ingredients"] >= 1 and row["n_soups"] >= 1
        for model in ("soup", "single"):
            for s in SPLITS:
                for m in METRICS:
                    assert _holds(row[model][s][m]), (objective, model, s, m, row[model][s][m])
    diff = result["trajectory_minus_single"]
    traj, single = result["objectives"]["trajectory_soup"]["soup"], result["objectives"]["single"]["soup"]
    for s in SPLITS:
        for m in METRICS:
            assert _holds(diff[s][m]), (s, m, diff[s][m])
            assert diff[s][m]["point"] == pytest.approx(traj[s][m]["point"] - single[s][m]["point"])
        assert 0 <= diff[s]["mcnemar"]["p_value"] <= 1
    assert result["sizes"] == {"train": 1439, "val": 179, "test": 179}

    rows = table_rows([result])
    assert len(rows) == len(OBJECTIVES) + 1 and all(len(r) == len(HEADER) for r in rows)
    assert [r[1] for r in rows[:2]] == list(OBJECTIVES)
    table = markdown_table([result]).splitlines()
    assert len(table) == 2 + len(rows) and all(line.count("|") == len(HEADER) + 1 for line in table)

