"""Uniform soup: the plain mean of every member's weights (Wortsman et al. 2022).

The family's uniform soup is made before any recipe runs (that one pass also computes every member's logits, for
soft voting and the best single: soups/build.cook_family), so this recipe hands it on.
"""
from __future__ import annotations

from soups.recipes import CookedSoup, Recipe, RecipeInputs, register


def cook(inputs: RecipeInputs) -> CookedSoup:
    return CookedSoup(inputs.uniform, {p.record.model_id for p in inputs.members}, {})


RECIPE = register(Recipe("uniform", needs_anchor=False, cook=cook, style=("s", "#2ca02c")))
