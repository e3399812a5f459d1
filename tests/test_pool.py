"""Ingredient pools (soups/pool.py), pure: hand-written checkpoints in, the chosen ones checked against
expectations written out by hand. The integration side (ich soup on the tiny sweep) is in
tests/test_soup_orchestrator.py."""
from __future__ import annotations

from collections import namedtuple

import pytest

from soups import pool
from soups.pool import PoolRefused, Schedule

Ckpt = namedtuple("Ckpt", "trial epoch score")
ACC = dict(score=lambda c: c.score, epoch=lambda c: c.epoch)
ACROSS = dict(ACC, trial=lambda c: c.trial)
RESTARTS_2 = Schedule("cosine_restarts", 2)
RESTARTS_3 = Schedule("cosine_restarts", 3)


def trajectory(scores: list[float], trial: str = "t") -> list[Ckpt]:
    return [Ckpt(trial, e, s) for e, s in enumerate(scores, start=1)]


def epochs(chosen) -> list[int]:
    return [c.epoch for c in chosen]


def test_all_keeps_every_checkpoint_in_the_order_given():
    ckpts = trajectory([0.3, 0.9, 0.5])
    assert pool.within(ckpts, "all", 1, "accuracy", **ACC) == ckpts
    assert pool.label("all", 8) == "all" and pool.label("top_k", 8) == "top_k:8"
    assert pool.label("cycle_end", 8) == "cycle_end"


def test_top_k_follows_the_metric_direction():
    ckpts = trajectory([0.3, 0.9, 0.5, 0.7, 0.1])
    assert epochs(pool.within(ckpts, "top_k", 2, "accuracy", **ACC)) == [2, 4]  # high is better
    assert epochs(pool.within(ckpts, "top_k", 2, "macro_f1", **ACC)) == [2, 4]
    assert epochs(pool.within(ckpts, "top_k", 2, "loss", **ACC)) == [1, 5]  # low is better
    assert epochs(pool.within(ckpts, "top_k", 1, "loss", **ACC)) == [5]


def test_top_k_ties_go_to_the_later_epoch():
    ckpts = trajectory([0.5, 0.8, 0.5, 0.5, 0.2])
    assert epochs(pool.within(ckpts, "top_k", 2, "accuracy", **ACC)) == [2, 4]
    assert epochs(pool.within(ckpts, "top_k", 3, "accuracy", **ACC)) == [2, 3, 4]
    # control: without the tie the earlier epoch wins on its score
    assert epochs(pool.within(trajectory([0.5, 0.8, 0.49, 0.4]), "top_k", 2, "accuracy", **ACC)) == [1, 2]


def test_top_k_larger_than_the_family_keeps_it_all():
    ckpts = trajectory([0.3, 0.9, 0.5])
    assert pool.within(ckpts, "top_k", 8, "accuracy", **ACC) == ckpts
    assert pool.within([], "top_k", 8, "accuracy", **ACC) == []


@pytest.mark.parametrize("schedule,expected", [
    (RESTARTS_2, [2, 4, 6]),
    (RESTARTS_3, [3, 6]),
    (Schedule("cosine_restarts", 3, warmup_epochs=1.0), [4, 7]),  # lr_at counts cycles after the warmup
    (Schedule("cosine_restarts", 1), [1, 2, 3, 4, 5, 6, 7]),
])
def test_cycle_end_keeps_the_epochs_at_the_learning_rate_minima(schedule, expected):
    ckpts = trajectory([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert epochs(pool.within(ckpts, "cycle_end", 8, "accuracy", schedule=schedule, **ACC)) == expected


def test_cycle_end_of_the_tiny_sweep_keeps_epoch_2_only():
    ckpts = trajectory([0.9, 0.1, 0.5])  # the best epoch is not a cycle end: score plays no part
    assert epochs(pool.within(ckpts, "cycle_end", 8, "accuracy", schedule=RESTARTS_2, **ACC)) == [2]


@pytest.mark.parametrize("schedule,reason", [
    (Schedule("cosine"), "schedule cosine, not cosine_restarts"),
    (Schedule("constant"), "schedule constant, not cosine_restarts"),
    (None, "no training schedule recorded"),
    (Schedule("cosine_restarts", 3, warmup_epochs=0.5),
     "warmup of 0.5 epochs puts its learning-rate minima between epochs"),
])
def test_cycle_end_refuses_a_schedule_without_minima_at_epoch_ends(schedule, reason):
    with pytest.raises(PoolRefused, match=f"^{reason}$"):
        pool.within(trajectory([0.1, 0.2, 0.3]), "cycle_end", 8, "accuracy", schedule=schedule, **ACC)


def test_schedule_reads_a_checkpoint_config_or_run_params():
    assert Schedule.of({"schedule": "cosine_restarts", "restart_period": 2, "warmup_epochs": 0.0}) == RESTARTS_2
    assert Schedule.of({"schedule": "cosine_restarts", "restart_period": "3", "warmup_epochs": "0.0"}) == RESTARTS_3
    assert Schedule.of({"schedule": "cosine", "restart_period": "3"}).name == "cosine"
    assert Schedule.of(None) is None and Schedule.of({}) is None


def _group() -> list[Ckpt]:
    """Three trials, ranked best first by accuracy as the orchestrator hands them over."""
    ckpts = [Ckpt("a", 1, 0.60), Ckpt("a", 2, 0.70), Ckpt("a", 3, 0.65),
             Ckpt("b", 1, 0.80), Ckpt("b", 2, 0.50), Ckpt("b", 3, 0.55),
             Ckpt("c", 1, 0.40), Ckpt("c", 2, 0.75)]
    return sorted(ckpts, key=lambda c: (-c.score, c.trial, c.epoch))


def names(chosen) -> list[tuple[str, int]]:
    return [(c.trial, c.epoch) for c in chosen]


def test_across_all_is_each_trials_best_and_every_checkpoint():
    out = pool.across(_group(), "all", 8, "accuracy", **ACROSS)
    assert names(out.best_per_trial) == [("b", 1), ("c", 2), ("a", 2)]
    assert out.every == _group() and out.notes == []


def test_across_top_k_keeps_the_k_best_candidates():
    out = pool.across(_group(), "top_k", 2, "accuracy", **ACROSS)
    assert names(out.best_per_trial) == [("b", 1), ("c", 2)]
    assert names(out.every) == [("b", 1), ("c", 2)]  # across-all: the group's 2 best checkpoints
    out = pool.across(_group(), "top_k", 2, "loss", **ACROSS)  # low is better
    assert names(out.best_per_trial) == [("c", 1), ("b", 2)]
    assert names(out.every) == [("c", 1), ("b", 2)]
    assert len(pool.across(_group(), "top_k", 8, "accuracy", **ACROSS).best_per_trial) == 3


def test_across_top_k_ties_go_to_the_later_epoch_then_the_trial_name():
    tied = [Ckpt("b", 1, 0.5), Ckpt("a", 1, 0.5), Ckpt("c", 2, 0.5), Ckpt("a", 3, 0.5)]
    out = pool.across(tied, "top_k", 2, "accuracy", **ACROSS)
    assert names(out.best_per_trial) == [("a", 3), ("c", 2)]


def test_across_cycle_end_takes_each_trials_best_cycle_end_and_names_the_trials_left_out():
    schedules = {"a": RESTARTS_2, "b": Schedule("cosine"), "c": RESTARTS_3}
    out = pool.across(_group(), "cycle_end", 8, "accuracy", schedules=schedules, **ACROSS)
    assert names(out.best_per_trial) == [("a", 2)]  # c reached no cycle end (epoch 3) yet, b has no restarts
    assert names(out.every) == [("a", 2)]
    assert out.notes == ["trial b: schedule cosine, not cosine_restarts, left out of the cycle_end across-run soups",
                         "trial c: no cycle-end epoch yet, left out of the cycle_end across-run soups"]
    schedules["b"] = Schedule("cosine_restarts", 3)
    out = pool.across(_group(), "cycle_end", 8, "accuracy", schedules=schedules, **ACROSS)
    assert names(out.best_per_trial) == [("a", 2), ("b", 3)]  # b's best (epoch 1) is not a cycle end
    assert names(out.every) == [("a", 2), ("b", 3)]


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown ingredient pool 'best'"):
        pool.within(trajectory([0.1, 0.2]), "best", 2, "accuracy", **ACC)
    with pytest.raises(ValueError, match="unknown ingredient pool 'best'"):
        pool.across(_group(), "best", 2, "accuracy", **ACROSS)
