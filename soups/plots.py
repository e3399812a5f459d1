"""Plots of soups and sweeps (matplotlib, Agg backend: no display on workers or in tests).

Pure functions: data in, one PNG written, its path out. No MLflow, no Ray; optuna only as the study handed in.
Every function returns None on empty input instead of drawing an empty frame, and closes its figure.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ich.metrics import metric_of_key  # noqa: E402
from soups import recipes  # noqa: E402

DPI = 110
LEGEND_MAX = 10  # beyond this many curves a legend hides the plot: name the best few instead
TOP_NAMED = 5
LABEL_MAX = 60  # characters of a row label in the forest plot before it is cut


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _short(text: str, n: int = LABEL_MAX) -> str:
    """Cut in the middle: the head names the kind of model, the tail often what tells it apart."""
    text = str(text)
    if len(text) <= n:
        return text
    head = (n - 1) // 2
    return text[:head] + "…" + text[len(text) - (n - 1 - head):]


# ---------------------------------------------------------------------------------------------- trial labels

# Tune's trial ids: 8 hex characters with a searcher, `<5 hex>_<5 digits>` without one (experiment prefix and
# a counter): cutting those to 8 characters gives `a1b2c_00` for the first 100 trials.
NO_SEARCHER = re.compile(r"^(?P<prefix>[0-9a-f]{5})_(?P<count>\d{5})$")


def _candidate(tid: str, one_prefix: bool) -> str:
    m = NO_SEARCHER.match(tid)
    if m:
        count = str(int(m["count"]))
        return count if one_prefix else f"{m['prefix']}_{count}"
    return tid[:8]


def trial_labels(trial_ids: Iterable[str]) -> dict[str, str]:
    """Trial id -> the shortest label that still tells it apart: the counter alone for a sweep without a
    searcher ("a1b2c_00007" -> "7"), prefix and counter when several experiments mix, the 8 hex characters
    of a searcher's id. Never two ids with one label (colliding cuts fall back to the full id)."""
    trial_ids = list(trial_ids)
    ids = list(dict.fromkeys("?" if t is None or t == "" else str(t) for t in trial_ids))
    prefixes = {m["prefix"] for m in map(NO_SEARCHER.match, ids) if m}
    one_prefix = len(prefixes) == 1 and all(NO_SEARCHER.match(t) for t in ids)
    labels = {t: _candidate(t, one_prefix) for t in ids}
    seen: dict[str, list[str]] = {}
    for t, lab in labels.items():
        seen.setdefault(lab, []).append(t)
    for lab, group in seen.items():
        if len(group) > 1:
            labels.update({t: t for t in group})
    if len(set(labels.values())) < len(labels):  # a cut equal to another full id: full ids are always unique
        labels = {t: t for t in ids}
    return {t: labels["?" if t is None or t == "" else str(t)] for t in trial_ids}


# ---------------------------------------------------------------------------------------------- soups

def ingredient_ticks(rows: list[dict]) -> list[str]:
    """One tick per ingredient: its trial's short label over its epoch."""
    names = trial_labels(r["trial"] for r in rows)
    return [f"{names[r['trial']]}\ne{r['epoch']}" for r in rows]


def ingredient_curve(path: str | Path, rows: list[dict], *, metric: str, title: str, soup_val: float,
                     uniform_val: float | None = None) -> Path | None:
    """Ingredients in greedy order (best val first): each one's own val score, and for greedy soups the
    candidate soup's val score after trying it (filled = accepted, hollow = rejected)."""
    if not rows:
        return None
    x = list(range(1, len(rows) + 1))
    fig, ax = plt.subplots(figsize=(min(40.0, max(5.0, 0.45 * len(rows) + 3)), 3.6), dpi=DPI)
    ax.plot(x, [r["val_score"] for r in rows], "o-", color="#999999", ms=4, lw=1, label="ingredient alone")
    tried = [(i, r) for i, r in zip(x, rows) if r.get("candidate_val") is not None]
    if tried:
        ax.plot([i for i, _ in tried], [r["candidate_val"] for _, r in tried], "-", color="#1f77b4", lw=1)
        for i, r in tried:
            ax.plot(i, r["candidate_val"], "o", ms=7, color="#1f77b4",
                    mfc="#1f77b4" if r["accepted"] else "white")
        ax.plot([], [], "o", color="#1f77b4", label="soup after try: accepted")
        ax.plot([], [], "o", color="#1f77b4", mfc="white", label="rejected")
    ax.axhline(soup_val, color="#d62728", lw=1.2, ls="--", label=f"soup {soup_val:.4f}")
    if uniform_val is not None:
        ax.axhline(uniform_val, color="#2ca02c", lw=1, ls=":", label=f"uniform {uniform_val:.4f}")
    ax.set_xticks(x)
    ax.set_xticklabels(ingredient_ticks(rows), fontsize=7)
    ax.set_xlabel("trial / epoch (greedy order)", fontsize=8)
    ax.set_ylabel(f"val {metric}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


MARKERS = {"ingredient": ("o", "#7f7f7f"), "best_single": ("^", "#000000"), "soft_vote": ("D", "#1f77b4"),
           "vote": ("D", "#1f77b4")}  # what is not a recipe's soup; each recipe brings its own (soups/recipes/)
KIND_NAMES = {"ingredient": "ingredients", "best_single": "best single", "soft_vote": "soft voting",
              "vote": "soft voting"}  # in legends; a recipe's points are "<recipe> soup"
OTHER_STYLES = (("P", "#9467bd"), ("X", "#8c564b"), ("v", "#e377c2"), ("h", "#bcbd22"), ("p", "#17becf"))


def recipe_style(name: str) -> tuple[str, str] | None:
    """(marker, colour) of a registered recipe's soups: its own, else one generated from its place among the
    recipes without one; None for a name no recipe registered."""
    if name not in recipes.names():
        return None
    if (style := recipes.get(name).style) is not None:
        return style
    plain = [r for r in recipes.names() if recipes.get(r).style is None]
    return OTHER_STYLES[plain.index(name) % len(OTHER_STYLES)]


def marker_of(kind: str) -> tuple[str, str] | None:
    """(marker, colour) of a point of this kind (ingredient, soft voting, a recipe's soup...), None if unknown."""
    return MARKERS.get(kind) or recipe_style(kind)


def plot_mds(path: Path, coords: np.ndarray, points: list[dict], title: str) -> Path | None:
    """2-D MDS of the CE distances; every point labelled with its val accuracy (like the paper's figure)."""
    if not points or coords is None or len(coords) == 0:
        return None
    coords = np.asarray(coords)
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=DPI)
    for kind in dict.fromkeys(p["kind"] for p in points):  # the points' order: ingredients, soups, soft voting
        if (known := marker_of(kind)) is None:
            continue
        marker, color = known
        idx = [i for i, p in enumerate(points) if p["kind"] == kind]
        ax.scatter(coords[idx, 0], coords[idx, 1], marker=marker, c=color, s=140 if marker == "*" else 60,
                   label=KIND_NAMES.get(kind, f"{kind} soup"), edgecolors="black", linewidths=0.5, zorder=3)
    for (x, y), p in zip(coords, points):
        tag = p.get("tag") or (f"e{p['epoch']}" if p.get("epoch") is not None else "")  # which ingredient
        text = f"{100 * p['val_accuracy']:.2f}" + (f" ({tag})" if p["kind"] == "ingredient" and tag else "")
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_bias_variance(path: Path, groups: list[dict]) -> Path | None:
    """Grouped bars: CE bias²/variance and 0-1 bias/variance per group of models."""
    if not groups:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), dpi=DPI)
    panels = (("ce", ("bias2", "variance", "expected_loss"), "cross-entropy (Yang et al.)"),
              ("zero_one", ("bias", "variance", "net_variance", "expected_loss"), "0-1 loss (Domingos)"))
    width = 0.8 / max(1, len(groups))
    for ax, (key, terms, title) in zip(axes, panels):
        x = np.arange(len(terms))
        for i, g in enumerate(groups):
            ax.bar(x + i * width - 0.4 + width / 2, [g[key][t] for t in terms], width, label=g["label"])
        ax.set_xticks(x)
        ax.set_xticklabels([t.replace("_", " ") for t in terms], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_champion(path: Path, cm: np.ndarray, f1: np.ndarray, classes: list[str], title: str) -> Path | None:
    """Confusion matrix and per-class F1 of the champion."""
    if not classes or cm is None or np.size(cm) == 0:
        return None
    cm = np.asarray(cm)
    k = len(classes)
    fig, (a, b) = plt.subplots(1, 2, figsize=(6 + 0.45 * k, 3 + 0.3 * k), dpi=DPI,
                               gridspec_kw={"width_ratios": [3, 2]})
    a.imshow(cm, cmap="Blues")
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    a.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                           color="white" if cm[i, j] > cm.max() / 2 else "black")
    a.set_xticks(range(k))
    a.set_yticks(range(k))
    a.set_xticklabels(classes, rotation=90, fontsize=7)
    a.set_yticklabels(classes, fontsize=7)
    a.set_xlabel("predicted")
    a.set_ylabel("true")
    a.set_title(title, fontsize=9)
    b.barh(range(k), f1, color="#1f77b4")
    b.set_yticks(range(k))
    b.set_yticklabels(classes, fontsize=7)
    b.invert_yaxis()
    b.set_xlim(0, 1)
    b.set_xlabel("F1")
    b.set_title("per-class F1", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- forest

KIND_COLORS = {"soup": "#d62728", "soft_vote": "#1f77b4", "vote": "#1f77b4"}


def plot_forest(path: str | Path, rows: list[dict], *, metric: str, title: str) -> Path | None:
    """Every soup's and soft voting's Δ vs the best single model with its paired 95% interval, in percentage
    points (rows carry fractions, as paired_comparison gives them). Best on top; a solid interval excludes 0,
    a faded one crosses it."""
    rows = [{**r, "kind": "soft_vote" if r.get("kind") == "vote" else r.get("kind")}
            for r in rows or [] if _finite(r.get("delta"))]
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: float(r["delta"]))  # barh grows upwards: the largest Δ ends on top
    n = len(rows)
    fig, ax = plt.subplots(figsize=(8.5, min(40.0, 1.3 + 0.3 * n)), dpi=DPI)
    for y, r in enumerate(rows):
        d = 100 * float(r["delta"])
        lo = 100 * float(r["lo"]) if _finite(r.get("lo")) else d
        hi = 100 * float(r["hi"]) if _finite(r.get("hi")) else d
        color = KIND_COLORS.get(r.get("kind"), "#7f7f7f")
        clear = lo > 0 or hi < 0  # the interval excludes zero
        ax.plot([lo, hi], [y, y], "-", color=color, lw=2.0 if clear else 1.2, alpha=1.0 if clear else 0.55)
        ax.plot(d, y, "D" if r.get("kind") == "soft_vote" else "o", color=color, ms=5,
                mfc=color if clear else "white", zorder=3)
        interval = f" [{lo:+.2f}, {hi:+.2f}]" if _finite(r.get("lo")) and _finite(r.get("hi")) else " (no interval)"
        ax.annotate(f"{d:+.2f}{interval}", (1.0, y), xycoords=("axes fraction", "data"),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(n))
    ax.set_yticklabels([_short(r.get("label", "?")) for r in rows], fontsize=7)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"Δ {metric} vs best single (percentage points, paired 95% interval)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    kinds = list(dict.fromkeys(r.get("kind") for r in rows))
    for kind in kinds:
        ax.plot([], [], "D" if kind == "soft_vote" else "o", color=KIND_COLORS.get(kind, "#7f7f7f"),
                label={"soup": "soup", "soft_vote": "soft voting"}.get(kind, str(kind)))
    ax.plot([], [], "o", color="#7f7f7f", mfc="white", label="interval crosses 0")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- val vs test

ANNOTATE_MAX = 15  # marked points labelled one by one up to this many


def plot_val_test(path: str | Path, checkpoints: list[tuple[float, float]], marked: list[dict], *, metric: str,
                  title: str, diagonal: bool = True) -> Path | None:
    """The model-soups paper's Fig. 1: val vs test of every checkpoint (grey) with the best single model,
    soups and soft voting marked. Val selects, test is only read off."""
    points = [(float(v), float(t)) for v, t in checkpoints or [] if _finite(v) and _finite(t)]
    marked = [m for m in marked or [] if _finite(m.get("val")) and _finite(m.get("test"))]
    if not points and not marked:
        return None
    fig, ax = plt.subplots(figsize=(10.0, 5.4), dpi=DPI)
    if points:
        ax.scatter(*zip(*points), s=14, c="#b0b0b0", edgecolors="none", label=f"checkpoints ({len(points)})",
                   zorder=2)
    others = {}
    for m in marked:
        kind = str(m.get("kind", "other"))
        if marker_of(kind) is None and kind not in others:
            others[kind] = OTHER_STYLES[len(others) % len(OTHER_STYLES)]
    # few marked points: each numbered on the plot and named in the legend (labels beside clustered points
    # overlap); many: one legend entry per kind
    one_by_one = len(marked) <= ANNOTATE_MAX
    for kind in dict.fromkeys(str(m.get("kind", "other")) for m in marked):
        if (known := marker_of(kind)) is not None:
            marker, color = known
            name = KIND_NAMES.get(kind, f"{kind} soup")
        else:
            (marker, color), name = others.get(kind, ("o", "#7f7f7f")), kind.replace("_", " ")
        group = [(i, m) for i, m in enumerate(marked, 1) if str(m.get("kind", "other")) == kind]
        style = dict(marker=marker, c=color, s=180 if marker == "*" else 60, edgecolors="black", linewidths=0.6,
                     zorder=4)
        if not one_by_one:
            ax.scatter([m["val"] for _, m in group], [m["test"] for _, m in group], label=f"{name} ({len(group)})",
                       **style)
            continue
        for i, m in group:
            ax.scatter([m["val"]], [m["test"]], label=f"{i}. {name}: {_short(m.get('label', ''), 36)} "
                                                      f"({m['val']:.3f} / {m['test']:.3f})", **style)
            ax.annotate(str(i), (m["val"], m["test"]), textcoords="offset points", xytext=(5, 5), fontsize=7,
                        zorder=5)
    if diagonal:
        xs = [p[0] for p in points] + [m["val"] for m in marked]
        ys = [p[1] for p in points] + [m["test"] for m in marked]
        lo, hi = min(min(xs), min(ys)), max(max(xs), max(ys))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "--", color="#999999", lw=0.8, zorder=1, label="y = x")
    ax.set_xlabel(f"val {metric} (selects)")
    ax.set_ylabel(f"test {metric} (reported)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return _save(fig, path)


def plot_parameter_curve(path: str | Path, series: dict[str, list[tuple[float, float]]], *, x: str,
                         chosen: float | None, title: str) -> Path | None:
    """A recipe's parameter swept on val (WiSE-FT's α): one line per series ("val accuracy", "test accuracy"...),
    val solid, test dashed, and the chosen value marked (chosen on val; test is only read off)."""
    parsed = {name: sorted((float(a), float(v)) for a, v in pts or [] if _finite(a) and _finite(v))
              for name, pts in (series or {}).items()}
    parsed = {k: v for k, v in parsed.items() if v}
    if not parsed:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=DPI)
    cmap = plt.get_cmap("tab10")
    for i, (name, pts) in enumerate(parsed.items()):
        ax.plot(*zip(*pts), "--" if name.startswith("test") else "-", marker="o", ms=3.5, lw=1.3,
                color=cmap(i % 10), label=name)
    if _finite(chosen):
        ax.axvline(float(chosen), color="#d62728", lw=1.1, ls=":", label=f"chosen on val: {x} = {float(chosen):g}")
    ax.set_xlabel(x)
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- learning curves

def _curve(value) -> tuple[list[tuple[float, float]], bool]:
    if isinstance(value, dict):
        points, stopped = value.get("points") or [], bool(value.get("stopped"))
    else:
        points, stopped = value or [], False
    points = sorted((float(e), float(v)) for e, v in points if _finite(e) and _finite(v))
    return points, stopped


def plot_learning_curves(path: str | Path, curves: dict, *, metric: str, title: str,
                         soup_so_far: list[tuple[int, float]] | None = None) -> Path | None:
    """Val metric per epoch of every trial (an x where ASHA stopped one) and, on a second panel, the
    soup-so-far val metric after each finished trial."""
    parsed = {str(label): _curve(v) for label, v in (curves or {}).items()}
    parsed = {k: v for k, v in parsed.items() if v[0]}
    soup = sorted((float(n), float(v)) for n, v in soup_so_far or [] if _finite(n) and _finite(v))
    if not parsed and not soup:
        return None
    panels = int(bool(parsed)) + int(bool(soup))
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.4), dpi=DPI, squeeze=False)
    axes = list(axes[0])
    if parsed:
        ax = axes[0]
        n = len(parsed)
        if n <= LEGEND_MAX:
            named = list(parsed)
        else:  # too many for a legend: the best few (by their best epoch) drawn bold and named, the rest faint
            known = metric_of_key(metric)  # "macro_f1", or "soup_macro_f1" under the soup objective
            sign = -1.0 if known and not known.higher_is_better else 1.0
            named = sorted(parsed, key=lambda k: -max(sign * v for _, v in parsed[k][0]))[:TOP_NAMED]
        cmap = plt.get_cmap("tab10")
        for label, (points, stopped) in parsed.items():
            if label in named:
                ax.plot(*zip(*points), "-", marker="." if len(points) < 30 else None, lw=1.4, zorder=3,
                        color=cmap(named.index(label) % 10), label=_short(label, 24))
            else:
                ax.plot(*zip(*points), "-", color="#9a9a9a", lw=0.8, alpha=0.5, zorder=2)
            if stopped:
                ax.plot(*points[-1], "x", color="black", ms=6, mew=1.4, zorder=4)
        if n > LEGEND_MAX:
            ax.plot([], [], "-", color="#9a9a9a", lw=0.8, label=f"the other {n - len(named)} trials")
        if any(stopped for _, stopped in parsed.values()):
            ax.plot([], [], "x", color="black", mew=1.4, ls="none", label="stopped by ASHA")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"val {metric}")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", ncol=2 if len(named) > 6 else 1)
    if soup:
        ax = axes[-1]
        ax.step(*zip(*soup), where="post", color="#d62728", lw=1.2)
        ax.plot(*zip(*soup), "o", color="#d62728", ms=4)
        ax.set_xlabel("trials finished")
        ax.set_ylabel(f"soup-so-far val {metric}")
        ax.set_title("soup so far" if parsed else title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- optuna

def _complete(study) -> tuple[list | None, str | None]:
    """Complete trials of a single-objective study, or why there is nothing to plot."""
    try:
        import optuna
        if len(study.directions) != 1:
            return None, f"study '{study.study_name}' has {len(study.directions)} objectives; plots need one"
        trials = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                  if _finite(t.value)]
    except Exception as e:  # a study that cannot be read is a reason, not a crash of the report
        return None, f"study could not be read: {type(e).__name__}: {e}"
    if len(trials) < 2:
        return None, f"study '{study.study_name}' has {len(trials)} complete trial(s); need at least 2"
    return trials, None


def plot_optuna_history(path: str | Path, study, *, metric: str | None = None) -> tuple[Path | None, str | None]:
    """Objective value of every complete trial in order, with the best value so far."""
    trials, reason = _complete(study)
    if trials is None:
        return None, reason
    import optuna
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    xs = [t.number for t in trials]
    ys = [float(t.value) for t in trials]
    best = list(np.maximum.accumulate(ys) if maximize else np.minimum.accumulate(ys))
    n_pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.get_trials(deepcopy=False))
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=DPI)
    ax.scatter(xs, ys, s=18, c="#1f77b4", label="objective value", zorder=3)
    ax.step(xs, best, where="post", color="#d62728", lw=1.3, label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"{metric or 'objective'} ({'maximize' if maximize else 'minimize'})")
    extra = f", {n_pruned} pruned" if n_pruned else ""
    ax.set_title(f"Optuna history: {study.study_name} ({len(trials)} complete{extra})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path), None


def plot_param_importances(path: str | Path, study) -> tuple[Path | None, str | None]:
    """fANOVA importances (optuna.importance.get_param_importances) of the parameters every complete trial has."""
    trials, reason = _complete(study)
    if trials is None:
        return None, reason
    params = set.intersection(*(set(t.params) for t in trials))
    if len(params) < 2:
        return None, (f"study '{study.study_name}' has {len(params)} parameter(s) common to its complete trials; "
                      "importances need at least 2")
    try:
        import optuna
        from optuna.importance import FanovaImportanceEvaluator, get_param_importances
        # only the trials with a finite value: one inf (a diverged trial) would make every importance NaN
        finite = optuna.create_study(study_name=study.study_name, direction=study.direction)
        finite.add_trials(trials)
        imp = get_param_importances(finite, evaluator=FanovaImportanceEvaluator(seed=0))
    except Exception as e:  # e.g. zero variance of the objective: no importances to draw
        return None, f"importances could not be computed: {type(e).__name__}: {e}"
    imp = {k: float(v) for k, v in imp.items() if _finite(v)}
    if not imp:
        return None, "importances could not be computed: no finite values"
    names = sorted(imp, key=imp.get)  # barh grows upwards: the most important on top
    fig, ax = plt.subplots(figsize=(7.0, 1.4 + 0.35 * len(names)), dpi=DPI)
    ax.barh(range(len(names)), [imp[k] for k in names], color="#1f77b4")
    for y, k in enumerate(names):
        ax.annotate(f"{imp[k]:.2f}", (imp[k], y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([_short(k, 40) for k in names], fontsize=8)
    ax.set_xlim(0, max(1e-9, max(imp.values())) * 1.15)
    ax.set_xlabel("importance (fANOVA, normalized)")
    ax.set_title(f"Optuna parameter importances: {study.study_name} ({len(trials)} complete trials)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path), None
