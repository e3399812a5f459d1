"""The report takes the intervals and paired comparisons `ich soup` logged on each soup's run instead of
bootstrapping them again, only when they are the very numbers it would compute (same test predictions,
resamples, alpha, seed, and the same best single): reuse changes the cost, never a figure.

End to end on the session's tiny sweep (copied into an experiment of its own, as tests/test_report.py does, so
nobody else's view of `tiny-sweep` changes), souped here; no new sweep. Real MLflow, no mocks; the spies wrap the
real functions.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.logged_sweep import copy_sweep

EXPERIMENT = "report-reuse"
RESAMPLES = 200


# ---------------------------------------------------------------------------------------------- unit checks

def _spy(monkeypatch) -> dict[str, list]:
    """Wrap bootstrap_ci and paired_comparison where the report calls them (soups.report.sections): every call
    counted, the real function answering."""
    import soups.report.sections as sections
    calls: dict[str, list] = {"bootstrap_ci": [], "paired_comparison": []}
    for name in calls:
        real = getattr(sections, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name].append(args)
            return _real(*args, **kwargs)
        monkeypatch.setattr(sections, name, spy)
    return calls


def test_logged_figures_are_taken_only_when_they_are_the_same_numbers(monkeypatch):
    import json

    from soups.report.sections import logged_figures, table_row
    from soups.report.snapshot import SoupRun
    from soups.soup_record import predictions_sha256
    from soups.store.tags import TAG_BEST_SINGLE, TAG_BOOTSTRAP
    from soups.stats import bootstrap_ci, interval_metrics, paired_comparison

    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    soup = np.eye(4)[np.where(rng.random(300) < 0.8, y, (y + 1) % 4)] * 3
    single = np.eye(4)[np.where(rng.random(300) < 0.6, y, (y + 1) % 4)] * 3
    pred, ref = soup.argmax(1), single.argmax(1)
    # What soup_record logs (flat_metrics' names), computed here with soups.stats directly.
    metrics = {}
    for m in interval_metrics():
        ci = bootstrap_ci(y, pred, m.name, n_resamples=RESAMPLES, alpha=0.05, seed=0, num_classes=4)
        metrics[f"test_{m.name}_low"], metrics[f"test_{m.name}_high"] = ci.low, ci.high
    vs = paired_comparison(y, pred, ref, n_resamples=RESAMPLES, alpha=0.05, seed=0, num_classes=4)
    metrics.update({f"vs_best_{k}": v for k, v in vs.items()})

    def run(**boot) -> SoupRun:
        boot = {"n_resamples": RESAMPLES, "alpha": 0.05, "seed": 0, "predictions_sha256": predictions_sha256(pred),
                "best_single_predictions_sha256": predictions_sha256(ref), **boot}
        return SoupRun("r", dict(metrics), {TAG_BEST_SINGLE: "m-single", TAG_BOOTSTRAP: json.dumps(boot)})

    full = logged_figures(run(), "test", RESAMPLES, pred, ("m-single", ref))
    assert set(full) == {"ci", "vs_best_single"} and full["vs_best_single"] == vs
    calls = _spy(monkeypatch)
    row = table_row("s", "soup", "soup", soup, y, 4, n_resamples=RESAMPLES, reference=single, logged=full)
    assert calls == {"bootstrap_ci": [], "paired_comparison": []}
    fresh = table_row("s", "soup", "soup", soup, y, 4, n_resamples=RESAMPLES, reference=single)
    assert row == fresh
    assert len(calls["bootstrap_ci"]) == len(interval_metrics()) and len(calls["paired_comparison"]) == 1

    # Another best single (by id or by its predictions): the intervals still hold, the comparison is recomputed.
    assert set(logged_figures(run(), "test", RESAMPLES, pred, ("m-other", ref))) == {"ci"}
    assert set(logged_figures(run(), "test", RESAMPLES, pred, ("m-single", (ref + 1) % 4))) == {"ci"}
    # Other resamples, alpha, seed, predictions or split, no record, a figure missing: nothing is taken.
    flipped = pred.copy()
    flipped[0] = (flipped[0] + 1) % 4
    for found in (logged_figures(run(n_resamples=RESAMPLES + 1), "test", RESAMPLES, pred, ("m-single", ref)),
                  logged_figures(run(alpha=0.1), "test", RESAMPLES, pred, ("m-single", ref)),
                  logged_figures(run(seed=1), "test", RESAMPLES, pred, ("m-single", ref)),
                  logged_figures(run(), "test", RESAMPLES, flipped, ("m-single", ref)),
                  logged_figures(run(), "val", RESAMPLES, pred, ("m-single", ref)),
                  logged_figures(None, "test", RESAMPLES, pred, ("m-single", ref)),
                  logged_figures(SoupRun("r", metrics, {TAG_BEST_SINGLE: "m-single"}), "test", RESAMPLES, pred,
                                 ("m-single", ref))):
        assert found == {}
    partial = run()
    del partial.metrics["test_macro_f1_high"], partial.metrics["vs_best_mcnemar_p"]  # NaN is never logged
    assert logged_figures(partial, "test", RESAMPLES, pred, ("m-single", ref)) == {}


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def souped(tiny_sweep, mlflow_server, ich_home, tmp_path_factory):
    from mlflow import MlflowClient

    from soups.orchestrate import SoupOptions, run_soups

    client = MlflowClient(mlflow_server)
    copy_sweep(client, tiny_sweep, EXPERIMENT, tmp_path_factory.mktemp("reuse-pulled")).finish(client)
    soups = run_soups(SoupOptions(experiment=EXPERIMENT, sweep=EXPERIMENT, tracking_uri=mlflow_server,
                                  n_resamples=RESAMPLES, registered_model=f"{EXPERIMENT}-champions"))
    return {"client": client, "soups": soups}


def _recomputed(row: dict, y, logits, reference, k: int, n_resamples: int) -> tuple[dict, dict]:
    """The row's intervals and paired comparison computed here, with soups.stats on the same logits."""
    from soups.stats import bootstrap_ci, interval_metrics, paired_comparison
    pred = logits[row["model_id"]].argmax(1)
    cis = {}
    for m in interval_metrics():
        ci = bootstrap_ci(y, pred, m.name, n_resamples=n_resamples, alpha=0.05, seed=0, num_classes=k)
        cis[f"{m.name}_ci"] = [ci.low, ci.high]
    return cis, paired_comparison(y, pred, reference.argmax(1), n_resamples=n_resamples, alpha=0.05, seed=0,
                                  num_classes=k)


@pytest.mark.integration
def test_report_takes_the_soups_logged_intervals_and_they_are_the_recomputed_ones(souped, mlflow_server, digits_data,
                                                                                  ich_home, monkeypatch, tmp_path):
    import json

    from soups.logit_store import PredictionStore, prediction_cache
    from soups.report.build import build_report
    from soups.store.tags import TAG_BEST_SINGLE, TAG_BOOTSTRAP
    from soups.stats import interval_metrics

    client = souped["client"]
    y, k = digits_data.splits["test"].labels, digits_data.num_classes
    # The logits the report reads: the prediction store `ich soup` wrote (read here directly, not through the report).
    logits = PredictionStore(prediction_cache(ich_home, digits_data.fingerprint))

    def run_of(model_id: str):
        return client.get_run(client.get_logged_model(model_id).source_run_id)

    for n_resamples in (RESAMPLES, RESAMPLES + 50):  # the soups' own resamples, then another count (the control)
        calls = _spy(monkeypatch)
        summary = build_report(EXPERIMENT, str(tmp_path / str(n_resamples)), tracking_uri=mlflow_server,
                               n_resamples=n_resamples)
        monkeypatch.undo()
        rows = summary["table"]
        singles = {r["block"]: r for r in rows if r["kind"] == "single"}
        soups = [r for r in rows if r["kind"] == "soup"]
        assert soups
        took_ci = took_vs = 0
        for row in soups:
            run = run_of(row["model_id"])
            boot = json.loads(run.data.tags[TAG_BOOTSTRAP])
            assert boot["n_resamples"] == RESAMPLES
            reference = logits[singles[row["block"]]["model_id"]]["test"]
            cis, vs = _recomputed(row, y, {row["model_id"]: logits[row["model_id"]]["test"]}, reference, k,
                                  n_resamples)
            assert {key: row[key] for key in cis} == cis, row["key"]  # exactly: the same numbers either way
            assert row["vs_best_single"] == vs, row["key"]
            if n_resamples == RESAMPLES:  # what the report may take: every logged interval; the comparison when the
                took_ci += 1              # soup was compared with this block's best single
                took_vs += run.data.tags[TAG_BEST_SINGLE] == singles[row["block"]]["model_id"]
        compared = sum(r["vs_best_single"] is not None for r in rows)
        assert len(calls["bootstrap_ci"]) == len(interval_metrics()) * (len(rows) - took_ci)
        assert len(calls["paired_comparison"]) == compared - took_vs
        if n_resamples == RESAMPLES:
            assert took_ci == len(soups) and took_vs >= 1  # reuse happened: the check above is not vacuous
            first = summary
        else:  # another count: every row bootstrapped here, the point figures unchanged
            assert took_ci == took_vs == 0
            assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in first["table"]]
