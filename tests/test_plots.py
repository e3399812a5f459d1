"""soups/plots.py: pure plotting functions on synthetic data. Each writes a real PNG (checked by its header,
by PIL and by its size), returns None on empty input, and leaves no figure open. Optuna plots read a real
in-memory study."""
from __future__ import annotations

import math
import re

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pytest
from PIL import Image

from soups import plots
from soups.plots import trial_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(autouse=True)
def no_figure_left_open():
    plt.close("all")
    yield
    assert plt.get_fignums() == [], "a plotting function left its figure open"


def png_size(path) -> tuple[int, int]:
    """A valid PNG of a reasonable size: (width, height) in pixels."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert 3_000 < len(data) < 8_000_000, f"{path}: {len(data)} bytes"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        pixels = np.asarray(im.convert("L"))
    assert 300 <= w <= 6000 and 200 <= h <= 6000, (w, h)
    assert pixels.std() > 5, "a blank image"
    return w, h


# ---------------------------------------------------------------------------------------------- trial labels

def no_searcher_ids(n: int, prefix: str = "a1b2c") -> list[str]:
    return [f"{prefix}_{i:05d}" for i in range(n)]


def test_the_old_eight_character_cut_collides():
    """What the labels fix: without a searcher, [:8] reads `a1b2c_00` for the first 1000 trials."""
    ids = no_searcher_ids(150)
    assert {t[:8] for t in ids} == {"a1b2c_00"}


def test_labels_of_150_trials_without_a_searcher_are_their_counters():
    ids = no_searcher_ids(150)
    labels = trial_labels(ids)
    assert len(set(labels.values())) == 150
    assert labels["a1b2c_00000"] == "0" and labels["a1b2c_00007"] == "7" and labels["a1b2c_00149"] == "149"


def test_searcher_ids_stay_eight_hex_characters():
    rng = np.random.default_rng(0)
    ids = list(dict.fromkeys(f"{int(x):08x}" for x in rng.integers(0, 2**32, 200)))
    labels = trial_labels(ids)
    assert labels == {t: t for t in ids}


def test_mixed_ids_keep_what_tells_them_apart():
    ids = no_searcher_ids(120) + no_searcher_ids(120, "f00ba") + ["3f2a9b1c", "deadbeef"]
    labels = trial_labels(ids)
    assert len(set(labels.values())) == len(ids)
    assert labels["a1b2c_00007"] == "a1b2c_7" and labels["f00ba_00007"] == "f00ba_7"
    assert labels["3f2a9b1c"] == "3f2a9b1c"
    assert max(map(len, labels.values())) <= 9


def test_labels_never_collide_on_awkward_ids():
    # long ids sharing 8 characters, an id equal to another's short form, duplicates and a missing id
    ids = ["trainfn_0001", "trainfn_0002", "a1b2c_00007", "a1b2c_7", "a1b2c_7", None, "x"]
    labels = trial_labels(ids)
    distinct = [t for t in dict.fromkeys(ids)]
    assert len({labels[t] for t in distinct}) == len(distinct)
    assert labels["trainfn_0001"] == "trainfn_0001"
    assert labels[None] == "?"
    assert trial_labels(iter(["abc"])) == {"abc": "abc"}  # a generator is read once
    assert trial_labels([]) == {}


def test_ingredient_curve_labels_trials_by_what_is_unique(tmp_path):
    rows = [{"trial": t, "epoch": 1 + i % 3, "val_score": 0.8 + 0.001 * i,
             "candidate_val": 0.85 if i % 2 else None, "accepted": i % 4 == 1}
            for i, t in enumerate(no_searcher_ids(50))]
    ticks = plots.ingredient_ticks(rows)
    assert len(set(ticks)) == 50 and ticks[12] == "12\ne1"
    w, _ = png_size(plots.ingredient_curve(tmp_path / "c.png", rows, metric="macro_f1", title="greedy",
                                           soup_val=0.86, uniform_val=0.84))
    assert w > 1500  # 50 ticks get room
    assert plots.ingredient_curve(tmp_path / "e.png", [], metric="macro_f1", title="t", soup_val=0.8) is None
    assert not (tmp_path / "e.png").exists()


# ---------------------------------------------------------------------------------------------- forest

def forest_rows(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        d = float(rng.normal(0.005, 0.02))
        rows.append({"label": f"CoAtNet + greedy soup (within trial a1b2c_{i:05d}) " + "x" * (i % 3) * 30,
                     "kind": "soup" if i % 2 else "soft_vote", "delta": d, "lo": d - 0.015, "hi": d + 0.015})
    return rows


def test_forest_plot_with_intervals_crossing_zero(tmp_path):
    rows = [{"label": "uniform soup", "kind": "soup", "delta": 0.01, "lo": -0.005, "hi": 0.025},  # crosses 0
            {"label": "greedy soup", "kind": "soup", "delta": 0.03, "lo": 0.01, "hi": 0.05},
            {"label": "soft voting", "kind": "soft_vote", "delta": -0.02, "lo": -0.04, "hi": -0.001},
            {"label": "no interval", "kind": "vote", "delta": 0.0, "lo": None, "hi": None},
            {"label": "no delta", "kind": "soup", "delta": None, "lo": None, "hi": None}]
    _, h_small = png_size(plots.plot_forest(tmp_path / "f.png", rows, metric="accuracy", title="Δ vs best single"))
    _, h_many = png_size(plots.plot_forest(tmp_path / "f50.png", forest_rows(50), metric="macro_f1", title="50"))
    assert h_many > 2 * h_small  # every row keeps its line
    assert plots.plot_forest(tmp_path / "e.png", [], metric="accuracy", title="t") is None
    assert plots.plot_forest(tmp_path / "n.png", rows[-1:], metric="accuracy", title="t") is None


# ---------------------------------------------------------------------------------------------- val vs test

def test_val_test_scatter_marks_singles_soups_and_voting(tmp_path):
    rng = np.random.default_rng(2)
    val = rng.uniform(0.6, 0.9, 60)
    checkpoints = [(float(v), float(v - 0.03 + rng.normal(0, 0.01))) for v in val]
    marked = [{"label": "best single", "kind": "best_single", "val": 0.9, "test": 0.87},
              {"label": "uniform", "kind": "uniform", "val": 0.88, "test": 0.88},
              {"label": "greedy", "kind": "greedy", "val": 0.92, "test": 0.89},
              {"label": "soft voting", "kind": "soft_vote", "val": 0.91, "test": 0.885},
              {"label": "something new", "kind": "ties", "val": 0.9, "test": 0.88},
              {"label": "nan", "kind": "greedy", "val": math.nan, "test": 0.5}]
    png_size(plots.plot_val_test(tmp_path / "vt.png", checkpoints, marked, metric="accuracy", title="Fig. 1"))
    png_size(plots.plot_val_test(tmp_path / "vt2.png", [], marked[:1], metric="accuracy", title="t", diagonal=False))
    many = [{"label": f"within {i}", "kind": "uniform", "val": 0.8, "test": 0.8 + 0.001 * i} for i in range(50)]
    png_size(plots.plot_val_test(tmp_path / "vt3.png", checkpoints, many, metric="accuracy", title="50"))
    assert plots.plot_val_test(tmp_path / "e.png", [], [], metric="accuracy", title="t") is None


# ---------------------------------------------------------------------------------------------- learning curves

def test_learning_curves_mark_asha_stops_and_the_soup_so_far(tmp_path):
    rng = np.random.default_rng(3)
    labels = trial_labels(no_searcher_ids(50))
    curves = {}
    for i, (tid, label) in enumerate(labels.items()):
        epochs = 1 + i % 4
        points = [(e, float(0.5 + 0.1 * e + rng.normal(0, 0.02))) for e in range(1, epochs + 1)]
        curves[label] = {"points": points, "stopped": epochs < 4} if i % 5 else points  # both shapes
    soup = [(n, 0.7 + 0.01 * math.log(n)) for n in range(1, 51)]
    w_both, _ = png_size(plots.plot_learning_curves(tmp_path / "lc.png", curves, metric="macro_f1", title="sweep",
                                                    soup_so_far=soup))
    w_one, _ = png_size(plots.plot_learning_curves(tmp_path / "lc1.png", dict(list(curves.items())[:5]),
                                                   metric="loss", title="five"))
    assert w_both > 1.5 * w_one  # the soup-so-far panel sits beside the curves
    png_size(plots.plot_learning_curves(tmp_path / "soup.png", {}, metric="accuracy", title="t", soup_so_far=soup))
    assert plots.plot_learning_curves(tmp_path / "e.png", {}, metric="accuracy", title="t") is None
    assert plots.plot_learning_curves(tmp_path / "e.png", {"a": []}, metric="accuracy", title="t",
                                      soup_so_far=[]) is None


# ---------------------------------------------------------------------------------------------- optuna

def two_param_study(n: int = 8) -> optuna.Study:
    study = optuna.create_study(study_name="two", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: -(t.suggest_float("lr", 1e-4, 1e-1, log=True) - 0.01) ** 2
                   + 0.1 * t.suggest_float("wd", 0.0, 0.1), n_trials=n)
    return study


def test_optuna_history_and_importances_from_a_study(tmp_path):
    study = two_param_study()
    trial = study.ask()  # a pruned trial is counted, not plotted
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    path, reason = plots.plot_optuna_history(tmp_path / "h.png", study, metric="val_macro_f1")
    assert reason is None
    png_size(path)
    path, reason = plots.plot_param_importances(tmp_path / "i.png", study)
    assert reason is None
    png_size(path)


def test_optuna_plots_say_why_they_cannot_draw(tmp_path):
    one = optuna.create_study(study_name="one")
    one.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    for f in (plots.plot_optuna_history, plots.plot_param_importances):
        path, reason = f(tmp_path / "x.png", one)
        assert path is None and re.search(r"1 complete trial", reason)
    assert not (tmp_path / "x.png").exists()

    single = optuna.create_study(study_name="single")
    single.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=4)
    path, reason = plots.plot_param_importances(tmp_path / "s.png", single)
    assert path is None and "1 parameter" in reason
    assert plots.plot_optuna_history(tmp_path / "s.png", single)[1] is None  # history still draws

    flat = optuna.create_study(study_name="flat")
    flat.optimize(lambda t: 0.5 + 0 * t.suggest_float("a", 0, 1) + 0 * t.suggest_float("b", 0, 1), n_trials=5)
    path, reason = plots.plot_param_importances(tmp_path / "f.png", flat)
    assert path is None and "zero total variance" in reason  # a constant objective: explained, never raised

    # a trial that diverged before suggesting anything (value inf, no params): left out, not a reason to give
    # up (optuna's own get_param_importances over the whole study returns {} here)
    diverged = two_param_study(4)
    diverged.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=math.inf))
    path, reason = plots.plot_param_importances(tmp_path / "d.png", diverged)
    assert reason is None
    png_size(path)

    multi = optuna.create_study(study_name="multi", directions=["maximize", "minimize"])
    multi.optimize(lambda t: (t.suggest_float("a", 0, 1), t.suggest_float("b", 0, 1)), n_trials=3)
    for f in (plots.plot_optuna_history, plots.plot_param_importances):
        path, reason = f(tmp_path / "m.png", multi)
        assert path is None and "2 objectives" in reason

    empty = optuna.create_study(study_name="empty")
    assert plots.plot_optuna_history(tmp_path / "e.png", empty)[0] is None


# ---------------------------------------------------------------------------------------------- moved from report.py

def test_mds_bias_variance_and_champion_draw_and_skip_empty(tmp_path):
    rng = np.random.default_rng(4)
    points = [{"kind": "ingredient", "val_accuracy": 0.8 + 0.01 * i, "epoch": i} for i in range(8)]
    points += [{"kind": k, "val_accuracy": 0.9} for k in ("uniform", "greedy", "soft_vote")]
    png_size(plots.plot_mds(tmp_path / "mds.png", rng.normal(size=(11, 2)), points, "MDS"))
    groups = [{"label": g, "ce": {"bias2": 0.3, "variance": 0.1, "expected_loss": 0.4},
               "zero_one": {"bias": 0.2, "variance": 0.05, "net_variance": 0.03, "expected_loss": 0.23}}
              for g in ("epochs", "soups")]
    png_size(plots.plot_bias_variance(tmp_path / "bv.png", groups))
    k = 17
    cm = rng.integers(0, 20, (k, k))
    png_size(plots.plot_champion(tmp_path / "ch.png", cm, rng.uniform(0, 1, k), [f"lớp {i}" for i in range(k)], "c"))
    assert plots.plot_mds(tmp_path / "e.png", np.zeros((0, 2)), [], "t") is None
    assert plots.plot_bias_variance(tmp_path / "e.png", []) is None
    assert plots.plot_champion(tmp_path / "e.png", np.zeros((0, 0)), np.zeros(0), [], "t") is None
