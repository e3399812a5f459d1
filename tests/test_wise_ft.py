"""WiSE-FT (issue 21 items 3 and 6): w(α) = (1-α)·w_init + α·w_ft on a grid of α, α chosen on val, the whole curve
logged by step and drawn in the report.

Pure: the endpoints are the init and the fine-tuned model bitwise (both head modes), a planted α = 0.3 is the
formula written out here, the kept head is the fine-tuned one bitwise, α is chosen on val only (a planted curve
where test would pick another α), the options. Then `ich soup --recipe wise_ft` on the suite's shared tiny sweep
(real MLflow, real Ray session; no new sweep): a soup per family with its 11-step curve, α = the argmax of the
logged val curve, the soup's weights the formula at that α; and the tiny sweep's checkpoints copied into an
experiment without their init: one note, the other recipes' soups as before.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from soups import recipes
from soups.average import wise_ft
from soups.compat import IncompatibleCheckpoint
from soups.options import SoupError, SoupOptions, alpha_grid, option_problem, wise_from_choices
from soups.recipes.wise_ft import alpha_curve, choose_alpha, step_of

HEAD = {"head.fc.weight", "head.fc.bias"}


def planted(dtype=torch.float64) -> tuple[dict, dict]:
    """An init and a fine-tuned model: a conv, a BatchNorm layer (weights, statistics, num_batches_tracked) and a
    classifier head."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    init = {"conv.weight": r(4, 3, 3, 3), "bn.weight": r(4), "bn.bias": r(4), "bn.running_mean": r(4),
            "bn.running_var": r(4).abs() + 0.5, "bn.num_batches_tracked": torch.tensor(7),
            "head.fc.weight": r(5, 4), "head.fc.bias": r(5)}
    ft = {k: (v + 0.1 * r(*v.shape) if v.is_floating_point() else torch.tensor(1000)) for k, v in init.items()}
    return init, ft


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.contiguous().view(torch.uint8).equal(
        b.contiguous().view(torch.uint8)) if a.is_floating_point() else torch.equal(a, b) and a.dtype == b.dtype


# ---------------------------------------------------------------------------------------------- pure

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("keep", [(), HEAD])
def test_alpha_0_is_the_init_and_alpha_1_the_fine_tuned_model_bitwise(keep, dtype):
    init, ft = planted(dtype)
    init[("conv.weight")][0, 0, 0, 0] = -0.0  # a signed zero survives too
    at0, at1 = wise_ft(init, ft, 0.0, keep=keep), wise_ft(init, ft, 1.0, keep=keep)
    for k in init:
        assert bitwise(at1[k], ft[k]), k
        assert bitwise(at0[k], ft[k] if k in keep else init[k]), k  # kept head: the fine-tuned one even at α = 0
    assert at0["conv.weight"].data_ptr() != init["conv.weight"].data_ptr()  # copies, never the caller's tensors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_a_planted_alpha_is_the_formula_and_the_kept_head_is_the_fine_tuned_one(dtype):
    init, ft = planted(dtype)
    alpha = 0.3
    for keep in ((), HEAD):
        got = wise_ft(init, ft, alpha, keep=keep)
        for k in init:
            if k in keep:
                assert bitwise(got[k], ft[k]), k  # kept: w_ft bitwise, not interpolated
                continue
            if not init[k].is_floating_point():
                assert bitwise(got[k], init[k]), k  # integer: the nearer endpoint (α < 0.5: the init)
                continue
            # written out by hand: (1 - α)·w_init + α·w_ft in float64, rounded once into the dtype
            want = ((1 - 0.3) * init[k].double() + 0.3 * ft[k].double()).to(dtype)
            rtol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3}[dtype]  # an ulp (torch.lerp)
            assert got[k].dtype == dtype and torch.allclose(got[k], want, rtol=rtol, atol=0), k
            assert not torch.equal(got[k], init[k]) and not torch.equal(got[k], ft[k]), k
        # BN running statistics are interpolated like the weights (the uniform soup averages them too)
        assert torch.allclose(got["bn.running_var"].double(), 0.7 * init["bn.running_var"].double()
                              + 0.3 * ft["bn.running_var"].double(), rtol=1e-3, atol=0)
    # control: interpolated, the head moves with α
    assert not torch.equal(wise_ft(init, ft, alpha)["head.fc.weight"], ft["head.fc.weight"])
    assert int(wise_ft(init, ft, 0.5)["bn.num_batches_tracked"]) == 1000  # α >= 0.5: the fine-tuned side's


def test_a_model_that_does_not_fit_the_init_is_refused_naming_both():
    init, ft = planted()
    bad = {**ft, "conv.weight": torch.zeros(4, 3, 1, 1, dtype=torch.float64)}
    with pytest.raises(IncompatibleCheckpoint, match=r"checkpoint trial a epoch 2: key 'conv.weight' has shape "
                                                     r"\(4, 3, 1, 1\), the shared init \(model m-1\) has"):
        wise_ft(init, bad, 0.5, init_name="the shared init (model m-1)", name="trial a epoch 2")
    wise_ft(init, ft, 0.5, init_name="the shared init (model m-1)", name="trial a epoch 2")  # control: it fits
    with pytest.raises(ValueError, match=r"alpha 1.5: must lie in \[0, 1\]"):
        wise_ft(init, ft, 1.5)


def test_alpha_is_chosen_on_val_never_on_test():
    alphas = [i / 10 for i in range(11)]
    val = [0.50, 0.55, 0.60, 0.70, 0.72, 0.71, 0.69, 0.66, 0.64, 0.62, 0.60]  # peaks at 0.4
    test = [0.48, 0.52, 0.58, 0.61, 0.62, 0.63, 0.64, 0.67, 0.70, 0.69, 0.68]  # would pick 0.8
    assert choose_alpha(zip(alphas, val)) == 0.4
    assert choose_alpha(zip(alphas, test)) == 0.8  # control: the planted test curve does pick another α
    # ties go to the larger α (the fine-tuned side); NaN never wins; a loss is minimised
    assert choose_alpha([(0.2, 0.7), (0.9, 0.7), (0.5, 0.6)]) == 0.9
    assert choose_alpha([(0.0, math.nan), (0.3, 0.1)]) == 0.3
    assert choose_alpha([(0.1, 0.9), (0.6, 0.4), (1.0, 0.5)], higher_is_better=False) == 0.6
    with pytest.raises(ValueError, match="no finite val score"):
        choose_alpha([(0.0, math.nan)])


def _planted_inputs(init: dict, ft: dict, val: dict[int, float], test: dict[int, float], **opts) -> tuple:
    """RecipeInputs over one planted fine-tuned model: the evaluator's scores are looked up by α, recovered from the
    loaded weights (w = (1-α)·0 + α·1 for a tensor that goes from 0 to 1)."""
    from soups.build import Soup
    loaded, calls = {}, []

    class Evaluator:
        model = None

        def logits(self, sd, split):
            if sd is not None:
                loaded["sd"] = sd
            calls.append(split)
            return np.array([[float(loaded["sd"]["probe"])]])

        def metrics(self, logits, split):
            step = step_of(float(logits[0, 0]))
            return {"macro_f1": (val if split == "val" else test)[step], "accuracy": 0.0}

    member = SimpleNamespace(record=SimpleNamespace(model_id="m-best"), label="trial a epoch 3")
    inputs = recipes.RecipeInputs(
        family="within-a", members=[member], ingredients=lambda members: iter([(member, ft)]), evaluator=Evaluator(),
        anchor=init, uniform=None, opts=SoupOptions(experiment="e", wise_head="interpolate", **opts),
        finish=lambda sd: Soup(sd, "none", {}), skip=lambda p, why: None)
    return inputs, calls


def test_the_recipe_chooses_on_val_and_reports_test_along_the_whole_grid():
    init, ft = {"probe": torch.tensor(0.0, dtype=torch.float64)}, {"probe": torch.tensor(1.0, dtype=torch.float64)}
    val = {s: 0.5 + 0.01 * s - 0.0002 * s * s for s in range(0, 101, 10)}  # peaks at α = 0.2 (25 -> 0.2 or 0.3)
    val[30] = val[20]  # a tie: the larger α
    test = {s: 0.4 + 0.004 * s for s in range(0, 101, 10)}  # rises to α = 1
    inputs, calls = _planted_inputs(init, ft, val, test)
    cooked = recipes.get("wise_ft").cook(inputs)
    assert cooked.params == {"alpha": "0.3", "head": "interpolate", "from": "best", "from_model": "m-best",
                             "alphas": "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"}
    assert cooked.accepted == {"m-best"} and float(cooked.soup.state_dict["probe"]) == pytest.approx(0.3)
    curve = cooked.curve
    assert curve["x"] == "alpha" and curve["chosen"] == 0.3
    assert [p["step"] for p in curve["points"]] == list(range(0, 101, 10))
    assert [p["test"]["macro_f1"] for p in curve["points"]] == [test[s] for s in range(0, 101, 10)]  # reported
    assert calls.count("test") == 11  # test is evaluated at every α...
    # ...and never chooses: on the test curve the choice would have been α = 1
    assert choose_alpha((p["alpha"], p["test"]["macro_f1"]) for p in curve["points"]) == 1.0


def test_the_curve_holds_one_interpolated_model_at_a_time():
    init, ft = planted()
    seen = []
    points = alpha_curve(init, ft, [0.0, 0.5, 1.0], lambda sd: seen.append(id(sd)) or {"val": {}, "test": {}})
    assert [p["step"] for p in points] == [0, 50, 100] and len(seen) == 3


def test_the_options_and_the_registry():
    assert recipes.names() == ["uniform", "greedy", "model_stock", "wise_ft", "learned"]
    recipe = recipes.get("wise_ft")
    assert recipe.needs_anchor and not recipe.every_checkpoint
    assert SoupOptions(experiment="e").recipes == recipes.names()  # --recipe all includes it
    opts = SoupOptions(experiment="e")
    assert (opts.wise_alphas, opts.wise_head, opts.wise_from) == ("0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", "keep",
                                                                   "best")
    assert alpha_grid(opts.wise_alphas) == [i / 10 for i in range(11)] and alpha_grid([1, 0, 0.5]) == [0, 0.5, 1]
    assert wise_from_choices() == ("best", "uniform", "greedy", "model_stock", "learned")  # not wise_ft itself
    assert recipe.starts_from(opts) is None and recipe.starts_from(SoupOptions(experiment="e", wise_from="greedy")) \
        == "greedy"
    for bad, why in (("0,1.5", "1.5 lies outside [0, 1]"), ("0,0.001", "share a metric step"), ("x", "numbers"),
                     ("0,0", "distinct")):
        assert why in option_problem("wise_alphas", bad), bad
    with pytest.raises(SoupError,
                       match=r"wise_from='wise_ft': must be one of best, uniform, greedy, model_stock, learned"):
        SoupOptions(experiment="e", wise_from="wise_ft").validate()
    with pytest.raises(SoupError, match=r"wise_head='both': must be one of keep, interpolate"):
        SoupOptions(experiment="e", wise_head="both").validate()


def test_the_report_draws_the_curve_of_the_focus_blocks_soup(tmp_path):
    """A hand-built snapshot (test_report_snapshot's kind): the wise_ft soup's curve drawn with its chosen α."""
    from soups.store.registry import CheckpointRecord
    from soups.report.build import compute_report
    from soups.report.predictions import Predictions
    from soups.report.snapshot import Snapshot

    k, rng = 3, np.random.default_rng(0)
    y = {s: rng.integers(0, k, 60) for s in ("val", "test")}
    dataset = SimpleNamespace(splits={s: SimpleNamespace(labels=y[s]) for s in y}, num_classes=k,
                              classes=list("abc"), fingerprint="f" * 64)

    def record(mid, trial, epoch, score, tags=None):
        return CheckpointRecord(mid, f"run-{mid}", "1", mid, "s", trial, epoch, "sha", "f" * 64, "init",
                                "coatnet_tiny_ich", metrics={"val_macro_f1": score, "val_accuracy": score},
                                tags=dict(tags or {}))
    checkpoints = [record(f"m-{e}", "t0", e, 0.5 + 0.1 * e) for e in (1, 2)]
    soup = record("soup-wise", "t0", 0, 0.8, {"ich.scope": "within", "ich.recipe": "wise_ft", "ich.curve": "alpha",
                                                "ich.wise_ft.alpha": "0.6"})
    series = {"val accuracy": [(s / 10, 0.6 + 0.01 * s) for s in range(11)],
              "test accuracy": [(s / 10, 0.5 + 0.01 * s) for s in range(11)]}
    snap = Snapshot("hand", "1", "http://127.0.0.1:1", checkpoints, [soup], {"soup-wise": ["m-2"]},
                    curves={"soup-wise": {"x": "alpha", "chosen": 0.6, "series": series}})
    preds = Predictions(dataset, tmp_path / "cache", tmp_path / "pulled", load=None)
    for mid in ("m-1", "m-2", "soup-wise"):
        for split in y:
            preds.put(mid, split, np.eye(k)[y[split]] + rng.normal(0, 0.6, (60, k)))
    out = tmp_path / "report"
    out.mkdir()
    report = compute_report(snap, preds, out, n_resamples=100, data="/nowhere")
    curves = report.summary["parameter_curves"]
    assert list(curves) == ["wise_ft"] and curves["wise_ft"]["chosen"] == 0.6
    assert curves["wise_ft"]["series"]["val accuracy"][3] == pytest.approx((0.3, 0.63))
    figures = [name for sec in report.sections for name, _ in sec.figures]
    assert "wise_ft_curve.png" in figures and (out / "wise_ft_curve.png").read_bytes()[:4] == b"\x89PNG"
    # control: without a logged curve there is no such figure
    snap.curves = {}
    out2 = tmp_path / "report2"
    out2.mkdir()
    report = compute_report(snap, preds, out2, n_resamples=100, data="/nowhere")
    assert report.summary["parameter_curves"] == {} and not (out2 / "wise_ft_curve.png").exists()


# ---------------------------------------------------------------------------------------------- real MLflow

REGISTERED = "tiny-sweep-wise-ft"


@pytest.fixture(scope="module")
def wise_soups(tiny_sweep, mlflow_server):
    """`ich soup --recipe wise_ft` once on the suite's tiny sweep (its warm start is logged as its init)."""
    from soups.orchestrate import run_soups
    summary = run_soups(SoupOptions(experiment=tiny_sweep["experiment"], tracking_uri=mlflow_server, recipe="wise_ft",
                                    bn="average", n_resamples=100, registered_model=REGISTERED, device="cpu"))
    return summary


@pytest.mark.integration
def test_ich_soup_logs_a_wise_ft_soup_per_family_with_its_curve(wise_soups, tiny_sweep, mlflow_server, mlflow_client,
                                                                 tmp_path):
    from soups.store import registry
    from soups.report.snapshot import read_snapshot
    soups = wise_soups["soups"]
    records = registry.search_checkpoints(mlflow_client, [tiny_sweep["experiment_id"]], sweep=tiny_sweep["experiment"])
    trials: dict[str, list] = {}
    for r in records:
        trials.setdefault(r.trial, []).append(r)
    souped = sorted(t for t, rs in trials.items() if len(rs) >= 2)
    assert sorted(s["name"] for s in soups) == sorted([f"within-{t}-wise_ft" for t in souped] + ["across-best-wise_ft"])
    assert not any("wise_ft" in n for n in wise_soups["notes"]), wise_soups["notes"]
    init = registry.search_init_by_fingerprint(mlflow_client, [tiny_sweep["experiment_id"]],
                                               records[0].init_fingerprint)
    init_sd = registry.load_record(mlflow_client, init[0], tmp_path / "init")[0]
    for soup in soups:
        run = mlflow_client.get_run(soup["run_id"])
        model = mlflow_client.get_logged_model(soup["model_id"])
        assert run.data.tags["ich.recipe"] == model.tags["ich.recipe"] == "wise_ft"
        val = {m.step: m.value for m in mlflow_client.get_metric_history(soup["run_id"], "alpha_val_macro_f1")}
        test = {m.step: m.value for m in mlflow_client.get_metric_history(soup["run_id"], "alpha_test_accuracy")}
        assert sorted(val) == sorted(test) == list(range(0, 101, 10))  # 11 steps, step = round(100·α)
        # α chosen = the argmax of the logged val curve (ties: the larger α), computed here from MLflow's record
        best = max(val.values())
        chosen = max(s for s, v in val.items() if v == best) / 100
        for tags in (run.data.tags, model.tags):
            assert float(tags["ich.wise_ft.alpha"]) == pytest.approx(chosen)
            assert (tags["ich.wise_ft.head"], tags["ich.wise_ft.from"], tags["ich.curve"]) == ("keep", "best", "alpha")
        assert soup["params"]["alpha"] == f"{chosen:g}" and soup["curve"]["chosen"] == pytest.approx(chosen)
        # the soup is the formula at that α, from the init and the family's best single, its head the best single's
        best_single = soup["best_single"]["model_id"]
        assert model.tags["ich.wise_ft.from_model"] == best_single
        assert [i["model_id"] for i in soup["ingredients"] if i["accepted"]] == [best_single]
        ft = registry.load_record(mlflow_client, registry.get_model_record(mlflow_client, best_single),
                                  tmp_path / best_single)[0]
        got = registry.load_record(mlflow_client, registry.get_model_record(mlflow_client, soup["model_id"]),
                                   tmp_path / soup["model_id"])[0]
        assert got.keys() == ft.keys()
        for k in got:
            if k.startswith("head.fc."):
                assert torch.equal(got[k], ft[k]), k
            elif got[k].is_floating_point():
                want = ((1 - chosen) * init_sd[k].double() + chosen * ft[k].double()).to(ft[k].dtype)
                assert torch.allclose(got[k], want, rtol=1e-6, atol=1e-7), k  # within an ulp (torch.lerp)
    # the report's read: every wise_ft soup's curve, by α, with the chosen value
    _, snap = read_snapshot(tiny_sweep["experiment"], tracking_uri=mlflow_server)
    for soup in soups:
        curve = snap.curves[soup["model_id"]]
        assert curve["x"] == "alpha" and curve["chosen"] == pytest.approx(soup["curve"]["chosen"])
        assert [a for a, _ in curve["series"]["val accuracy"]] == [s / 100 for s in range(0, 101, 10)]
        assert [v for _, v in curve["series"]["test accuracy"]] == pytest.approx(
            [p["test"]["accuracy"] for p in soup["curve"]["points"]])


@pytest.mark.integration
def test_a_family_without_its_init_gets_one_line_and_the_other_recipes_run(tiny_sweep, mlflow_server, mlflow_client,
                                                                          tmp_path):
    """The tiny sweep's checkpoints of two trials logged again in an experiment of their own, without the init."""
    from soups.store import registry
    from soups.orchestrate import run_soups
    experiment = "wise-ft-without-init"
    records = registry.search_checkpoints(mlflow_client, [tiny_sweep["experiment_id"]], sweep=tiny_sweep["experiment"])
    two = sorted({r.trial for r in records})[:2]
    eid = registry.get_or_create_experiment(mlflow_client, experiment)
    sweep_run = mlflow_client.create_run(eid, run_name=experiment, tags={
        "ich.kind": "sweep", "ich.sweep": tiny_sweep["experiment"], "ich.data": str(tiny_sweep["data"])}).info.run_id
    runs = {t: mlflow_client.create_run(eid, run_name=t, tags={
        "ich.kind": "trial", "ich.sweep": tiny_sweep["experiment"], "ich.trial": t,
        "mlflow.parentRunId": sweep_run}).info.run_id for t in two}
    for r in records:
        if r.trial in runs:
            registry.log_checkpoint(mlflow_client, (eid, runs[r.trial]),
                                    registry.download_checkpoint(mlflow_client, r, tmp_path))
    summary = run_soups(SoupOptions(experiment=experiment, tracking_uri=mlflow_server, scope="across", bn="average",
                                    n_resamples=100, registered_model=f"{experiment}-soup", device="cpu"))
    fingerprint = records[0].init_fingerprint
    about = [n for n in summary["notes"] if "wise_ft" in n]
    assert about == [f"no model_stock or wise_ft soup for init fingerprint {fingerprint}: this experiment holds no "
                     "`init` LoggedModel of it (sweeps log their init since this version: run the sweep again, or log "
                     "it with soups.store.registry.log_init_model(client, sweep_run, folder), the folder's checkpoint.json "
                     f"with ich.init_fingerprint={fingerprint})"]
    assert sorted(s["name"] for s in summary["soups"]) == ["across-all-greedy", "across-best-greedy",
                                                           "across-best-learned", "across-best-uniform"]
