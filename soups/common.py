"""Small helpers shared by the soup orchestrator and the report: written once here.

json_safe (summaries to JSON), best_first (best val first, ties broken stably), soft_vote_logits (soft voting as
logits the evaluator's metrics take), find_experiment (an experiment by name, or one clear line), and
quiet_run_urls (MLflow's environment default for runs ended in bulk).
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

from soups.evaluate import higher_is_better
from soups.logit_store import soft_vote_stream
from soups.options import SoupError

T = TypeVar("T")
NO_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def json_safe(x):
    """JSON-safe: numpy scalars to Python, NaN/Inf to None, private keys (leading _) dropped."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def best_first(items: Iterable[T], metric: str, score: Callable[[T], float],
               tiebreak: Callable[[T], tuple] = lambda _: ()) -> list[T]:
    """Items sorted best `metric` first (high for accuracy/F1, low for loss); equal scores by tiebreak(item)."""
    sign = -1.0 if higher_is_better(metric) else 1.0
    return sorted(items, key=lambda it: (sign * score(it), *tiebreak(it)))


def soft_vote_logits(logit_sets: Iterable[np.ndarray]) -> np.ndarray:
    """Log of soft voting's probabilities (the evaluator's metrics take logits), one model's logits at a time."""
    return np.log(np.clip(soft_vote_stream(logit_sets), 1e-300, None))


def find_experiment(client, name: str, uri: str):
    """The live experiment `name` on the server at `uri`; SoupError naming it when missing or deleted."""
    from soups import registry
    experiment = registry.call_with_retry(f"get experiment {name!r}", client.get_experiment_by_name, name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise SoupError(f"experiment {name!r}: not found on the MLflow server at {uri}")
    return experiment


@contextlib.contextmanager
def quiet_run_urls() -> Iterator[None]:
    """MLflow prints a "View run" line (after an extra get_run) for every run it ends: noise when runs are
    recorded in bulk. Off inside the block; the caller's setting is restored after."""
    before = os.environ.get(NO_URLS)
    os.environ[NO_URLS] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NO_URLS, None)
        else:
            os.environ[NO_URLS] = before
