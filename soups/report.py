"""The report: the paper's table, its MDS figure and a bias-variance study, from MLflow records alone.

    build_report("ich17", "reports/ich17")          # or: ich report --experiment ich17 --out reports/ich17

What it reads (searches, never local paths; every weight file is verified by sha256 when it is pulled):
  - checkpoints (LoggedModels ich.kind=checkpoint) of every sweep of the experiment: the CoAtNet trials and the
    baselines, told apart by architecture family (ich.models.family), not by sweep name;
  - soups (LoggedModels ich.kind=soup, built by soups/orchestrate.py) with their ich.scope/ich.recipe/ich.trial tags;
  - the `champion` alias of the registered model "<experiment>-soup".
What it writes (to DIR, and as artifacts of a report run: ich.kind=report, child of the latest sweep run):
  results.md/.json        the table: best of each baseline family, best single CoAtNet, uniform and greedy soups
                          (within the best trial's trajectory, across runs), soft voting of each soup's ingredients;
                          accuracy, macro P/R/F1, 95% bootstrap intervals, paired difference vs the best single
                          CoAtNet and McNemar's exact p
  ce_distance.json/.csv   pairwise cross-entropy distances on val (trajectory, greedy, uniform, soft voting)
  mds.png                 their metric-MDS embedding, each point labelled with its val accuracy
  bias_variance.md/.json/.png   CE (Yang et al.) and 0-1 (Domingos) decompositions across trials: best singles
                          vs trajectory soups
  champion.json/.png      confusion matrix and per-class F1 of the champion
  report.md, report.html  everything on one page; report.json the whole summary
Selection looks at recorded val metrics only; test is only reported (design decision 3). The soups and the
bias-variance study use the architecture of the best single CoAtNet (a CoAtNet-0 soup is compared with a CoAtNet-0).
Logits are cached per model id and split in $ICH_HOME/cache/predictions/<dataset fingerprint>/: a model runs once.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from tqdm import tqdm

from ich.checkpoint import META
from ich.data import ICHDataset, load_dataset
from ich.metrics import classification_metrics, confusion_matrix, per_class_prf
from ich.models import family
from soups import registry
from soups.orchestrate import json_safe
from soups.analysis import bias_variance_01, bias_variance_ce, ce_distance_matrix, mds_embed, soft_vote, softmax
from soups.evaluate import EvalSpec, Evaluator, higher_is_better
from soups.stats import bootstrap_ci, paired_comparison

SPLITS = ("val", "test")
METRICS = ("macro_f1", "accuracy", "loss")
TABLE_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1")
FAMILY_NAMES = {"coatnet": "CoAtNet", "resnet": "ResNet", "densenet": "DenseNet", "vit": "ViT"}
MDS_CAP = 12  # trajectory points in the MDS figure (the paper shows 8)
SEED = 0  # bootstrap resamples: the same images for every row
ALIAS = "champion"
TAG_SOUP_MODEL = "ich.soup_model_id"  # on registered versions: the soup LoggedModel behind it (orchestrate.py)


class ReportError(ValueError):
    """The report cannot be built: unknown experiment, no checkpoints, bad option; one line naming it."""


@dataclass
class Candidate:
    """A checkpoint or soup of the experiment as MLflow records it; `score` (its val metric) is all selection sees."""
    record: registry.CheckpointRecord
    kind: str  # checkpoint | soup
    score: float

    @property
    def id(self) -> str:
        return self.record.model_id

    @property
    def family(self) -> str:
        return family(self.record.architecture)

    @property
    def scope(self) -> str:
        return self.record.tags.get("ich.scope", "")

    @property
    def recipe(self) -> str:
        return self.record.tags.get("ich.recipe", "")


def _best(candidates: list[Candidate], metric: str) -> Candidate | None:
    """Best recorded val score; ties go to the earlier trial/epoch, so the pick is stable."""
    sign = -1.0 if higher_is_better(metric) else 1.0
    ranked = sorted(candidates, key=lambda c: (sign * c.score, c.record.trial, c.record.epoch, c.id))
    return ranked[0] if ranked else None


# ---------------------------------------------------------------------------------------------- predictions

@dataclass
class Predictions:
    """Logits per (model id, split): memory, then the disk cache, then one forward pass per model (all splits)."""
    client: object
    dataset: ICHDataset
    cache_dir: Path
    tmp: Path
    device: str = "auto"
    computed: int = 0  # models run by this report (the rest came from the cache)
    mem: dict = field(default_factory=dict)
    evaluators: dict = field(default_factory=dict)

    def _path(self, model_id: str, split: str) -> Path:
        return self.cache_dir / f"{model_id}-{split}.npy"

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
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for record in tqdm(todo, desc="report predictions", unit="model", file=sys.stderr):
            state_dict, meta = registry.load_record(self.client, record, self.tmp)  # sha256 verified
            if list(meta.class_names) != self.dataset.classes:
                raise ReportError(f"model {record.model_id}: its class map differs from the dataset's")
            ev = self._evaluator(meta)
            ev.load(state_dict)
            for split in SPLITS:
                logits = ev.logits(None, split)
                self.mem[(record.model_id, split)] = logits
                part = self._path(record.model_id, split).with_suffix(".part.npy")
                np.save(part, logits)
                part.replace(self._path(record.model_id, split))  # atomic: a concurrent report sees all or nothing
            shutil.rmtree(self.tmp / record.model_id, ignore_errors=True)
            self.computed += 1

    def logits(self, model_id: str, split: str) -> np.ndarray:
        return self.mem[(model_id, split)]


# ---------------------------------------------------------------------------------------------- gather

def _open(experiment: str, tracking_uri: str | None):
    from mlflow import MlflowClient
    if tracking_uri is None:
        from soups.tracking_server import ensure_tracking_uri
        tracking_uri = ensure_tracking_uri()
    client = MlflowClient(tracking_uri)
    found = registry.call_with_retry(f"get experiment {experiment!r}", client.get_experiment_by_name, experiment)
    if found is None or found.lifecycle_stage == "deleted":
        raise ReportError(f"experiment {experiment!r}: not found on the MLflow server at {tracking_uri}")
    return client, found.experiment_id, tracking_uri


def _soups(client, experiment_id: str) -> list[registry.CheckpointRecord]:
    return registry.search_soup_models(client, [experiment_id])


def _sweep_run(client, experiment_id: str, sweep: str | None):
    """The latest sweep run (of `sweep` if that has one): the report's parent and the default dataset."""
    for tags in ([{registry.TAG_KIND: "sweep", registry.TAG_SWEEP: sweep}] if sweep else []) + [{registry.TAG_KIND: "sweep"}]:
        if (run := registry.latest_run_by_tags(client, experiment_id, tags)) is not None:
            return run
    return None


def _usable(records, kind: str, key: str, fingerprint: str, notes: list[str]) -> list[Candidate]:
    """Records built on this dataset with a finite val figure; the rest are counted in one note per reason."""
    out, skipped = [], {}
    for r in records:
        score = r.metrics.get(key)
        if r.dataset_fingerprint != fingerprint:
            reason = "built on another dataset"
        elif r.tags.get("ich.gc") == "deleted":  # the record stays, its weights were deleted by `ich gc`
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


def _soup_ingredients(client, soup: Candidate, tmp: Path) -> list[str]:
    """Model ids the soup averaged (accepted ingredients), from its checkpoint.json (a small download)."""
    dst = tmp / "soup-meta" / soup.id
    dst.mkdir(parents=True, exist_ok=True)
    uri = f"{soup.record.artifact_uri.rstrip('/')}/{META}"
    path = registry.call_with_retry(f"download {META} of soup {soup.id}", download_artifacts, artifact_uri=uri,
                                    dst_path=str(dst), tracking_uri=client.tracking_uri)
    return list((json.loads(Path(path).read_text(encoding="utf-8")).get("extra") or {}).get("ingredients") or [])


# ---------------------------------------------------------------------------------------------- selection

@dataclass
class Selection:
    """What the report shows, chosen by val: every field names models by their registry records."""
    best: Candidate  # best single CoAtNet
    baselines: dict[str, Candidate]  # family -> best checkpoint of that family
    soups: dict[tuple[str, str], Candidate]  # (scope, recipe) -> best soup of that kind
    ingredients: dict[str, list[Candidate]]  # soup model id -> its ingredients (for soft voting)
    trajectory: list[Candidate]  # epochs of the soup trial, for the MDS figure
    soup_trial: str | None
    bias_variance: list[dict]  # per trial: {"trial", "single", "uniform", "greedy"}


def select(checkpoints: list[Candidate], soups: list[Candidate], metric: str, ingredients_of, notes: list[str]) -> Selection:
    coatnets = [c for c in checkpoints if c.family == "coatnet"]
    best = _best(coatnets, metric)
    baselines = {}
    for fam in sorted({c.family for c in checkpoints} - {"coatnet"}):
        baselines[fam] = _best([c for c in checkpoints if c.family == fam], metric)
    arch = best.record.architecture
    soups = [s for s in soups if s.record.architecture == arch]
    by_id = {c.id: c for c in checkpoints}

    # Within-trajectory soups of the best trial; if it has none (stopped after one epoch), the best trial that has.
    within = [s for s in soups if s.scope == "within"]
    soup_trial = best.record.trial
    if within and not any(s.record.trial == soup_trial for s in within):
        soup_trial = _best(within, metric).record.trial
        notes.append(f"trial {best.record.trial} of the best single CoAtNet has no within-trajectory soup; "
                     f"the within rows use trial {soup_trial}, the best trial that has one")
    chosen: dict[tuple[str, str], Candidate] = {}
    for scope in ("within", "across"):
        for recipe in ("uniform", "greedy"):
            pool = [s for s in soups if s.scope == scope and s.recipe == recipe
                    and (scope != "within" or s.record.trial == soup_trial)]
            if pool:
                chosen[(scope, recipe)] = _best(pool, metric)
            else:
                notes.append(f"no {scope} {recipe} soup of {arch} in MLflow (run `ich soup` first)")
    ingredients: dict[str, list[Candidate]] = {}
    for soup in chosen.values():
        ids = ingredients_of(soup)
        missing = [i for i in ids if i not in by_id]
        if not ids or missing:
            notes.append(f"soup {soup.record.name} ({soup.id}): ingredients {missing or ids} are not usable "
                         "checkpoints of this dataset; no soft-voting row for it")
            continue
        ingredients[soup.id] = [by_id[i] for i in ids]

    trial_ckpts = sorted([c for c in coatnets if c.record.trial == (soup_trial or best.record.trial)
                          and c.record.architecture == arch], key=lambda c: c.record.epoch)
    if len(trial_ckpts) > MDS_CAP:  # evenly spaced epochs, first and last kept
        keep = np.unique(np.linspace(0, len(trial_ckpts) - 1, MDS_CAP).round().astype(int))
        trial_ckpts = [trial_ckpts[i] for i in keep]

    spread = []
    for trial in sorted({s.record.trial for s in within}):
        mine = [s for s in within if s.record.trial == trial]
        uniform, greedy = (_best([s for s in mine if s.recipe == r], metric) for r in ("uniform", "greedy"))
        single = _best([c for c in coatnets if c.record.trial == trial and c.record.architecture == arch], metric)
        if uniform and greedy and single:
            spread.append({"trial": trial, "single": single, "uniform": uniform, "greedy": greedy})
    return Selection(best, baselines, chosen, ingredients, trial_ckpts, soup_trial, spread)


# ---------------------------------------------------------------------------------------------- figures

def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f}"


def _vote_logits(preds: Predictions, members: list[Candidate], split: str) -> np.ndarray:
    """Soft voting as log-probabilities (mean of logits, softmax), so argmax and metrics read it like logits."""
    return np.log(np.clip(soft_vote([preds.logits(c.id, split) for c in members]), 1e-300, None))


def table_row(key: str, label: str, kind: str, logits: np.ndarray, y: np.ndarray, k: int, *, n_resamples: int,
              reference: np.ndarray | None = None, **info) -> dict:
    """One row of the results table: point metrics, 95% bootstrap intervals, paired comparison with reference."""
    pred = logits.argmax(1)
    row = {"key": key, "label": label, "kind": kind, **info, **classification_metrics(y, pred, k)}
    for metric in ("accuracy", "macro_f1"):
        ci = bootstrap_ci(y, pred, metric, n_resamples=n_resamples, seed=SEED, num_classes=k)
        row[f"{metric}_ci"] = [ci.low, ci.high]
    row["vs_best_single"] = None if reference is None else paired_comparison(
        y, pred, reference.argmax(1), n_resamples=n_resamples, seed=SEED, num_classes=k)
    return row


def table_lines(rows: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    header = ["model", "ingredients", f"val {metric} (selects)", "accuracy % [95% CI]", "macro P %", "macro R %",
              "macro F1 % [95% CI]", "Δacc vs best single [95% CI]", "ΔF1 [95% CI]", "McNemar p"]
    lines = []
    for r in rows:
        vs = r["vs_best_single"]
        lines.append([
            r["label"], str(r.get("n_ingredients") or 1), "-" if r.get("val_score") is None else f"{r['val_score']:.4f}",
            f"{_pct(r['accuracy'])} [{_pct(r['accuracy_ci'][0])}, {_pct(r['accuracy_ci'][1])}]",
            _pct(r["macro_precision"]), _pct(r["macro_recall"]),
            f"{_pct(r['macro_f1'])} [{_pct(r['macro_f1_ci'][0])}, {_pct(r['macro_f1_ci'][1])}]",
            "-" if vs is None else f"{_signed(vs['acc_diff'])} [{_signed(vs['acc_diff_low'])}, {_signed(vs['acc_diff_high'])}]",
            "-" if vs is None else f"{_signed(vs['f1_diff'])} [{_signed(vs['f1_diff_low'])}, {_signed(vs['f1_diff_high'])}]",
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


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # no display on servers or in tests
    import matplotlib.pyplot as plt
    return plt


MARKERS = {"ingredient": ("o", "#7f7f7f"), "greedy": ("*", "#d62728"), "uniform": ("s", "#2ca02c"),
           "soft_vote": ("D", "#1f77b4")}


def plot_mds(path: Path, coords: np.ndarray, points: list[dict], title: str) -> Path:
    """2-D MDS of the CE distances; every point labelled with its val accuracy (like the paper's figure)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110)
    for kind, (marker, color) in MARKERS.items():
        idx = [i for i, p in enumerate(points) if p["kind"] == kind]
        if idx:
            ax.scatter(coords[idx, 0], coords[idx, 1], marker=marker, c=color, s=140 if marker == "*" else 60,
                       label={"ingredient": "ingredients (epochs)", "soft_vote": "soft voting"}.get(kind, f"{kind} soup"),
                       edgecolors="black", linewidths=0.5, zorder=3)
    for (x, y), p in zip(coords, points):
        text = f"{100 * p['val_accuracy']:.2f}" + (f" (e{p['epoch']})" if p["kind"] == "ingredient" else "")
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bias_variance(path: Path, groups: list[dict]) -> Path:
    """Grouped bars: CE bias²/variance and 0-1 bias/variance per group of models."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), dpi=110)
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
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_champion(path: Path, cm: np.ndarray, f1: np.ndarray, classes: list[str], title: str) -> Path:
    plt = _plt()
    k = len(classes)
    fig, (a, b) = plt.subplots(1, 2, figsize=(6 + 0.45 * k, 3 + 0.3 * k), dpi=110,
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
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- sections

def results_section(sel: Selection, preds: Predictions, split: str, metric: str, n_resamples: int) -> list[dict]:
    data = preds.dataset
    y, k = data.splits[split].labels, data.num_classes
    reference = preds.logits(sel.best.id, split)

    def info(c: Candidate, **more) -> dict:
        return {"model_id": c.id, "architecture": c.record.architecture, "family": c.family, "sweep": c.record.sweep,
                "trial": c.record.trial if c.kind == "checkpoint" or c.scope == "within" else None,
                "epoch": c.record.epoch if c.kind == "checkpoint" else None, "val_score": c.score, **more}

    rows = []
    for fam, c in sel.baselines.items():
        rows.append(table_row(f"baseline_{fam}", f"{FAMILY_NAMES.get(fam, fam)} ({c.record.architecture})", "baseline",
                              preds.logits(c.id, split), y, k, n_resamples=n_resamples, **info(c)))
    b = sel.best
    rows.append(table_row("best_single", f"CoAtNet ({b.record.architecture}), best single: trial {b.record.trial} "
                                         f"epoch {b.record.epoch}", "single", reference, y, k,
                          n_resamples=n_resamples, **info(b)))
    for (scope, recipe), soup in sel.soups.items():
        where = f"within trial {soup.record.trial}" if scope == "within" else f"across runs: {soup.record.name}"
        members = sel.ingredients.get(soup.id)
        n = len(members) if members else None
        rows.append(table_row(f"{scope}_{recipe}_soup", f"CoAtNet + {recipe} soup ({where})", "soup",
                              preds.logits(soup.id, split), y, k, n_resamples=n_resamples, reference=reference,
                              **info(soup, scope=scope, recipe=recipe, name=soup.record.name, n_ingredients=n)))
        if members:
            rows.append(table_row(f"{scope}_{recipe}_vote", f"CoAtNet soft voting (the {recipe} soup's ingredients, "
                                                            f"{where})", "soft_vote",
                                  _vote_logits(preds, members, split), y, k, n_resamples=n_resamples,
                                  reference=reference, scope=scope, recipe=recipe, n_ingredients=n, val_score=None,
                                  ingredients=[c.id for c in members], architecture=soup.record.architecture,
                                  family="coatnet"))
    return rows


def mds_section(sel: Selection, preds: Predictions, out: Path) -> dict | None:
    """CE distances on val between the trajectory's epochs, the within soups and soft voting; MDS; the figure."""
    points, probs = [], []
    y, k = preds.dataset.splits["val"].labels, preds.dataset.num_classes

    def add(name: str, kind: str, logits: np.ndarray, **info) -> None:
        points.append({"name": name, "kind": kind, **info,
                       "val_accuracy": classification_metrics(y, logits.argmax(1), k)["accuracy"]})
        probs.append(softmax(logits))

    for c in sel.trajectory:
        add(f"epoch {c.record.epoch}", "ingredient", preds.logits(c.id, "val"), model_id=c.id, epoch=c.record.epoch)
    for recipe in ("greedy", "uniform"):
        soup = sel.soups.get(("within", recipe))
        if soup is not None:
            add(f"{recipe} soup", recipe, preds.logits(soup.id, "val"), model_id=soup.id)
    uniform = sel.soups.get(("within", "uniform"))
    members = sel.ingredients.get(uniform.id) if uniform else None
    if members:
        add("soft voting", "soft_vote", _vote_logits(preds, members, "val"),
            ingredients=[c.id for c in members])
    if len(points) < 2:
        return None
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
    result = {"split": "val", "trial": sel.soup_trial, "points": points, "matrix": D.tolist()}
    (out / "ce_distance.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot_mds(out / "mds.png", coords, points, f"CE distance, metric MDS (val), trial {sel.soup_trial}: "
                                              "labels = val accuracy %")
    return result


def bias_variance_section(sel: Selection, preds: Predictions, split: str, out: Path) -> dict | None:
    """Spread across trials of their best single checkpoints vs of their within-trajectory soups."""
    if len(sel.bias_variance) < 2:
        return None
    y, k = preds.dataset.splits[split].labels, preds.dataset.num_classes
    groups = []
    for key, label in (("single", "best single per trial"), ("uniform", "uniform soup per trial"),
                       ("greedy", "greedy soup per trial")):
        logits = np.stack([preds.logits(t[key].id, split) for t in sel.bias_variance])
        groups.append({"key": key, "label": label, "models": [t[key].id for t in sel.bias_variance],
                       "ce": bias_variance_ce(softmax(logits), y), "zero_one": bias_variance_01(logits.argmax(-1), y, k)})
    result = {"split": split, "trials": [t["trial"] for t in sel.bias_variance], "groups": groups}
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
    return result


def _champion(client, experiment: str, sel: Selection, soups: list[Candidate], metric: str, fingerprint: str,
              notes: list[str]) -> tuple[Candidate, str]:
    name = f"{experiment}-soup"
    try:
        version = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException as e:
        if registry.is_transient(e):
            raise
        version = None  # no registered model or no alias yet
    if version is not None:
        model_id = (version.tags or {}).get(TAG_SOUP_MODEL)
        known = {s.id: s for s in soups}
        if model_id in known:
            return known[model_id], f"alias {ALIAS} of {name} (v{version.version})"
        if model_id:
            record = registry.get_model_record(client, model_id)
            if record.dataset_fingerprint == fingerprint:
                return (Candidate(record, "soup", record.metrics.get(f"val_{metric}", float("nan"))),
                        f"alias {ALIAS} of {name} (v{version.version})")
        notes.append(f"alias {ALIAS} of {name} (v{version.version}) points at no usable soup of this dataset")
    best_soup = _best([s for s in soups if s.record.architecture == sel.best.record.architecture], metric)
    if best_soup is not None:
        return best_soup, f"best soup by val {metric} (no {ALIAS} alias on {name})"
    return sel.best, f"best single CoAtNet by val {metric} (no soups)"


def champion_section(champ: Candidate, source: str, preds: Predictions, split: str, out: Path) -> dict:
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
    return result


# ---------------------------------------------------------------------------------------------- pages

def write_pages(out: Path, summary: dict) -> list[str]:
    """report.md and report.html: the table, every figure by file name, the notes."""
    s, split, metric = summary, summary["split"], summary["metric"]
    header, lines = table_lines(s["table"], metric)
    intro = (f"Experiment **{s['experiment']}** (id {s['experiment_id']}) on {s['tracking_uri']}; data `{s['data']}` "
             f"(fingerprint {s['dataset_fingerprint'][:16]}); {s['counts']['coatnet_checkpoints']} CoAtNet and "
             f"{s['counts']['baseline_checkpoints']} baseline checkpoints, {s['counts']['soups']} CoAtNet soups. Models are chosen by val {metric}; figures on {split}. Intervals: 95% "
             f"stratified bootstrap ({s['n_resamples']} resamples); Δ = row − best single CoAtNet on the same images, "
             "McNemar's exact test on the images where exactly one is right.")
    md = [f"# Model soups report: {s['experiment']}", "", intro, "", f"## Results on {split}", "",
          md_table(header, lines), "", "Files: `results.md`, `results.json`.", ""]
    parts = [("h2", f"Results on {split}"), ("table", html_table(header, lines)),
             ("p", "Files: results.md, results.json.")]
    if s["mds"]:
        text = (f"Pairwise cross-entropy distance on val between the epochs of trial {s['mds']['trial']}'s trajectory, "
                "its greedy and uniform soups and soft voting, embedded in 2-D by metric MDS; labels are val accuracy %.")
        md += ["## Cross-entropy distance and MDS (val)", "", text, "", "![MDS of CE distances](mds.png)", "",
               "Files: `mds.png`, `ce_distance.csv`, `ce_distance.json`.", ""]
        parts += [("h2", "Cross-entropy distance and MDS (val)"), ("p", text), ("img", "mds.png"),
                  ("p", "Files: mds.png, ce_distance.csv, ce_distance.json.")]
    if s["bias_variance"]:
        bv = s["bias_variance"]
        text = (f"Across {len(bv['trials'])} trials: their best single checkpoints vs their within-trajectory soups, "
                f"on {bv['split']}. CE: Yang et al. (bias² + variance = expected loss); 0-1: Domingos.")
        md += ["## Bias-variance", "", text, "", md_table(bv["table"]["header"], bv["table"]["lines"]), "",
               "![Bias-variance](bias_variance.png)", "",
               "Files: `bias_variance.png`, `bias_variance.md`, `bias_variance.json`.", ""]
        parts += [("h2", "Bias-variance"), ("p", text), ("table", html_table(bv["table"]["header"], bv["table"]["lines"])),
                  ("img", "bias_variance.png"), ("p", "Files: bias_variance.png, bias_variance.md, bias_variance.json.")]
    c = s["champion"]
    text = (f"{c['name']} ({c['model_id']}, {c['source']}): accuracy {_pct(c['metrics']['accuracy'])} %, "
            f"macro F1 {_pct(c['metrics']['macro_f1'])} % on {c['split']}.")
    md += ["## Champion", "", text, "", "![Champion confusion matrix and per-class F1](champion.png)", "",
           "Files: `champion.png`, `champion.json`.", ""]
    parts += [("h2", "Champion"), ("p", text), ("img", "champion.png"), ("p", "Files: champion.png, champion.json.")]
    if s["notes"]:
        md += ["## Notes", ""] + [f"- {n}" for n in s["notes"]] + [""]
        parts += [("h2", "Notes"), ("ul", s["notes"])]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")

    body = [f"<h1>Model soups report: {html.escape(s['experiment'])}</h1>", f"<p>{html.escape(intro)}</p>"]
    for kind, value in parts:
        if kind == "img":  # embedded, so the page stands alone; the file name is the link
            data = base64.b64encode((out / value).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{value}">'
                        f'<figcaption><a href="{value}">{value}</a></figcaption></figure>')
        elif kind == "table":
            body.append(value)
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in value) + "</ul>")
        else:
            body.append(f"<{kind}>{html.escape(value)}</{kind}>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Report "
                                     f"{html.escape(s['experiment'])}</title><style>{style}</style></head><body>"
                                     + "\n".join(body) + "</body></html>", encoding="utf-8")
    return ["report.md", "report.html"]


# ---------------------------------------------------------------------------------------------- main

def build_report(experiment: str, out_dir: str | None = None, *, tracking_uri: str | None = None,
                 data: str | None = None, split_for_table: str = "test", n_resamples: int = 1000,
                 device: str = "auto", metric: str = "macro_f1") -> dict:
    """Build the report of an experiment from MLflow, write it to out_dir (a temp folder if None) and log it
    as the artifacts of a report run; returns the summary (also written as report.json)."""
    from mlflow.entities import Metric

    from ich.home import ich_home

    if split_for_table not in SPLITS:
        raise ReportError(f"report option split_for_table={split_for_table!r}: must be one of {', '.join(SPLITS)}")
    if metric not in METRICS:
        raise ReportError(f"report option metric={metric!r}: must be one of {', '.join(METRICS)}")
    if n_resamples < 100:
        raise ReportError(f"report option n_resamples={n_resamples}: use at least 100")
    started = time.time()
    client, experiment_id, uri = _open(experiment, tracking_uri)
    records = registry.search_checkpoints(client, [experiment_id])
    if not records:
        raise ReportError(f"experiment {experiment!r}: no checkpoints")
    key = f"val_{metric}"
    scored = [r for r in records if math.isfinite(r.metrics.get(key, float("nan")))]
    top = _best([Candidate(r, "checkpoint", r.metrics[key]) for r in scored if family(r.architecture) == "coatnet"],
                metric)
    sweep_run = _sweep_run(client, experiment_id, top.record.sweep if top else None)
    tagged = sweep_run.data.tags.get("ich.data") if sweep_run else None
    data = data or tagged
    if not data:
        raise ReportError(f"experiment {experiment!r}: no sweep run with an ich.data tag; pass the dataset with --data")
    if not Path(data).is_dir():
        raise ReportError(f"dataset {data}: no such folder" + (" (the sweep run's ich.data tag; pass --data)"
                                                               if data == tagged else ""))
    dataset = load_dataset(data)

    notes: list[str] = []
    checkpoints = _usable(records, "checkpoint", key, dataset.fingerprint, notes)
    soups = [s for s in _usable(_soups(client, experiment_id), "soup", key, dataset.fingerprint, notes)
             if s.family == "coatnet"]
    if not any(c.family == "coatnet" for c in checkpoints):
        raise ReportError(f"experiment {experiment!r}: no CoAtNet checkpoint with a {key} on dataset {data}")
    if split_for_table == "val":
        notes.append("the table is on val, the split that also selects: its figures are optimistic")

    tmp = Path(tempfile.mkdtemp(prefix="ich-report-"))
    out = Path(out_dir) if out_dir else tmp / "report"
    out.mkdir(parents=True, exist_ok=True)
    run_id = None
    try:
        sel = select(checkpoints, soups, metric, lambda s: _soup_ingredients(client, s, tmp), notes)
        champ, source = _champion(client, experiment, sel, soups, metric, dataset.fingerprint, notes)
        needed = [sel.best, *sel.baselines.values(), *sel.soups.values(), *sel.trajectory, champ,
                  *(c for members in sel.ingredients.values() for c in members),
                  *(t[k] for t in sel.bias_variance for k in ("single", "uniform", "greedy"))]
        preds = Predictions(client, dataset, ich_home() / "cache" / "predictions" / dataset.fingerprint[:16],
                            tmp / "pulled", device)
        preds.ensure([c.record for c in needed])

        table = results_section(sel, preds, split_for_table, metric, n_resamples)
        (out / "results.json").write_text(json.dumps(json_safe({"split": split_for_table, "metric": metric,
                                                             "n_resamples": n_resamples, "rows": table}), indent=2,
                                                     ensure_ascii=False), encoding="utf-8")
        header, lines = table_lines(table, metric)
        (out / "results.md").write_text(f"# Results on {split_for_table}\n\n{md_table(header, lines)}\n",
                                        encoding="utf-8")
        mds = mds_section(sel, preds, out)
        if mds is None:
            notes.append("no MDS figure: the soup trial has fewer than 2 models to compare")
        bv = bias_variance_section(sel, preds, split_for_table, out)
        if bv is None:
            notes.append(f"no bias-variance study: {len(sel.bias_variance)} trial(s) have within-trajectory soups "
                         "(needs at least 2)")
        champion = champion_section(champ, source, preds, split_for_table, out)

        parent = sweep_run.info.run_id if sweep_run else None
        tags = {registry.TAG_KIND: "report", "ich.experiment": experiment, "ich.split": split_for_table,
                "ich.metric": metric, registry.TAG_SWEEP: sel.best.record.sweep,
                **({"mlflow.parentRunId": parent} if parent else {})}
        run = registry.call_with_retry("create report run", client.create_run, experiment_id,
                                       run_name=f"report-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
        run_id = run.info.run_id
        summary = json_safe({
            "experiment": experiment, "experiment_id": experiment_id, "tracking_uri": uri, "run_id": run_id,
            "parent_run_id": parent, "data": str(data), "dataset_fingerprint": dataset.fingerprint,
            "split": split_for_table, "metric": metric, "n_resamples": n_resamples, "out_dir": str(out),
            "counts": {"coatnet_checkpoints": sum(c.family == "coatnet" for c in checkpoints),
                       "baseline_checkpoints": sum(c.family != "coatnet" for c in checkpoints),
                       "soups": len(soups), "computed": preds.computed,
                       "from_cache": len({c.id for c in needed}) - preds.computed},
            "table": table, "mds": mds, "bias_variance": bv, "champion": champion, "notes": notes})
        files = ["results.md", "results.json"] + (["ce_distance.json", "ce_distance.csv", "mds.png"] if mds else []) \
            + (["bias_variance.md", "bias_variance.json", "bias_variance.png"] if bv else []) \
            + ["champion.json", "champion.png"] + write_pages(out, summary) + ["report.json"]
        summary["files"] = files
        summary["seconds"] = round(time.time() - started, 1)
        (out / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
        now = int(time.time() * 1000)
        metrics = [Metric(f"{r['key']}_{split_for_table}_{m}", float(r[m]), now, 0)
                   for r in table for m in ("accuracy", "macro_f1")]
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
        raise
    finally:
        shutil.rmtree(tmp / "pulled", ignore_errors=True)
        shutil.rmtree(tmp / "soup-meta", ignore_errors=True)
        if out_dir:
            shutil.rmtree(tmp, ignore_errors=True)


def print_summary(summary: dict) -> None:
    header, lines = table_lines(summary["table"], summary["metric"])
    keep = [0, 3, 6, 7, 9]  # model, acc, F1, Δacc, p: what fits a terminal
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

def add_report_args(p: argparse.ArgumentParser) -> None:
    """Options of `ich report` (wire with: s = sub.add_parser("report"); add_report_args(s); s.set_defaults(func=cmd_report))."""
    p.add_argument("--experiment", required=True, help="MLflow experiment (CoAtNet sweep, baselines and soups)")
    p.add_argument("--out", help="write the report here (default: $ICH_HOME/reports/<experiment>)")
    p.add_argument("--data", help="dataset folder (default: the latest sweep run's ich.data tag)")
    p.add_argument("--split", dest="split_for_table", choices=SPLITS, default="test", help="split of the table")
    p.add_argument("--metric", choices=METRICS, default="macro_f1", help="val metric that selects every model")
    p.add_argument("--resamples", dest="n_resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--device", default="auto")


def cmd_report(args: argparse.Namespace) -> None:
    """`ich report`: bad input exits 2 with one line."""
    from ich.home import ich_home
    from ich.errors import USER_ERRORS
    from soups.tracking_server import MlflowServerError
    out = args.out or str(ich_home() / "reports" / args.experiment)
    try:
        summary = build_report(args.experiment, out, data=args.data, split_for_table=args.split_for_table,
                               n_resamples=args.n_resamples, device=args.device, metric=args.metric)
    except (ReportError, registry.RegistryError, MlflowServerError) + USER_ERRORS as e:
        print(f"ich report: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print_summary(summary)
