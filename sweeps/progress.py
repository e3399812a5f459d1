"""What a person sees while a sweep runs: one progress bar and one line per finished trial.

Ray Tune's own status tables and config boxes stay behind `--verbose`. The bar (trials done / total, best
val so far, ETA) is drawn only when stdout is a terminal; in a log (cron, `ray job logs`, a pipe) only the
per-trial lines appear, one each, never a redrawn bar. The formatting is plain functions (tested alone);
the Tune callback only feeds them. Below them: the driver's own quieting of Ray, Tune, Optuna and MLflow."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from ray.tune import Callback


def fmt_value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def better(a: float | None, b: float | None, mode: str) -> bool:
    """a beats b under `mode` (max | min); anything beats None."""
    if a is None:
        return False
    return b is None or (a > b if mode == "max" else a < b)


def trial_line(done: int, total: int, trial_id: str, status: str, epochs: int, metric: str, value: float | None,
               best: float | None, params: dict) -> str:
    """`trial 3/8 853f3a74 finished  6 ep  val_macro_f1 0.9833 (best 0.9833)  lr=0.000715 ...`"""
    shown = "-" if value is None else f"{value:.4f}"
    best_shown = "" if best is None else f" (sweep best {best:.4f})"
    width = len(str(total))
    params_shown = " ".join(f"{k}={fmt_value(v)}" for k, v in params.items())
    return (f"trial {done:>{width}}/{total} {trial_id:<8} {status:<15} {epochs:>3} ep  {metric} {shown}{best_shown}"
            + (f"  {params_shown}" if params_shown else ""))


def trial_status(result: dict | None, config: dict, planned_epochs: int, error: bool) -> tuple[str, int]:
    """(status word, epochs trained) of a trial that has ended."""
    epochs = int((result or {}).get("epoch", 0))
    if error:
        return "failed", epochs
    planned = int(config.get("epochs", planned_epochs))
    return ("finished" if epochs >= planned else "stopped by ASHA"), epochs


def eta_seconds(elapsed: float, done: int, total: int, done_before: int = 0) -> float | None:
    """Time left at the pace so far (trials run side by side, so a rough figure); None before the first.
    `done_before`: trials that ended before `elapsed` began (an earlier driver, before --resume)."""
    if done >= total:
        return 0.0
    if done - done_before <= 0:
        return None
    return elapsed / (done - done_before) * (total - done)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def bar_line(done: int, total: int, metric: str, best: float | None, elapsed: float, width: int = 24,
             done_before: int = 0) -> str:
    """`sweep [#########---------------] 3/8 trials  best val_macro_f1 0.9833  1:02 elapsed, ETA 1:43`"""
    filled = int(width * done / total) if total else width
    best_shown = "-" if best is None else f"{best:.4f}"
    return (f"sweep [{'#' * filled}{'-' * (width - filled)}] {done}/{total} trials  best {metric} {best_shown}  "
            f"{fmt_duration(elapsed)} elapsed, ETA {fmt_duration(eta_seconds(elapsed, done, total, done_before))}")


class SweepProgress(Callback):
    """A Tune callback on the driver: the bar (terminal only) and one line per trial that ends. Tune's own
    output is off meanwhile (tune_output below). `params`: the searched keys shown on each trial's line.
    `planned_epochs`: a trial's epochs when its config does not say (tells "finished" from "stopped by ASHA").
    `tty`: None = ask stdout."""

    def __init__(self, total: int, metric: str, mode: str, planned_epochs: int, params: list[str],
                 tty: bool | None = None):
        self.total, self.metric, self.mode, self.planned_epochs = total, metric, mode, planned_epochs
        self.params, self.tty = list(params), tty
        self.finished: set[str] = set()  # trial ids that ended, across --resume (get_state/set_state)
        self.best, self.last, self.done_before = None, {}, 0
        self._clock, self._drawn = None, 0.0

    @property
    def done(self) -> int:
        return len(self.finished)

    def get_state(self) -> dict:
        """Plain data, saved by Tune with the experiment state, so that --resume counts on instead of from 0."""
        return {"kind": "sweep_progress", "finished": sorted(self.finished), "best": self.best}

    def set_state(self, state: dict) -> None:
        if isinstance(state, dict) and state.get("kind") == "sweep_progress":  # Tune keys states by list position
            self.finished, self.best = set(state["finished"]), state["best"]
            self.done_before = self.done

    def __getstate__(self):  # Tune pickles its callbacks with the experiment (for --resume): no clock
        state = dict(self.__dict__)
        state["_clock"], state["_drawn"] = None, 0.0
        return state

    def _terminal(self) -> bool:
        return self.tty if self.tty is not None else sys.stdout.isatty()

    def _elapsed(self) -> float:
        if self._clock is None:
            self._clock = time.monotonic()
        return time.monotonic() - self._clock

    def _draw(self, end: str = "") -> None:
        if self._terminal():
            bar = bar_line(self.done, self.total, self.metric, self.best, self._elapsed(), done_before=self.done_before)
            sys.stdout.write("\r\x1b[2K" + bar + end)
            sys.stdout.flush()
            self._drawn = time.monotonic()

    def _say(self, line: str) -> None:
        if self._terminal():
            sys.stdout.write("\r\x1b[2K")  # the trial's line takes the bar's place; the bar is drawn below it
        print(line, flush=True)
        self._draw()

    def on_step_end(self, iteration, trials, **info):
        if self._terminal() and time.monotonic() - self._drawn >= 1.0:  # the clock ticks once a second
            self._draw()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and better(float(value), self.best, self.mode):
            self.best = float(value)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=True)

    def on_experiment_end(self, trials, **info):
        self._draw(end="\n")

    def _finish(self, trial, error: bool) -> None:
        self.finished.add(trial.trial_id)  # a trial that failed before --resume and runs again counts once
        result = self.last.get(trial.trial_id) or trial.last_result or {}
        config = trial.config or {}
        status, epochs = trial_status(result, config, self.planned_epochs, error)
        value = result.get(self.metric)
        params = {k: config[k] for k in self.params if k in config}
        self._say(trial_line(self.done, self.total, trial.trial_id, status, epochs, self.metric,
                             float(value) if isinstance(value, (int, float)) else None, self.best, params))


# ------------------------------------------------------------------- what the driver prints

def progress_callbacks(cfg, verbose: bool) -> list:
    """Default output: a bar and a line per finished trial (sweeps/progress.py); --verbose: Tune's own tables."""
    if verbose:
        return []
    from sweeps.progress import SweepProgress
    return [SweepProgress(total=cfg.num_trials, metric=cfg.tune_metric, mode=cfg.mode,
                          planned_epochs=int(cfg.train.get("epochs", cfg.max_epochs)),
                          params=[k for k in cfg.search if k != "seed"] + list(cfg.grid))]


@contextlib.contextmanager
def tune_output(verbose: bool):
    """Tune's default output engine prints a configuration box and result paths even at verbose=0, and takes no
    reporter of ours. Its legacy engine (RAY_AIR_NEW_OUTPUT=0, as under Ray Client) prints nothing at verbose=0,
    so SweepProgress says what matters. The variable is read when the run starts; restored afterwards."""
    if verbose:
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def quiet_driver(verbose: bool) -> None:
    """Default output: the driver's Ray, Tune, Optuna and MLflow chatter off (their records are untouched).
    --verbose keeps all of it."""
    if verbose:
        return
    import optuna
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ... at" per finished run
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # a tiny sweep's pace
    # Said once per `ray.init` that starts a local Ray: a setting of Ray's, not a problem of this sweep.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in RDB ..."
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Validating input example ...", "Waiting up to 300 s ..."
