"""Greedy soup (Wortsman et al. 2022): members best val first, each one kept when the soup with it does not score
worse on val (the tie rule decides). Selects on val, so it is also cooked over every checkpoint of a group.

The candidates use the averaged BatchNorm statistics; the BN option is applied once, to the finished soup (a train
pass per try would cost more than the whole selection).
"""
from __future__ import annotations

import sys

from soups.recipes import CookedSoup, Recipe, RecipeInputs, register


def cook(inputs: RecipeInputs) -> CookedSoup:
    from tqdm import tqdm

    from soups.average import Ingredient, greedy_soup
    from soups.evaluate import higher_is_better

    ev, metric = inputs.evaluator, inputs.opts.metric
    bar = tqdm(total=len(inputs.members), desc=f"{inputs.family} greedy", unit="try", file=sys.stderr, disable=None,
               leave=False)

    def evaluate(sd: dict) -> float:
        bar.update(1)
        return ev.score(ev.logits(sd, "val"), "val", metric)

    by_id = {p.record.model_id: p for p in inputs.members}
    ingredients = (Ingredient(p.record.model_id, p.score, sd) for p, sd in inputs.ingredients(inputs.members))
    try:
        result = greedy_soup(ingredients, evaluate, higher_is_better=higher_is_better(metric),
                             tie_rule=inputs.opts.tie_rule, prefetch_depth=1,
                             on_skip=lambda s: inputs.skip(by_id[s.name], s.reason))
    finally:
        bar.close()
    return CookedSoup(inputs.finish(result.state_dict), set(result.accepted),
                      {s.name: s.candidate_score for s in result.steps})


RECIPE = register(Recipe("greedy", needs_anchor=False, cook=cook, every_checkpoint=True, style=("*", "#d62728")))
