"""Learned soup (soups/recipes/learned.py) on planted tensors and a toy linear model: the math against formulas
written out here, the one-ingredient and sum-to-one properties (issue 21 item 6), determinism for a seed, the val
halves, and that fitting moves the weight to the ingredient that fits (control: the uniform mix scores lower)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from soups.recipes.learned import coefficients, fit, mix, split_halves, stack_ingredients


def _toy(seed: int, int_buffer: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {"0.weight": torch.randn(3, 4, generator=g), "0.bias": torch.randn(3, generator=g)}
    return {**sd, "steps": torch.tensor(seed, dtype=torch.long)} if int_buffer else sd


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3))


def test_mix_is_the_weighted_sum_written_out_by_hand():
    sds = [_toy(1, True), _toy(2, True), _toy(3, True)]
    keys, stacks, fixed = stack_ingredients(sds)
    assert keys == ["0.weight", "0.bias"] and set(fixed) == {"steps"}
    c = torch.tensor([[0.2, 0.5], [0.3, 0.25], [0.5, 0.25]])  # by layer: a column per tensor
    out = mix(keys, stacks, fixed, c)
    for l, k in enumerate(keys):
        want = c[0, l] * sds[0][k] + c[1, l] * sds[1][k] + c[2, l] * sds[2][k]
        assert torch.allclose(out[k], want, atol=1e-6), k
    assert out["steps"] is sds[0]["steps"]  # integer buffers: the first (best) ingredient's
    by_model = mix(keys, stacks, fixed, torch.tensor([[0.2], [0.3], [0.5]]))
    want = 0.2 * sds[0]["0.bias"] + 0.3 * sds[1]["0.bias"] + 0.5 * sds[2]["0.bias"]
    assert torch.allclose(by_model["0.bias"], want, atol=1e-6)


@pytest.mark.parametrize("by", ["model", "layer"])
def test_one_ingredient_is_returned_bitwise(by):
    sd = _toy(7)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    out, info = fit(_model(), [sd], lambda: [(x, y)], lambda s: 0.0, by=by, steps=3, lr=0.5, seed=0)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    assert np.allclose(np.asarray(info["coefficients"]), 1.0)


def _planted(seed: int = 0):
    """A 3-class linear task the first ingredient solves and the second (random weights) does not."""
    g = torch.Generator().manual_seed(seed)
    good = {"0.weight": torch.eye(3, 4) * 4.0, "0.bias": torch.zeros(3)}
    bad = {"0.weight": torch.randn(3, 4, generator=g) * 4.0, "0.bias": torch.randn(3, generator=g)}
    x = torch.randn(240, 4, generator=g)
    y = x[:, :3].argmax(1)
    return good, bad, x, y


def _accuracy(sd, x, y) -> float:
    m = _model()
    m.load_state_dict(sd)
    with torch.no_grad():
        return float((m(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("by", ["model", "layer"])
def test_fitting_moves_the_mass_to_the_ingredient_that_fits_and_sums_to_one(by):
    good, bad, x, y = _planted()
    fit_x, fit_y, held_x, held_y = x[:120], y[:120], x[120:], y[120:]
    out, info = fit(_model(), [bad, good], lambda: [(fit_x, fit_y)], lambda s: _accuracy(s, held_x, held_y),
                    by=by, steps=40, lr=0.2, seed=0)
    c = np.asarray(info["coefficients"])
    assert c.shape == ((2, 2) if by == "layer" else (2, 1))
    assert np.allclose(c.sum(axis=0), 1.0, atol=1e-6)  # softmax over the ingredients, per column
    assert (c[1] > 0.6).all(), c  # the good ingredient (second) carries the weight
    assert info["step"] > 0
    # control: the uniform mix (step 0, what the fit starts from) is worse on the held-out half
    uniform = mix(*stack_ingredients([bad, good]), torch.full((2, 1), 0.5))
    assert _accuracy(out, held_x, held_y) > _accuracy(uniform, held_x, held_y)


def test_the_held_out_half_chooses_the_step_not_the_fit_half():
    """A held-out score that gets worse as fitting goes on keeps step 0 (the uniform soup); control: the same fit
    scored by a held-out score that improves keeps a later step."""
    good, bad, x, y = _planted()
    args = dict(by="model", steps=20, lr=0.2, seed=0)
    falling = iter(range(100, 0, -1))
    _, kept = fit(_model(), [bad, good], lambda: [(x, y)], lambda s: next(falling), **args)
    rising = iter(range(100))
    _, moved = fit(_model(), [bad, good], lambda: [(x, y)], lambda s: next(rising), **args)
    assert kept["step"] == 0 and np.allclose(np.asarray(kept["coefficients"]), 0.5)
    assert moved["step"] == 20


def test_deterministic_for_a_seed():
    good, bad, x, y = _planted(3)
    runs = [fit(_model(), [bad, good, _toy(5)], lambda: [(x[:100], y[:100]), (x[100:], y[100:])],
                lambda s: _accuracy(s, x, y), by="layer", steps=10, lr=0.1, seed=4)[1]["coefficients"]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_val_halves_are_stratified_disjoint_and_cover_val():
    labels = np.array([0] * 7 + [1] * 4 + [2] * 2 + [3])
    fit_idx, held = split_halves(labels, seed=1)
    assert not set(fit_idx) & set(held) and sorted([*fit_idx, *held]) == list(range(len(labels)))
    for c in (0, 1, 2):  # every class with two or more images is in both halves
        assert (labels[fit_idx] == c).any() and (labels[held] == c).any()
    assert (split_halves(labels, 1)[0] == fit_idx).all()
    assert not (split_halves(labels, 2)[0] == fit_idx).all() or len(fit_idx) < 2  # the seed moves the halves


def test_softmax_columns_sum_to_one():
    z = torch.randn(5, 7)
    assert torch.allclose(coefficients(z).sum(0), torch.ones(7))


# ------------------------------------------------------------------------------ on the suite's tiny sweep

class _Poisoned:
    """A split that raises on any use: the recipe must never touch test."""
    def __getattr__(self, name):
        raise AssertionError(f"the learned recipe read test ({name})")


@pytest.fixture(scope="module")
def learned_soups(tiny_sweep, mlflow_server):
    """`ich soup --recipe learned --scope across` once on the suite's tiny sweep."""
    from soups.options import SoupOptions
    from soups.orchestrate import run_soups
    return run_soups(SoupOptions(experiment=tiny_sweep["experiment"], tracking_uri=mlflow_server, recipe="learned",
                                 scope="across", bn="average", n_resamples=100, registered_model="tiny-sweep-learned",
                                 device="cpu"))


@pytest.mark.integration
def test_ich_soup_logs_a_learned_soup_that_is_its_coefficients_mix(learned_soups, tiny_sweep, mlflow_client,
                                                                   tmp_path):
    from soups.store import registry
    soups = learned_soups["soups"]
    assert [s["name"] for s in soups] == ["across-best-learned"], [s["name"] for s in soups]
    soup = soups[0]
    run = mlflow_client.get_run(soup["run_id"])
    model = mlflow_client.get_logged_model(soup["model_id"])
    tags = model.tags
    assert run.data.tags["ich.recipe"] == tags["ich.recipe"] == "learned"
    assert tags["ich.learned.by"] == "model" and int(tags["ich.learned.step"]) >= 0
    coef = dict(item.split(":") for item in tags["ich.learned.coefficients"].split(","))
    coef = {m: float(c) for m, c in coef.items()}
    assert sum(coef.values()) == pytest.approx(1.0, abs=1e-5)
    accepted = [i["model_id"] for i in soup["ingredients"] if i["accepted"]]
    assert sorted(coef) == sorted(accepted) and len(accepted) >= 2
    # the soup's weights are Σ c_i·w_i of its ingredients, computed here from the pulled checkpoints
    got = registry.load_record(mlflow_client, registry.get_model_record(mlflow_client, soup["model_id"]),
                               tmp_path / "soup")[0]
    ws = {m: registry.load_record(mlflow_client, registry.get_model_record(mlflow_client, m), tmp_path / m)[0]
          for m in accepted}
    for k, v in got.items():
        if v.is_floating_point():
            want = sum(coef[m] * ws[m][k].double() for m in accepted)
            assert torch.allclose(v.double(), want, rtol=0, atol=1e-5 * (1 + want.abs().max())), k


@pytest.mark.integration
def test_the_recipe_reads_only_val_and_is_deterministic(tiny_sweep, mlflow_client, tmp_path):
    """cook() on the tiny sweep's best checkpoints with test poisoned: it runs (test never read), twice the same
    coefficients; control: the poisoned split does raise when read."""
    from types import SimpleNamespace

    from ich.data import load_dataset
    from soups.store import registry
    from soups.build import Soup
    from soups.evaluate import EvalSpec, Evaluator
    from soups.options import SoupOptions
    from soups.recipes import RecipeInputs
    from soups.recipes.learned import cook

    records = registry.search_checkpoints(mlflow_client, [tiny_sweep["experiment_id"]], sweep=tiny_sweep["experiment"])
    best = {}
    for r in records:
        if r.trial not in best or r.metrics.get("val_macro_f1", 0) > best[r.trial].metrics.get("val_macro_f1", 0):
            best[r.trial] = r
    pulled = [registry.load_record(mlflow_client, r, tmp_path / r.model_id) for r in best.values()]
    members = [SimpleNamespace(record=r, label=r.label()) for r in best.values()]
    ev = Evaluator(load_dataset(tiny_sweep["data"]), EvalSpec.of(pulled[0][1]), device="cpu")
    ev.data.splits["test"] = _Poisoned()
    with pytest.raises(AssertionError, match="read test"):  # control: the poison works
        ev.logits(None, "test")
    by_id = {m.record.model_id: sd for m, (sd, _) in zip(members, pulled)}
    inputs = RecipeInputs(family="across-best", members=members,
                          ingredients=lambda ms: iter([(m, dict(by_id[m.record.model_id])) for m in ms]),  # cook
                          evaluator=ev,  # consumes the dicts it is handed: a fresh one each time
                          anchor=None, uniform=None, opts=SoupOptions(experiment="e", learned_by="layer", learned_steps=6),
                          finish=lambda sd: Soup(sd, "none", {}), skip=lambda p, why: None)
    first, second = cook(inputs), cook(inputs)
    assert first.params["coefficients"] == second.params["coefficients"]
    assert first.params["by"] == "layer" and first.accepted == set(by_id)
    for k, v in first.soup.state_dict.items():
        assert torch.equal(v, second.soup.state_dict[k]), k


def test_a_model_with_batchnorm_fits_its_running_statistics_mixed_without_gradient():
    def bn_model():
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    sds = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = bn_model()
        m.train()
        m(torch.randn(32, 4))  # running statistics of its own
        sds.append({k: v.clone() for k, v in m.state_dict().items()})
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    out, info = fit(bn_model(), sds, lambda: [(x, y)], lambda s: 0.0, by="layer", steps=3, lr=0.5, seed=0)
    c = np.asarray(info["coefficients"])
    keys = info["keys"]
    i = keys.index("1.running_mean")
    assert torch.allclose(out["1.running_mean"], c[0, i] * sds[0]["1.running_mean"] + c[1, i] * sds[1]["1.running_mean"])
    assert torch.equal(out["1.num_batches_tracked"], sds[0]["1.num_batches_tracked"])
