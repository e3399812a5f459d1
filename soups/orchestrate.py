"""The soup orchestrator: checkpoints of a sweep come back from MLflow, soups go back into it.

    run_soups(SoupOptions(experiment="ich17"))       # or: ich soup --experiment ich17

1. Pull (soups/pull.py). The sweep's record is read once (experiment, sweep run, checkpoint records). Every
   READY checkpoint of the sweep is found by search (never by a local path), downloaded in background threads
   while soups are being built, and verified once: sha256, safetensors, finite weights, registry tags against
   checkpoint.json. A checkpoint that fails is skipped with a warning naming it.
2. Group (soups/pull.py). Checkpoints average only within a group (soups/compat.group_key): same architecture,
   init and dataset, img size, class map and preprocessing; a member that differs from its group's first is
   refused.
3. Build (soups/build.py). within: the recipes (uniform, greedy, model_stock: soups/recipes/) over each trial's
   epochs (the paper). across: the recipes over each trial's best checkpoint (Wortsman), plus a greedy over every
   checkpoint of the group. model_stock's anchor, the shared init, is pulled from MLflow by the checkpoints' init
   fingerprint (soups/pull.py); where MLflow holds none, a note says so and the other recipes run. The
   ingredient pool (--ingredients all | top_k | cycle_end, soups/pool.py) chooses which checkpoints each family
   offers; the rule and the pool's size go on every soup and in the table.
4. Record (soups/soup_record.py). Each soup is a run under the sweep run with its figures, artifacts and weights.
5. Register (soups/champion.py). The best soup (val) becomes a version of the registered model; alias `champion`
   moves to it only when it beats the current champion.

Memory stays flat in the number of ingredients: a running sum, one candidate and one checkpoint loaded
ahead; only the ingredients' logits (N x C each) are kept, for soft voting (soups/logit_store.py: in memory up
to ICH_SOUP_LOGITS_MB, 64 MB by default, spilled to disk past it).

Each phase lives in its own module (pull, build, soup_record, champion); callers import from there.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

from ich.data import load_dataset
from ich.home import ich_home
from soups.build import Soup, SoupBuilder, cook_family
from soups.champion import register_best
from soups.logit_store import PredictionStore, prediction_cache
from soups.options import SPLITS, SoupError, SoupOptions, add_soup_args  # noqa: F401  (`ich soup`'s public face)
from soups.pool import label as pool_label
from soups.pull import CheckpointPool, Family, families, read_sweep, usable_records
from soups.soup_record import SoupCall, SoupEntry, json_safe, log_soup, pool_text, quiet_run_urls, report_soup


def _record_soup(ctx: SoupCall, builder: SoupBuilder, family: Family, recipe: str, soup: Soup, uniform: Soup,
                 accepted: set[str], tries: dict[str, float], soups: list[SoupEntry]) -> None:
    """Report one built soup, log it to MLflow and put its predictions in the store (champion decision, report)."""
    members, ev = family.members, builder.evaluator(family.members[0])
    name = f"{family.name}-{recipe}"
    entry = report_soup(name=name, family=family, recipe=recipe, soup=soup, members=members, ev=ev,
                        builder=builder, uniform=uniform, accepted=accepted, tries=tries)
    log_soup(ctx, entry, soup, members[0])
    soup.state_dict = {}  # on disk and in MLflow now; the next recipe needs the memory
    builder.logits[entry.model_id] = soup.logits  # the prediction store: the champion decision and `ich report` read it
    soups.append(entry)


def cooked_families(builder: SoupBuilder, opts: SoupOptions, records, pool: CheckpointPool, uri: str, notes: list[str]):
    """(family, one built soup) in family order: built here one after another, or as Ray tasks (--parallel N)."""
    if opts.parallel > 1:  # families as Ray tasks; recorded here in the same order as the serial path
        from soups.parallel import cook_families
        for family, cooked in cook_families(builder, families(opts, records, pool, notes), uri, notes):
            for one in cooked:
                yield family, one
    else:
        for family in families(opts, records, pool, notes):
            for one in cook_family(builder, family):
                yield family, one


def _default_tracking_uri() -> str:
    from soups.tracking_server import ensure_tracking_uri
    return ensure_tracking_uri()


def run_soups(opts: SoupOptions) -> dict:
    """Build the soups of a sweep from MLflow, record them there, move `champion`; returns the summary."""
    import mlflow

    opts.validate()
    started = time.time()
    uri = opts.tracking_uri or _default_tracking_uri()
    mlflow.set_tracking_uri(uri)  # for whatever below makes its own MlflowClient() or downloads without a URI
    client = MlflowClient(uri)
    snap = read_sweep(client, opts, uri)
    data = opts.data or snap.data
    if not data:
        raise SoupError(f"sweep {snap.sweep!r}: no ich.data tag on a sweep run; pass the dataset with --data")
    dataset = load_dataset(data)
    usable = usable_records(snap.records, opts.metric, dataset.fingerprint, data)
    records, skipped = usable.records, usable.skipped
    if not records:
        first = skipped[0]["reason"] if skipped else "weights deleted by ich gc"
        raise SoupError(f"experiment {opts.experiment!r}: none of its {len(snap.records)} checkpoints is usable "
                        f"(first: {first})")
    print(f"soups of sweep {snap.sweep}: {len(records)} checkpoints of {len({r.trial for r, _ in records})} trials, "
          f"scope {opts.scope}, recipe {opts.recipe}, metric val_{opts.metric}, BN {opts.bn}, "
          f"ingredients {pool_label(opts.ingredients, opts.k)}", flush=True)

    soups: list[SoupEntry] = []
    notes: list[str] = []
    if usable.collected:
        notes.append(f"{len(usable.collected)} checkpoint(s) kept as records only (weights deleted by ich gc), "
                     "not souped")
    champion = None
    tmp = Path(tempfile.mkdtemp(prefix="ich-soups-"))
    pool = CheckpointPool(client, records, tmp / "pulled")
    ctx = SoupCall(client, opts, snap.experiment_id, snap.sweep, snap.sweep_run_id, dataset, tmp)
    # Every ingredient's and soup's val/test logits, written through to the dataset's cache: a later `ich soup`
    # or `ich report` reads them instead of running those models again.
    predictions = PredictionStore(prediction_cache(ich_home(), dataset.fingerprint),
                                  shapes={s: (len(dataset.splits[s].labels), dataset.num_classes) for s in SPLITS})
    try:
        with quiet_run_urls():
            builder = SoupBuilder(opts, dataset, pool, logits=predictions)
            for family, cooked in cooked_families(builder, opts, records, pool, uri, notes):
                _record_soup(ctx, builder, family, *cooked, soups)
            pool.close()
            if soups:
                champion = register_best(ctx, soups, {e.name: predictions[e.model_id]["val"] for e in soups})
            else:
                notes.append("no soup could be built")
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = json_safe({
        "experiment": opts.experiment, "sweep": snap.sweep, "sweep_run_id": snap.sweep_run_id, "tracking_uri": uri,
        "data": str(data), "metric": opts.metric, "tie_rule": opts.tie_rule, "bn": opts.bn, "scope": opts.scope,
        "recipe": opts.recipe, "ingredients": pool_label(opts.ingredients, opts.k), "champion_rule": opts.champion_rule,
        "soups": [e.to_dict() for e in soups],
        "skipped": skipped + pool.skipped, "notes": notes, "champion": champion,
        "seconds": round(time.time() - started, 1)})
    if opts.json_path:
        Path(opts.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_path).write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    print_table(summary)
    return summary


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:6.2f}"


def print_table(summary: dict) -> None:
    metric = summary["metric"]
    print(f"\n{'soup':<32} {'n':>5} {'val ' + metric:>12} {'test acc [95% CI]':>24} {'test F1':>7} "
          f"{'best':>6} {'vote':>6} {'Δacc vs best (p)':>18}  {'BN':<11}  pool")
    for s in summary["soups"]:
        n = f"{sum(i['accepted'] for i in s['ingredients'])}/{len(s['ingredients'])}"
        lo, hi = s["test"]["accuracy_ci"]
        vs = s["vs_best_single"]
        print(f"{s['name'][:32]:<32} {n:>5} {s['val'][metric]:>12.4f} {_pct(s['test']['accuracy'])} "
              f"[{_pct(lo)},{_pct(hi)}] {_pct(s['test']['macro_f1'])} {_pct(s['best_single']['test']['accuracy'])} "
              f"{_pct(s['soft_vote']['test']['accuracy'])} {100 * vs['acc_diff']:+7.2f} (p={vs['mcnemar_p']:.2f})"
              f"  {s['bn_mode']:<11}  {pool_text(s.get('pool'))}")
    for s in summary["skipped"]:
        print(f"skipped trial {s['trial']} epoch {s['epoch']} ({s['model_id']}): {s['reason']}")
    for note in summary["notes"]:
        print(f"note: {note}")
    c = summary.get("champion")
    if c:
        print(f"{c['registered_model']} v{c['version']} ({c['soup']}): alias {c['alias']} "
              f"{'moved to it' if c['moved'] else 'kept on v' + str(c['alias_version'])}: {c['reason']}")
    print(f"soups took {summary['seconds']} s", flush=True)


# ---------------------------------------------------------------------------------------------- CLI

def cmd_soup(args: argparse.Namespace) -> None:
    """`ich soup`: bad input exits 2 with one line."""
    from ich.errors import exit_on_user_error
    names = {f.name for f in dataclasses.fields(SoupOptions)}
    with exit_on_user_error("ich soup"):
        run_soups(SoupOptions(**{k: v for k, v in vars(args).items() if k in names}))
