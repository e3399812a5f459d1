"""The report: the paper's table, its figures and a bias-variance study, from MLflow records alone.

    build_report("ich17", "reports/ich17")          # or: ich report --experiment ich17 --out reports/ich17

Files (soups/report/): snapshot.py reads (Snapshot, read_snapshot: every MLflow/Optuna read); predictions.py holds
the logits (Predictions); selection.py chooses by val (select, the champion shown); sections.py computes each section
as data; render.py draws the pages; this file runs the phases (compute_report, build_report); cli.py is `ich report`.

Three phases, so the math is testable without a server:
  1. read_snapshot (soups/report/snapshot.py): the sweep's record, read once (searches, never local paths) into a `Snapshot`:
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

import json
import shutil
import tempfile
import time
from pathlib import Path

from ich.data import load_dataset
from ich.metrics import METRICS, metric_names
from soups.store import provenance, registry, retry
from soups.logit_store import prediction_cache
from soups.options import SPLITS
from soups.report.predictions import Predictions
from soups.report.render import write_pages
from soups.report.sections import (Report, Section, bias_variance_section, champion_section, forest_section,
                                   learning_curves_section, mds_section, optuna_section, parameter_curve_sections,
                                   results_rows, results_section, val_test_section)
from soups.report.selection import Selection, _champion, _usable, select
from soups.report.snapshot import Candidate, ReportError, Snapshot, read_snapshot
from soups.soup_record import json_safe
from soups.stats import interval_metrics
from soups.store.tags import KIND_REPORT, TAG_EXPERIMENT, TAG_KIND, TAG_METRIC, TAG_SPLIT, TAG_SWEEP


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

    rows = results_rows(sel, preds, split, n_resamples, snap.soup_runs)
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
                **provenance.run_tags("soups/report/build.py")}  # the code and packages that made it, as on every run
        run = retry.call_with_retry("create report run", client.create_run, snap.experiment_id,
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
        retry.call_with_retry("log report metrics", client.log_batch, run_id, metrics=metrics)
        for name in files:
            retry.call_with_retry(f"log report artifact {name}", client.log_artifact, run_id, str(out / name))
        retry.call_with_retry("finish report run", client.set_terminated, run_id, "FINISHED")
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
