"""What a person sees while a sweep runs: one progress bar and one line per finished trial.

Ray Tune's own status tables and config boxes stay behind `--verbose`. The bar (tqdm, like the project's
other bars: epochs done against the sweep's epoch budget, trials ended, best val so far, ETA) moves with every
epoch, so a sweep of 32 trials x 50 epochs shows progress within minutes; it is drawn only when stdout is a terminal; in a log (cron, `ray job logs`, a pipe) only the
per-trial lines appear, one each, never a redrawn bar. The formatting is plain functions (tested alone);
the Tune callback only feeds them. Below them: the driver's own quieting of Ray, Tune, Optuna and MLflow."""
from __future__ import annotations

import contextlib
import logging
import os
import sys

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


def epoch_budget(total: int, planned_epochs: int, trials: dict[str, tuple[int, int, bool]]) -> tuple[int, int]:
    """(epochs done, epoch budget) of a sweep: `trials` maps each trial seen so far to (its planned epochs,
    epochs it reported, ended?). A trial that ended (finished, stopped by ASHA, failed after its retries) has
    done its whole plan: it trains no more. Trials not seen yet count the default plan."""
    done = sum(planned if ended else min(reported, planned) for planned, reported, ended in trials.values())
    budget = sum(planned for planned, _, _ in trials.values()) + max(total - len(trials), 0) * planned_epochs
    return done, budget


BAR_FORMAT = "sweep |{bar:24}| {n_fmt}/{total_fmt} epochs{postfix}  [{elapsed}<{remaining}]"  # tqdm puts ", " before the postfix


class SweepProgress(Callback):
    """A Tune callback on the driver: a tqdm bar of epochs done against the sweep's epoch budget (terminal
    only; it moves with every epoch, not only when a trial ends) and one line per trial that ends. Tune's own
    output is off meanwhile (tune_output below). `params`: the searched keys shown on each trial's line.
    `planned_epochs`: a trial's epochs when its config does not say (tells "finished" from "stopped by ASHA").
    `tty`: None = ask stdout."""

    def __init__(self, total: int, metric: str, mode: str, planned_epochs: int, params: list[str],
                 tty: bool | None = None):
        self.total, self.metric, self.mode, self.planned_epochs = total, metric, mode, planned_epochs
        self.params, self.tty = list(params), tty
        self.finished: dict[str, int] = {}  # trial id -> its planned epochs, for trials that ended (across --resume)
        self.running: dict[str, tuple[int, int]] = {}  # trial id -> (planned epochs, epochs reported)
        self.best, self.last = None, {}
        self._bar = None

    @property
    def done(self) -> int:
        return len(self.finished)

    def epochs(self) -> tuple[int, int]:
        trials = {t: (p, e, False) for t, (p, e) in self.running.items() if t not in self.finished}
        trials.update({t: (p, p, True) for t, p in self.finished.items()})
        return epoch_budget(self.total, self.planned_epochs, trials)

    def get_state(self) -> dict:
        """Plain data, saved by Tune with the experiment state, so that --resume counts on instead of from 0."""
        return {"kind": "sweep_progress", "finished": sorted(self.finished), "planned": self.finished, "best": self.best}

    def set_state(self, state: dict) -> None:
        if isinstance(state, dict) and state.get("kind") == "sweep_progress":  # Tune keys states by list position
            planned = state.get("planned") or {}
            self.finished = {t: int(planned.get(t, self.planned_epochs)) for t in state["finished"]}
            self.best = state["best"]

    def __getstate__(self):  # Tune pickles its callbacks with the experiment (for --resume): not the bar
        state = dict(self.__dict__)
        state["_bar"] = None
        return state

    def _terminal(self) -> bool:
        return self.tty if self.tty is not None else sys.stdout.isatty()

    def _draw(self) -> None:
        if not self._terminal():
            return
        from tqdm import tqdm
        done, budget = self.epochs()
        if self._bar is None:  # started at the epochs already done (--resume), so the rate counts this run's only
            self._bar = tqdm(total=budget, initial=done, file=sys.stdout, bar_format=BAR_FORMAT, dynamic_ncols=True)
        best = "-" if self.best is None else f"{self.best:.4f}"
        self._bar.total = budget
        self._bar.set_postfix_str(f"trials {self.done}/{self.total}, best {self.metric} {best}", refresh=False)
        self._bar.update(done - self._bar.n)

    def _say(self, line: str) -> None:
        if self._terminal() and self._bar is not None:
            self._bar.write(line, file=sys.stdout)  # above the bar, which tqdm redraws below it
            sys.stdout.flush()
        else:
            print(line, flush=True)
        self._draw()

    def on_step_end(self, iteration, trials, **info):
        if self._bar is not None:
            self._bar.refresh()  # the clock ticks between epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        planned = int((trial.config or {}).get("epochs", self.planned_epochs))
        self.running[trial.trial_id] = (planned, int(result.get("epoch", result.get("training_iteration", 0)) or 0))
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and better(float(value), self.best, self.mode):
            self.best = float(value)
        self._draw()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=True)

    def on_experiment_end(self, trials, **info):
        self._draw()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _finish(self, trial, error: bool) -> None:
        config = trial.config or {}
        # a trial that failed before --resume and runs again counts once
        self.finished[trial.trial_id] = int(config.get("epochs", self.planned_epochs))
        result = self.last.get(trial.trial_id) or trial.last_result or {}
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
    logging.getLogger("ray.tune.execution.experiment_state").addFilter(drop_renamed_temp_file_sync_error)


def drop_renamed_temp_file_sync_error(record: logging.LogRecord) -> bool:
    """False for the one benign error of Tune's state sync: a searcher's `.<uuid>-tmp-...` file, listed by the
    previous sync's copy and renamed into place before it was read (Tune writes atomically while its async copy
    runs). The renamed file goes up with the next sync, which Tune forces and waits for at the end; any other
    sync error is kept."""
    err = record.exc_info[1] if record.exc_info else None
    return not (isinstance(err, FileNotFoundError) and "-tmp-" in str(err))
