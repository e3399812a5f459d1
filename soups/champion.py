"""Champion: the best soup (val) becomes a version of the registered model; alias `champion` moves to it only
when it beats the current champion (rule 'better': its val metric; rule 'significant': McNemar's exact test on
val, p < alpha, with higher val accuracy).

registered_model_name and current_champion are the lookups the report uses too.
"""
from __future__ import annotations

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from soups.store import registry, retry
from soups.evaluate import EvalSpec, Evaluator, higher_is_better, metric_value
from soups.soup_record import SoupCall, SoupEntry
from soups.stats import mcnemar_exact
from soups.store.tags import (TAG_CHAMPION_PREFIX, TAG_DATASET, TAG_DECISION, TAG_DECISION_REASON, TAG_EXPERIMENT,
                              TAG_METRIC, TAG_REGISTERED_MODEL, TAG_REGISTERED_VERSION, TAG_SOUP, TAG_SOUP_MODEL,
                              TAG_SWEEP, TAG_VAL_PREFIX)

ALIAS = "champion"


def soup_card(ctx: SoupCall, best: SoupEntry, metric: str, decision: dict) -> str:
    """The registered version's model card (soups/store/lineage.py): figures, ingredients, input, decision, limits."""
    from ich.checkpoint import read_meta
    from soups.store import provenance
    from soups.store.lineage import model_card
    from soups.store.tags import TAG_SOURCE_HASH, TAG_VERSION
    meta = read_meta(best.ckpt)
    code = provenance.run_tags("soups/champion.py")
    return model_card(name=best.name, recipe=best.recipe, scope=best.scope, experiment_id=ctx.experiment_id,
                      ingredients=best.ingredients, val=best.val, test=best.test, vs_best_single=best.vs_best_single,
                      best_single=best.best_single, metric=metric, bn_mode=best.bn_mode, preprocess=meta.preprocess,
                      dataset_fingerprint=ctx.dataset.fingerprint,
                      code_version=f"{code.get(TAG_VERSION, '?')} (source {str(code.get(TAG_SOURCE_HASH, '?'))[:12]})",
                      decision=("moved `champion` here: " if decision["moved"] else "kept `champion` where it was: ")
                      + decision["reason"], params=best.params)


def registered_model_name(experiment: str, registered_model: str | None = None) -> str:
    """The registered model a sweep's soups go to: the one given, else "<experiment>-soup"."""
    return registered_model or f"{experiment}-soup"


def current_champion(client: MlflowClient, name: str):
    """The model version alias `champion` of `name` points at, or None (no model, no alias, or its version was
    deleted). A transient server error is raised, not taken for "no champion"."""
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException as e:
        if retry.is_transient(e):
            raise
        return None


def ensure_registered_model(client: MlflowClient, name: str, experiment: str) -> None:
    try:
        retry.call_with_retry(f"get registered model {name!r}", client.get_registered_model, name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            retry.call_with_retry(f"create registered model {name!r}", client.create_registered_model, name,
                                     tags={TAG_EXPERIMENT: experiment})
        except MlflowException as e2:
            if e2.error_code != "RESOURCE_ALREADY_EXISTS":  # created by another call meanwhile
                raise


def _better(new: float, old: float, metric: str) -> bool:
    return new > old if higher_is_better(metric) else new < old


def _champion_val_logits(ctx: SoupCall, version) -> tuple[np.ndarray | None, str]:
    """The champion's val logits from its own weights (sha256 verified), or None and why not."""
    model_id = (version.tags or {}).get(TAG_SOUP_MODEL)
    if not model_id:
        return None, f"champion v{version.version} has no {TAG_SOUP_MODEL} tag"
    record = registry.get_model_record(ctx.client, model_id)
    state_dict, meta = registry.load_record(ctx.client, record, ctx.tmp / "champion")
    if list(meta.class_names) != ctx.dataset.classes or meta.dataset_fingerprint != ctx.dataset.fingerprint:
        return None, f"champion v{version.version} was built on another dataset"
    return Evaluator(ctx.dataset, EvalSpec.of(meta), device=ctx.opts.device).logits(state_dict, "val"), ""


def decide_champion(ctx: SoupCall, best: SoupEntry, best_val_logits: np.ndarray, current) -> dict:
    """Whether alias `champion` moves to the new best soup; the figures behind the decision."""
    opts, metric = ctx.opts, ctx.opts.metric
    new_val = best.val[metric]
    out = {"rule": opts.champion_rule, "metric": metric, "new_val": new_val, "champion_val": None,
           "previous_version": None, "p_value": None}
    if current is None:
        return {**out, "moved": True, "reason": "no champion yet"}
    out["previous_version"] = current.version
    tags = current.tags or {}
    if tags.get(TAG_DATASET) and tags[TAG_DATASET] != ctx.dataset.fingerprint:
        return {**out, "moved": False, "reason": f"champion v{current.version} is on another dataset; not comparable"}
    champ_val = tags.get(f"{TAG_VAL_PREFIX}{metric}")
    champ_logits = None
    if champ_val is None and current.run_id:  # older versions: the run's metric
        champ_val = retry.call_with_retry("get champion run", ctx.client.get_run, current.run_id).data.metrics.get(
            f"val_{metric}")
    if champ_val is None or opts.champion_rule == "significant":
        champ_logits, why = _champion_val_logits(ctx, current)
        if champ_logits is None:
            return {**out, "moved": False, "reason": why}
        champ_val = metric_value(champ_logits, ctx.dataset.splits["val"].labels, ctx.dataset.num_classes, metric)
    out["champion_val"] = champ_val = float(champ_val)
    if opts.champion_rule == "better":
        moved = _better(new_val, champ_val, metric)
        verb = "beats" if moved else "does not beat"
        return {**out, "moved": moved,
                "reason": f"val {metric} {new_val:.4f} {verb} champion v{current.version}'s {champ_val:.4f}"}
    sig = significant_decision(ctx.dataset.splits["val"].labels, best_val_logits.argmax(1), champ_logits.argmax(1),
                               opts.alpha)
    moved = sig.pop("moved")
    out.update(sig)
    new_acc, champ_acc, p = sig["new_val_accuracy"], sig["champion_val_accuracy"], sig["p_value"]
    return {**out, "moved": moved,
            "reason": f"val accuracy {new_acc:.4f} vs champion v{current.version}'s {champ_acc:.4f}, McNemar exact "
                      f"p={p:.3g} ({'<' if p < opts.alpha else '>='} alpha {opts.alpha})"}


def significant_decision(y_val: np.ndarray, new_pred: np.ndarray, champ_pred: np.ndarray, alpha: float) -> dict:
    """Rule 'significant', on val predictions only: move when McNemar's exact test says the two differ
    (p < alpha) and the new one is the more accurate."""
    test = mcnemar_exact(y_val, new_pred, champ_pred)
    new_acc, champ_acc = float((new_pred == y_val).mean()), float((champ_pred == y_val).mean())
    return {"moved": test.p_value < alpha and new_acc > champ_acc, "p_value": test.p_value, "mcnemar_b": test.b,
            "mcnemar_c": test.c, "new_val_accuracy": new_acc, "champion_val_accuracy": champ_acc}


def best_soup(soups: list[SoupEntry], metric: str) -> SoupEntry:
    """The soup registered as a candidate champion: best val `metric` (the first of equals); test never chooses."""
    sign = 1.0 if higher_is_better(metric) else -1.0
    return max(soups, key=lambda e: sign * e.val[metric])  # max() keeps the first of equals


def register_best(ctx: SoupCall, soups: list[SoupEntry], val_logits: dict[str, np.ndarray]) -> dict:
    """Register the best soup (val), its own LoggedModel (logged once by ich soup, signed: no second upload; `ich
    serve` writes the pyfunc model around its verified copy), and move `champion` only if it wins."""
    client, opts, metric = ctx.client, ctx.opts, ctx.opts.metric
    best = best_soup(soups, metric)
    name = registered_model_name(opts.experiment, opts.registered_model)
    ensure_registered_model(client, name, opts.experiment)
    current = current_champion(client, name)
    decision = decide_champion(ctx, best, val_logits[best.name], current)

    version_tags = {TAG_SOUP: best.name, TAG_SOUP_MODEL: best.model_id,
                    TAG_SWEEP: ctx.sweep, TAG_EXPERIMENT: opts.experiment, TAG_METRIC: metric,
                    TAG_DATASET: ctx.dataset.fingerprint,
                    TAG_DECISION: "moved" if decision["moved"] else "kept",
                    TAG_DECISION_REASON: decision["reason"][:5000],
                    **{f"{TAG_VAL_PREFIX}{k}": repr(v) for k, v in best.val.items()},
                    **{f"{TAG_CHAMPION_PREFIX}{k}": repr(decision[k]) for k in ("champion_val", "p_value")
                       if decision[k] is not None}}
    version = retry.call_with_retry(
        f"register soup in {name!r}", client.create_model_version, name, source=f"models:/{best.model_id}",
        run_id=best.run_id, tags=version_tags, model_id=best.model_id,
        description=soup_card(ctx, best, metric, decision))
    if decision["moved"]:
        retry.call_with_retry(f"move alias {ALIAS}", client.set_registered_model_alias, name, ALIAS, version.version)
    run_tags = {k: v for k, v in version_tags.items() if k.startswith(TAG_CHAMPION_PREFIX)}  # decision, reason, figures
    run_tags.update({TAG_REGISTERED_MODEL: name, TAG_REGISTERED_VERSION: str(version.version)})
    retry.call_with_retry("tag champion decision", client.log_batch, best.run_id,
                             tags=[RunTag(k, v) for k, v in run_tags.items()])
    alias_version = version.version if decision["moved"] else (current.version if current else None)
    return {"registered_model": name, "version": str(version.version), "soup": best.name,
            "run_id": best.run_id, "model_id": best.model_id,
            "alias": ALIAS, "alias_version": None if alias_version is None else str(alias_version), **decision}
