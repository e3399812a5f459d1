"""A soup recipe from outside soups/, for tests/test_recipe_registry.py: the uniform soup of the family's two best
members. `ICH_RECIPES=tests.toy_recipe` loads it; no other file names it. No plot style: the plots generate one."""
from __future__ import annotations

from soups.recipes import CookedSoup, Recipe, RecipeInputs, register

NAME = "best_two"


def cook(inputs: RecipeInputs) -> CookedSoup:
    from soups.average import RunningSum
    total, used = RunningSum(), set()
    for p, sd in inputs.ingredients(inputs.members[:2]):
        total.add(sd, p.label)
        used.add(p.record.model_id)
    return CookedSoup(inputs.finish(total.mean()), used, {})


register(Recipe(NAME, needs_anchor=False, cook=cook))
