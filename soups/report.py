"""The report: the paper's table, its figures and a bias-variance study, from MLflow records alone.

    build_report("ich17", "reports/ich17")          # or: ich report --experiment ich17 --out reports/ich17

Files: soups/report_snapshot.py reads (Snapshot, read_snapshot: every MLflow/Optuna read); this file computes,
renders and writes (compute_report, sections, renderers, build_report, `ich report`) and re-exports the reads.

Three phases, so the math is testable without a server:
  1. read_snapshot (soups/report_snapshot.py): the sweep's record, read once (searches, never local paths) into a `Snapshot`:
     - checkpoints (LoggedModels ich.kind=checkpoint) of every sweep of the experiment: the CoAtNet trials and the
       baselines, told apart by architecture family (ich.models.family), not by sweep name;
     - soups (LoggedModels ich.kind=soup, built by soups/orchestrate.py), their tags and accepted ingredients;
     - the latest sweep run: its trial runs (val metric per epoch, final status: stopped by ASHA or not) and its
       `soup_so_far_val_<metric>` history;
     - the `champion` alias of the registered model the soups were registered under (--registered-model; by
       default the name on the newest soup run's ich.registered_model tag, else "<experiment>-soup");
     - the sweep's Optuna study, when its storage is known (--optuna-storage, or $ICH_HOME/optuna.db when the
       sweep run's ich.optuna_storage tag names it; another tag is shown, never opened): its trials, copied out of
       the database, opened read-only.
  2. compute_report: selection by val, logits (cached per model id; weights pulled and sha256-verified only for
     models not cached yet), every section as data: title, text, tables, figures, files.
  3. render: one Markdown and one HTML renderer over the same sections; then the report run in MLflow.
What it writes (to DIR, and as artifacts of a report run: ich.kind=report, child of the latest sweep run):
  results.md/.json        the paper's table: the best of each baseline family first, then one block per CoAtNet
                          architecture (by name): its best single checkpoint, its best soup of each registered
                          recipe (soups/recipes/: uniform, greedy...; the best single's trial's within-trajectory
                          soups and the across-run soups compete, by val; the label says which, and the soup's
                          ingredient pool when it records one), soft voting of each soup's ingredients; accuracy,
                          macro P/R/F1, 95% bootstrap intervals, paired difference vs the block's best single and
                          McNemar's exact p
  forest.png              every soup's and soft voting's Δ accuracy vs its block's best single, paired 95% interval
  val_test.png            val vs test accuracy of every checkpoint of the focus architecture (grey), its best single,
                          soups and soft voting marked (the model-soups paper's Fig. 1)
  <recipe>_curve.png      for a recipe that sweeps a parameter on val (wise_ft: α), its focus-block soup's val and
                          test accuracy along it (logged on the soup's run by step), the chosen value marked
  learning_curves.png     val metric per epoch of every trial of the sweep run (ASHA stops marked) and the soup
                          so far after each finished trial
  optuna_history.png, optuna_importances.png   the sweep's Optuna study (when its storage is reachable)
  ce_distance.json/.csv   pairwise cross-entropy distances on val: the best soup's recorded ingredients, the soups
                          of its block (greedy, uniform, ...), soft voting of those ingredients (the paper's figure)
  mds.png                 their metric-MDS embedding, each point labelled with its val accuracy
  bias_variance.md/.json/.png   CE (Yang et al.) and 0-1 (Domingos) decompositions: within one trajectory (the
                          checkpoints the soup trial's uniform soup averaged, beside its soups) and, with 2 or more
                          souped trials, across trials (best singles vs trajectory soups)
  champion.json/.png      confusion matrix and per-class F1 of the champion
  report.md, report.html  everything on one page; report.json the whole summary
Selection looks at recorded val metrics only; test is only reported (docs: split discipline). A soup is compared
with the best single of its own architecture (a CoAtNet-0 soup with a CoAtNet-0). The focus architecture of the
figures is that of the best soup by val (of the best single CoAtNet when there are no soups).
Logits are cached per model id and split in $ICH_HOME/cache/predictions/<dataset fingerprint>/: a model runs once.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ich.data import ICHDataset, load_dataset
from ich.metrics import METRICS, classification_metrics, confusion_matrix, metric_names, per_class_prf
from soups import provenance, recipes, registry
from soups.analysis import bias_variance_01, bias_variance_ce, ce_distance_matrix, mds_embed, softmax
from soups.champion import ALIAS
from soups.logit_store import cached_logits_path, prediction_cache, save_cached_logits, soft_vote_logits
from soups.evaluate import EvalSpec, Evaluator
from soups.plots import (plot_bias_variance, plot_champion, plot_forest, plot_learning_curves, plot_mds,
                         plot_optuna_history, plot_parameter_curve, plot_param_importances, plot_val_test,
                         trial_labels)
from soups.report_snapshot import (RUNS_PAGE, TAG_OPTUNA_STORAGE, TAG_REGISTERED_MODEL,  # noqa: F401 re-exported
                                    TRIAL_STATUS, Candidate, ChampionRef, OptunaRecord, ReportError, Snapshot,
                                    TrialRun, _best, _read_optuna, read_snapshot)
from soups.soup_record import json_safe
from soups.stats import bootstrap_ci, interval_metrics, paired_comparison
from soups.tags import (GC_DELETED, KIND_REPORT, TAG_EXPERIMENT, TAG_GC, TAG_INGREDIENTS, TAG_KIND, TAG_METRIC,
                        TAG_SPLIT, TAG_SWEEP)

from soups.options import SPLITS, add_report_args  # noqa: F401  (flags live with the other options: `ich --help` imports no MLflow)
FAMILY_NAMES = {"coatnet": "CoAtNet", "resnet": "ResNet", "densenet": "DenseNet", "vit": "ViT"}
SEED = 0  # bootstrap resamples: the same images for every row


# ---------------------------------------------------------------------------------------------- predictions

@dataclass
class Predictions:
    """Logits per (model id, split): memory, then the disk cache, then one forward pass per model (all splits).
    `load(record, folder) -> (state_dict, meta)` pulls weights (sha256 verified); None when every model is cached."""
    dataset: ICHDataset
    cache_dir: Path
    tmp: Path
    load: Callable | None = None
    device: str = "auto"
    computed: int = 0  # models run by this report (the rest came from the cache)
    mem: dict = field(default_factory=dict)
    evaluators: dict = field(default_factory=dict)

    def _path(self, model_id: str, split: str) -> Path:
        return cached_logits_path(self.cache_dir, model_id, split)

    def _cached(self, model_id: str, split: str) -> np.ndarray | None:
        key = (model_id, split)
        if key not in self.mem:
            path = self._path(model_id, split)
            shape = (len(self.dataset.splits[split]), self.dataset.num_classes)
            try:
                logits = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                return None
            if logits.shape != shape or not np.isfinite(logits).all():
                return None  # a cache file of another dataset build or a torn write: run the model again
            self.mem[key] = logits
        return self.mem[key]

    def _evaluator(self, meta) -> Evaluator:
        spec = EvalSpec.of(meta)  # the preprocessing the checkpoint (or soup) records
        if spec.key() not in self.evaluators:
            self.evaluators[spec.key()] = Evaluator(self.dataset, spec, device=self.device)
        return self.evaluators[spec.key()]

    def ensure(self, records: list[registry.CheckpointRecord]) -> None:
        """Run every model that lacks a cached split, with a progress bar; each model once, on every split."""
        unique = {r.model_id: r for r in records}
        todo = [r for r in unique.values() if any(self._cached(r.model_id, s) is None for s in SPLITS)]
        if todo and self.load is None:
            raise ReportError(f"model {todo[0].model_id}: no logits in the cache and no way to pull its weights")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for record in tqdm(todo, desc="report predictions", unit="model", file=sys.stderr, disable=not todo or None):
            state_dict, meta = self.load(record, self.tmp)  # sha256 verified
            if list(meta.class_names) != self.dataset.classes:
                raise ReportError(f"model {record.model_id}: its class map differs from the dataset's")
            ev = self._evaluator(meta)
            ev.load(state_dict)
            for split in SPLITS:
                logits = ev.logits(None, split)
                self.mem[(record.model_id, split)] = logits
                save_cached_logits(self.cache_dir, record.model_id, split, logits)
            shutil.rmtree(self.tmp / record.model_id, ignore_errors=True)
            self.computed += 1

    def logits(self, model_id: str, split: str) -> np.ndarray:
        return self.mem[(model_id, split)]


# ---------------------------------------------------------------------------------------------- selection

def _usable(records, kind: str, key: str, fingerprint: str, notes: list[str]) -> list[Candidate]:
    """Records built on this dataset with a finite val figure; the rest are counted in one note per reason."""
    out, skipped = [], {}
    for r in records:
        score = r.metrics.get(key)
        if r.dataset_fingerprint != fingerprint:
            reason = "built on another dataset"
        elif r.tags.get(TAG_GC) == GC_DELETED:  # the record stays, its weights were deleted by `ich gc`
            reason = "weights deleted by ich gc"
        elif score is None or not math.isfinite(score):
            reason = f"no finite {key} recorded"
        else:
            out.append(Candidate(r, kind, float(score)))
            continue
        skipped.setdefault(reason, []).append(r)
    for reason, rs in skipped.items():
        notes.append(f"skipped {len(rs)} {kind}(s), {reason}: e.g. {rs[0].label()}")
    return out


def arch_name(architecture: str) -> str:
    """The paper's name of a CoAtNet: coatnet_0_rw_224 -> CoAtNet-0, coatnet_tiny_ich -> CoAtNet-tiny."""
    parts = architecture.split("_")
    if parts[0] != "coatnet":
        return architecture
    size = [p for p in parts[1:] if p not in ("rw", "ich") and not (p.isdigit() and int(p) >= 32)]  # 224: img size
    return "-".join(["CoAtNet", *size])


@dataclass
class Block:
    """One CoAtNet architecture's rows of the table, as the paper has them: its best single checkpoint, then its
    best uniform and best greedy soup (the soup trial's within-trajectory soups and the across-run soups compete,
    by val), then soft voting of each soup's ingredients."""
    architecture: str
    best: Candidate
    soups: dict[str, Candidate]  # recipe -> the best soup of that recipe, by val
    soup_trial: str | None  # the trial whose within-trajectory soups compete: the best single's, else the best souped
    within: dict[str, Candidate] = field(default_factory=dict)  # recipe -> that trial's within soup (its trajectory)
    pool: list[Candidate] = field(default_factory=list)  # every checkpoint of this architecture (val vs test)


@dataclass
class Selection:
    """What the report shows, chosen by val: every field names models by their registry records."""
    best: Candidate  # best single CoAtNet of any architecture
    baselines: dict[str, Candidate]  # family -> best checkpoint of that family
    blocks: list[Block]  # one per CoAtNet architecture, by architecture name
    ingredients: dict[str, list[Candidate]]  # soup model id -> its recorded ingredients (soft voting, MDS)
    focus: Block  # the block of the best soup by val (else of the best single): val vs test, MDS, bias-variance
    mds_soup: Candidate | None  # the best soup by val with usable ingredients: the MDS shows its ingredients
    bias_variance: list[dict]  # focus architecture, per souped trial: {"trial", "single", <recipe>: its soup...}


def _block(arch: str, checkpoints: list[Candidate], soups: list[Candidate], metric: str, notes: list[str]) -> Block:
    pool = [c for c in checkpoints if c.record.architecture == arch]
    best = _best(pool, metric)
    soups = [s for s in soups if s.record.architecture == arch]
    # Within-trajectory soups of the best trial; if it has none (stopped after one epoch), the best trial that has.
    within = [s for s in soups if s.scope == "within"]
    soup_trial = best.record.trial
    if within and not any(s.record.trial == soup_trial for s in within):
        soup_trial = _best(within, metric).record.trial
        notes.append(f"{arch}: trial {best.record.trial} of its best single has no within-trajectory soup; its "
                     f"within soups are those of trial {soup_trial}, the best trial that has one")
    mine = [s for s in within if s.record.trial == soup_trial]
    block = Block(arch, best, {}, soup_trial if mine else None, pool=pool)
    for recipe in recipes.names():
        if (w := _best([s for s in mine if s.recipe == recipe], metric)) is not None:
            block.within[recipe] = w
        competing = [s for s in mine if s.recipe == recipe] + [s for s in soups if s.scope == "across"
                                                                 and s.recipe == recipe]
        if competing:
            block.soups[recipe] = _best(competing, metric)
        else:
            needs = "; it needs the sweep's shared init logged as an `init` model" if recipes.get(recipe).needs_anchor \
                else ""
            notes.append(f"no {recipe} soup of {arch} in MLflow (run `ich soup` first{needs})")
    return block


def select(checkpoints: list[Candidate], soups: list[Candidate], metric: str, ingredients_of, notes: list[str]) -> Selection:
    coatnets = [c for c in checkpoints if c.family == "coatnet"]
    best = _best(coatnets, metric)
    baselines = {}
    for fam in sorted({c.family for c in checkpoints} - {"coatnet"}):
        baselines[fam] = _best([c for c in checkpoints if c.family == fam], metric)
    blocks = [_block(arch, coatnets, soups, metric, notes) for arch in sorted({c.record.architecture for c in coatnets})]
    by_id = {c.id: c for c in checkpoints}

    ingredients: dict[str, list[Candidate]] = {}
    for soup in {s.id: s for b in blocks for s in (*b.soups.values(), *b.within.values())}.values():
        ids = ingredients_of(soup) or []
        missing = [i for i in ids if i not in by_id]
        if not ids or missing:
            notes.append(f"soup {soup.record.name} ({soup.id}): ingredients {missing or ids} are not usable "
                         "checkpoints of this dataset; no soft-voting row for it")
            continue
        ingredients[soup.id] = [by_id[i] for i in ids]

    # The soup analyses follow the best soup by val (the paper's figure shows its ingredients).
    mds_soup = _best([s for b in blocks for s in b.soups.values() if s.id in ingredients], metric)
    arch = mds_soup.record.architecture if mds_soup else best.record.architecture
    focus = next(b for b in blocks if b.architecture == arch)

    spread = []
    within = [s for s in soups if s.scope == "within" and s.record.architecture == arch]
    souped = [r for r in recipes.names() if any(s.recipe == r for s in within)]  # the recipes this sweep cooked
    for trial in sorted({s.record.trial for s in within}):
        mine = [s for s in within if s.record.trial == trial]
        by_recipe = {r: _best([s for s in mine if s.recipe == r], metric) for r in souped}
        single = _best([c for c in focus.pool if c.record.trial == trial], metric)
        if souped and all(by_recipe.values()) and single:
            spread.append({"trial": trial, "single": single, **by_recipe})
    return Selection(best, baselines, blocks, ingredients, focus, mds_soup, spread)


def _champion(snap: Snapshot, sel: Selection, soups: list[Candidate], metric: str, fingerprint: str,
              notes: list[str]) -> tuple[Candidate, str]:
    """The champion alias's soup when it is usable here; else the best soup; else the best single."""
    ref, name = snap.champion, snap.registered_model
    if ref is not None:
        known = {s.id: s for s in soups}
        if ref.model_id in known:
            return known[ref.model_id], f"alias {ALIAS} of {name} (v{ref.version})"
        if ref.record is not None and ref.record.dataset_fingerprint == fingerprint:
            return (Candidate(ref.record, "soup", ref.record.metrics.get(f"val_{metric}", float("nan"))),
                    f"alias {ALIAS} of {name} (v{ref.version})")
        notes.append(f"alias {ALIAS} of {name} (v{ref.version}) points at no usable soup of this dataset")
    best_soup = _best([s for s in soups if s.record.architecture == sel.best.record.architecture], metric)
    if best_soup is not None:
        return best_soup, f"best soup by val {metric} (no {ALIAS} alias on {name})"
    return sel.best, f"best single CoAtNet by val {metric} (no soups)"


# ---------------------------------------------------------------------------------------------- sections

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
              reference: np.ndarray | None = None, **info) -> dict:
    """One row of the results table: point metrics, 95% bootstrap intervals, paired comparison with reference."""
    pred = logits.argmax(1)
    row = {"key": key, "label": label, "kind": kind, **info, **classification_metrics(y, pred, k)}
    for metric in interval_metrics():
        ci = bootstrap_ci(y, pred, metric.name, n_resamples=n_resamples, seed=SEED, num_classes=k)
        row[f"{metric.name}_ci"] = [ci.low, ci.high]
    row["vs_best_single"] = None if reference is None else paired_comparison(
        y, pred, reference.argmax(1), n_resamples=n_resamples, seed=SEED, num_classes=k)
    return row


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


def html_table(header: list[str], lines: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in line) + "</tr>" for line in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _where(soup: Candidate) -> str:
    """Which soup of the block this is: its scope (and trial or name), and its ingredient pool when recorded."""
    where = f"within trial {soup.record.trial}" if soup.scope == "within" else f"across runs: {soup.record.name}"
    pool = soup.record.tags.get(TAG_INGREDIENTS)  # the pool rule (soups/pool.py), on soups that record one
    return f"{where}, pool {pool}" if pool else where


def results_rows(sel: Selection, preds: Predictions, split: str, n_resamples: int) -> list[dict]:
    """The paper's layout: the baselines, then one block per CoAtNet architecture (best single, uniform soup,
    greedy soup, soft voting of each soup's ingredients); every block row is compared with its block's best single."""
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
            rows.append(table_row(f"{arch}_{recipe}_soup", f"{name} + {recipe} soup ({_where(soup)})", "soup",
                                  preds.logits(soup.id, split), y, k, n_resamples=n_resamples, reference=reference,
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


# ---------------------------------------------------------------------------------------------- compute

@dataclass
class Report:
    """The computed report: the summary (report.json) and the sections of the page, in order."""
    title: str
    summary: dict
    sections: list[Section]

    def files(self) -> list[str]:
        return [name for s in self.sections for name in s.written()]


def needed_models(sel: Selection, champ: Candidate) -> list[Candidate]:
    """Every model whose logits the sections read."""
    return [*sel.baselines.values(), champ, *sel.focus.pool,
            *(c for b in sel.blocks for c in (b.best, *b.soups.values(), *b.within.values())),
            *(c for members in sel.ingredients.values() for c in members),
            *(c for t in sel.bias_variance for k, c in t.items() if k != "trial")]


def compute_report(snap: Snapshot, preds: Predictions, out: Path, *, split: str = "test", metric: str = "macro_f1",
                   n_resamples: int = 1000, data: str = "") -> Report:
    """Selection, logits and every section from the snapshot; no MLflow call (weights are pulled through
    preds.load only for models not in the cache)."""
    dataset = preds.dataset
    key = f"val_{metric}"
    notes = list(snap.notes)
    checkpoints = _usable(snap.checkpoints, "checkpoint", key, dataset.fingerprint, notes)
    soups = [s for s in _usable(snap.soups, "soup", key, dataset.fingerprint, notes) if s.family == "coatnet"]
    if not any(c.family == "coatnet" for c in checkpoints):
        raise ReportError(f"experiment {snap.experiment!r}: no CoAtNet checkpoint with a {key} on dataset {data}")
    if split == "val":
        notes.append("the table is on val, the split that also selects: its figures are optimistic")

    sel = select(checkpoints, soups, metric, lambda s: snap.ingredients.get(s.id), notes)
    champ, source = _champion(snap, sel, soups, metric, dataset.fingerprint, notes)
    needed = needed_models(sel, champ)
    preds.ensure([c.record for c in needed])

    rows = results_rows(sel, preds, split, n_resamples)
    sections = [results_section(rows, split, metric, out)]
    forest, section = forest_section(rows, split, out)
    sections += [section] if section else []
    val_test, section = val_test_section(sel, preds, out)
    sections += [section] if section else []
    parameter_curves, curve_sections = parameter_curve_sections(sel, snap, out)
    sections += curve_sections
    curves, section = learning_curves_section(snap, out)
    if section:
        sections.append(section)
    else:
        notes.append(f"no learning curves: sweep run {snap.sweep_run_id} has no trial runs with {snap.curve_key or key} "
                     "and no soup-so-far metric")
    optuna, section = optuna_section(snap, out, notes)
    sections += [section] if section else []
    mds, section = mds_section(sel, preds, out)
    if section:
        sections.append(section)
    else:
        notes.append("no MDS figure: no soup with usable recorded ingredients")
    bv, section = bias_variance_section(sel, preds, split, out)
    sections += [section] if section else []
    if len(sel.bias_variance) < 2:
        notes.append(f"no bias-variance study across trials: {len(sel.bias_variance)} trial(s) of "
                     f"{sel.focus.architecture} have within-trajectory soups (needs at least 2)")
    if not bv or not bv["trajectory"]:
        notes.append(f"no bias-variance study within a trajectory: {sel.focus.architecture} has no within-trajectory "
                     "uniform soup of 2 or more usable ingredients")
    champion, section = champion_section(champ, source, preds, split, out)
    sections.append(section)

    counts = {"coatnet_checkpoints": sum(c.family == "coatnet" for c in checkpoints),
              "baseline_checkpoints": sum(c.family != "coatnet" for c in checkpoints),
              "soups": len(soups), "computed": preds.computed,
              "from_cache": len({c.id for c in needed}) - preds.computed}
    intro = (f"Experiment **{snap.experiment}** (id {snap.experiment_id}) on {snap.tracking_uri}; data `{data}` "
             f"(fingerprint {dataset.fingerprint[:16]}); {counts['coatnet_checkpoints']} CoAtNet and "
             f"{counts['baseline_checkpoints']} baseline checkpoints, {counts['soups']} CoAtNet soups. Models are "
             f"chosen by val {metric}; figures on {split}. Intervals: 95% stratified bootstrap ({n_resamples} "
             "resamples); Δ = row − the best single checkpoint of the row's architecture (its block) on the same "
             "images, McNemar's exact test on the images where exactly one is right.")
    sections.insert(0, Section("", intro))
    if notes:
        sections.append(Section("Notes", items=notes))
    summary = json_safe({
        "experiment": snap.experiment, "experiment_id": snap.experiment_id, "tracking_uri": snap.tracking_uri,
        "data": str(data), "dataset_fingerprint": dataset.fingerprint, "split": split, "metric": metric,
        "n_resamples": n_resamples, "out_dir": str(out), "counts": counts, "registered_model": snap.registered_model,
        "sweep_run_id": snap.sweep_run_id, "best_single": f"{sel.best.record.architecture}_single",
        "blocks": [{"architecture": b.architecture, "keys": [r["key"] for r in rows if r.get("block") == b.architecture]}
                   for b in sel.blocks], "table": rows, "forest": forest, "val_test": val_test,
        "learning_curves": curves, "parameter_curves": parameter_curves, "optuna": optuna, "mds": mds, "bias_variance": bv, "champion": champion,
        "notes": notes})
    return Report(f"Model soups report: {snap.experiment}", summary, sections)


# ---------------------------------------------------------------------------------------------- render

def render_markdown(title: str, sections: list[Section]) -> str:
    md = [f"# {title}", ""]
    for s in sections:
        md += [f"## {s.title}", ""] if s.title else []
        md += [s.text, ""] if s.text else []
        for t in s.tables:
            md += [md_table(t.header, t.lines), ""]
        for name, what in s.figures:
            md += [f"![{what}]({name})", ""]
        md += [f"- {item}" for item in s.items] + ([""] if s.items else [])
        if s.written():
            md += ["Files: " + ", ".join(f"`{name}`" for name in s.written()) + ".", ""]
    return "\n".join(md)


def _inline(text: str) -> str:
    """Escaped text with Markdown's **bold** and `code` as HTML (the only markup the sections use)."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def render_html(title: str, sections: list[Section], out: Path) -> str:
    """The same sections as one standalone page: figures embedded, each captioned with its file's link."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body += [f"<h2>{html.escape(s.title)}</h2>"] if s.title else []
        body += [f"<p>{_inline(s.text)}</p>"] if s.text else []
        body += [html_table(t.header, t.lines) for t in s.tables]
        for name, what in s.figures:
            data = base64.b64encode((out / name).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(what)}">'
                        f'<figcaption><a href="{name}">{name}</a></figcaption></figure>')
        if s.items:
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in s.items) + "</ul>")
        if s.written():
            body.append("<p>Files: " + ", ".join(html.escape(n) for n in s.written()) + ".</p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>")


def write_pages(out: Path, report: Report) -> list[str]:
    """report.md and report.html: the same sections, rendered twice."""
    (out / "report.md").write_text(render_markdown(report.title, report.sections), encoding="utf-8")
    (out / "report.html").write_text(render_html(report.title, report.sections, out), encoding="utf-8")
    return ["report.md", "report.html"]


# ---------------------------------------------------------------------------------------------- main

def build_report(experiment: str, out_dir: str | None = None, *, tracking_uri: str | None = None,
                 data: str | None = None, split_for_table: str = "test", n_resamples: int = 1000,
                 device: str = "auto", metric: str = "macro_f1", registered_model: str | None = None,
                 optuna_storage: str | None = None) -> dict:
    """Build the report of an experiment from MLflow, write it to out_dir (a temp folder if None) and log it
    as the artifacts of a report run; returns the summary (also written as report.json).
    registered_model: where the champion alias lives (default: the soups' ich.registered_model tag, else
    "<experiment>-soup"); optuna_storage: the sweep's Optuna database URL, opened read-only (default: the sweep
    run's ich.optuna_storage tag when it names $ICH_HOME/optuna.db; without one the report says so, naming any
    other tag, and has no Optuna figures)."""
    from mlflow.entities import Metric

    from ich.home import ich_home

    if split_for_table not in SPLITS:
        raise ReportError(f"report option split_for_table={split_for_table!r}: must be one of {', '.join(SPLITS)}")
    if metric not in METRICS:
        raise ReportError(f"report option metric={metric!r}: must be one of {', '.join(metric_names())}")
    if n_resamples < 100:
        raise ReportError(f"report option n_resamples={n_resamples}: use at least 100")
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="ich-report-"))
    run_id = None
    client = None
    try:
        client, snap = read_snapshot(experiment, tracking_uri=tracking_uri, metric=metric,
                                     registered_model=registered_model, optuna_storage=optuna_storage, tmp=tmp)
        tagged = snap.data
        data = data or tagged
        if not data:
            raise ReportError(f"experiment {experiment!r}: no sweep run with an ich.data tag; pass the dataset with --data")
        if not Path(data).is_dir():
            raise ReportError(f"dataset {data}: no such folder" + (" (the sweep run's ich.data tag; pass --data)"
                                                                   if data == tagged else ""))
        dataset = load_dataset(data)
        out = Path(out_dir) if out_dir else tmp / "report"
        out.mkdir(parents=True, exist_ok=True)
        preds = Predictions(dataset, prediction_cache(ich_home(), dataset.fingerprint), tmp / "pulled",
                            load=lambda record, folder: registry.load_record(client, record, folder), device=device)
        report = compute_report(snap, preds, out, split=split_for_table, metric=metric, n_resamples=n_resamples,
                                data=str(data))

        parent = snap.sweep_run_id
        best = next(r for r in report.summary["table"] if r["key"] == report.summary["best_single"])
        tags = {TAG_KIND: KIND_REPORT, TAG_EXPERIMENT: experiment, TAG_SPLIT: split_for_table,
                TAG_METRIC: metric, TAG_SWEEP: best["sweep"],
                **({"mlflow.parentRunId": parent} if parent else {}),
                **provenance.run_tags("soups/report.py")}  # the code and packages that made it, as on every run
        run = registry.call_with_retry("create report run", client.create_run, snap.experiment_id,
                                       run_name=f"report-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
        run_id = run.info.run_id
        summary = {**report.summary, "run_id": run_id, "parent_run_id": parent}
        files = report.files() + write_pages(out, report) + ["report.json"]
        summary["files"] = files
        summary["seconds"] = round(time.time() - started, 1)
        (out / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
        now = int(time.time() * 1000)
        metrics = [Metric(f"{key}_{split_for_table}_{m}", float(r[m]), now, 0)
                   for r in report.summary["table"] for m in (i.name for i in interval_metrics())
                   for key in ([r["key"]] + (["best_single"] if r is best else []))]  # best_single: one name across runs
        registry.call_with_retry("log report metrics", client.log_batch, run_id, metrics=metrics)
        for name in files:
            registry.call_with_retry(f"log report artifact {name}", client.log_artifact, run_id, str(out / name))
        registry.call_with_retry("finish report run", client.set_terminated, run_id, "FINISHED")
        return summary
    except BaseException:
        if run_id:
            try:
                client.set_terminated(run_id, "FAILED")
            except Exception:
                pass
        if not out_dir:  # the report folder lived in tmp: nothing worth keeping
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp / "pulled", ignore_errors=True)
        shutil.rmtree(tmp / "soup-meta", ignore_errors=True)
        if out_dir:
            shutil.rmtree(tmp, ignore_errors=True)


def print_summary(summary: dict) -> None:
    header, lines = table_lines(summary["table"], summary["metric"])
    shown, paired = table_metrics(), interval_metrics()
    # model, the interval metrics (accuracy, F1), the first Δ (Δacc), McNemar p: what fits a terminal
    keep = [0, *(3 + shown.index(m) for m in paired), 3 + len(shown), len(header) - 1]
    widths = [max(len(row[i]) for row in [header] + lines) for i in keep]
    for row in [header] + lines:
        print("  ".join(row[i].ljust(w) for i, w in zip(keep, widths)))
    bv = summary["bias_variance"]
    if bv:
        for g in bv["groups"]:
            print(f"{g['label']:<24} CE bias² {g['ce']['bias2']:.4f} var {g['ce']['variance']:.4f}   "
                  f"0-1 bias {g['zero_one']['bias']:.4f} var {g['zero_one']['variance']:.4f}")
    for note in summary["notes"]:
        print(f"note: {note}")
    c = summary["counts"]
    print(f"report run {summary['run_id']} ({c['computed']} models run, {c['from_cache']} from cache, "
          f"{summary['seconds']} s); files in {summary['out_dir']}", flush=True)


# ---------------------------------------------------------------------------------------------- CLI

def cmd_report(args: argparse.Namespace) -> None:
    """`ich report`: bad input exits 2 with one line."""
    from ich.errors import exit_on_user_error
    from ich.home import ich_home
    out = args.out or str(ich_home() / "reports" / args.experiment)
    with exit_on_user_error("ich report"):
        summary = build_report(args.experiment, out, data=args.data, split_for_table=args.split_for_table,
                               n_resamples=args.n_resamples, device=args.device, metric=args.metric,
                               registered_model=getattr(args, "registered_model", None),
                               optuna_storage=getattr(args, "optuna_storage", None))
    print_summary(summary)
