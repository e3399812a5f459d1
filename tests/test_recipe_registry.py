"""Recipes are data (issue 20, item 3): a recipe registered by a module outside soups/ (tests/toy_recipe.py, loaded
with ICH_RECIPES, no other file edited) is an `ich soup --recipe` choice, is cooked into soups that reach the soup
table and MLflow, and gets its rows in the report, its bars in the forest plot and a generated plot style. The
`ich` commands run as subprocesses, so the test session's own registry stays the built-ins (the controls).
Real MLflow: the session's tiny sweep copied into an experiment of its own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from soups import recipes
from tests.logged_sweep import copy_sweep

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "recipe-registry"
TOY_MODULE = "tests.toy_recipe"  # never imported by this process: only the `ich` subprocesses load it
TOY = "best_two"  # the name it registers


def _ich(args: list[str], *, toy: bool, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    if toy:
        env[recipes.RECIPES_ENV] = TOY_MODULE
    else:
        env.pop(recipes.RECIPES_ENV, None)
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Recipes registered inside one test only (the session's registry comes back after it)."""
    monkeypatch.setattr(recipes, "_recipes", dict(recipes._recipes))
    return recipes


# ---------------------------------------------------------------------------------------------- no server

def test_builtins_registered_in_order_and_names_checked(scratch_registry):
    assert recipes.names() == ["uniform", "greedy", "model_stock", "wise_ft", "learned"]  # never the toy here
    assert [recipes.get(n).every_checkpoint for n in recipes.names()] == [False, True, False, False, False]
    assert [recipes.get(n).needs_anchor for n in recipes.names()] == [False, False, True, True, False]
    with pytest.raises(ValueError, match="recipe name 'all'"):
        recipes.register(recipes.Recipe("all", needs_anchor=False, cook=lambda inputs: None))
    with pytest.raises(ValueError, match="recipe name 'single'"):  # a report kind: its rows would collide
        recipes.register(recipes.Recipe("single", needs_anchor=False, cook=lambda inputs: None))
    from ich.errors import ConfigError
    with pytest.raises(ConfigError,
                       match=r"^unknown soup recipe 'dare' \(registered: uniform, greedy, model_stock, wise_ft, learned;"):
        recipes.get("dare")
    recipes.register(recipes.Recipe("dare", needs_anchor=True, cook=lambda inputs: None))
    assert recipes.names() == ["uniform", "greedy", "model_stock", "wise_ft", "learned", "dare"]
    assert recipes.get("dare").needs_anchor


def test_a_recipe_without_a_style_gets_a_generated_one(scratch_registry, tmp_path):
    from soups.plots import marker_of, plot_mds, plot_val_test
    assert marker_of("toy_a") is None  # not registered: no style of its own
    for name in ("toy_a", "toy_b"):
        recipes.register(recipes.Recipe(name, needs_anchor=False, cook=lambda inputs: None))
    styles = [marker_of(k) for k in ("uniform", "greedy", "toy_a", "toy_b", "ingredient", "soft_vote")]
    assert styles[:2] == [("s", "#2ca02c"), ("*", "#d62728")]  # the built-ins keep the figures' styles
    assert len(set(styles)) == len(styles)  # each generated style differs from every other
    marked = [{"kind": k, "val": 0.5 + 0.1 * i, "test": 0.4 + 0.1 * i, "label": k}
              for i, k in enumerate(("best_single", "uniform", "toy_a", "soft_vote"))]
    assert plot_val_test(tmp_path / "vt.png", [(0.5, 0.5)], marked, metric="accuracy", title="t").is_file()
    points = [{"kind": k, "val_accuracy": 0.5} for k in ("ingredient", "ingredient", "toy_a", "greedy", "soft_vote")]
    import numpy as np
    assert plot_mds(tmp_path / "m.png", np.random.default_rng(0).random((5, 2)), points, "t").is_file()


def test_ray_tasks_of_ich_soup_parallel_are_handed_the_recipe_modules(monkeypatch):
    monkeypatch.delenv(recipes.RECIPES_ENV, raising=False)
    assert recipes.ray_runtime_env() is None  # control: nothing to hand on
    monkeypatch.setenv(recipes.RECIPES_ENV, TOY_MODULE)  # read, not imported here
    assert recipes.ray_runtime_env() == {"env_vars": {recipes.RECIPES_ENV: TOY_MODULE}}


def test_the_toy_recipe_is_an_ich_soup_choice_only_where_its_module_is_named():
    toy, plain = _ich(["soup", "--help"], toy=True), _ich(["soup", "--help"], toy=False)
    assert toy.returncode == plain.returncode == 0, toy.stderr + plain.stderr
    assert "{uniform,greedy,model_stock,wise_ft,learned,best_two,all}" in toy.stdout.replace("\n", "").replace(" ", "")
    assert "{uniform,greedy,model_stock,wise_ft,learned,all}" in plain.stdout.replace("\n", "").replace(" ", "")
    assert TOY not in plain.stdout
    bad = subprocess.run([sys.executable, "-m", "sweeps.cli", "soup", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, recipes.RECIPES_ENV: "tests.no_such_recipe"}, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"ich: error: {recipes.RECIPES_ENV}=tests.no_such_recipe: module tests.no_such_recipe cannot be imported "
        "(No module named 'tests.no_such_recipe')"], bad.stderr


# ---------------------------------------------------------------------------------------------- real MLflow

@pytest.fixture(scope="module")
def toy_soups(tiny_sweep, mlflow_server, tmp_path_factory):
    """The tiny sweep's checkpoints logged again under EXPERIMENT (same sweep name, weights and val metrics), then
    `ich soup` (within-trial soups) and `ich report` with the toy recipe's module named in ICH_RECIPES."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    tmp = tmp_path_factory.mktemp("recipe-registry")
    copied = copy_sweep(client, tiny_sweep, EXPERIMENT, tmp, rename=False)  # the same sweep name, files unchanged
    copied.finish(client)
    experiment_id = copied.experiment_id
    soup = _ich(["soup", "--experiment", EXPERIMENT, "--scope", "within", "--resamples", "100",
                 "--json", str(tmp / "soups.json")], toy=True)
    assert soup.returncode == 0, soup.stdout[-3000:] + soup.stderr[-3000:]
    report = _ich(["report", "--experiment", EXPERIMENT, "--out", str(tmp / "report"), "--resamples", "100"], toy=True)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    return {"client": client, "experiment_id": experiment_id, "tmp": tmp, "soup_stdout": soup.stdout,
            "soups": json.loads((tmp / "soups.json").read_text()),
            "report": json.loads((tmp / "report" / "report.json").read_text())}


@pytest.mark.integration
def test_the_toy_recipe_is_cooked_into_the_soup_table_and_mlflow(toy_soups):
    soups = toy_soups["soups"]["soups"]
    by_family: dict[str, dict] = {}
    for s in soups:
        by_family.setdefault(s["name"].rsplit("-", 1)[0], {})[s["recipe"]] = s
    # the built-ins that need no init (the copies here have none: model_stock and wise_ft are left out), then the toy
    assert by_family and all(list(mine) == ["uniform", "greedy", "learned", TOY] for mine in by_family.values()), \
        by_family
    table = toy_soups["soup_stdout"]
    for family, mine in by_family.items():
        toy = mine[TOY]
        assert toy["name"] == f"{family}-{TOY}" and any(line.startswith(toy["name"]) for line in table.splitlines())
        # the toy's choice: the family's two best members by val (the members come best first), nothing else
        ranked = [i["model_id"] for i in mine["uniform"]["ingredients"]]
        assert [i["model_id"] for i in toy["ingredients"] if i["accepted"]] == ranked[:2]
        assert all(i["candidate_val"] is None for i in toy["ingredients"])
        model = toy_soups["client"].get_logged_model(toy["model_id"])
        assert model.tags["ich.recipe"] == TOY and model.tags["ich.kind"] == "soup"
        # control: the built-ins' soups are there beside it, under their own names and tags
        for recipe in ("uniform", "greedy"):
            assert toy_soups["client"].get_logged_model(mine[recipe]["model_id"]).tags["ich.recipe"] == recipe


@pytest.mark.integration
def test_the_toy_recipe_has_its_rows_in_the_report_and_the_forest_plot(toy_soups, mlflow_server, tmp_path):
    from soups.report.build import build_report
    report = toy_soups["report"]
    rows = {r["key"]: r for r in report["table"]}
    arch = report["blocks"][0]["architecture"]
    assert [b["keys"] for b in report["blocks"]] == [[f"{arch}_{k}" for k in (
        "single", "uniform_soup", "greedy_soup", "learned_soup", f"{TOY}_soup", "uniform_vote", "greedy_vote",
        "learned_vote", f"{TOY}_vote")]]
    toy_ids = {s["model_id"] for s in toy_soups["soups"]["soups"] if s["recipe"] == TOY}
    assert rows[f"{arch}_{TOY}_soup"]["model_id"] in toy_ids and rows[f"{arch}_{TOY}_soup"]["recipe"] == TOY
    assert rows[f"{arch}_{TOY}_vote"]["n_ingredients"] == 2
    forest = {f["key"]: f for f in report["forest"]}
    assert f"{arch}_{TOY}_soup" in forest and f"{TOY} soup (within trial" in forest[f"{arch}_{TOY}_soup"]["label"]
    assert forest[f"{arch}_{TOY}_soup"]["delta"] == rows[f"{arch}_{TOY}_soup"]["vs_best_single"]["acc_diff"]
    assert TOY in {m["kind"] for m in report["val_test"]["marked"]}
    assert (toy_soups["tmp"] / "report" / "forest.png").is_file()

    # Control: the same experiment reported here, where no module registered the toy: no toy row, and every other
    # row has the same figures (the toy's soups in MLflow change nothing else).
    plain = build_report(EXPERIMENT, str(tmp_path / "plain"), tracking_uri=mlflow_server, n_resamples=100)
    plain_rows = {r["key"]: r for r in plain["table"]}
    assert list(plain_rows) == [k for k in rows if TOY not in k]
    assert not any(TOY in f["key"] for f in plain["forest"])
    for key, row in plain_rows.items():
        for field in ("model_id", "accuracy", "macro_f1", "accuracy_ci", "vs_best_single"):
            assert row.get(field) == rows[key].get(field), (key, field)  # a vote row has no model id
