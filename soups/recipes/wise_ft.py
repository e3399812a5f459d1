"""WiSE-FT (Wortsman et al., CVPR 2022, "Robust fine-tuning of zero-shot models"): the fine-tuned weights pulled
back toward the shared init, w(α) = (1-α)·w_init + α·w_ft (soups/average.wise_ft), for α on a grid
(`--wise-alphas`, default 0, 0.1, ..., 1), α chosen on val.

- The init is the anchor: the family's shared init, the `init` LoggedModel of its ich.init_fingerprint
  (soups/pull.py finds it; a family without one gets a note instead, and the other recipes run).
- The fine-tuned side (`--wise-from`): the family's best single checkpoint by val (default), or the family's soup of
  the recipe named (uniform, greedy, model_stock...: its weights as recorded, BN option applied).
- The head (`--wise-head`): `keep` (default) keeps the fine-tuned classifier head whatever α and interpolates the
  backbone only (the init's head is a fresh, seeded one for a hub or file init: nothing to interpolate toward);
  `interpolate` interpolates every tensor. BN running statistics are interpolated like the weights; integer buffers
  are the nearer endpoint's (soups/average.wise_ft).
- α is chosen on val, by the selection metric (`--metric`); ties go to the larger α (the fine-tuned side: moving
  away from it needs val evidence, and a flat curve leaves the fine-tuned model as it is). The candidates use their
  interpolated BN statistics; the BN option is applied once, to the chosen soup (as greedy does). Test is evaluated
  at every α for the report only: choose_alpha is never handed a test figure.

The whole curve (every registered metric, val and test) is logged on the soup's run as alpha_<split>_<metric> at
step round(100·α) (soups/soup_record.py) and drawn in the report (soups/report/sections.py, `<recipe>_curve.png`); the
soup carries its parameters as tags ich.wise_ft.{alpha, head, from, from_model, alphas}.

Memory: the init, the fine-tuned side and one interpolated model at a time, whatever the grid.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from soups.recipes import CookedSoup, Recipe, RecipeInputs, register

NAME = "wise_ft"
CURVE_X = "alpha"


def step_of(alpha: float) -> int:
    """The metric step of α on the logged curve."""
    return round(100 * alpha)


def choose_alpha(val_scores: Iterable[tuple[float, float]], *, higher_is_better: bool = True) -> float:
    """The α of the best val score among (α, val score) pairs; ties go to the larger α; NaN scores never win.
    Only val goes in: the caller keeps test out of it."""
    best: tuple[float, float] | None = None
    for alpha, score in sorted(val_scores):
        if not math.isfinite(score):
            continue
        if best is None or (score >= best[1] if higher_is_better else score <= best[1]):  # >=: the larger α on ties
            best = (alpha, score)
    if best is None:
        raise ValueError("WiSE-FT: no finite val score on the alpha grid")
    return best[0]


def alpha_curve(init: dict, fine_tuned: dict, alphas: Iterable[float], evaluate: Callable[[dict], dict], *,
                keep: Iterable[str] = (), init_name: str = "the shared init",
                name: str = "the fine-tuned model") -> list[dict]:
    """[{"alpha", "step", **evaluate(w(α))}] over the grid, one interpolated model in memory at a time.
    evaluate(state dict) -> {"val": {metric: value}, "test": {...}}."""
    from soups.average import wise_ft
    keep = set(keep)
    points = []
    for alpha in alphas:
        sd = wise_ft(init, fine_tuned, alpha, keep=keep, init_name=init_name, name=name)
        points.append({CURVE_X: alpha, "step": step_of(alpha), **evaluate(sd)})
        del sd
    return points


def _fine_tuned(inputs: RecipeInputs) -> tuple[dict, str, str, set[str]]:
    """The fine-tuned side: (weights, what it is in messages, its model id (best) or recipe, the model ids it is made
    of)."""
    from soups.options import SoupError
    source = inputs.opts.wise_from
    if source == "best":
        for p, sd in inputs.ingredients(inputs.members):  # best val first: the first that loads
            return sd, p.label, p.record.model_id, {p.record.model_id}
        raise SoupError(f"{inputs.family} {NAME}: no usable ingredient to start from")
    weights, accepted = inputs.soup_weights(source)
    if not weights:
        raise SoupError(f"{inputs.family} {NAME}: the {source} soup's weights are not available")
    return weights, f"the {inputs.family} {source} soup", source, set(accepted)


def cook(inputs: RecipeInputs) -> CookedSoup:
    from ich.models import classifier_keys
    from soups.average import wise_ft
    from soups.evaluate import higher_is_better
    from soups.options import alpha_grid

    ev, opts = inputs.evaluator, inputs.opts
    ft, ft_name, ft_id, used = _fine_tuned(inputs)
    keep = classifier_keys(ev.model) if opts.wise_head == "keep" else set()

    def evaluate(sd: dict) -> dict:
        val = ev.logits(sd, "val")
        test = ev.logits(None, "test")  # the weights just loaded
        return {"val": ev.metrics(val, "val"), "test": ev.metrics(test, "test")}

    points = alpha_curve(inputs.anchor, ft, alpha_grid(opts.wise_alphas), evaluate, keep=keep,
                         init_name=inputs.anchor_name, name=ft_name)
    chosen = choose_alpha([(p[CURVE_X], p["val"][opts.metric]) for p in points],
                          higher_is_better=higher_is_better(opts.metric))
    soup = inputs.finish(wise_ft(inputs.anchor, ft, chosen, keep=keep, init_name=inputs.anchor_name, name=ft_name))
    params = {CURVE_X: f"{chosen:g}", "head": opts.wise_head, "from": opts.wise_from,
              "alphas": ",".join(f"{p[CURVE_X]:g}" for p in points)}
    if opts.wise_from == "best":
        params["from_model"] = ft_id
    return CookedSoup(soup, used, {}, params=params, curve={"x": CURVE_X, "chosen": chosen, "points": points})


def _starts_from(opts) -> str | None:
    return None if opts.wise_from == "best" else opts.wise_from


RECIPE = register(Recipe(NAME, needs_anchor=True, cook=cook, style=("v", "#9467bd"), starts_from=_starts_from))
