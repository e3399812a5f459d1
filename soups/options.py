"""Soup options: one dataclass is the source of every default, choice and help text.

`ich soup`'s flags (add_soup_args), the `soups:` block of a sweep config (sweeps/config.SoupConfig, the fields
marked sweep=True) and both validations (SoupOptions.validate, sweeps/config.validate via option_problem) are
derived from SoupOptions' fields. The flags of `ich report` and `ich gc` live here too. No MLflow, no torch:
`ich --help` imports this.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ich.errors import IchError
from ich.metrics import metric_names
from soups import recipes as recipe_registry

SCOPES = ("within", "across", "all")
SCOPE_NAMES = ("within", "across")
SPLITS = ("val", "test")
TIE_RULES = ("accept", "strict")
BN_OPTIONS = ("average", "recalibrate", "auto")
CHAMPION_RULES = ("better", "significant")
INGREDIENT_POOLS = ("all", "top_k", "cycle_end")  # soups/pool.py chooses by these rules
MIN_RESAMPLES = 100


EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable: where runs go when nothing names an experiment


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless the help already shows it. argparse's
    ArgumentDefaultsHelpFormatter would also print "None", "False" and "[]", which say nothing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not shows_a_default(action) or "%(default)" in text or says_default(text, action.default):
            return text
        return f"{text} (default: %(default)s)"


def says_default(text: str, default) -> bool:
    """Whether a help text states `default` ("default 0.1", "(default: 256)")."""
    return re.search(rf"\bdefault:? {re.escape(str(default))}(?![\w.])", text) is not None


def shows_a_default(action: argparse.Action) -> bool:
    """Whether `--help` must show this option's default: it has a value (not None, not a flag's False, not [])."""
    d = action.default
    return bool(action.option_strings) and action.nargs != 0 and d is not argparse.SUPPRESS and d is not None \
        and d != []


def help_formatter(parser: argparse.ArgumentParser) -> None:
    """Defaults shown in the --help of this parser and of every subcommand under it."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                help_formatter(sub)


def add_experiment_arg(p: argparse.ArgumentParser, help: str, *, required: bool = True, otherwise: str = "") -> None:
    """--experiment, defaulting to $MLFLOW_EXPERIMENT_NAME as read now (at parse time), as MLflow itself does.
    required: refused when neither is given; otherwise: what applies when neither is (said in the help)."""
    env = os.environ.get(EXPERIMENT_ENV) or None
    if env:
        said = f"default: ${EXPERIMENT_ENV}, here %(default)s"
    else:
        said = f"default: ${EXPERIMENT_ENV}, unset here" + ("; so required" if required else f"; {otherwise}" if otherwise else "")
    p.add_argument("--experiment", default=env, required=required and env is None, help=f"{help} ({said})")


def version_line() -> str:
    """`ich --version`: the installed package and the code hash (and git commit) that soups/store/provenance.py tags runs
    with. Standard library only: no torch, timm, MLflow or Ray."""
    from soups.store.provenance import DIST_NAME, code_version
    code = code_version()
    git = f", git {code.commit[:12]}{'-dirty' if code.dirty else ''}" if code.commit else ""
    return f"{DIST_NAME} {code.version} (source {code.source_hash[:12]}{git})"


class VersionAction(argparse.Action):
    """--version, computed only when asked for (hashing the sources is cheap, but not free on every parse)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print the package version and code hash, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


class SoupError(IchError):
    """Soups cannot be built: unknown experiment, no checkpoints, bad option; one line naming it."""


def _option(default=dataclasses.MISSING, help: str = "", *, choices: tuple | Callable | None = None,
            flag: str | None = None, sweep: bool = False, check=None, metavar: str | None = None):
    """A SoupOptions field. flag: its `ich soup` flag ("" = none; default --<name with dashes>); sweep: a sweep
    config's `soups:` block may set it; check(value) -> problem text or None, besides `choices` (a tuple, or a
    function that gives it when asked)."""
    meta = {"help": help, "choices": choices, "flag": flag, "sweep": sweep, "check": check, "metavar": metavar}
    return field(default=default, metadata=meta)


def recipe_choices() -> tuple[str, ...]:
    """`--recipe`'s choices: the registered recipes (soups/recipes/, read when asked: a module registering one
    later is seen), then all."""
    return (*recipe_registry.names(), "all")


def _choices(meta) -> tuple | None:
    return meta["choices"]() if callable(meta["choices"]) else meta["choices"]


def _nonempty(value) -> str | None:
    return None if value else "must not be empty"


def _probability(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1
    return None if ok else "must lie between 0 and 1"


def _resamples(value) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= MIN_RESAMPLES
    return None if ok else f"must be a whole number >= {MIN_RESAMPLES}"


def _positive_int(value) -> str | None:
    return None if isinstance(value, int) and value >= 1 else "must be a whole number >= 1"


def _positive_number(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and value < float("inf")
    return None if ok else "must be a number > 0"


def _whole_number(value) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else "must be a whole number >= 0"


LEARNED_BY = ("model", "layer")
WISE_ALPHAS = ",".join(f"{i / 10:g}" for i in range(11))  # 0,0.1,...,0.9,1: WiSE-FT's grid
WISE_HEADS = ("keep", "interpolate")


def alpha_grid(value) -> list[float]:
    """--wise-alphas ("0,0.5,1", or a list from a sweep config) -> sorted distinct floats; ValueError naming why."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not items:
        raise ValueError("must be comma-separated numbers in [0, 1], e.g. 0,0.1,...,1")
    try:
        alphas = sorted({float(x) for x in items if not isinstance(x, bool)})
    except (TypeError, ValueError):
        raise ValueError("must be comma-separated numbers in [0, 1], e.g. 0,0.1,...,1") from None
    if len(alphas) != len(items):
        raise ValueError("must be distinct numbers in [0, 1]")
    if not all(0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"{next(a for a in alphas if not 0.0 <= a <= 1.0):g} lies outside [0, 1]")
    steps = [round(100 * a) for a in alphas]
    if len(set(steps)) != len(steps):
        raise ValueError("two values closer than 0.01 would share a metric step (step = round(100*alpha))")
    return alphas


def _alpha_grid_problem(value) -> str | None:
    try:
        alpha_grid(value)
    except ValueError as e:
        return str(e)
    return None


def wise_from_choices() -> tuple[str, ...]:
    """--wise-from's choices: best (the family's best single), or a registered recipe that starts from no other."""
    return ("best", *(r for r in recipe_registry.names() if recipe_registry.get(r).starts_from is None))


def _all_or_pair(value) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value == 0 or value >= 2)
    return None if ok else "must be 0 (all) or a whole number >= 2 (an angle needs two ingredients)"


@dataclass
class SoupOptions:
    experiment: str = _option(help="MLflow experiment of the sweep", check=_nonempty)
    sweep: str | None = _option(None, "sweep name (default: that of the experiment's latest sweep run)")
    tracking_uri: str | None = _option(None, "default: MLFLOW_TRACKING_URI, or the project's local server", flag="")
    scope: str = _option("all", "within each trial, across trials, or all", choices=SCOPES, sweep=True)
    recipe: str = _option("all", "soup recipe (soups/recipes/; $ICH_RECIPES adds modules), or all",
                          choices=recipe_choices, sweep=True)
    metric: str = _option("macro_f1", "val metric that ranks and selects (ingredients, greedy, champion)",
                          choices=metric_names, sweep=True)
    tie_rule: str = _option("accept", "greedy: accept ties (the paper's code) or strict improvement "
                            "(model-soups reference)", choices=TIE_RULES, sweep=True)
    bn: str = _option("auto", "BatchNorm statistics of the soups", choices=BN_OPTIONS, sweep=True)
    registered_model: str | None = _option(None, "registered model name (default: <experiment>-soup)", sweep=True)
    json_path: str | None = _option(None, "write the summary here", flag="--json")
    data: str | None = _option(None, "dataset folder (default: the sweep run's ich.data tag)")
    device: str = _option("auto", "torch device of the evaluations (auto: cuda when available)")
    n_resamples: int = _option(1000, "bootstrap resamples", flag="--resamples", sweep=True, check=_resamples)
    champion_rule: str = _option("better", "move alias champion when val is better, or only when significantly "
                                 "better (McNemar)", choices=CHAMPION_RULES, sweep=True)
    alpha: float = _option(0.05, "significance level of --champion-rule significant", sweep=True, check=_probability)
    ingredients: str = _option("all", "which checkpoints a soup may use: all; top_k (the k best by the val "
                               "metric, ties to the later epoch; across runs, the k best trials' best checkpoints); "
                               "cycle_end (epochs at the learning-rate minima of cosine_restarts; across runs, each "
                               "trial's best such epoch; other schedules are left out with a note)",
                               choices=INGREDIENT_POOLS, sweep=True)
    k: int = _option(8, "pool size of --ingredients top_k (the paper's 8)", sweep=True, check=_positive_int)
    model_stock_k: int = _option(0, "model_stock: soup only each family's k best ingredients by val (0: all of them; "
                                 "Model Stock's paper uses 2 or 3)", sweep=True, check=_all_or_pair, metavar="K")
    wise_alphas: str = _option(WISE_ALPHAS, "wise_ft: the grid of alpha, w = (1-alpha)*init + alpha*fine-tuned, "
                               "comma-separated values in [0, 1] (each logged at step round(100*alpha))", sweep=True,
                               check=_alpha_grid_problem, metavar="A,B,...")
    wise_head: str = _option("keep", "wise_ft: keep the fine-tuned classifier head, or interpolate it too",
                             choices=WISE_HEADS, sweep=True)
    wise_from: str = _option("best", "wise_ft: the fine-tuned side: each family's best single checkpoint by val, or "
                             "that family's soup of the recipe named", choices=wise_from_choices, sweep=True)
    learned_by: str = _option("model", "learned: one mixing coefficient per ingredient, or per ingredient and tensor",
                              choices=LEARNED_BY, sweep=True)
    learned_max: int = _option(16, "learned: hold at most N ingredients (each family's N best by val)", sweep=True,
                               check=_positive_int, metavar="N")
    learned_steps: int = _option(30, "learned: passes of Adam over the fit half of val", sweep=True,
                                 check=_positive_int, metavar="N")
    learned_lr: float = _option(0.1, "learned: Adam's learning rate on the coefficients' logits", sweep=True,
                                check=_positive_number)
    learned_seed: int = _option(0, "learned: seed of the val halves (fit / held out) and the batch order", sweep=True,
                                check=_whole_number)
    parallel: int = _option(1, "build up to N soup families at once as Ray tasks (default 1: one after another)",
                            sweep=True, check=_positive_int, metavar="N")

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            problem = option_problem(f.name, getattr(self, f.name))
            if problem:
                raise SoupError(f"soup option {f.name}={getattr(self, f.name)!r}: {problem}")

    @property
    def recipes(self) -> list[str]:
        return recipe_registry.names() if self.recipe == "all" else [self.recipe]

    @property
    def scopes(self) -> list[str]:
        return list(SCOPE_NAMES) if self.scope == "all" else [self.scope]


FIELDS = {f.name: f for f in dataclasses.fields(SoupOptions)}


def option_problem(name: str, value) -> str | None:
    """What is wrong with `value` for option `name` ("must be one of ..."), or None when it is fine."""
    meta = FIELDS[name].metadata
    choices = _choices(meta)
    if choices and value not in choices:
        return f"must be one of {', '.join(choices)}"
    return meta["check"](value) if meta["check"] else None


def sweep_option_fields() -> list[tuple]:
    """(name, type, field) of the options a sweep config's `soups:` block may set, with SoupOptions' defaults:
    for dataclasses.make_dataclass (sweeps/config.SoupConfig)."""
    return [(f.name, f.type, field(default=f.default)) for f in FIELDS.values() if f.metadata["sweep"]]


def add_soup_args(p: argparse.ArgumentParser) -> None:
    """Options of `ich soup`, one per SoupOptions field (but tracking_uri). Wired into sweeps/cli.py with:
    s = sub.add_parser("soup", help=...); add_soup_args(s); s.set_defaults(func=cmd_soup)"""
    for f in FIELDS.values():
        meta = f.metadata
        flag = meta["flag"] if meta["flag"] is not None else "--" + f.name.replace("_", "-")
        if not flag:
            continue
        if f.name == "experiment":  # its default is MLflow's variable, read at parse time
            add_experiment_arg(p, meta["help"])
            continue
        kw = {"dest": f.name, "help": meta["help"]}
        if f.default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
            if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
                kw["type"] = type(f.default)
        if meta["choices"]:
            kw["choices"] = _choices(meta)
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        p.add_argument(flag, **kw)


def add_report_args(p: argparse.ArgumentParser) -> None:
    """Options of `ich report` (wire with: s = sub.add_parser("report"); add_report_args(s); s.set_defaults(func=cmd_report))."""
    add_experiment_arg(p, "MLflow experiment (CoAtNet sweep, baselines and soups)")
    p.add_argument("--out", help="write the report here (default: $ICH_HOME/reports/<experiment>)")
    p.add_argument("--data", help="dataset folder (default: the latest sweep run's ich.data tag)")
    p.add_argument("--split", dest="split_for_table", choices=SPLITS, default="test", help="split of the table")
    p.add_argument("--metric", choices=metric_names(), default="macro_f1", help="val metric that selects every model")
    p.add_argument("--resamples", dest="n_resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--device", default="auto", help="device for models not in the prediction cache (auto, cpu, cuda)")
    p.add_argument("--registered-model", dest="registered_model",
                   help="registered model holding the champion alias (default: the one the soups were registered "
                        "under, from their ich.registered_model tag, else <experiment>-soup)")
    p.add_argument("--optuna-storage", dest="optuna_storage",
                   help="the sweep's Optuna database URL for the study figures, opened read-only (default: "
                        "sqlite:///$ICH_HOME/optuna.db when the sweep run's ich.optuna_storage tag names it; a tag "
                        "naming another database is shown, never opened)")


def add_gc_args(p: argparse.ArgumentParser) -> None:
    add_experiment_arg(p, "MLflow experiment of the sweep")
    p.add_argument("--apply", action="store_true", help="delete (default: a dry run that only reports)")
    p.add_argument("--config", help="sweep config: its gc.keep_top_k / gc.keep_last_k, metric and mode")
    p.add_argument("--keep-top-k", type=int, help="per trial, keep the k best checkpoints by the val metric "
                                                   "(default: the config's, else 2)")
    p.add_argument("--keep-last-k", type=int, help="per trial, keep the k latest epochs (default: the config's, else 1)")
    p.add_argument("--metric", help="val metric that ranks (default: the config's or the sweep run's)")
    p.add_argument("--json", dest="json_path", help="write the summary here")
    p.add_argument("--verbose", action="store_true", help="list every record that goes, and the bytes that stay")
