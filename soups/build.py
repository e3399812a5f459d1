"""Build: a family's soups from its pulled members, one recipe at a time. No MLflow here.

within: the recipes over each trial's epochs (the paper). across: the recipes over each trial's best checkpoint
(Wortsman), plus the recipes that choose (greedy) over every checkpoint of the group. The recipes are data
(soups/recipes/): cook_family hands each one the family's RecipeInputs (and the soup of the recipe it starts from:
Recipe.starts_from, WiSE-FT's fine-tuned side). Greedy ranks ingredients by their recorded val metric and selects on
val; test is only reported. BatchNorm statistics are recalibrated on train when asked
('auto' keeps what is better on val), once per finished soup.

cook_family is shared by the serial path (soups/orchestrate.py records each soup before the next is built)
and the Ray tasks of soups/parallel.py.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from ich.checkpoint import CheckpointError
from ich.data import ICHDataset
from soups import recipes
from soups.average import RunningSum, prefetch
from soups.bn import choose_bn_mode
from soups.evaluate import Evaluator, higher_is_better
from soups.logit_store import PredictionStore
from soups.options import SoupError, SoupOptions
from soups.pull import Family, Pulled, short_reason


@dataclass
class Soup:
    """One soup's weights (emptied once recorded), BN mode and predictions, before it is reported."""
    state_dict: dict
    bn_mode: str
    logits: dict[str, np.ndarray]  # split -> (N, C)
    params: dict[str, str] = field(default_factory=dict)  # the recipe's parameters (CookedSoup.params)
    # a parameter the recipe swept on val: {"x": name, "chosen": value, "points": [{x: value, "step": int,
    # "val": {metric: value}, "test": {metric: value}}]}, logged as metrics <x>_<split>_<metric> by step
    curve: dict | None = None


@dataclass
class SoupBuilder:
    opts: SoupOptions
    dataset: ICHDataset
    pool: object  # has skip(record, reason): soups/pull.CheckpointPool, or a Ray task's collector
    evaluators: dict = field(default_factory=dict)
    # model_id -> split -> (N, C): the prediction store (soups/logit_store.py; `ich soup` hands it the dataset's
    # cache, so the report reads what was computed here); a temp one of its own when not given
    logits: PredictionStore = field(default_factory=PredictionStore)

    def evaluator(self, p: Pulled) -> Evaluator:
        key = p.spec.key()
        if key not in self.evaluators:
            self.evaluators[key] = Evaluator(self.dataset, p.spec, device=self.opts.device)
        return self.evaluators[key]

    def score(self, ev: Evaluator, logits: np.ndarray, split: str = "val") -> float:
        return ev.score(logits, split, self.opts.metric)

    def stream(self, members: list[Pulled]):
        """(member, state dict) pairs; meant to run inside prefetch's thread, so loading overlaps evaluation."""
        for p in members:
            try:
                yield p, p.load()
            except CheckpointError as e:  # verified on pull; only a cache file changed since could land here
                self.pool.skip(p.record, short_reason(e, str(p.folder)))

    def uniform(self, members: list[Pulled], ev: Evaluator, desc: str) -> tuple[dict, list[Pulled]]:
        """Uniform soup of the members, computing each member's val/test logits on the way (one pass)."""
        total, used = RunningSum(), []
        for p, sd in tqdm(prefetch(self.stream(members), 1), total=len(members), desc=desc, unit="ckpt",
                          file=sys.stderr, disable=None, leave=False):
            total.add(sd, p.label)
            if p.record.model_id not in self.logits:
                self.logits[p.record.model_id] = {s: ev.logits(sd, s) for s in ("val", "test")}
            used.append(p)
            del sd
        if not used:
            raise SoupError(f"{desc}: no usable ingredients")
        return total.mean(), used

    def finish(self, state_dict: dict, ev: Evaluator) -> Soup:
        """Apply the BN option (decided on val) and compute the soup's val and test logits."""
        val = ev.logits(state_dict, "val")
        mode = "none" if not ev.has_bn else "average"
        if ev.has_bn and self.opts.bn != "average":
            recal = ev.recalibrated(state_dict)
            recal_val = ev.logits(recal, "val")
            if self.opts.bn == "recalibrate":
                mode = "recalibrate"
            else:
                mode = choose_bn_mode(self.score(ev, val), self.score(ev, recal_val),
                                      higher_is_better(self.opts.metric))
            if mode == "recalibrate":
                state_dict, val = recal, recal_val
        return Soup(state_dict, mode, {"val": val, "test": ev.logits(state_dict, "test")})


def cook_family(builder: SoupBuilder, family: Family):
    """Build a family's soups, one recipe at a time: yields (recipe, soup, uniform, accepted, tries). No MLflow:
    the serial path records each soup before the next is built, a Ray task (soups/parallel.py) returns them.
    The uniform pass comes first for every family: it computes each member's logits (soft voting, best single)."""
    ev = builder.evaluator(family.members[0])
    uniform_sd, members = builder.uniform(family.members, ev, f"{family.name} uniform")
    family.members = members
    uniform = builder.finish(uniform_sd, ev)
    del uniform_sd
    # the soups another recipe of the family starts from (Recipe.starts_from: WiSE-FT's fine-tuned side), kept
    # until the family is done; the others' weights go once they are recorded
    wanted = {r for name in family.recipes
              if (start := recipes.get(name).starts_from) is not None and (r := start(builder.opts)) is not None}
    if "uniform" not in family.recipes and "uniform" not in wanted:
        uniform.state_dict = {}  # only its predictions are reported: keep memory flat during the other recipes
    # recipe -> its soup's weights (the dict itself: recording empties Soup.state_dict) and accepted ingredients
    kept: dict[str, tuple[dict, set[str]]] = {}

    def soup_weights(name: str) -> tuple[dict, set[str]]:
        if name not in kept:  # not cooked in this family (not one of its recipes, or later in the order): now
            cooked = recipes.get(name).cook(inputs)
            kept[name] = (cooked.soup.state_dict, cooked.accepted)
        return kept[name]

    anchor = family.anchor  # set by pull.families only where a recipe of the family needs it
    inputs = recipes.RecipeInputs(
        family=family.name, members=family.members, ingredients=builder.stream, evaluator=ev,
        anchor=anchor.load() if anchor else None, uniform=uniform, opts=builder.opts,
        finish=lambda sd: builder.finish(sd, ev), skip=lambda p, reason: builder.pool.skip(p.record, reason),
        anchor_name=f"the shared init (model {anchor.record.model_id})" if anchor else "the shared init",
        soup_weights=soup_weights)
    for name in family.recipes:
        recipe = recipes.get(name)
        if recipe.needs_anchor and inputs.anchor is None:  # pull.families leaves these out where none is found
            raise SoupError(f"{family.name}: recipe {name} needs the shared init, which this family has not")
        cooked = recipe.cook(inputs)
        if name in wanted:
            kept[name] = (cooked.soup.state_dict, cooked.accepted)
        soup = cooked.soup
        if cooked.params or cooked.curve is not None:
            soup.params, soup.curve = dict(cooked.params), cooked.curve
        yield name, soup, uniform, cooked.accepted, cooked.tries
