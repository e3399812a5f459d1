"""Issue 20's equivalence test: the tiny deterministic sweep of tests/equivalence_sweep.py, souped by `ich soup` with
the current code, gives every soup the name, ingredients, figures, BN mode and weights sha256 that the code before
the refactor gave (tests/fixtures/equivalence.json, recorded once from commit 8e99265; how: equivalence_sweep.py).
Real MLflow server (the session's), real `ich soup`; no mocks.
"""
from __future__ import annotations

import copy
import hashlib
import json

import pytest

from tests import equivalence_sweep as eq

COMPARED = ("sweep", "checkpoints", "runs")  # init_fitted is an input of the sweep, not an outcome


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(eq.FIXTURE.read_text(encoding="utf-8"))


def _report(diffs: list[str], limit: int = 40) -> str:
    more = f"\n... and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return f"{len(diffs)} field(s) differ from {eq.FIXTURE.name}:\n" + "\n".join(diffs[:limit]) + more


def test_checkpoint_weights_are_the_recorded_bits(recorded):
    """The generator alone (no project code but the model's shapes): the same bytes here as when recorded. When
    this fails the machine computes the weights differently, and the soup comparison below says nothing."""
    from safetensors.torch import save

    from ich.models import create_model

    reference = create_model(eq.ARCHITECTURE, 10, eq.IMG_SIZE).state_dict()
    for t, trial in enumerate(eq.TRIALS):
        for epoch in range(1, eq.EPOCHS + 1):
            weights = eq.checkpoint_weights(reference, recorded["init_fitted"], t, epoch)
            digest = hashlib.sha256(save(weights, metadata={"format": "pt"})).hexdigest()
            assert digest == recorded["checkpoints"][f"{trial}/{epoch}"]["sha256"], f"{trial}/{epoch}"


@pytest.mark.integration
def test_soups_are_what_the_code_before_the_refactor_made(recorded, mlflow_server, digits_dataset, ich_home,
                                                           tmp_path_factory):
    actual = eq.run_equivalence_sweep(mlflow_server, digits_dataset, tmp_path_factory.mktemp("equivalence"),
                                      recorded["init_fitted"])
    expected = {k: recorded[k] for k in COMPARED}
    diffs = eq.differences(expected, actual)
    assert not diffs, _report(diffs)
    # what the comparison covered: both soup runs, every family and recipe, greedy choices, both BN modes
    runs = actual["runs"]
    assert len(runs["bn_average"]["soups"]) == len(runs["bn_default"]["soups"]) == 9
    assert all(s["weights_sha256"] for s in runs["bn_average"]["soups"])
    greedy = [s for s in runs["bn_average"]["soups"] if s["recipe"] == "greedy"]
    assert {sum(i["accepted"] for i in s["ingredients"]) for s in greedy} > {1}
    assert {s["bn_mode"] for s in runs["bn_default"]["soups"]} == {"average", "recalibrate"}


# ---------------------------------------------------------------------------------------------- the comparator

def _first_soup(record: dict) -> dict:
    return record["runs"][eq.HASHED_RUN]["soups"][0]


@pytest.mark.parametrize("change, where", [
    (lambda r: r["checkpoints"]["t1/2"].update(sha256="0" * 64), "checkpoints.t1/2.sha256"),
    (lambda r: _first_soup(r).update(weights_sha256="f" * 64), "weights_sha256"),
    (lambda r: _first_soup(r)["test"].update(accuracy=_first_soup(r)["test"]["accuracy"] + 1 / 179), "test.accuracy"),
    (lambda r: _first_soup(r)["val"].update(macro_f1=_first_soup(r)["val"]["macro_f1"] * (1 + 1e-15)),
     "val.macro_f1"),  # argmax figures: exact
    (lambda r: _first_soup(r)["test"].update(loss=_first_soup(r)["test"]["loss"] + 1e-4), "test.loss"),
    (lambda r: _first_soup(r)["ingredients"][0].update(accepted=not _first_soup(r)["ingredients"][0]["accepted"]),
     "ingredients[0].accepted"),
    (lambda r: _first_soup(r)["ingredients"][1].update(epoch=99), "ingredients[1].epoch"),
    (lambda r: _first_soup(r).update(bn_mode="recalibrate"), "bn_mode"),
    (lambda r: r["runs"]["bn_default"]["soups"].pop(), "bn_default.soups: 9 items expected, 8 got"),
])
def test_comparator_finds_one_changed_weight_figure_or_choice(recorded, change, where):
    expected = {k: recorded[k] for k in COMPARED}
    assert eq.differences(expected, copy.deepcopy(expected)) == []  # control: an unchanged copy passes
    actual = copy.deepcopy(expected)
    change(actual)
    diffs = eq.differences(expected, actual)
    assert len(diffs) == 1 and where in diffs[0], diffs


def test_comparator_allows_last_bits_of_continuous_figures_only(recorded):
    expected = {k: recorded[k] for k in COMPARED}
    actual = copy.deepcopy(expected)
    soup = _first_soup(actual)
    soup["test"]["loss"] *= 1 + 1e-9  # a forward pass rounded differently
    soup["test"]["accuracy_ci"][0] += 1e-9
    soup["vs_best_single"]["mcnemar_p"] *= 1 - 1e-9
    assert eq.differences(expected, actual) == []
    soup["test"]["accuracy"] += 1e-9  # control: an argmax figure has no tolerance
    assert [d.split(":")[0] for d in eq.differences(expected, actual)] == \
        [f"runs.{eq.HASHED_RUN}.soups[0 {soup['name']}].test.accuracy"]
