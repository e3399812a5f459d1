"""No code path selects on test (docs/design.md, decision 3), checked where each selection lives (issue 25).

Every case plants a candidate that is best on test and worst on val, among candidates whose test figures are
known to the code under test (recorded metrics, logits, tags), and asserts the plant is not picked. Its control
runs the same call with val and test swapped: then the plant IS picked, so the planted set tells a val
selection from a test one. Selection points: the greedy soup's ingredient order (pull.usable_records +
pulled_best_first), BN 'auto' (SoupBuilder.finish), the soup registered as candidate champion
(champion.best_soup) and the champion rule (decide_champion), the report's best single and fallback champion
(report.selection.select, report.selection._champion), and the sweep's ASHA/Optuna metric (sweeps/config.validate).
The report's full path (compute_report) is in tests/test_report_snapshot.py::test_best_single_is_chosen_on_val_not_test.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from soups.store.registry import CheckpointRecord

FP = "f" * 64
ARCH = "coatnet_tiny_ich"
PLANT = "plant"
# model id -> (val accuracy, test accuracy): the plant is worst on val and best on test.
FIGURES = {"m1": (0.80, 0.60), "m2": (0.75, 0.65), "m3": (0.70, 0.70), PLANT: (0.50, 0.95)}


def figures(swapped: bool) -> dict[str, tuple[float, float]]:
    return {k: (t, v) if swapped else (v, t) for k, (v, t) in FIGURES.items()}


def record(model_id: str, val: float, test: float, trial: str = "t0", epoch: int = 1, tags=None) -> CheckpointRecord:
    metrics = {f"{split}_{m}": x for split, x in (("val", val), ("test", test)) for m in ("accuracy", "macro_f1")}
    return CheckpointRecord(model_id, f"run-{model_id}", "1", model_id, "s", trial, epoch, "sha", FP, "init", ARCH,
                            metrics=metrics, tags=dict(tags or {}))


def records(swapped: bool) -> list[CheckpointRecord]:
    return [record(k, v, t, trial=f"t{i}", epoch=i + 1) for i, (k, (v, t)) in enumerate(figures(swapped).items())]


# ---------------------------------------------------------------------------------------------- greedy's order

def greedy_order(swapped: bool) -> list[str]:
    from soups.pull import Pulled, pulled_best_first, usable_records
    usable = usable_records(records(swapped), "accuracy", FP, "data", warn=False)
    pulled = [Pulled(r, folder=None, meta=None, score=score, spec=None) for r, score in usable.records]
    return [p.record.model_id for p in pulled_best_first(pulled, "accuracy")]


def test_greedy_ranks_ingredients_by_val():
    order = greedy_order(swapped=False)
    assert order == ["m1", "m2", "m3", PLANT]  # the plant is tried last, never the soup's first ingredient
    assert greedy_order(swapped=True)[0] == PLANT  # control


# ---------------------------------------------------------------------------------------------- BN auto

class PlantedEvaluator:
    """Stands in for a model's evaluation: the logits of the soup with averaged statistics ("average") and
    after recalibration ("recalibrate") are planted per split, with known accuracies; score() is accuracy."""
    has_bn = True

    def __init__(self, accuracy: dict[tuple[str, str], float]):
        self.labels = {"val": np.arange(100) % 5, "test": np.arange(200) % 5}
        self.accuracy = accuracy

    def logits(self, state_dict: dict, split: str) -> np.ndarray:
        y = self.labels[split]
        right = np.arange(len(y)) < round(self.accuracy[(state_dict["stats"], split)] * len(y))
        return np.eye(5)[np.where(right, y, (y + 1) % 5)]

    def recalibrated(self, state_dict: dict) -> dict:
        return {"stats": "recalibrate"}

    def score(self, logits: np.ndarray, split: str, metric: str) -> float:
        return float((logits.argmax(1) == self.labels[split]).mean())


def bn_mode(swapped: bool) -> str:
    from soups.build import SoupBuilder
    from soups.options import SoupOptions
    # Recalibrated statistics are the plant: worst on val, best on test.
    (avg_val, avg_test), (rec_val, rec_test) = (0.7, 0.6), (0.5, 0.95)
    if swapped:
        (avg_val, avg_test), (rec_val, rec_test) = (avg_test, avg_val), (rec_test, rec_val)
    ev = PlantedEvaluator({("average", "val"): avg_val, ("average", "test"): avg_test,
                           ("recalibrate", "val"): rec_val, ("recalibrate", "test"): rec_test})
    builder = SoupBuilder(SoupOptions(experiment="leak", metric="accuracy", bn="auto"), dataset=None, pool=None)
    built = builder.finish({"stats": "average"}, ev)
    assert built.logits["test"].shape == (200, 5)  # test is computed (for the report), yet must not choose
    return built.bn_mode


def test_bn_auto_decides_on_val():
    assert bn_mode(swapped=False) == "average"
    assert bn_mode(swapped=True) == "recalibrate"  # control


# ---------------------------------------------------------------------------------------------- champion

def soup_entries(swapped: bool) -> list[SimpleNamespace]:
    return [SimpleNamespace(name=k, val={"accuracy": v}, test={"accuracy": t}) for k, (v, t) in figures(swapped).items()]


def test_registered_soup_is_the_best_on_val():
    from soups.champion import best_soup
    assert best_soup(soup_entries(swapped=False), "accuracy").name == "m1"
    assert best_soup(soup_entries(swapped=True), "accuracy").name == PLANT  # control


def champion_moves(swapped: bool) -> bool:
    from soups.store import registry
    from soups.champion import decide_champion
    # The champion: val 0.70, test 0.60. The new soup (the plant): val 0.50, test 0.95.
    (new_val, new_test), (old_val, old_test) = (0.50, 0.95), (0.70, 0.60)
    if swapped:
        (new_val, new_test), (old_val, old_test) = (new_test, new_val), (old_test, old_val)
    ctx = SimpleNamespace(opts=SimpleNamespace(metric="accuracy", champion_rule="better", alpha=0.05), client=None,
                          dataset=SimpleNamespace(fingerprint=FP, splits={}))
    new = SimpleNamespace(val={"accuracy": new_val}, test={"accuracy": new_test})
    current = SimpleNamespace(version="1", run_id=None, tags={
        registry.TAG_DATASET: FP, "ich.val_accuracy": repr(old_val), "ich.test_accuracy": repr(old_test)})
    return decide_champion(ctx, new, None, current)["moved"]


def test_champion_rule_compares_val():
    assert champion_moves(swapped=False) is False
    assert champion_moves(swapped=True) is True  # control


# ---------------------------------------------------------------------------------------------- report

def report_selection(swapped: bool):
    from soups.report.selection import _champion, _usable, select
    notes: list[str] = []
    checkpoints = _usable(records(swapped), "checkpoint", "val_accuracy", FP, notes)
    soups = _usable([record(f"soup-{k}", v, t, tags={"ich.scope": "across", "ich.recipe": "greedy"})
                     for k, (v, t) in figures(swapped).items()], "soup", "val_accuracy", FP, notes)
    sel = select(checkpoints, soups, "accuracy", lambda s: None, notes)
    snap = SimpleNamespace(champion=None, registered_model="leak-soup")
    champ, source = _champion(snap, sel, soups, "accuracy", FP, notes)
    return sel, champ, source


def test_report_best_single_and_fallback_champion_are_chosen_on_val():
    sel, champ, source = report_selection(swapped=False)
    assert sel.best.id == "m1"
    assert champ.id == "soup-m1" and source.startswith("best soup by val accuracy")
    sel, champ, _ = report_selection(swapped=True)  # control
    assert sel.best.id == PLANT and champ.id == f"soup-{PLANT}"


# ---------------------------------------------------------------------------------------------- sweep metric

def test_sweep_metric_must_be_a_val_metric():
    from sweeps.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="must be a val_ metric"):
        load_config(overrides={"metric": "test_accuracy"})
    assert load_config(overrides={"metric": "val_accuracy"}).metric == "val_accuracy"  # control
