"""Ingredient pools: which of a family's checkpoints its soups may use (`ich soup --ingredients`, a sweep
config's `soups: {ingredients: ..., k: ...}`).

Within a trajectory (one trial's epochs):
- all: every usable checkpoint (the default, and what soups used before pools existed).
- top_k: the k checkpoints with the best recorded val metric (direction from the metric: loss low, others high);
  equal scores go to the later epoch. All of them when the trial has k or fewer.
- cycle_end: the epochs at which a cosine_restarts schedule reaches its learning-rate minimum, the snapshots the
  restarts exist to make: 1-based epoch e with (e - warmup_epochs) a positive multiple of restart_period
  (ich/train.lr_at). A trial trained on another schedule, or with a warmup that is not a whole number of
  epochs (its minima fall between epochs), is refused (PoolRefused names why).

Across runs (one candidate per trial, per compatible group):
- all: each trial's best checkpoint.
- top_k: the k best of those candidates (ties: later epoch, then trial name).
- cycle_end: each trial's best cycle-end checkpoint; trials refused as above, or with no cycle-end epoch yet, are
  left out with a note.
The greedy over every checkpoint of a group (across-all) takes the group's k best for top_k and every cycle-end
checkpoint for cycle_end.

Pure: items in, chosen items out, with accessors for score/epoch/trial (like best_first below), so the
orchestrator (Pulled members), the report and the sweep can share it. Scores are recorded val figures: test
never chooses.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from soups.evaluate import higher_is_better
from soups.options import INGREDIENT_POOLS, SoupError

T = TypeVar("T")


def best_first(items: Iterable[T], metric: str, score: Callable[[T], float],
               tiebreak: Callable[[T], tuple] = lambda _: ()) -> list[T]:
    """Items sorted best `metric` first (high for accuracy/F1, low for loss); equal scores by tiebreak(item)."""
    sign = -1.0 if higher_is_better(metric) else 1.0
    return sorted(items, key=lambda it: (sign * score(it), *tiebreak(it)))


class PoolRefused(SoupError):
    """The pool rule cannot apply to this family (e.g. cycle_end on a trial without warm restarts): the orchestrator
    turns it into a note naming the trial and soups the other families."""


@dataclass(frozen=True)
class Schedule:
    """A trial's learning-rate schedule, as ich.train.TrainConfig records it."""
    name: str  # cosine | cosine_restarts | constant
    restart_period: int = 0  # epochs per cycle (cosine_restarts)
    warmup_epochs: float = 0.0

    @classmethod
    def of(cls, config: Mapping | None) -> Schedule | None:
        """From a trial's training config: checkpoint.json's extra["config"] or the trial run's params (strings)."""
        if not config or not config.get("schedule"):
            return None
        return cls(str(config["schedule"]), int(float(config.get("restart_period", 0) or 0)),
                   float(config.get("warmup_epochs", 0) or 0))


def label(rule: str, k: int) -> str:
    """The rule as recorded on a soup (tag ich.ingredients): "all", "top_k:8", "cycle_end"."""
    return f"top_k:{k}" if rule == "top_k" else rule


def cycle_end_problem(schedule: Schedule | None) -> str | None:
    """Why cycle_end cannot apply to a trial with this schedule, or None."""
    if schedule is None:
        return "no training schedule recorded"
    if schedule.name != "cosine_restarts":
        return f"schedule {schedule.name}, not cosine_restarts"
    if schedule.restart_period < 1:
        return f"restart_period {schedule.restart_period}"
    if schedule.warmup_epochs != int(schedule.warmup_epochs):
        return f"warmup of {schedule.warmup_epochs:g} epochs puts its learning-rate minima between epochs"
    return None


def is_cycle_end(epoch: int, schedule: Schedule) -> bool:
    """Whether 1-based `epoch` ends at a learning-rate minimum of a (checked) cosine_restarts schedule."""
    after = epoch - int(schedule.warmup_epochs)
    return after > 0 and after % schedule.restart_period == 0


def _later_first(epoch: Callable, trial: Callable) -> Callable:
    return lambda it: (-epoch(it), trial(it))


def within(items: list[T], rule: str, k: int, metric: str, *, score: Callable[[T], float],
           epoch: Callable[[T], int], schedule: Schedule | None = None) -> list[T]:
    """The pool of one trial's checkpoints, in the order given. Raises PoolRefused for cycle_end on a schedule
    without learning-rate minima at epoch ends."""
    if rule not in INGREDIENT_POOLS:
        raise ValueError(f"unknown ingredient pool {rule!r}")
    if rule == "all" or not items:
        return list(items)
    if rule == "top_k":
        keep = {id(it) for it in best_first(items, metric, score, _later_first(epoch, lambda _: ""))[:k]}
    elif rule == "cycle_end":
        problem = cycle_end_problem(schedule)
        if problem:
            raise PoolRefused(problem)
        keep = {id(it) for it in items if is_cycle_end(epoch(it), schedule)}
    return [it for it in items if id(it) in keep]


@dataclass
class Across:
    """The pools of a group's across-run soups, best first, and why trials were left out."""
    best_per_trial: list  # across-best: one checkpoint per trial
    every: list  # across-all
    notes: list[str]


def across(items: list[T], rule: str, k: int, metric: str, *, score: Callable[[T], float],
           epoch: Callable[[T], int], trial: Callable[[T], str],
           schedules: Mapping[str, Schedule | None] | None = None) -> Across:
    """Pools of one compatible group's checkpoints (all trials). `items` best first as the caller ranks them;
    rule all keeps that ranking's first checkpoint of each trial (what soups did before pools)."""
    if rule not in INGREDIENT_POOLS:
        raise ValueError(f"unknown ingredient pool {rule!r}")
    notes: list[str] = []
    if rule == "cycle_end":
        schedules = schedules or {}
        problems = {t: cycle_end_problem(schedules.get(t)) for t in dict.fromkeys(trial(it) for it in items)}
        for t, problem in problems.items():
            if problem:
                notes.append(f"trial {t}: {problem}, left out of the cycle_end across-run soups")
        items = [it for it in items if not problems[trial(it)] and is_cycle_end(epoch(it), schedules[trial(it)])]
        left = {t for t, problem in problems.items() if not problem} - {trial(it) for it in items}
        notes += [f"trial {t}: no cycle-end epoch yet, left out of the cycle_end across-run soups"
                  for t in sorted(left)]
    if rule != "all":  # the pool's own tie rule; all keeps the caller's ranking, so its soups stay bit for bit
        items = best_first(items, metric, score, _later_first(epoch, trial))
    best_per_trial, seen = [], set()
    for it in items:
        if trial(it) not in seen:
            seen.add(trial(it))
            best_per_trial.append(it)
    every = list(items)
    if rule == "top_k":
        best_per_trial, every = best_per_trial[:k], every[:k]
    return Across(best_per_trial, every, notes)
