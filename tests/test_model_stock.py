"""Model Stock (issue 21, items 1, 2 and 6): the soup pulled toward the shared init, per tensor
w = t·w_avg + (1-t)·w_init with t = N·c / (1 + (N-1)·c), c the mean pairwise cosine of the deltas from the init.

The reference (`closed_form`) is written out here with plain torch ops, pair by pair, as the paper states it; the code
under test streams (soups/average.ModelStockSum: running sums, no pair held). Planted tensors give the limits:
orthogonal deltas (t = 0: the init), identical deltas (t = 1: the fine-tuned model), opposite deltas (c < 0,
clamped: the init), a tensor no ingredient moved (the init, no division by zero); BN statistics and
num_batches_tracked as the uniform soup makes them. Then `ich soup` on a real MLflow server: the anchor is the init
LoggedModel found by the checkpoints' init fingerprint; without it, one note naming the fingerprint and the other
recipes' soups unchanged (control: with it, the model_stock soups exist and equal the closed form).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from mlflow import MlflowClient

from ich.checkpoint import save_checkpoint
from ich.models import create_model
from soups import recipes
from soups.store import registry, tags
from soups.average import ModelStockSum, RunningSum, model_stock_ratio
from soups.compat import IncompatibleCheckpoint
from soups.options import SoupError, SoupOptions
from tests.logged_sweep import ARCH, log_sweep, meta_of


# ---------------------------------------------------------------------------------------------- the closed form

def closed_form(init: dict, sds: list[dict]) -> dict:
    """Model Stock as the paper writes it, tensor by tensor, every pair explicitly. BN running statistics: the mean
    of the ingredients; integer tensors: the first ingredient's (the uniform soup's rules)."""
    n, out = len(sds), {}
    for k, w0 in init.items():
        if not w0.is_floating_point():
            out[k] = sds[0][k].clone()
            continue
        ws = [sd[k].double() for sd in sds]
        w_avg = sum(ws) / n
        if k.endswith(("running_mean", "running_var")):
            out[k] = w_avg.to(sds[0][k].dtype)
            continue
        deltas = [w - w0.double() for w in ws]
        cosines = []
        for a, b in itertools.combinations(deltas, 2):
            na, nb = a.norm(), b.norm()
            cosines.append(0.0 if na == 0 or nb == 0 else float((a * b).sum() / (na * nb)))  # no direction: cos 0
        c = sum(cosines) / len(cosines)
        c = min(max(c, 0.0), 1.0)
        t = n * c / (1 + (n - 1) * c)
        out[k] = (t * w_avg + (1 - t) * w0.double()).to(sds[0][k].dtype)
    return out


def planted(n: int, dtype=torch.float64) -> tuple[dict, list[dict]]:
    """An init and n ingredients: a generic tensor, orthogonal, identical, opposite (n = 2) and frozen deltas, and a
    BatchNorm layer's statistics."""
    g = torch.Generator().manual_seed(n)
    init = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g, dtype=dtype),
            "orth.weight": torch.randn(5, generator=g, dtype=dtype),
            "same.weight": torch.randn(2, 3, generator=g, dtype=dtype),
            "frozen.weight": torch.randn(3, generator=g, dtype=dtype),
            "bn.weight": torch.ones(3, dtype=dtype), "bn.bias": torch.zeros(3, dtype=dtype),
            "bn.running_mean": torch.zeros(3, dtype=dtype), "bn.running_var": torch.ones(3, dtype=dtype),
            "bn.num_batches_tracked": torch.tensor(0)}
    shared_conv = torch.randn(4, 3, 3, 3, generator=g, dtype=dtype)  # the deltas agree in part: 0 < c < 1
    same = torch.randn(2, 3, generator=g, dtype=dtype)
    sds = []
    for i in range(n):
        sd = {k: v.clone() for k, v in init.items()}
        sd["conv.weight"] += 0.1 * (shared_conv + torch.randn(4, 3, 3, 3, generator=g, dtype=dtype))
        sd["orth.weight"][i] += 0.3 * (i + 1)  # delta i along axis i: pairwise orthogonal
        sd["same.weight"] += 0.2 * same
        sd["bn.weight"] += 0.05 * torch.randn(3, generator=g, dtype=dtype)
        sd["bn.bias"] += 0.05 * torch.randn(3, generator=g, dtype=dtype)
        sd["bn.running_mean"] = torch.randn(3, generator=g, dtype=dtype)
        sd["bn.running_var"] = torch.rand(3, generator=g, dtype=dtype) + 0.5
        sd["bn.num_batches_tracked"] = torch.tensor(100 * (i + 1))
        sds.append(sd)
    return init, sds


def stock(init: dict, sds: list[dict]) -> ModelStockSum:
    total = ModelStockSum(init)
    for i, sd in enumerate(sds):
        total.add(sd, f"ingredient {i}")
    return total


# ---------------------------------------------------------------------------------------------- pure

def test_the_ratio_and_its_limits():
    assert model_stock_ratio(0.0, 2) == 0.0 and model_stock_ratio(1.0, 3) == 1.0
    assert model_stock_ratio(0.5, 2) == pytest.approx(2 * 0.5 / 1.5)
    assert model_stock_ratio(0.3, 3) == pytest.approx(0.9 / 1.6)
    assert model_stock_ratio(-0.4, 3) == 0.0 and model_stock_ratio(-1.0, 2) == 0.0  # clamped: no division by zero
    assert model_stock_ratio(1.0 + 1e-12, 2) == 1.0  # rounding above 1 stays 1
    assert model_stock_ratio(0.2, 1) == 1.0  # one ingredient: no angle, the ingredient itself


@pytest.mark.parametrize("n", [2, 3])
def test_model_stock_equals_the_closed_form(n):
    init, sds = planted(n)
    got, want = stock(init, sds).result(), closed_form(init, sds)
    assert set(got) == set(init)
    for k in init:
        assert got[k].dtype == init[k].dtype and torch.allclose(got[k], want[k], rtol=0, atol=1e-12), k
    # the planted limits, each against what it must be, not only against the closed form
    cos = stock(init, sds).mean_cosines()
    assert cos["orth.weight"] == pytest.approx(0, abs=1e-12) and torch.equal(got["orth.weight"], init["orth.weight"])
    assert cos["same.weight"] == pytest.approx(1) and torch.allclose(got["same.weight"], sds[0]["same.weight"],
                                                                      rtol=0, atol=1e-12)
    assert torch.equal(got["frozen.weight"], init["frozen.weight"])  # nobody moved it: the init, no NaN
    assert 0.05 < cos["conv.weight"] < 0.95  # the generic tensor sits strictly between the limits
    t = model_stock_ratio(cos["conv.weight"], n)
    assert not torch.allclose(got["conv.weight"], init["conv.weight"])
    assert not torch.allclose(got["conv.weight"], sum(sd["conv.weight"] for sd in sds) / n)
    assert 0 < t < 1


def test_float32_ingredients_round_once_into_their_dtype():
    init, sds = planted(3, torch.float32)
    got, want = stock(init, sds).result(), closed_form(init, sds)
    for k in init:
        assert got[k].dtype == init[k].dtype and torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k


def test_opposite_deltas_give_the_init_and_a_zero_delta_counts_as_orthogonal():
    init = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    away = {"w": init["w"] + torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)}
    back = {"w": init["w"] - torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)}
    total = stock(init, [away, back])
    assert total.mean_cosines()["w"] == pytest.approx(-1) and torch.equal(total.result()["w"], init["w"])
    # N = 3, one ingredient left the tensor at the init: its pairs count cos 0, c = cos(away, away2) / 3
    away2 = {"w": init["w"] + 2 * torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)}
    total = stock(init, [away, {"w": init["w"].clone()}, away2])
    assert total.mean_cosines()["w"] == pytest.approx(1 / 3)
    t = 3 * (1 / 3) / (1 + 2 * (1 / 3))
    expected = init["w"] + t * ((away["w"] + init["w"] + away2["w"]) / 3 - init["w"])
    assert torch.allclose(total.result()["w"], expected, rtol=0, atol=1e-12)
    assert torch.allclose(total.result()["w"], closed_form(init, [away, {"w": init["w"].clone()}, away2])["w"])


def test_bn_statistics_and_integer_tensors_are_those_of_the_uniform_soup():
    init, sds = planted(3, torch.float32)
    uniform = RunningSum()
    for sd in sds:
        uniform.add(sd)
    got, mean = stock(init, sds).result(), uniform.mean()
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert got[k].dtype == mean[k].dtype and torch.equal(got[k], mean[k]), k
    assert int(got["bn.num_batches_tracked"]) == 100  # the first ingredient's, as uniform keeps it
    # control: BN's affine weights are parameters, pulled toward the init like every other parameter
    assert not torch.equal(got["bn.weight"], mean["bn.weight"])


def test_memory_is_flat_in_the_number_of_ingredients():
    def held(total: ModelStockSum) -> tuple[int, int]:
        tensors = [v for d in (total.total._sum, total._units) for v in d.values()]
        return len(tensors), sum(t.numel() * t.element_size() for t in tensors)
    init, sds = planted(2)
    two = stock(init, sds)
    many = ModelStockSum(init)
    g = torch.Generator().manual_seed(7)
    for i in range(12):
        many.add({k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
                  for k, v in init.items()}, f"ingredient {i}")
    assert many.count == 12 and two.count == 2
    assert held(many) == held(two)  # two float64 sums per tensor (weights, unit deltas), whatever N
    assert held(two)[0] == len(init) + len([k for k in init if init[k].is_floating_point() and "running" not in k])


def test_an_ingredient_that_does_not_fit_the_init_is_refused_naming_both():
    init, sds = planted(2)
    total = ModelStockSum(init, "the shared init (model m-1)")
    bad = {**sds[0], "conv.weight": torch.zeros(4, 3, 1, 1, dtype=torch.float64)}
    with pytest.raises(IncompatibleCheckpoint, match=r"checkpoint trial a epoch 1: key 'conv.weight' has shape "
                                                     r"\(4, 3, 1, 1\), the shared init \(model m-1\) has \(4, 3, 3, 3\)"):
        total.add(bad, "trial a epoch 1")
    total.add(sds[0], "trial a epoch 2")  # control: a fitting one is taken
    assert total.count == 1


def test_model_stock_is_a_registered_recipe_with_its_k_option():
    assert recipes.names()[:5] == ["uniform", "greedy", "model_stock", "wise_ft", "learned"]
    recipe = recipes.get("model_stock")
    assert recipe.needs_anchor and not recipe.every_checkpoint
    assert SoupOptions(experiment="e").recipes == ["uniform", "greedy", "model_stock", "wise_ft", "learned"]  # all
    for bad in (1, -1, True, 2.5):
        with pytest.raises(SoupError, match=r"model_stock_k=.*: must be 0 \(all\) or a whole number >= 2"):
            SoupOptions(experiment="e", model_stock_k=bad).validate()
    for good in (0, 2, 3):
        SoupOptions(experiment="e", model_stock_k=good).validate()


# ---------------------------------------------------------------------------------------------- real MLflow

SCORES = {"a": [0.50, 0.70, 0.60], "b": [0.40, 0.45, 0.80]}  # val_macro_f1 per epoch


def _log_sweep(client: MlflowClient, experiment: str, folder, digits_data, digits_dataset, *, with_init: bool) -> dict:
    """A tiny sweep as a warm-start sweep logs it: the init (ich.kind=init, its sha256 the fingerprint) on the sweep
    run, two trials x three epochs near it. Same seeds in every experiment: the same weights. Returns the init's
    state dict, its fingerprint and the checkpoints' {model id: state dict}."""
    torch.manual_seed(0)
    init = create_model(ARCH, digits_data.num_classes, 32).state_dict()
    fingerprint = save_checkpoint(folder / "init", init, meta_of(digits_data, experiment, "warm-start", 4,
                                                                 {"val_macro_f1": 0.3}, recipe="test"))
    sweep_run, logged = log_sweep(client, experiment, digits_dataset, digits_data, folder, init, SCORES, fingerprint,
                                  scale=1e-2)
    if with_init:
        registry.log_init_model(client, sweep_run, folder / "init")
    return {"init": init, "fingerprint": fingerprint, "checkpoints": dict(logged.values())}


@pytest.fixture(scope="module")
def stock_soups(mlflow_server, digits_data, digits_dataset, tmp_path_factory):
    """The same tiny sweep in two experiments, with and without its init logged; `ich soup --recipe all` on each.
    The learned soups take 5 passes of Adam, not 30 (half this fixture's time): here they only need to be the same
    with or without the init (the learned recipe itself: tests/test_learned.py)."""
    client = MlflowClient(mlflow_server)
    out = {"client": client}
    for name, with_init in (("with", True), ("without", False)):
        experiment = f"model-stock-{name}-init"
        logged = _log_sweep(client, experiment, tmp_path_factory.mktemp(experiment), digits_data, digits_dataset,
                            with_init=with_init)
        summary = registry_soups(mlflow_server, experiment, "all", learned_steps=5)
        out[name] = {**logged, "summary": summary, "soups": {s["name"]: s for s in summary["soups"]}}
    return out


def registry_soups(uri: str, experiment: str, recipe: str, **kw) -> dict:
    from soups.orchestrate import run_soups
    return run_soups(SoupOptions(experiment=experiment, tracking_uri=uri, recipe=recipe, bn="average",
                                 n_resamples=100, registered_model=f"{experiment}-{recipe}", device="cpu", **kw))


def _soup_weights(client, model_id: str, folder) -> dict:
    return registry.load_record(client, registry.get_model_record(client, model_id), folder)[0]


@pytest.mark.integration
def test_ich_soup_cooks_model_stock_from_the_init_found_by_its_fingerprint(stock_soups, tmp_path):
    mine = stock_soups["with"]
    stocks = {n: s for n, s in mine["soups"].items() if s["recipe"] == "model_stock"}
    assert set(stocks) == {"within-a-model_stock", "within-b-model_stock", "across-best-model_stock"}
    assert not any("fingerprint" in n for n in mine["summary"]["notes"]), mine["summary"]["notes"]
    for name, soup in stocks.items():
        order = [i["model_id"] for i in soup["ingredients"]]
        assert all(i["accepted"] for i in soup["ingredients"]) and all(i["candidate_val"] is None
                                                                        for i in soup["ingredients"])
        assert order == [i["model_id"] for i in mine["soups"][name.replace("model_stock", "uniform")]["ingredients"]]
        want = closed_form(mine["init"], [mine["checkpoints"][m] for m in order])
        got = _soup_weights(stock_soups["client"], soup["model_id"], tmp_path / name)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.allclose(got[k], want[k], rtol=0, atol=1e-6), (name, k)
        model = stock_soups["client"].get_logged_model(soup["model_id"])
        assert model.tags[tags.TAG_SOUP_RECIPE] == "model_stock" and model.tags[tags.TAG_KIND] == tags.KIND_SOUP
        # pulled toward the init: not the uniform soup of the same ingredients
        uniform = _soup_weights(stock_soups["client"], mine["soups"][name.replace("model_stock", "uniform")]["model_id"],
                                tmp_path / f"{name}-uniform")
        assert any(not torch.equal(got[k], uniform[k]) for k in got if got[k].is_floating_point())


@pytest.mark.integration
def test_without_the_init_one_note_names_the_fingerprint_and_the_other_soups_are_as_before(stock_soups):
    mine, control = stock_soups["without"], stock_soups["with"]
    fingerprint = mine["fingerprint"]
    assert fingerprint == control["fingerprint"]
    about = [n for n in mine["summary"]["notes"] if "model_stock" in n]
    assert about == [f"no model_stock or wise_ft soup for init fingerprint {fingerprint}: this experiment holds no `init` "
                     "LoggedModel of it (sweeps log their init since this version: run the sweep again, or log it "
                     "with soups.store.registry.log_init_model(client, sweep_run, folder), the folder's checkpoint.json "
                     f"with ich.init_fingerprint={fingerprint})"]
    others = {n: s for n, s in control["soups"].items() if s["recipe"] not in ("model_stock", "wise_ft")}
    assert set(mine["soups"]) == set(others) == {
        "within-a-uniform", "within-a-greedy", "within-b-uniform", "within-b-greedy", "across-best-uniform",
        "across-best-greedy", "across-all-greedy", "within-a-learned", "within-b-learned", "across-best-learned"}
    for name, soup in mine["soups"].items():  # the same checkpoints: the same soups, with or without the init
        theirs = others[name]
        assert [(i["trial"], i["epoch"], i["accepted"]) for i in soup["ingredients"]] == \
            [(i["trial"], i["epoch"], i["accepted"]) for i in theirs["ingredients"]], name
        if soup["recipe"] == "learned":  # gradient steps: equal to float32 rounding (test_soup_parallel)
            assert all(v == pytest.approx(theirs["val"][k], rel=1e-5) for k, v in soup["val"].items()), name
        else:
            assert soup["val"] == theirs["val"] and soup["test"] == theirs["test"], name


@pytest.mark.integration
def test_model_stock_k_soups_the_k_best(stock_soups, mlflow_server, tmp_path):
    summary = registry_soups(mlflow_server, "model-stock-with-init", "model_stock", scope="within", model_stock_k=2)
    mine = stock_soups["with"]
    for soup in summary["soups"]:
        assert soup["recipe"] == "model_stock"
        ranked = [i["model_id"] for i in mine["soups"][soup["name"].replace("model_stock", "uniform")]["ingredients"]]
        used = [i["model_id"] for i in soup["ingredients"] if i["accepted"]]
        assert used == ranked[:2]
        want = closed_form(mine["init"], [mine["checkpoints"][m] for m in used])
        got = _soup_weights(stock_soups["client"], soup["model_id"], tmp_path / soup["name"])
        assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want), soup["name"]
    assert {s["name"] for s in summary["soups"]} == {"within-a-model_stock", "within-b-model_stock"}
    assert math.isfinite(summary["soups"][0]["val"]["macro_f1"])


def test_the_soup_records_the_spread_of_its_t():
    """cook() on planted tensors: one tensor whose two deltas are orthogonal (c = 0, t = 0), one whose deltas are the
    same (c = 1, t = 1): the recorded spread is that of the closed form."""
    from types import SimpleNamespace

    from soups.build import Soup
    from soups.recipes import RecipeInputs
    from soups.recipes.model_stock import cook
    anchor = {"a": torch.zeros(4), "b": torch.zeros(4)}
    sds = [{"a": torch.tensor([1.0, 0, 0, 0]), "b": torch.tensor([1.0, 0, 0, 0])},
           {"a": torch.tensor([0, 1.0, 0, 0]), "b": torch.tensor([2.0, 0, 0, 0])}]
    members = [SimpleNamespace(record=SimpleNamespace(model_id=f"m-{i}"), label=f"m-{i}") for i in range(2)]
    inputs = RecipeInputs(family="within-a", members=members, ingredients=lambda ms: iter(zip(ms, sds)),
                          evaluator=None, anchor=anchor, uniform=None, opts=SoupOptions(experiment="e"),
                          finish=lambda sd: Soup(sd, "none", {}), skip=lambda p, why: None)
    cooked = cook(inputs)
    assert cooked.params == {"k": "0", "tensors": "2", "t_min": "0", "t_median": "1", "t_mean": "0.5", "t_max": "1"}
    assert torch.equal(cooked.soup.state_dict["a"], anchor["a"])  # t = 0: the init
    assert torch.allclose(cooked.soup.state_dict["b"], torch.tensor([1.5, 0, 0, 0]))  # t = 1: the average
