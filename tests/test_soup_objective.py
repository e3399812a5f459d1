"""`objective: trajectory_soup` (issue 14, item 2): each epoch a trial reports its running uniform soup's
val_soup_<metric>, and that is what Optuna and ASHA rank by. Real Ray + MLflow for the sweep."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from ich.checkpoint import CheckpointError, load_checkpoint
from ich.data import load_dataset
from ich.errors import ConfigError
from soups.store import registry
from soups.average import RunningSum
from soups.evaluate import EvalSpec, Evaluator
from soups.parallel import state_dict_sha256
from sweeps.config import SweepConfig, load_config
from sweeps.soup_callback import TAG_VS_POSTHOC, SoupSoFar, diff_with_posthoc, summary_line
from sweeps.soup_objective import TrajectorySoup, objective_metric
from tests.fixtures_sweep import write_sweep_config


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g).half(),
            "n": torch.tensor(seed, dtype=torch.int64)}


def _uniform(sds) -> dict[str, torch.Tensor]:
    """The post-hoc uniform soup's math (soups/build.SoupBuilder.uniform): a RunningSum of the state dicts."""
    total = RunningSum()
    for sd in sds:
        total.add(sd)
    return total.mean()


def test_running_sum_restored_goes_on_bitwise():
    full, half = RunningSum(threads=1), RunningSum(threads=1)
    for i in range(4):
        full.add(_sd(i))
        if i < 2:
            half.add(_sd(i))
    restored = RunningSum.restore(*half.export())
    for i in range(2, 4):
        restored.add(_sd(i))
    a, b = full.mean(), restored.mean()
    assert restored.count == 4 and set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="do not fit"):
        RunningSum.restore(half.export()[0], {"w": "float32"}, 2)


def test_trajectory_soup_saved_and_loaded(tmp_path):
    class FakeTrainer:  # save/load touch neither the model nor the data
        pass
    soup = TrajectorySoup(FakeTrainer())
    soup.add(_sd(0), 1)
    soup.add(_sd(1), 2)
    soup.save(tmp_path)
    again = TrajectorySoup(FakeTrainer())
    assert again.load(tmp_path) and again.epochs == [1, 2]
    expected = _uniform([_sd(0), _sd(1)])
    assert all(torch.equal(again.state_dict()[k], expected[k]) for k in expected)
    assert not TrajectorySoup(FakeTrainer()).load(tmp_path / "none")
    (tmp_path / "soup_sum.json").write_text("{}")
    with pytest.raises(CheckpointError, match="soup_sum.safetensors: cannot restore"):
        again.load(tmp_path)


def test_objective_config(tmp_path):
    assert SweepConfig().objective == "single" and SweepConfig().tune_metric == "val_macro_f1"
    assert objective_metric("val_accuracy", "trajectory_soup") == "val_soup_accuracy"
    cfg = load_config(write_sweep_config(tmp_path, "obj-ok", **{"mode: max\n": "mode: max\nobjective: trajectory_soup\n"}))
    assert cfg.tune_metric == "val_soup_macro_f1"
    bad = write_sweep_config(tmp_path, "obj-bad", **{"mode: max\n": "mode: max\nobjective: soup\n"})
    with pytest.raises(ConfigError, match=r"obj-bad.yaml: objective must be single or trajectory_soup, not 'soup'"):
        load_config(bad)


def _history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def _artifact_json(client, run_id: str, path: str, folder) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, path, str(folder))).read_text())


# The planted trials of the sweep below, run one at a time in this order (a grid runs its list in order).
GOOD_LR, LOSER_LR = 1.5e-3, 0.0


def _planted_stop(rows: list[dict], soup_at_2: dict) -> None:
    """ASHA stopped the planted loser at its rung (epoch 2) with the lower soup; the winner trained to the end."""
    loser = next(r for r in rows if r["config"]["lr"] == LOSER_LR)
    winner = next(r for r in rows if r["config"]["lr"] == GOOD_LR)
    assert (loser["status"], loser["epochs"]) == ("KILLED", 2), rows
    assert (winner["status"], winner["epochs"]) == ("FINISHED", 3), rows
    assert soup_at_2[loser["trial"]] < soup_at_2[winner["trial"]], soup_at_2


def test_trajectory_soup_sweep_reports_and_selects_on_the_soup(ray_local, mlflow_client, digits_dataset, ich_home,
                                                                tmp_path):
    """Issue 14 items 1 and 2 on real Ray + MLflow: the trials report val_soup_macro_f1 each epoch and ASHA ranks by
    it; while the sweep runs the soup so far grows one step per trial and each trial's within soups are built as Ray
    tasks; they equal the post-hoc `ich soup`'s (ingredients, figures, weights bitwise).

    ASHA's stop is planted, not hoped for. Ray's ASHA (one bracket; rung at epoch 2, reduction 2) lets the first
    trial to reach a rung continue and stops a later one whose value is below the rung's cutoff (with one earlier
    value: that value). So the two trials are a `grid:` over lr run one at a time (max_concurrent 1; Tune's grid
    runs its list in order): first a trial that learns (GOOD_LR), then one with lr 0, whose weights never move
    (AdamW's step and decay both scale with lr; only BatchNorm's running statistics follow the data), so its soup
    at epoch 2 stays at the warm start's score. The warm start trains only 2 epochs, far from its plateau, so the
    learning trial's soup of epochs 1-2 sits well above it (measured here: val macro F1 0.81 against 0.45).
    A grid runs without Optuna, so this sweep has no study: the check that Optuna's values are the trials' last
    val_soup is gone (with a search, which trial comes second is up to the sampler). Optuna is handed the same
    `tune_metric` as ASHA (sweeps/coatnet.py), and test_objective_config checks its value for this objective."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    from sweeps.job import parse_args, run_sweep
    from tests.fixtures_sweep import TINY_SWEEP_YAML
    tiny = TINY_SWEEP_YAML.format(experiment="soup-objective")
    search = tiny[tiny.index("search:"):tiny.index("asha:")]
    config = write_sweep_config(ich_home, "soup-objective", **{
        "mode: max\n": "mode: max\nobjective: trajectory_soup\nsoup_so_far: true\n",
        "num_samples: 4": "num_samples: 1", "max_concurrent: 2": "max_concurrent: 1",
        search: f"grid:\n  lr: [{GOOD_LR}, {LOSER_LR}]\n",
        "grace_period: 1": "grace_period: 2",  # ASHA's rung at epoch 2: there the soup of 2 differs from epoch 2 alone
        "warm_start: {epochs: 4": "warm_start: {epochs: 2"})
    assert "grid:" in config.read_text() and "search:" not in config.read_text()
    # soups after the sweep too (the post-hoc `ich soup` compared below); the report has tests of its own
    args = parse_args(["--config", str(config), "--data", str(digits_dataset), "--no-report"])
    summary = run_sweep(args, ich_home)
    rows = summary["trials"]
    assert len(rows) == 2 and all(r["status"] in ("FINISHED", "KILLED") for r in rows)

    exp = mlflow_client.get_experiment_by_name("soup-objective").experiment_id
    records = registry.search_checkpoints(mlflow_client, [exp], sweep="soup-objective")
    soup_at_2, histories, weights_of = {}, {}, {}
    for row in rows:
        mine = sorted((r for r in records if r.trial == row["trial"]), key=lambda r: r.epoch)
        history = histories[row["trial"]] = _history(mlflow_client, row["run_id"], "val_soup_macro_f1")
        assert [m.step for m in history] == [r.epoch for r in mine] and len(mine) == row["epochs"] >= 2
        soup_at_2[row["trial"]] = history[1].value
        # epoch 1: the soup of one checkpoint is that checkpoint
        assert history[0].value == pytest.approx(mine[0].metrics["val_macro_f1"], abs=1e-12)
        # every epoch: the soup equals a post-hoc uniform soup of the trial's checkpoints so far
        folders = [registry.download_checkpoint(mlflow_client, r, tmp_path / row["trial"]) for r in mine]
        weights = [load_checkpoint(f, expected_sha256=r.sha256) for f, r in zip(folders, mine)]
        weights_of[row["trial"]] = [w for w, _ in weights]
        ev = Evaluator(load_dataset(digits_dataset), EvalSpec.of(weights[0][1]), device="cpu")
        for n, m in enumerate(history, start=1):
            score = ev.score(ev.logits(_uniform([w for w, _ in weights[:n]]), "val"), "val", "macro_f1")
            assert math.isclose(score, m.value, abs_tol=1e-9), (row["trial"], n, score, m.value)

    # The plant held: the trials ran in the grid's order, one after the other (every report of the winner came
    # before the loser's first), and the loser's weights did not move (only BatchNorm's running statistics).
    loser = next(r for r in rows if r["config"]["lr"] == LOSER_LR)
    winner = next(r for r in rows if r is not loser)
    assert max(m.timestamp for m in histories[winner["trial"]]) <= min(m.timestamp for m in histories[loser["trial"]])
    first, second = weights_of[loser["trial"]][:2]
    moving = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(first[k], second[k]) for k in first if not k.endswith(moving))
    assert any(not torch.equal(first[k], second[k]) for k in first if k.endswith("running_mean"))
    # ASHA decided on the soup, unconditionally: the loser (second at the rung) stopped at epoch 2 with the lower
    # soup, the winner finished.
    _planted_stop(rows, soup_at_2)
    # Controls. The same checks on the soups swapped fail; and Ray's own rung, replayed with the recorded soups in
    # the order they arrived, stops the loser, but would let it go on had its soup equalled the winner's or had it
    # arrived first: the stop above came from the soups at epoch 2, not from anything else.
    with pytest.raises(AssertionError):
        _planted_stop(rows, {loser["trial"]: soup_at_2[winner["trial"]], winner["trial"]: soup_at_2[loser["trial"]]})

    def rung(*arrivals: tuple[str, float]) -> str:
        bracket = _Bracket(min_t=2, max_t=3, reduction_factor=2, s=0)
        trials = [type("T", (), {"trial_id": t})() for t, _ in arrivals]
        return [bracket.on_result(t, 2, v) for t, (_, v) in zip(trials, arrivals)][-1]
    w, lo = (winner["trial"], soup_at_2[winner["trial"]]), (loser["trial"], soup_at_2[loser["trial"]])
    assert rung(w, lo) == TrialScheduler.STOP
    assert rung(w, (loser["trial"], w[1])) == rung(lo, w) == TrialScheduler.CONTINUE

    # The soup so far (item 1): one step per trial done, never worse, the first is one trial's best checkpoint.
    parent = summary["parent_run_id"]
    so_far = _history(mlflow_client, parent, "soup_so_far_val_macro_f1")
    sizes = _history(mlflow_client, parent, "soup_so_far_size")
    assert [m.step for m in so_far] == [1, 2] and [m.step for m in sizes] == [1, 2]
    assert sizes[0].value == 1 and sizes[1].value in (1, 2) and so_far[1].value >= so_far[0].value - 1e-7
    bests = [max(r.metrics["val_macro_f1"] for r in records if r.trial == row["trial"]) for row in rows]
    assert any(math.isclose(so_far[0].value, b, abs_tol=1e-9) for b in bests), (so_far[0].value, bests)
    state = _artifact_json(mlflow_client, parent, "soup_so_far.json", tmp_path / "state")
    assert len(state["accepted"]) == sizes[1].value and len(state["offered"]) == 2
    assert state["val_macro_f1"] == so_far[1].value and sorted(state["trial_steps"].values()) == [1, 2]

    # Within soups built during the sweep (Ray tasks) equal the post-hoc ones: ingredients, val, weights bitwise.
    posthoc = {s["name"]: s for s in summary["soups"]["soups"]}
    for recipe in ("uniform", "greedy"):
        steps = [m.step for m in _history(mlflow_client, parent, f"within_{recipe}_val_macro_f1")]
        assert sorted(steps) == [1, 2], (recipe, steps)
    for row in rows:
        during = _artifact_json(mlflow_client, parent, f"soups_so_far/within-{row['trial']}.json", tmp_path / "w")
        assert during["step"] == state["trial_steps"][row["trial"]]
        # every recipe, model_stock and wise_ft too: the sweep's warm start is logged as its init (the anchor)
        assert [s["name"] for s in during["soups"]] == [
            f"within-{row['trial']}-{r}" for r in ("uniform", "greedy", "model_stock", "wise_ft", "learned")]
        for s in during["soups"]:
            p = posthoc[s["name"]]
            assert [(i["model_id"], i["accepted"]) for i in s["ingredients"]] == \
                [(i["model_id"], i["accepted"]) for i in p["ingredients"]], s["name"]
            assert s["bn_mode"] == p["bn_mode"], s["name"]
            if s["recipe"] == "learned":  # gradient steps in a Ray task: equal to float32 rounding, not bitwise
                assert all(v == pytest.approx(p["val"][k], rel=1e-5) for k, v in s["val"].items()), s["name"]
                continue
            assert s["val"] == p["val"], s["name"]
            record = registry.get_model_record(mlflow_client, p["model_id"])
            weights, _ = load_checkpoint(registry.download_checkpoint(mlflow_client, record, tmp_path / "posthoc"),
                                         expected_sha256=record.sha256)
            assert state_dict_sha256(weights) == s["weights_sha256"], s["name"]

    # The soup so far beside the post-hoc across-best greedy soup: both figures, the ingredients that differ.
    vs = _artifact_json(mlflow_client, parent, "soup_so_far_vs_posthoc.json", tmp_path / "vs")
    across = posthoc["across-best-greedy"]
    theirs = [i["model_id"] for i in across["ingredients"] if i["accepted"]]
    assert vs["so_far"]["ingredients"] == state["accepted"] and vs["posthoc"]["ingredients"] == theirs
    assert vs["so_far"]["val"] == so_far[1].value and vs["posthoc"]["val"] == across["val"]["macro_f1"]
    assert set(vs["only_so_far"]) == set(state["accepted"]) - set(theirs)
    assert set(vs["only_posthoc"]) == set(theirs) - set(state["accepted"])
    from soups.recipes import names as recipe_names  # every registered recipe cooks within each trial
    assert len(vs["within"]) == len(recipe_names()) * len(rows) and all(w["same_ingredients"] for w in vs["within"])
    tag = mlflow_client.get_run(parent).data.tags[TAG_VS_POSTHOC]
    assert tag == ("same ingredients" if vs["same_ingredients"] else
                   f"differ: {len(vs['only_so_far'])} only so far, {len(vs['only_posthoc'])} only post hoc")

    # Resume: the callback's state (plain data) restores the soup so far without double counting; the running sum
    # rebuilt from its ingredients' checkpoints scores exactly the figure recorded before.
    cb = SoupSoFar(tracking_uri=mlflow_client.tracking_uri, experiment_id=exp, sweep="soup-objective",
                   parent_run_id=parent, data=str(digits_dataset), within=False)
    cb.set_state({"version": 1, "done": 2, "seen": state["trial_steps"], "best": state["val_macro_f1"],
                  "accepted": state["accepted"], "offered": state["offered"], "within": {rows[0]["trial"]: {}}})
    assert cb._resubmit == [rows[1]["trial"]]  # its within task was in flight: built again after the resume
    cb.on_trial_complete(0, [], type("T", (), {"trial_id": rows[0]["trial"]})())
    assert cb.done == 2 and cb.offered == state["offered"]  # a trial seen before is not offered twice
    cb._restore_sum(MlflowClient(mlflow_client.tracking_uri))
    ev = Evaluator(load_dataset(digits_dataset), EvalSpec.of(cb._ref[1]), device="cpu")
    assert cb.sum.count == len(state["accepted"])
    assert ev.score(ev.logits(cb.sum.mean(), "val"), "val", "macro_f1") == state["val_macro_f1"]
    pickle.dumps(cb)  # Tune pickles its callbacks: must not raise (nothing is unpickled here: tests/test_security.py)
    again = SoupSoFar(tracking_uri=mlflow_client.tracking_uri, experiment_id=exp, sweep="soup-objective",
                      parent_run_id=parent, data=str(digits_dataset), within=False)
    again.set_state(json.loads(json.dumps(cb.get_state())))  # plain data: a JSON round trip loses nothing
    assert again.get_state()["accepted"] == state["accepted"] and again.done == cb.done


def test_soup_so_far_diff_is_pure():
    so_far = {"metric": "accuracy", "val_accuracy": 0.9, "accepted": ["a", "b"], "offered": ["a", "b", "c"]}
    post = [{"name": "across-best-greedy", "scope": "across", "recipe": "greedy", "bn_mode": "average",
             "val": {"accuracy": 0.91}, "ingredients": [{"model_id": m, "accepted": m != "a"} for m in "bca"]},
            {"name": "within-t-uniform", "scope": "within", "recipe": "uniform", "bn_mode": "average",
             "val": {"accuracy": 0.8}, "ingredients": [{"model_id": "x", "accepted": True}]}]
    within = {"t": {"soups": [{"name": "within-t-uniform", "val": {"accuracy": 0.8}, "weights_sha256": "00",
                               "ingredients": [{"model_id": "x", "accepted": True}]}]}}
    d = diff_with_posthoc(so_far, post, within)
    assert d["posthoc"]["ingredients"] == ["b", "c"] and d["only_so_far"] == ["a"] and d["only_posthoc"] == ["c"]
    assert d["same_ingredients"] is False and d["within"][0]["same_ingredients"] is True
    assert summary_line(d) == ("soup so far vs post-hoc across-best-greedy: val accuracy 0.9000 (2 ingr., average BN) "
                               "vs 0.9100 (2 ingr., average BN); ingredients differ (1 only so far, 1 only post hoc)")
    assert diff_with_posthoc(so_far, [])["posthoc"] is None


def test_soup_so_far_state_is_plain_data_and_failures_are_one_line(capsys):
    cb = SoupSoFar(tracking_uri="http://127.0.0.1:9", experiment_id="1", sweep="s", parent_run_id="r", data="d")
    cb.set_state({"version": 99})  # a state this code did not write: start from empty, say so
    assert cb.done == 0 and cb.accepted == [] and "another version" in capsys.readouterr().err
    state = {"version": 1, "done": 3, "seen": {"a": 1, "b": 2, "c": 3}, "best": 0.5, "accepted": ["m1"],
             "offered": ["m1", "m2"], "within": {"a": {"soups": []}}}
    cb.set_state(state)
    assert cb.get_state() == state and json.loads(json.dumps(cb.get_state())) == state  # JSON-able: data only
    assert cb._resubmit == ["b", "c"] and cb._rebuild == ["m1"]
    cb._guard("trial x", lambda: 1 / 0)
    assert capsys.readouterr().err == "soup so far: trial x: ZeroDivisionError: division by zero\n"


@pytest.mark.integration
def test_within_soups_are_built_while_trials_hold_every_cpu(tiny_sweep, mlflow_client, mlflow_server):
    """Trials usually hold every CPU of the cluster (and Tune reuses their actors), so a within-soup task that
    reserved a CPU ran only after the sweep. Here an actor holds both CPUs of the session's Ray, as trials would,
    and the callback's task for one trial of the session sweep still comes back, with that trial's soups."""
    import ray

    @ray.remote(num_cpus=2)
    class Trials:
        def ready(self) -> bool:
            return True

    holder = Trials.remote()
    try:
        assert ray.get(holder.ready.remote(), timeout=120)
        assert ray.available_resources().get("CPU", 0) == 0
        exp = mlflow_client.get_experiment_by_name(tiny_sweep["experiment"]).experiment_id
        records = registry.search_checkpoints(mlflow_client, [exp], sweep=tiny_sweep["experiment"])
        trial = max({r.trial for r in records}, key=lambda t: sum(r.trial == t for r in records))  # most epochs
        cb = SoupSoFar(tracking_uri=mlflow_server, experiment_id=exp, sweep=tiny_sweep["experiment"],
                       parent_run_id="unused", data=str(tiny_sweep["data"]))
        cb._submit_within(trial)
        done, _ = ray.wait([cb._refs[trial]], timeout=180)
        assert done, "the within-soup task waited for a CPU that the trials hold"
        result = ray.get(done[0])
        assert result["trial"] == trial and {s["recipe"] for s in result["soups"]} == {
            "uniform", "greedy", "model_stock", "wise_ft", "learned"}, result
    finally:
        ray.kill(holder)
