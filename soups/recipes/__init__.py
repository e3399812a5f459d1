"""Soup recipes as data: one module per recipe registers a Recipe here; options, families, the soup table, the
report and the plots iterate the registry (docs/design.md#15).

    from soups.recipes import CookedSoup, Recipe, RecipeInputs, register

    def cook(inputs: RecipeInputs) -> CookedSoup: ...
    register(Recipe("best_two", needs_anchor=False, cook=cook))

The built-in recipes (uniform.py, greedy.py, model_stock.py, wise_ft.py, learned.py) are imported below. More modules come from ICH_RECIPES
(comma-separated module names, e.g. `ICH_RECIPES=mypkg.model_stock`), imported when the recipes are first asked
for, so that `ich soup --help`, `ich soup`, `ich report` and the Ray tasks they start see the same recipes. A
recipe is found only by the name it registered: a tag read from MLflow (ich.recipe) never imports anything.

No torch here nor at the top of a recipe module: `ich --help` lists the recipes.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ich.errors import ConfigError

if TYPE_CHECKING:
    from soups.build import Soup
    from soups.evaluate import Evaluator
    from soups.options import SoupOptions
    from soups.pull import Pulled

RECIPES_ENV = "ICH_RECIPES"
RESERVED = ("all", "trial", "single", "best_single", "soft_vote", "vote", "ingredient")  # options, report kinds


@dataclass(frozen=True)
class RecipeInputs:
    """What a recipe cooks one family's soup from."""
    family: str  # the family's name (within-<trial>, across-best...): progress bars and messages
    members: list[Pulled]  # the usable ingredients, best val first
    ingredients: Callable[[list[Pulled]], Iterator[tuple[Pulled, dict]]]  # (member, state dict) streamed, loaded
    # ahead in a thread; a member whose file fails is skipped (and reported) on the way
    evaluator: Evaluator  # the family's val/test logits and scores
    anchor: dict | None  # the shared init's state dict (soups/pull.py finds it by the family's init fingerprint);
    # None where it was not asked for or not found (a recipe that needs it is then not cooked)
    uniform: Soup  # the family's uniform soup: logits and BN mode (its weights are released once it is recorded)
    opts: SoupOptions
    finish: Callable[[dict], Soup]  # a soup's weights -> Soup: the BN option applied (decided on val), val/test logits
    skip: Callable[[Pulled, str], None]  # report an ingredient left out (NaN/Inf...), naming why
    anchor_name: str = "the shared init"  # names the anchor (its init model) in a recipe's messages
    soup_weights: Callable[[str], tuple[dict, set[str]]] | None = None  # recipe name -> that recipe's soup of this
    # family: its weights and accepted model ids (the one cooked before in this call, else cooked now); for
    # Recipe.starts_from


@dataclass
class CookedSoup:
    """A recipe's soup and what it chose: the accepted ingredients' model ids, and for the ingredients it tried one
    by one, the candidate soup's val score (greedy's curve; empty for recipes that do not try). params: what the
    recipe chose or was told (name -> text), tags `ich.<recipe>.<name>` on the soup's run and LoggedModel; curve: a
    parameter swept on val (soups/build.Soup.curve's shape), logged as metrics by step."""
    soup: Soup
    accepted: set[str]
    tries: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)
    curve: dict | None = None


@dataclass(frozen=True)
class Recipe:
    name: str  # the ich.recipe tag value, `--recipe` choice and soup name suffix (<family>-<name>)
    needs_anchor: bool  # pulls toward the shared init: skipped, with a note, where MLflow holds none
    cook: Callable[[RecipeInputs], CookedSoup]
    every_checkpoint: bool = False  # also cooked over every checkpoint of a group (across-all): recipes that choose
    style: tuple[str, str] | None = None  # matplotlib (marker, colour) in the plots; None: one is generated
    # starts_from(opts): the recipe whose soup of the same family this one starts from (its weights come through
    # RecipeInputs.soup_weights), or None; a recipe with one is not itself a choice of another's
    starts_from: Callable[[SoupOptions], str | None] | None = None


_recipes: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add a recipe; registering the same name again (a reloaded module) replaces it in place."""
    if not recipe.name.replace("_", "").isalnum() or recipe.name in RESERVED:
        raise ValueError(f"recipe name {recipe.name!r}: letters, digits and _ only, and none of {', '.join(RESERVED)}")
    _recipes[recipe.name] = recipe
    return recipe


def get(name: str) -> Recipe:
    _import_env_modules()
    try:
        return _recipes[name]
    except KeyError:
        raise ConfigError(f"unknown soup recipe {name!r} (registered: {', '.join(_recipes)}; "
                          f"{RECIPES_ENV} adds modules)") from None


def names() -> list[str]:
    """Registered recipe names, in registration order (built-ins first)."""
    _import_env_modules()
    return list(_recipes)


def ray_runtime_env() -> dict | None:
    """What Ray tasks on other nodes need to see the same recipes: ICH_RECIPES (the modules themselves must be
    importable there, like the project's own code). None when it is unset."""
    modules = os.environ.get(RECIPES_ENV)
    return {"env_vars": {RECIPES_ENV: modules}} if modules else None


_env_imported: set[str] = set()


def _import_env_modules() -> None:
    """The modules ICH_RECIPES names, each imported once, when the recipes are first asked for (a bad name is then a
    one-line error of the command that asked, not of every import of this package)."""
    for module in filter(None, (m.strip() for m in os.environ.get(RECIPES_ENV, "").split(","))):
        if module in _env_imported:
            continue
        _env_imported.add(module)  # before importing: the module itself may ask for the recipes
        try:
            importlib.import_module(module)
        except ImportError as e:
            _env_imported.discard(module)
            raise ConfigError(f"{RECIPES_ENV}={os.environ[RECIPES_ENV]}: module {module} cannot be imported "
                              f"({e})") from None


# they register themselves, in this order (the table's, the report's)
for _builtin in ("uniform", "greedy", "model_stock", "wise_ft", "learned"):
    importlib.import_module(f"soups.recipes.{_builtin}")
