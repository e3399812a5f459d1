"""The report's math and pages from a snapshot built by hand: no MLflow server, no Ray, no weights.

The snapshot holds what read_snapshot would read (checkpoint and soup records, ingredients, trial curves with
their ASHA stops, the soup-so-far history, the champion alias, an Optuna study's trials); the logits of every
model are given in memory, so Predictions never pulls anything (its loader is None and would raise).
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

K = 4
N_VAL, N_TEST = 120, 160
ARCH = "coatnet_tiny_ich"
FINGERPRINT = "f" * 64


def _record(model_id, trial, epoch, score, *, arch=ARCH, sweep="s", tags=None):
    from soups.store.registry import CheckpointRecord
    return CheckpointRecord(model_id, f"run-{trial}", "1", model_id, sweep, trial, epoch, "sha", FINGERPRINT, "init",
                            arch, metrics={"val_macro_f1": score, "val_accuracy": score}, tags=dict(tags or {}))


def _logits(rng, y, accuracy):
    """Logits whose argmax is right on about `accuracy` of the images (noisy, so the models differ)."""
    pred = np.where(rng.random(len(y)) < accuracy, y, (y + rng.integers(1, K, len(y))) % K)
    return np.eye(K)[pred] * 2.0 + rng.normal(0, 0.3, (len(y), K))


def _study_trials():
    """A real (in-memory) Optuna study's frozen trials: two parameters, one of them matters."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 1 - (t.suggest_float("lr", 1e-4, 1e-2, log=True) - 3e-3) ** 2 * 1e4
                   + 0.01 * t.suggest_float("mixup", 0.0, 0.2), n_trials=12)
    return study.trials


@pytest.fixture
def snapshot_and_preds(tmp_path):
    from soups.report.predictions import Predictions
    from soups.report.snapshot import ChampionRef, OptunaRecord, Snapshot, TrialRun

    rng = np.random.default_rng(0)
    y = {"val": rng.integers(0, K, N_VAL), "test": rng.integers(0, K, N_TEST)}
    dataset = SimpleNamespace(splits={s: SimpleNamespace(labels=y[s]) for s in y}, num_classes=K,
                              classes=list("abcd"), fingerprint=FINGERPRINT)
    accuracy = {}
    checkpoints = []
    # Three trials without a searcher (`<5 hex>_<5 digits>` ids); the third stopped by ASHA after epoch 1.
    for t, (trial, epochs) in enumerate((("a1b2c_00000", 3), ("a1b2c_00001", 3), ("a1b2c_00002", 1))):
        for e in range(1, epochs + 1):
            mid = f"m-{t}-{e}"
            accuracy[mid] = 0.55 + 0.08 * e + 0.02 * t
            checkpoints.append(_record(mid, trial, e, accuracy[mid]))
    checkpoints.append(_record("m-resnet", "r0000", 1, 0.6, arch="resnet18", sweep="base"))
    accuracy["m-resnet"] = 0.6
    soups, ingredients = [], {}
    for t, trial in enumerate(("a1b2c_00000", "a1b2c_00001")):
        for recipe, members in (("uniform", [1, 2, 3]), ("greedy", [3, 2])):
            sid = f"soup-{t}-{recipe}"
            accuracy[sid] = 0.8 + 0.01 * t
            soups.append(_record(sid, trial, 0, accuracy[sid], tags={"ich.scope": "within", "ich.recipe": recipe}))
            ingredients[sid] = [f"m-{t}-{e}" for e in members]
    for recipe, members, acc in (("uniform", ["m-0-3", "m-1-3", "m-2-1"], 0.84), ("greedy", ["m-1-3", "m-0-3"], 0.85)):
        sid = f"soup-across-{recipe}"
        accuracy[sid] = acc
        soups.append(_record(sid, "soup", 0, accuracy[sid], tags={"ich.scope": "across", "ich.recipe": recipe}))
        ingredients[sid] = members

    preds = Predictions(dataset, tmp_path / "cache", tmp_path / "pulled", load=None)
    for mid, acc in accuracy.items():
        for split in ("val", "test"):
            preds.put(mid, split, _logits(rng, y[split], acc))
    trials = [TrialRun("a1b2c_00000", "r0", "finished", [(1, 0.63), (2, 0.71), (3, 0.79)]),
              TrialRun("a1b2c_00001", "r1", "finished", [(1, 0.65), (2, 0.73), (3, 0.81)]),
              TrialRun("a1b2c_00002", "r2", "stopped by ASHA", [(1, 0.59)])]
    snap = Snapshot("hand", "1", "http://127.0.0.1:1", checkpoints, soups, ingredients, sweep="s",
                    sweep_run_id="sweep-run", sweep_tags={"ich.sweep": "s", "ich.data": "/nowhere"},
                    curve_key="val_macro_f1", trials=trials, soup_so_far_key="soup_so_far_val_macro_f1",
                    soup_so_far=[(1, 0.79), (2, 0.83), (3, 0.83)], registered_model="ich-champions",
                    champion=ChampionRef("ich-champions", "3", "soup-across-greedy"),
                    optuna=OptunaRecord("s", "sqlite:///x.db", "maximize", _study_trials()))
    return snap, preds


def test_report_from_a_hand_built_snapshot(snapshot_and_preds, tmp_path):
    from soups.report.build import compute_report
    from soups.report.render import write_pages
    from soups.report.sections import table_lines

    snap, preds = snapshot_and_preds
    out = tmp_path / "report"
    out.mkdir()
    report = compute_report(snap, preds, out, split="test", n_resamples=200, data="/nowhere")
    s = report.summary
    assert preds.computed == 0  # everything came from memory: nothing pulled

    # The paper's layout: the baseline, then the block of the one CoAtNet architecture (best single, uniform and
    # greedy soup, soft voting of each); the block's soups are the best by val of the best trial's within soups and
    # the across-run soups (here the across ones), the best single is the best recorded val, not test.
    rows = {r["key"]: r for r in s["table"]}
    assert list(rows) == ["baseline_resnet"] + [f"{ARCH}_{k}" for k in ("single", "uniform_soup", "greedy_soup",
                                                                        "uniform_vote", "greedy_vote")]
    assert rows[f"{ARCH}_single"]["model_id"] == "m-1-3" and s["best_single"] == f"{ARCH}_single"
    for recipe in ("uniform", "greedy"):
        competing = [r for r in snap.soups if r.tags["ich.recipe"] == recipe
                     and (r.tags["ich.scope"] == "across" or r.trial == "a1b2c_00001")]
        assert rows[f"{ARCH}_{recipe}_soup"]["model_id"] == max(competing, key=lambda r: r.metrics["val_macro_f1"]).model_id
        assert rows[f"{ARCH}_{recipe}_vote"]["ingredients"] == snap.ingredients[rows[f"{ARCH}_{recipe}_soup"]["model_id"]]
    assert "across runs" in rows[f"{ARCH}_uniform_soup"]["label"]

    # The forest plot draws the table's numbers: one row per compared row, the same Δ and interval, and the
    # rendered table prints exactly those (in percentage points).
    compared = [r for r in s["table"] if r["vs_best_single"]]
    assert [f["key"] for f in s["forest"]] == [r["key"] for r in compared] and len(compared) == 4
    header, lines = table_lines(s["table"], "macro_f1")
    column = header.index("Δacc vs best single [95% CI]")
    printed = {r["key"]: line[column] for r, line in zip(s["table"], lines)}
    for f in s["forest"]:
        vs = rows[f["key"]]["vs_best_single"]
        assert (f["delta"], f["lo"], f["hi"]) == (vs["acc_diff"], vs["acc_diff_low"], vs["acc_diff_high"])
        assert printed[f["key"]] == f"{100 * f['delta']:+.2f} [{100 * f['lo']:+.2f}, {100 * f['hi']:+.2f}]"

    # Val vs test: every CoAtNet checkpoint of the soups' architecture (the ResNet is not one), marked models.
    vt = s["val_test"]
    assert len(vt["checkpoints"]) == 7 and {m["kind"] for m in vt["marked"]} == {"best_single", "uniform", "greedy",
                                                                                "soft_vote"}
    y_test = preds.dataset.splits["test"].labels
    first = vt["checkpoints"][0]
    assert first["test"] == pytest.approx(np.mean(preds.logits(first["model_id"], "test").argmax(1) == y_test))

    # Learning curves: labels by what is unique (the counter), the ASHA stop carried, the soup so far.
    lc = s["learning_curves"]
    assert [t["label"] for t in lc["trials"]] == ["0", "1", "2"]
    assert [t["status"] for t in lc["trials"]][-1] == "stopped by ASHA" and len(lc["soup_so_far"]) == 3

    # Bias-variance: two trials with within soups, so the study across trials is there (unconditionally, here),
    # and the one within the soup trial's trajectory: the 3 checkpoints its uniform soup averaged.
    bv = s["bias_variance"]
    assert bv["trials"] == ["a1b2c_00000", "a1b2c_00001"]
    assert [g["key"] for g in bv["groups"]] == ["single", "uniform", "greedy", "trajectory", "trajectory_uniform",
                                                "trajectory_greedy"]
    assert bv["trajectory"]["ingredients"] == snap.ingredients["soup-1-uniform"] == bv["groups"][3]["models"]
    for g in bv["groups"]:
        assert g["ce"]["bias2"] + g["ce"]["variance"] == pytest.approx(g["ce"]["expected_loss"], rel=1e-6)

    # The champion: the alias of the registered model the snapshot names, not "<experiment>-soup".
    assert s["champion"]["model_id"] == "soup-across-greedy" and "ich-champions (v3)" in s["champion"]["source"]
    assert s["optuna"]["figures"] == ["optuna_history.png", "optuna_importances.png"]

    # Every figure is a PNG; both pages show the same sections, figures and tables.
    write_pages(out, report)
    figures = [name for sec in report.sections for name, _ in sec.figures]
    assert figures == ["forest.png", "val_test.png", "learning_curves.png", "optuna_history.png",
                       "optuna_importances.png", "mds.png", "bias_variance.png", "champion.png"]
    assert all((out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
    assert {p.name for p in out.glob("*.png")} == set(figures)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert re.findall(r"!\[[^]]*\]\(([\w.-]+\.png)\)", md) == figures
    assert re.findall(r'<figcaption><a href="([\w.-]+\.png)">', page) == figures
    titles = [sec.title for sec in report.sections if sec.title]
    assert re.findall(r"^## (.+)$", md, re.M) == titles
    assert [t.replace("&#x27;", "'") for t in re.findall(r"<h2>(.+?)</h2>", page)] == titles
    assert md.count("\n| ") == page.count("<tr>")  # every table row once on each page (header rows included)
    assert all((out / name).is_file() for name in report.files())


def test_best_single_is_chosen_on_val_not_test(snapshot_and_preds, tmp_path):
    """A planted checkpoint, worst CoAtNet on val and best on test (in its record and its logits), is not the
    best single; the best on val (m-1-3, made worst on test) is. Control: the records' val and test figures
    swapped, the plant is picked, so the planted case tells a val selection from a test one."""
    from soups.report.build import compute_report

    snap, preds = snapshot_and_preds
    y_test = preds.dataset.splits["test"].labels
    preds.put("m-0-1", "test", np.eye(K)[y_test] * 5.0)  # every test image right
    preds.put("m-1-3", "test", np.eye(K)[(y_test + 1) % K] * 5.0)  # every test image wrong
    test_acc = {"m-0-1": 1.0, "m-1-3": 0.0}
    for r in snap.checkpoints:
        acc = test_acc.get(r.model_id, 0.5)
        r.metrics.update(test_accuracy=acc, test_macro_f1=acc)
    assert min((r for r in snap.checkpoints if r.architecture == ARCH), key=lambda r: r.metrics["val_macro_f1"]
               ).model_id == "m-0-1"

    def best_single(name: str) -> dict:
        out = tmp_path / name
        out.mkdir()
        summary = compute_report(snap, preds, out, split="test", n_resamples=50).summary
        return next(r for r in summary["table"] if r["key"] == summary["best_single"])

    row = best_single("planted")
    assert row["model_id"] == "m-1-3"
    for r in snap.checkpoints:  # control: what test says, val now says
        m = r.metrics
        m["val_accuracy"], m["test_accuracy"] = m["test_accuracy"], m["val_accuracy"]
        m["val_macro_f1"], m["test_macro_f1"] = m["test_macro_f1"], m["val_macro_f1"]
    assert best_single("swapped")["model_id"] == "m-0-1"


def test_without_a_study_or_curves_the_report_says_so(snapshot_and_preds, tmp_path):
    """No Optuna storage and no trial runs: notes, not failures; the rest of the report is unchanged."""
    from soups.report.build import compute_report
    from soups.report.snapshot import _read_optuna

    snap, preds = snapshot_and_preds
    notes = []
    assert _read_optuna(None, "s", notes) is None and "storage is unknown" in notes[0]
    assert _read_optuna(f"sqlite:///{tmp_path}/none.db", "s", notes) is None and "does not exist" in notes[1]
    assert not (tmp_path / "none.db").exists()  # reading never creates a database
    snap.optuna, snap.trials, snap.soup_so_far, snap.notes = None, [], [], notes
    out = tmp_path / "bare"
    out.mkdir()
    s = compute_report(snap, preds, out, n_resamples=200).summary
    assert s["optuna"] is None and s["learning_curves"] is None
    assert any(n.startswith("no learning curves: sweep run sweep-run") for n in s["notes"])
    assert notes[0] in s["notes"]
    assert not (out / "optuna_history.png").exists() and (out / "forest.png").is_file()
