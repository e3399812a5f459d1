"""The paper's table and figure in the report (issue 22 item 4), from hand-built snapshots: no server, no weights.

One block per CoAtNet architecture (best single, uniform and greedy soups, soft voting), the baselines first; the MDS
of the best soup's recorded ingredients plus greedy, uniform and soft voting; bias-variance within one trajectory
even when a single trial was souped. The end-to-end case (two architectures logged through MLflow) is in
tests/test_report.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.test_report_snapshot import ARCH, _logits, _record, snapshot_and_preds  # noqa: F401 (fixture)

ARCH2 = "coatnet_2_rw_224"  # only records and logits here: nothing builds the network


def _report(snap, preds, out):
    from soups.report.build import compute_report
    out.mkdir()
    return compute_report(snap, preds, out, split="test", n_resamples=100).summary


def _accuracy(logits, y) -> float:
    return float(np.mean(np.asarray(logits).argmax(1) == y))


def _add_second_architecture(snap, preds, pool_tag: str):
    """A CoAtNet-2 trial of 3 epochs with its within soups (one recording an ingredient pool), logits in memory."""
    rng = np.random.default_rng(1)
    y = {s: preds.dataset.splits[s].labels for s in ("val", "test")}
    scores = {}
    for e in (1, 2, 3):
        scores[f"c2-{e}"] = 0.5 + 0.1 * e
        snap.checkpoints.append(_record(f"c2-{e}", "b0000", e, scores[f"c2-{e}"], arch=ARCH2))
    for recipe, members, score, tags in (("uniform", [1, 2, 3], 0.82, {"ich.ingredients": pool_tag}),
                                         ("greedy", [3, 2], 0.83, {})):
        sid = f"c2-soup-{recipe}"
        scores[sid] = score
        snap.soups.append(_record(sid, "b0000", 0, score, arch=ARCH2,
                                  tags={"ich.scope": "within", "ich.recipe": recipe, **tags}))
        snap.ingredients[sid] = [f"c2-{e}" for e in members]
    for mid, acc in scores.items():
        for split in ("val", "test"):
            preds.put(mid, split, _logits(rng, y[split], acc))


def test_one_block_per_coatnet_architecture_in_the_papers_layout(snapshot_and_preds, tmp_path):
    snap, preds = snapshot_and_preds
    _add_second_architecture(snap, preds, "top_k:8")
    s = _report(snap, preds, tmp_path / "report")
    rows = {r["key"]: r for r in s["table"]}
    y = preds.dataset.splits["test"].labels

    # Baselines first, then the blocks ordered by architecture name, each as the paper has it.
    layout = ("single", "uniform_soup", "greedy_soup", "uniform_vote", "greedy_vote")
    assert [b["architecture"] for b in s["blocks"]] == sorted({ARCH, ARCH2})
    assert list(rows) == ["baseline_resnet"] + [f"{b['architecture']}_{k}" for b in s["blocks"] for k in layout]
    assert [b["keys"] for b in s["blocks"]] == [[f"{a}_{k}" for k in layout] for a in sorted({ARCH, ARCH2})]

    for arch, name in ((ARCH, "CoAtNet-tiny"), (ARCH2, "CoAtNet-2")):
        # The block's best single: the best recorded val of that architecture's checkpoints (recomputed here).
        mine = [r for r in snap.checkpoints if r.architecture == arch]
        best = max(mine, key=lambda r: r.metrics["val_macro_f1"])
        single = rows[f"{arch}_single"]
        assert single["model_id"] == best.model_id and single["label"].startswith(f"{name} ({arch}), best single")
        assert single["accuracy"] == pytest.approx(_accuracy(preds.logits(best.model_id, "test"), y))
        for recipe in ("uniform", "greedy"):
            assert rows[f"{arch}_{recipe}_soup"]["label"].startswith(f"{name} + {recipe} soup (")
        # Every soup and soft-voting row is compared with its own block's best single, not the other block's.
        other = rows[f"{ARCH2 if arch == ARCH else ARCH}_single"]
        assert single["accuracy"] != other["accuracy"]  # so the check below can tell the two references apart
        for key in (f"{arch}_{k}" for k in layout[1:]):
            acc_diff = rows[key]["vs_best_single"]["acc_diff"]
            assert acc_diff == pytest.approx(rows[key]["accuracy"] - single["accuracy"])
            assert acc_diff != pytest.approx(rows[key]["accuracy"] - other["accuracy"])
    # The overall best single (by val) names the report run's sweep; soups record their ingredient pool when they
    # have one, and the label shows it.
    top = max((r for r in snap.checkpoints if r.architecture.startswith("coatnet")),
              key=lambda r: r.metrics["val_macro_f1"])
    assert rows[s["best_single"]]["model_id"] == top.model_id
    assert rows[f"{ARCH2}_uniform_soup"]["label"].endswith("within trial b0000, pool top_k:8)")
    assert "pool" not in rows[f"{ARCH2}_greedy_soup"]["label"]
    assert len(s["forest"]) == 8 and all(f["label"].startswith(("CoAtNet-2 ", "CoAtNet-tiny ")) for f in s["forest"])


def test_mds_points_are_the_best_soups_recorded_ingredients_and_its_soups(snapshot_and_preds, tmp_path):
    snap, preds = snapshot_and_preds
    s = _report(snap, preds, tmp_path / "report")
    mds, rows = s["mds"], {r["key"]: r for r in s["table"]}
    y = preds.dataset.splits["val"].labels

    # The best soup by val among those the table shows: the best single's trial's within soups and the across ones.
    best_trial = max(snap.checkpoints, key=lambda r: r.metrics["val_macro_f1"]).trial
    competing = [r for r in snap.soups if r.tags["ich.scope"] == "across" or r.trial == best_trial]
    soup = max(competing, key=lambda r: r.metrics["val_macro_f1"])
    recorded = snap.ingredients[soup.model_id]
    assert mds["soup"]["model_id"] == soup.model_id and mds["ingredients"] == recorded

    points = mds["points"]
    assert [p["model_id"] for p in points if p["kind"] == "ingredient"] == recorded
    assert [(p["kind"], p["model_id"]) for p in points if p["kind"] in ("greedy", "uniform")] == [
        ("greedy", rows[f"{ARCH}_greedy_soup"]["model_id"]), ("uniform", rows[f"{ARCH}_uniform_soup"]["model_id"])]
    votes = [p for p in points if p["kind"] == "soft_vote"]
    assert len(votes) == 1 and votes[0]["ingredients"] == recorded and len(points) == len(recorded) + 3
    # Each label is the point's own val accuracy (numpy here: argmax of the logits, of their mean for soft voting).
    for p in points:
        logits = (np.mean([preds.logits(i, "val") for i in recorded], axis=0) if p["kind"] == "soft_vote"
                  else preds.logits(p["model_id"], "val"))
        assert p["val_accuracy"] == pytest.approx(_accuracy(logits, y))
    # Control: the old figure's points (the epochs of the best trial) are not these ingredients.
    epochs = [r.model_id for r in snap.checkpoints if r.trial == best_trial]
    assert set(epochs) != set(recorded)
    assert (tmp_path / "report" / "mds.png").read_bytes()[:4] == b"\x89PNG"


def test_bias_variance_within_one_souped_trajectory(snapshot_and_preds, tmp_path):
    """Only one trial souped (the paper's case): the study is there, over that trajectory's ingredients."""
    snap, preds = snapshot_and_preds
    snap.soups = [r for r in snap.soups if r.tags["ich.scope"] == "across" or r.trial == "a1b2c_00001"]
    s = _report(snap, preds, tmp_path / "report")
    bv = s["bias_variance"]
    assert bv is not None and bv["trials"] == []  # no study across trials with one souped trial, and a note says so
    assert any(n.startswith("no bias-variance study across trials: 1 trial(s)") for n in s["notes"])

    uniform = next(r for r in snap.soups if r.trial == "a1b2c_00001" and r.tags["ich.recipe"] == "uniform")
    ingredients = snap.ingredients[uniform.model_id]
    groups = {g["key"]: g for g in bv["groups"]}
    assert list(groups) == ["trajectory", "trajectory_uniform", "trajectory_greedy"]
    g = groups["trajectory"]
    assert bv["trajectory"] == {"trial": "a1b2c_00001", "soup": uniform.model_id, "ingredients": ingredients}
    assert g["models"] == ingredients and len(g["models"]) == 3
    assert g["ce"]["variance"] > 0 and g["zero_one"]["variance"] > 0
    # From those ingredients' predictions: the 0-1 terms and the CE expected loss written out in numpy.
    y = preds.dataset.splits["test"].labels
    logits = np.stack([preds.logits(i, "test") for i in ingredients])
    pred = logits.argmax(-1)
    main = np.array([np.bincount(col, minlength=4).argmax() for col in pred.T])
    assert g["zero_one"]["variance"] == pytest.approx(np.mean(pred != main[None]))
    assert g["zero_one"]["bias"] == pytest.approx(np.mean(main != y))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert g["ce"]["expected_loss"] == pytest.approx(-log_p[:, np.arange(len(y)), y].mean(), rel=1e-6)
    # Control: a soup is one model, so it has no variance: a positive variance above is the ingredients' spread.
    for key in ("trajectory_uniform", "trajectory_greedy"):
        assert len(groups[key]["models"]) == 1 and groups[key]["ce"]["variance"] == pytest.approx(0, abs=1e-12)
        assert groups[key]["zero_one"]["variance"] == 0
