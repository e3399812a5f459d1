"""The report's sections as data (title, text, tables, figures, files): the results table and each figure's section,
each writing its data files and figure to the report folder; `Report` holds them, in page order."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ich.metrics import METRICS, classification_metrics, confusion_matrix, per_class_prf
from soups import recipes
from soups.analysis import bias_variance_01, bias_variance_ce, ce_distance_matrix, mds_embed, softmax
from soups.logit_store import soft_vote_logits
from soups.plots import (plot_bias_variance, plot_champion, plot_forest, plot_learning_curves, plot_mds,
                         plot_optuna_history, plot_parameter_curve, plot_param_importances, plot_val_test,
                         trial_labels)
from soups.report.predictions import Predictions
from soups.report.selection import Selection, arch_name
from soups.report.snapshot import Candidate, Snapshot, SoupRun
from soups.soup_record import json_safe, predictions_sha256
from soups.stats import bootstrap_ci, interval_metrics, paired_comparison
from soups.store.tags import TAG_BEST_SINGLE, TAG_BOOTSTRAP, TAG_INGREDIENTS

FAMILY_NAMES = {"coatnet": "CoAtNet", "resnet": "ResNet", "densenet": "DenseNet", "vit": "ViT"}
SEED = 0  # bootstrap resamples: the same images for every row
ALPHA = 0.05  # 95% intervals


@dataclass
class Table:
    header: list[str]
    lines: list[list[str]]


@dataclass
class Section:
    """One part of the page as data; render_markdown and render_html draw the same sections."""
    title: str  # "" for the untitled introduction
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (png file name, what it shows)
    files: list[str] = field(default_factory=list)  # data files beside it, named under "Files:"
    items: list[str] = field(default_factory=list)  # a bullet list

    def written(self) -> list[str]:
        return self.files + [name for name, _ in self.figures]


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def _vote_logits(preds: Predictions, members: list[Candidate], split: str) -> np.ndarray:
    """Soft voting as log-probabilities (mean of logits, softmax), so argmax and metrics read it like logits."""
    return soft_vote_logits(preds.logits(c.id, split) for c in members)


def table_row(key: str, label: str, kind: str, logits: np.ndarray, y: np.ndarray, k: int, *, n_resamples: int,
              reference: np.ndarray | None = None, logged: dict | None = None, **info) -> dict:
    """One row of the results table: point metrics, 95% bootstrap intervals, paired comparison with reference.
    logged (logged_figures): intervals and the paired comparison already computed on the same predictions, taken
    as they are instead of bootstrapping again."""
    pred = logits.argmax(1)
    logged = logged or {}
    row = {"key": key, "label": label, "kind": kind, **info, **classification_metrics(y, pred, k)}
    for metric in interval_metrics():
        if "ci" in logged:
            row[f"{metric.name}_ci"] = logged["ci"][metric.name]
        else:
            ci = bootstrap_ci(y, pred, metric.name, n_resamples=n_resamples, alpha=ALPHA, seed=SEED, num_classes=k)
            row[f"{metric.name}_ci"] = [ci.low, ci.high]
    if reference is None:
        row["vs_best_single"] = None
    elif "vs_best_single" in logged:
        row["vs_best_single"] = logged["vs_best_single"]
    else:
        row["vs_best_single"] = paired_comparison(y, pred, reference.argmax(1), n_resamples=n_resamples, alpha=ALPHA,
                                                  seed=SEED, num_classes=k)
    return row


def _paired_keys() -> list[str]:
    """The keys paired_comparison returns (soups/stats.py), in its order."""
    return [f"{m.diff_name}_diff{end}" for m in interval_metrics() for end in ("", "_low", "_high")] + [
        "mcnemar_b", "mcnemar_c", "mcnemar_p"]


def logged_figures(run: SoupRun | None, split: str, n_resamples: int, pred: np.ndarray,
                   reference: tuple[str, np.ndarray] | None) -> dict:
    """What table_row may take from a soup's run instead of recomputing (`ich soup` bootstrapped the same test
    predictions; soups/soup_record.py): "ci" (test_<metric>_low/high) when the run's bootstrap had this table's
    split, resamples, alpha and seed and these very predictions (sha256); "vs_best_single" (vs_best_*) when, besides,
    it compared with this block's best single (model id) on the same predictions of it. Anything else is recomputed,
    so taking a figure changes the cost, never the number."""
    if run is None or split != "test":
        return {}
    try:
        boot = json.loads(run.tags.get(TAG_BOOTSTRAP) or "null")
    except ValueError:
        return {}
    settings = [n_resamples, ALPHA, SEED]
    if (not isinstance(boot, dict) or [boot.get(k) for k in ("n_resamples", "alpha", "seed")] != settings
            or boot.get("predictions_sha256") != predictions_sha256(pred)):
        return {}
    m, out = run.metrics, {}
    bounds = {metric.name: (f"test_{metric.name}_low", f"test_{metric.name}_high") for metric in interval_metrics()}
    if all(lo in m and hi in m for lo, hi in bounds.values()):  # a non-finite figure is not logged: recompute
        out["ci"] = {name: [m[lo], m[hi]] for name, (lo, hi) in bounds.items()}
    if (reference is not None and run.tags.get(TAG_BEST_SINGLE) == reference[0]
            and boot.get("best_single_predictions_sha256") == predictions_sha256(reference[1])
            and all(f"vs_best_{k}" in m for k in _paired_keys())):
        out["vs_best_single"] = {k: m[f"vs_best_{k}"] for k in _paired_keys()}
    return out


def table_metrics() -> list:
    """The registered metrics the results table shows (ich/metrics.py: accuracy, macro P/R/F1, ...), in order."""
    return [m for m in METRICS.values() if m.table]


def table_lines(rows: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """The results table: a column per table metric (with its 95% interval for the interval metrics), then the
    paired difference of each interval metric vs the best single, then McNemar's p."""
    shown, paired = table_metrics(), interval_metrics()
    header = ["model", "ingredients", f"val {metric} (selects)",
              *(f"{m.column} %" + (" [95% CI]" if m.interval else "") for m in shown),
              *(m.delta_label + (" vs best single" if i == 0 else "") + " [95% CI]" for i, m in enumerate(paired)),
              "McNemar p"]
    lines = []
    for r in rows:
        vs = r["vs_best_single"]
        lines.append([
            r["label"], str(r.get("n_ingredients") or 1), "-" if r.get("val_score") is None else f"{r['val_score']:.4f}",
            *(_pct(r[m.name]) + (f" [{_pct(r[m.name + '_ci'][0])}, {_pct(r[m.name + '_ci'][1])}]" if m.interval else "")
              for m in shown),
            *("-" if vs is None else f"{_signed(vs[d + '_diff'])} [{_signed(vs[d + '_diff_low'])}, "
              f"{_signed(vs[d + '_diff_high'])}]" for d in (m.diff_name for m in paired)),
            "-" if vs is None else f"{vs['mcnemar_p']:.3g}"])
    return header, lines


def md_table(header: list[str], lines: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|")
    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _where(soup: Candidate) -> str:
    """Which soup of the block this is: its scope (and trial or name), and its ingredient pool when recorded."""
    where = f"within trial {soup.record.trial}" if soup.scope == "within" else f"across runs: {soup.record.name}"
    pool = soup.record.tags.get(TAG_INGREDIENTS)  # the pool rule (soups/pool.py), on soups that record one
    return f"{where}, pool {pool}" if pool else where


def results_rows(sel: Selection, preds: Predictions, split: str, n_resamples: int,
                 soup_runs: dict[str, SoupRun] | None = None) -> list[dict]:
    """The paper's layout: the baselines, then one block per CoAtNet architecture (best single, uniform soup,
    greedy soup, soft voting of each soup's ingredients); every block row is compared with its block's best single.
    A soup row takes the intervals its run logged when they are the same numbers (soup_runs: logged_figures)."""
    soup_runs = soup_runs or {}
    data = preds.dataset
    y, k = data.splits[split].labels, data.num_classes

    def info(c: Candidate, **more) -> dict:
        return {"model_id": c.id, "architecture": c.record.architecture, "family": c.family, "sweep": c.record.sweep,
                "trial": c.record.trial if c.kind == "checkpoint" or c.scope == "within" else None,
                "epoch": c.record.epoch if c.kind == "checkpoint" else None, "val_score": c.score, **more}

    rows = []
    for fam, c in sel.baselines.items():
        rows.append(table_row(f"baseline_{fam}", f"{FAMILY_NAMES.get(fam, fam)} ({c.record.architecture})", "baseline",
                              preds.logits(c.id, split), y, k, n_resamples=n_resamples, **info(c)))
    for block in sel.blocks:
        arch, b = block.architecture, block.best
        name = arch_name(arch)
        reference = preds.logits(b.id, split)
        rows.append(table_row(f"{arch}_single", f"{name} ({arch}), best single: trial {b.record.trial} epoch "
                                                f"{b.record.epoch}", "single", reference, y, k,
                              n_resamples=n_resamples, **info(b, block=arch)))
        votes = []
        for recipe, soup in block.soups.items():
            members = sel.ingredients.get(soup.id)
            n = len(members) if members else None
            logits = preds.logits(soup.id, split)
            logged = logged_figures(soup_runs.get(soup.id), split, n_resamples, logits.argmax(1),
                                    (b.id, reference.argmax(1)))
            rows.append(table_row(f"{arch}_{recipe}_soup", f"{name} + {recipe} soup ({_where(soup)})", "soup",
                                  logits, y, k, n_resamples=n_resamples, reference=reference, logged=logged,
                                  **info(soup, block=arch, scope=soup.scope, recipe=recipe, name=soup.record.name,
                                         n_ingredients=n)))
            if members:
                votes.append(table_row(f"{arch}_{recipe}_vote", f"{name} soft voting (the {recipe} soup's "
                                                                f"ingredients, {_where(soup)})", "soft_vote",
                                       _vote_logits(preds, members, split), y, k, n_resamples=n_resamples,
                                       reference=reference, block=arch, scope=soup.scope, recipe=recipe,
                                       n_ingredients=n, val_score=None,
                                       trial=soup.record.trial if soup.scope == "within" else None,
                                       ingredients=[c.id for c in members], architecture=arch, family="coatnet"))
        rows += votes  # the paper's rows first (single, uniform, greedy), then soft voting
    return rows


def results_section(rows: list[dict], split: str, metric: str, out: Path) -> Section:
    header, lines = table_lines(rows, metric)
    (out / "results.json").write_text(json.dumps(json_safe({"split": split, "metric": metric, "rows": rows}),
                                                 indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "results.md").write_text(f"# Results on {split}\n\n{md_table(header, lines)}\n", encoding="utf-8")
    return Section(f"Results on {split}", tables=[Table(header, lines)], files=["results.md", "results.json"])


def _forest_label(row: dict) -> str:
    """Short enough for a figure's axis: which block, what it is and where (the table's label says the rest)."""
    where = f"within trial {row['trial']}" if row.get("scope") == "within" and row.get("trial") else row.get("scope", "")
    name = arch_name(row.get("block") or row.get("architecture", ""))
    if row["kind"] == "soft_vote":
        return f"{name} soft voting, {row.get('recipe')} soup's ingredients ({where})"
    return f"{name} {row.get('recipe')} soup ({where})" if row["kind"] == "soup" else row["label"]


def forest_rows(rows: list[dict]) -> list[dict]:
    """Every row compared with the best single (soups, soft voting): Δ accuracy and its paired 95% interval,
    the very numbers of the table."""
    return [{"key": r["key"], "label": _forest_label(r), "kind": r["kind"], "delta": r["vs_best_single"]["acc_diff"],
             "lo": r["vs_best_single"]["acc_diff_low"], "hi": r["vs_best_single"]["acc_diff_high"]}
            for r in rows if r.get("vs_best_single")]


def forest_section(rows: list[dict], split: str, out: Path) -> tuple[list[dict], Section | None]:
    forest = forest_rows(rows)
    if not plot_forest(out / "forest.png", forest, metric="accuracy",
                       title=f"soups and soft voting vs the best single of their architecture ({split})"):
        return forest, None
    text = (f"Δ accuracy on {split} of every soup and soft voting row vs the best single checkpoint of its "
            "architecture, in percentage points, with the paired bootstrap 95% interval of the table; the line at 0 "
            "is that best single. "
            "A filled marker: the interval excludes 0.")
    return forest, Section(f"Δ vs the best single (forest plot, {split})", text,
                           figures=[("forest.png", "Forest plot of Δ accuracy vs the best single")])


def val_test_section(sel: Selection, preds: Predictions, out: Path) -> tuple[dict, Section | None]:
    """Val vs test accuracy of every checkpoint of the focus architecture, with its block's models marked."""
    data = preds.dataset
    block = sel.focus

    def acc(logits_of) -> tuple[float, float]:
        return tuple(classification_metrics(data.splits[s].labels, logits_of(s).argmax(1), data.num_classes)
                     ["accuracy"] for s in ("val", "test"))

    points = [{"model_id": c.id, "trial": c.record.trial, "epoch": c.record.epoch,
               **dict(zip(("val", "test"), acc(lambda s, c=c: preds.logits(c.id, s))))} for c in block.pool]
    marked = []
    b = block.best
    marked.append({"label": "best single", "kind": "best_single", "model_id": b.id,
                   **dict(zip(("val", "test"), acc(lambda s: preds.logits(b.id, s))))})
    for recipe, soup in block.soups.items():
        marked.append({"label": f"{recipe} soup ({soup.scope})", "kind": recipe, "model_id": soup.id,
                       **dict(zip(("val", "test"), acc(lambda s, soup=soup: preds.logits(soup.id, s))))})
        members = sel.ingredients.get(soup.id)
        if members:
            marked.append({"label": f"{recipe} soup's ingredients ({soup.scope})", "kind": "soft_vote",
                           **dict(zip(("val", "test"), acc(lambda s, m=members: _vote_logits(preds, m, s))))})
    result = {"metric": "accuracy", "architecture": block.architecture, "checkpoints": points, "marked": marked}
    if not plot_val_test(out / "val_test.png", [(p["val"], p["test"]) for p in points], marked, metric="accuracy",
                         title=f"val vs test: {len(points)} checkpoints of {block.architecture}"):
        return result, None
    text = (f"Val vs test accuracy of every checkpoint of {block.architecture} ({len(points)}, grey) with its "
            "best single, soups and soft voting marked (the model-soups paper's Fig. 1). Val selects; test is "
            "only read off.")
    (out / "val_test.json").write_text(json.dumps(json_safe(result), indent=2), encoding="utf-8")
    return result, Section("Val vs test", text, figures=[("val_test.png", "Val vs test of every checkpoint")],
                           files=["val_test.json"])


def parameter_curve_sections(sel: Selection, snap: Snapshot, out: Path) -> tuple[dict, list[Section]]:
    """For each recipe soup of the focus block whose recipe swept a parameter on val (WiSE-FT's α): val and test
    accuracy (and val of the selection metric) along it, the chosen value marked; one figure per recipe."""
    block, data, sections = sel.focus, {}, []
    for recipe, soup in block.soups.items():
        curve = snap.curves.get(soup.id)
        if not curve:
            continue
        name = f"{recipe}_curve.png"
        x, chosen = curve["x"], curve["chosen"]
        if plot_parameter_curve(out / name, curve["series"], x=x, chosen=chosen,
                                title=f"{recipe} soup {soup.record.name}: scores along {x}") is None:
            continue
        data[recipe] = {"model_id": soup.id, "soup": soup.record.name, "x": x, "chosen": chosen,
                        "series": curve["series"], "figure": name}
        text = (f"The {recipe} soup of {block.architecture} ({_where(soup)}, {soup.record.name}): val and test "
                f"accuracy at every {x} of its grid, as logged on its run (metrics {x}_<split>_<metric>, step = "
                f"round(100·{x})); {x} = {chosen if chosen is None else f'{chosen:g}'} was chosen on val, test is "
                "only read off.")
        sections.append(Section(f"{recipe}: the {x} curve", text, figures=[(name, f"{recipe} {x} curve")]))
    return data, sections


def learning_curves_section(snap: Snapshot, out: Path) -> tuple[dict | None, Section | None]:
    """Each trial's val curve (an x where ASHA stopped it) and the soup so far after each finished trial."""
    trials = [t for t in snap.trials if t.history]
    if not trials and not snap.soup_so_far:
        return None, None
    labels = trial_labels([t.trial for t in trials])
    curves = {labels[t.trial]: {"points": t.history, "stopped": t.stopped} for t in trials}
    metric = snap.curve_key[len("val_"):] if snap.curve_key.startswith("val_") else snap.curve_key
    path = plot_learning_curves(out / "learning_curves.png", curves, metric=metric,
                                title=f"trials of sweep {snap.sweep} ({snap.curve_key} per epoch)",
                                soup_so_far=snap.soup_so_far or None)
    result = {"key": snap.curve_key, "sweep_run_id": snap.sweep_run_id,
              "trials": [{"trial": t.trial, "label": labels[t.trial], "run_id": t.run_id, "status": t.status,
                          "history": t.history} for t in trials],
              "soup_so_far_key": snap.soup_so_far_key, "soup_so_far": snap.soup_so_far}
    if path is None:
        return result, None
    stopped = sum(t.stopped for t in trials)
    text = (f"{snap.curve_key} per epoch of the {len(trials)} trials of sweep run {snap.sweep_run_id} "
            f"({stopped} stopped by ASHA, marked x); labels are the shortest unique part of each trial id.")
    if snap.soup_so_far:
        text += (f" Right: {snap.soup_so_far_key} of the across-run greedy soup built while the sweep ran, after each "
                 "finished trial.")
    (out / "learning_curves.json").write_text(json.dumps(json_safe(result), indent=2), encoding="utf-8")
    return result, Section("Learning curves", text, figures=[("learning_curves.png", "Trial learning curves")],
                           files=["learning_curves.json"])


def optuna_section(snap: Snapshot, out: Path, notes: list[str]) -> tuple[dict | None, Section | None]:
    if snap.optuna is None:
        return None, None
    study = snap.optuna.study()
    figures, result = [], {"study": snap.optuna.study_name, "storage": snap.optuna.storage,
                           "direction": snap.optuna.direction, "trials": len(snap.optuna.trials)}
    for name, plot, what in (("optuna_history.png", plot_optuna_history, "Optuna optimization history"),
                             ("optuna_importances.png", plot_param_importances, "Optuna parameter importances")):
        path, reason = plot(out / name, study)
        if path is None:
            notes.append(f"no {what.lower()}: {reason}")
        else:
            figures.append((name, what))
    result["figures"] = [name for name, _ in figures]
    if not figures:
        return result, None
    text = (f"Optuna study {snap.optuna.study_name!r} ({snap.optuna.storage}, {snap.optuna.direction}, "
            f"{len(snap.optuna.trials)} trials): the objective of every complete trial with the best so far, and "
            "fANOVA parameter importances.")
    return result, Section("Optuna study", text, figures=figures)


def mds_section(sel: Selection, preds: Predictions, out: Path) -> tuple[dict | None, Section | None]:
    """The paper's figure: CE distances on val between the best soup's recorded ingredients, its block's greedy and
    uniform soups and soft voting of those ingredients, embedded by metric MDS, each labelled with its val accuracy."""
    soup = sel.mds_soup
    if soup is None:
        return None, None
    members, block = sel.ingredients[soup.id], sel.focus
    points, probs = [], []
    y, k = preds.dataset.splits["val"].labels, preds.dataset.num_classes

    def add(name: str, kind: str, logits: np.ndarray, **info) -> None:
        points.append({"name": name, "kind": kind, **info,
                       "val_accuracy": classification_metrics(y, logits.argmax(1), k)["accuracy"]})
        probs.append(softmax(logits))

    one_trial = len({c.record.trial for c in members}) == 1
    short = trial_labels(c.record.trial for c in members)
    for c in members:
        name = f"epoch {c.record.epoch}" if one_trial else f"trial {c.record.trial} epoch {c.record.epoch}"
        tag = f"e{c.record.epoch}" if one_trial else f"{short[c.record.trial]} e{c.record.epoch}"
        add(name, "ingredient", preds.logits(c.id, "val"), model_id=c.id, trial=c.record.trial, epoch=c.record.epoch,
            tag=tag)
    for recipe in reversed(recipes.names()):  # the figure's order: greedy before uniform
        if (s := block.soups.get(recipe)) is not None:
            add(f"{recipe} soup", recipe, preds.logits(s.id, "val"), model_id=s.id, scope=s.scope, soup=s.record.name)
    add("soft voting", "soft_vote", _vote_logits(preds, members, "val"), ingredients=[c.id for c in members])
    D = ce_distance_matrix(probs)
    coords = mds_embed(D)
    for p, (x1, x2) in zip(points, coords):
        p["mds"] = [float(x1), float(x2)]
    names = [p["name"] for p in points]
    with open(out / "ce_distance.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([""] + names)
        for name, row in zip(names, D):
            w.writerow([name] + [f"{v:.6f}" for v in row])
    what = f"{arch_name(soup.record.architecture)} {soup.recipe} soup ({_where(soup)})"
    result = {"split": "val", "architecture": soup.record.architecture,
              "soup": {"model_id": soup.id, "name": soup.record.name, "recipe": soup.recipe, "scope": soup.scope,
                       "trial": soup.record.trial if soup.scope == "within" else None},
              "ingredients": [c.id for c in members], "points": points, "matrix": D.tolist()}
    (out / "ce_distance.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot_mds(out / "mds.png", coords, points, f"CE distance, metric MDS (val): the ingredients of the {what}; "
                                              "labels = val accuracy %")
    text = (f"Pairwise cross-entropy distance on val between the {len(members)} ingredients of the best soup by val, "
            f"the {what}, the greedy and uniform soups of {block.architecture} in the table, and soft voting of those "
            "ingredients, embedded in 2-D by metric MDS; labels are val accuracy % (the paper's figure).")
    return result, Section("Cross-entropy distance and MDS (val)", text, figures=[("mds.png", "MDS of CE distances")],
                           files=["ce_distance.csv", "ce_distance.json"])


def _decomposition(key: str, label: str, scope: str, models: list[Candidate], preds: Predictions, split: str) -> dict:
    y, k = preds.dataset.splits[split].labels, preds.dataset.num_classes
    logits = np.stack([preds.logits(c.id, split) for c in models])
    return {"key": key, "label": label, "scope": scope, "models": [c.id for c in models],
            "ce": bias_variance_ce(softmax(logits), y), "zero_one": bias_variance_01(logits.argmax(-1), y, k)}


def bias_variance_section(sel: Selection, preds: Predictions, split: str, out: Path) -> tuple[dict | None, Section | None]:
    """Two studies of the focus architecture. Across trials (at least 2 souped): their best single checkpoints vs
    their within-trajectory soups. Within one trajectory (the paper's case): the checkpoints the soup trial's uniform
    soup averaged, as the models, beside that trial's soups (one model each: no variance, its whole loss is bias)."""
    groups, text = [], []
    trials = [t["trial"] for t in sel.bias_variance] if len(sel.bias_variance) >= 2 else []  # those of the study
    if trials:
        for key in (k for k in sel.bias_variance[0] if k != "trial"):  # single, then the recipes' soups
            label = "best single per trial" if key == "single" else f"{key} soup per trial"
            groups.append(_decomposition(key, label, "across_trials", [t[key] for t in sel.bias_variance], preds, split))
        text.append(f"Across {len(trials)} trials: their best single checkpoints vs their within-trajectory soups.")
    block = sel.focus
    uniform = block.within.get("uniform")
    members = sel.ingredients.get(uniform.id) if uniform else None
    trajectory = None
    if members and len(members) >= 2:
        trial = block.soup_trial
        groups.append(_decomposition("trajectory", f"trial {trial}'s {len(members)} ingredients", "trajectory", members,
                                     preds, split))
        for recipe, soup in block.within.items():
            groups.append(_decomposition(f"trajectory_{recipe}", f"trial {trial}'s {recipe} soup", "trajectory", [soup],
                                         preds, split))
        trajectory = {"trial": trial, "soup": uniform.id, "ingredients": [c.id for c in members]}
        text.append(f"Within trial {trial}'s trajectory: the {len(members)} checkpoints its uniform soup averaged, "
                    "beside its soups (one model each, so no variance).")
    if not groups:
        return None, None
    result = {"split": split, "architecture": block.architecture, "trials": trials, "trajectory": trajectory,
              "groups": groups}
    header = ["models", "M", "CE expected loss", "CE bias²", "CE variance", "0-1 expected loss", "0-1 bias",
              "0-1 variance", "0-1 net variance"]
    lines = [[g["label"], str(len(g["models"])), *(f"{g['ce'][t]:.4f}" for t in ("expected_loss", "bias2", "variance")),
              *(f"{g['zero_one'][t]:.4f}" for t in ("expected_loss", "bias", "variance", "net_variance"))]
             for g in groups]
    result["table"] = {"header": header, "lines": lines}
    (out / "bias_variance.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "bias_variance.md").write_text(f"# Bias-variance decomposition ({split})\n\n{md_table(header, lines)}\n",
                                          encoding="utf-8")
    plot_bias_variance(out / "bias_variance.png", groups)
    text.append(f"{block.architecture}, on {split}. CE: Yang et al. (bias² + variance = expected loss); 0-1: Domingos.")
    return result, Section("Bias-variance", " ".join(text), tables=[Table(header, lines)],
                           figures=[("bias_variance.png", "Bias-variance")],
                           files=["bias_variance.md", "bias_variance.json"])


def champion_section(champ: Candidate, source: str, preds: Predictions, split: str, out: Path) -> tuple[dict, Section]:
    data = preds.dataset
    y, k = data.splits[split].labels, data.num_classes
    pred = preds.logits(champ.id, split).argmax(1)
    cm = confusion_matrix(y, pred, k)
    precision, recall, f1 = per_class_prf(cm)
    result = {"source": source, "model_id": champ.id, "name": champ.record.name, "kind": champ.kind,
              "architecture": champ.record.architecture, "split": split, "classes": data.classes,
              "metrics": classification_metrics(y, pred, k), "confusion_matrix": cm.tolist(),
              "per_class": [{"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                            for c, p, r, f, s in zip(data.classes, precision, recall, f1, cm.sum(1))]}
    (out / "champion.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    plot_champion(out / "champion.png", cm, f1, data.classes, f"champion {champ.record.name} ({split})")
    text = (f"{result['name']} ({result['model_id']}, {source}): accuracy {_pct(result['metrics']['accuracy'])} %, "
            f"macro F1 {_pct(result['metrics']['macro_f1'])} % on {split}.")
    return result, Section("Champion", text, figures=[("champion.png", "Champion confusion matrix and per-class F1")],
                           files=["champion.json"])



@dataclass
class Report:
    """The computed report: the summary (report.json) and the sections of the page, in order."""
    title: str
    summary: dict
    sections: list[Section]

    def files(self) -> list[str]:
        return [name for s in self.sections for name in s.written()]
