"""Sweep configuration: a YAML file plus CLI overrides -> SweepConfig and a Tune search space.

A search-space entry is `{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}`, `{randint: [lo, hi]}` (hi
exclusive), `{quniform: [lo, hi, q]}` or `{choice: [a, b, ...]}`; every key must be a TrainConfig field.
A grid entry is a list of values: every combination of the grid's lists is one trial (Tune's grid_search;
num_samples repeats the whole grid). A grid runs without Optuna, so `grid` and `search` do not mix.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ich.errors import ConfigError
from ich.train_config import RETIRED_OPTIONS, TrainConfig
from soups.options import option_problem, sweep_option_fields

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "cpu.yaml"
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "quniform", "choice")


@dataclass
class AshaConfig:
    grace_period: int = 1  # epochs before a trial can be stopped
    reduction_factor: int = 2


@dataclass
class InitConfig:
    """Where every trial's initial weights come from (docs/design.md#2)."""
    weights: str | None = None  # local .safetensors / checkpoint folder, MLflow model URI, or hub:<timm tag>
    warm_start: dict = field(default_factory=dict)  # TrainConfig overrides for the offline warm-start base model
    # mean / std / crop_pct / interpolation overriding the init weights' own (ich/preprocess.py)
    preprocess: dict = field(default_factory=dict)


# The `soups:` block: the options of soups.options.SoupOptions marked sweep=True, with their defaults (one source).
SoupConfig = dataclasses.make_dataclass("SoupConfig", sweep_option_fields())
SoupConfig.__module__ = __name__  # pickled by name (Ray); make_dataclass takes module= only from Python 3.12


@dataclass
class GcConfig:
    """What `ich gc` keeps per trial besides soup and champion ingredients (soups/store/gc.py)."""
    keep_top_k: int = 2  # best checkpoints by the sweep's val metric
    keep_last_k: int = 1  # latest epochs


@dataclass
class SweepConfig:
    experiment: str = "ich-sweep"
    sweep: str | None = None  # sweep name inside the experiment (default: the experiment name); baselines use their own
    data: str | None = None
    metric: str = "val_macro_f1"  # drives ASHA and Optuna (val only: docs/design.md#3)
    mode: str = "max"
    # single: a trial is judged by its checkpoint's metric; trajectory_soup: by the uniform soup of its
    # checkpoints so far, reported as val_soup_<metric> (sweeps/soup_objective.py)
    objective: str = "single"
    soup_so_far: bool = False  # extend the across-run greedy soup as trials end (sweeps/soup_callback.py)
    num_samples: int = 8
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    allow_failed_trials: int = 0  # trials that may fail after their retries while the sweep still exits 0
    seed: int = 0  # Optuna's TPE sampler seed
    optuna_storage: str | None = None  # Optuna study DB (default sqlite:///$ICH_HOME/optuna.db): later runs continue it
    storage: str | None = None  # Ray Tune storage: local path, s3://..., gs://... (default $ICH_HOME/ray_results)
    # seconds between samples of MLflow's system metrics on every trial run (CPU, memory, disk, network; GPU with
    # nvidia-ml-py); 0 = off. Needs psutil: `pip install '.[system]'` (the GPU configs turn it on)
    system_metrics: float = 0.0
    train: dict = field(default_factory=dict)  # fixed TrainConfig fields
    search: dict = field(default_factory=dict)  # TrainConfig field -> distribution
    grid: dict = field(default_factory=dict)  # TrainConfig field -> list of values; every combination is a trial
    asha: AshaConfig = field(default_factory=AshaConfig)
    init: InitConfig = field(default_factory=InitConfig)
    soups: SoupConfig = field(default_factory=SoupConfig)
    gc: GcConfig = field(default_factory=GcConfig)

    @property
    def tune_metric(self) -> str:
        """The metric ASHA and Optuna rank trials by."""
        from sweeps.soup_objective import objective_metric
        return objective_metric(self.metric, self.objective)

    @property
    def models(self) -> list[str]:
        """The architectures the sweep trains; each gets its own shared init."""
        if "model" in self.grid:
            return sorted(set(self.grid["model"]))
        if "model" in self.search:
            return sorted(set(self.search["model"].get("choice", [])))
        return [self.train.get("model", TrainConfig.model)]

    @property
    def num_trials(self) -> int:
        """Trials the sweep runs: num_samples times the number of grid combinations."""
        return self.num_samples * math.prod(len(v) for v in self.grid.values())

    @property
    def max_epochs(self) -> int:
        if "epochs" in self.grid:
            return int(max(self.grid["epochs"]))
        spec = self.search.get("epochs")
        if spec:
            kind, args = next(iter(spec.items()))
            return int(max(args) if kind == "choice" else args[1])
        return int(self.train.get("epochs", TrainConfig.epochs))


def _build(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(names)})")
    kw = {}
    for k, v in d.items():
        sub = {"asha": AshaConfig, "init": InitConfig, "soups": SoupConfig, "gc": GcConfig}.get(k) if cls is SweepConfig else None
        kw[k] = _build(sub, v or {}, f"{where}.{k}") if sub else v
    return cls(**kw)


def load_config(path: str | Path | None = None, overrides: dict | None = None, sets=()) -> SweepConfig:
    """The YAML at `path` (default cpu.yaml), then `sets` ("a.b=value", `--set`), then `overrides` (the named
    command-line options, None = not given). Everything is validated here, once, before anything starts."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file() and not path.is_absolute():
        # `ray submit` runs the script from the home folder: look in the installed project too.
        for candidate in (CONFIG_DIR.parent.parent / path, CONFIG_DIR / path.name):
            if candidate.is_file():
                path = candidate
                break
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep config")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    where = f"{path} with --set" if sets else str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(raw).__name__}")
    for text in sets:
        apply_set(raw, *parse_set(text), raw_text=text.partition("=")[2])
    cfg = _build(SweepConfig, raw, where)
    for k, v in (overrides or {}).items():
        if v is not None:
            setattr(cfg, k, v)
    validate(cfg, where)
    return cfg


# --- `--set a.b=value`: dotted overrides of any config key --------------------------------------------------
# YAML 1.1 reads 3e-4 as a string (it wants 3.0e-4); on a command line it is a number.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# Sections whose keys are training options (TrainConfig fields); below them (a search distribution,
# init.preprocess) keys are free and `validate` judges them.
_TRAIN_KEYED = {("train",), ("search",), ("grid",), ("init", "warm_start")}


def parse_set(text: str) -> tuple[str, object]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003). The value is read as YAML: numbers, true/false, null, lists
    `[a, b]`, mappings `{loguniform: [1e-4, 1e-3]}`; anything else is a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    return key, _numbers(value)


def _numbers(value):
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def _fields_at(path: tuple) -> dict | None:
    """name -> dataclass Field of the keys allowed at `path` in a sweep config; None: any key."""
    sections = {"asha": AshaConfig, "init": InitConfig, "soups": SoupConfig, "gc": GcConfig}
    if path == ():
        return {f.name: f for f in dataclasses.fields(SweepConfig)}
    if len(path) == 1 and path[0] in sections:
        return {f.name: f for f in dataclasses.fields(sections[path[0]])}
    if path in _TRAIN_KEYED:
        return {f.name: f for f in dataclasses.fields(TrainConfig)}
    return None


def _is_section(f: dataclasses.Field) -> bool:
    """A field that holds keys of its own (a mapping or a sub-config), as opposed to a single value."""
    return f.default_factory is not dataclasses.MISSING


def _checked_value(key: str, f: dataclasses.Field, value, raw_text: str):
    """The --set value for a single-valued field, converted to its type or refused in one line."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kind = kind.replace("Optional[", "").rstrip("]")
    optional = "None" in kind
    base = kind.split("|")[0].strip()
    if value is None and optional:
        return None
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base == "str":
        return value if isinstance(value, str) else raw_text.strip()
    if base not in ("bool", "int", "float"):
        return value  # anything else: validate judges it
    expected = {"bool": "true or false", "int": "a whole number", "float": "a number"}[base]
    raise ConfigError(f"--set {key}: expected {expected}, got {raw_text.strip()!r}")


def apply_set(raw: dict, key: str, value, raw_text: str | None = None) -> None:
    """Put `value` at dotted `key` into the raw YAML mapping, refusing unknown keys and values of the wrong type
    in one line. In a mapping of training options (train, search, init.warm_start) `null` removes the key."""
    parts = key.split(".")
    raw_text = raw_text if raw_text is not None else str(value)
    node, path = raw, ()
    for i, part in enumerate(parts):
        known = _fields_at(path)
        if path in _TRAIN_KEYED and part in RETIRED_OPTIONS:
            raise ConfigError(f"--set {key}: {part} {RETIRED_OPTIONS[part]}")
        if known is not None and part not in known:
            where = ".".join(path) or "the top level"
            raise ConfigError(f"--set {key}: unknown key {part!r} in {where} (known: {', '.join(known)})")
        last = i == len(parts) - 1
        # a search entry is a distribution mapping, a grid entry a list, not a value of the training option's type
        f = known.get(part) if known is not None and path not in (("search",), ("grid",)) else None
        if f is not None and not _is_section(f) and not last:
            raise ConfigError(f"--set {key}: {'.'.join(path + (part,))} is a single value, not a section")
        if last:
            if value is None and path in _TRAIN_KEYED:
                node.pop(part, None)
            elif f is not None and not _is_section(f):
                node[part] = _checked_value(key, f, value, raw_text)
            else:
                node[part] = value
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(path + (part,))} is not a mapping in the config")
        node, path = child, path + (part,)



def validate(cfg: SweepConfig, where: str = "config") -> None:
    """Refuse what cannot run before anything starts: unknown fields, empty ranges, impossible resources."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for section, keys in (("train", cfg.train), ("search", cfg.search), ("grid", cfg.grid),
                          ("init.warm_start", cfg.init.warm_start or {})):
        for k in keys:
            if k in RETIRED_OPTIONS:
                raise ConfigError(f"{where}: {section}.{k} {RETIRED_OPTIONS[k]}")
    for k in cfg.train:
        if k not in train_fields:
            raise ConfigError(f"{where}: train.{k} is not a training option")
    _check_scale(cfg.train, "train", where)
    _check_scale({**cfg.train, **(cfg.init.warm_start or {})}, "init.warm_start", where)
    for k, spec in cfg.search.items():
        if k not in train_fields:
            raise ConfigError(f"{where}: search.{k} is not a training option")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: search.{k} must be one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}")
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ConfigError(f"{where}: search.{k} choice has no values (no valid point)")
        else:
            if not isinstance(args, list) or len(args) < 2 or not all(isinstance(a, (int, float)) for a in args):
                raise ConfigError(f"{where}: search.{k} {kind} needs [low, high]")
            lo, hi = args[0], args[1]
            if not lo < hi or (kind == "loguniform" and lo <= 0):
                raise ConfigError(f"{where}: search.{k} {kind} range [{lo}, {hi}] holds no valid point")
        # every end of the range must be a valid value (e.g. a magnitude within torchvision's bins), never clamped
        ends = args if kind == "choice" else [args[0], args[1] - 1 if kind == "randint" else args[1]]
        for v in ends:
            if problem := _scale_problem({**cfg.train, k: v}):
                raise ConfigError(f"{where}: search.{k} {kind} {args} leaves the allowed range: {problem}")
    for k, values in cfg.grid.items():
        if k not in train_fields:
            raise ConfigError(f"{where}: grid.{k} is not a training option")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid.{k} must be a non-empty list of values, not {values!r}")
        typed = []  # each value as its option's type: YAML 1.1 reads 3e-4 as a string
        for v in values:
            try:
                typed.append(getattr(TrainConfig.from_dict({k: v}), k))
            except (TypeError, ValueError, ConfigError) as e:  # the option's own checks
                raise ConfigError(f"{where}: grid.{k} value {v!r} is not valid ({e})") from None
        if len(set(map(repr, typed))) != len(typed):
            raise ConfigError(f"{where}: grid.{k} lists a value twice ({values!r}): each value is one trial")
        cfg.grid[k] = typed
    if cfg.grid and cfg.search:
        raise ConfigError(f"{where}: grid ({', '.join(cfg.grid)}) and search ({', '.join(cfg.search)}) cannot be "
                          f"combined: a grid runs without Optuna, so fix the searched keys in train or list them in grid")
    from ich.preprocess import PreprocessError, check_overrides
    try:
        check_overrides(cfg.init.preprocess or {}, f"{where}: init.preprocess")
    except PreprocessError as e:
        raise ConfigError(str(e)) from None
    if cfg.mode not in ("min", "max"):
        raise ConfigError(f"{where}: mode must be min or max, not {cfg.mode!r}")
    if not isinstance(cfg.soup_so_far, bool):
        raise ConfigError(f"{where}: soup_so_far must be true or false, not {cfg.soup_so_far!r}")
    if cfg.objective not in ("single", "trajectory_soup"):
        raise ConfigError(f"{where}: objective must be single or trajectory_soup, not {cfg.objective!r}")
    if not cfg.metric.startswith("val_"):
        raise ConfigError(f"{where}: metric {cfg.metric!r} must be a val_ metric (test never selects)")
    if cfg.num_samples < 1 or cfg.max_concurrent < 1:
        raise ConfigError(f"{where}: num_samples and max_concurrent must be at least 1")
    if not isinstance(cfg.allow_failed_trials, int) or cfg.allow_failed_trials < 0:
        raise ConfigError(f"{where}: allow_failed_trials must be a whole number >= 0, not {cfg.allow_failed_trials!r}")
    if not 1 <= cfg.asha.grace_period <= cfg.max_epochs:
        raise ConfigError(f"{where}: asha.grace_period={cfg.asha.grace_period} must be between 1 and the most "
                          f"epochs a trial trains ({cfg.max_epochs})")
    if cfg.cpus_per_trial <= 0 or cfg.gpus_per_trial < 0:
        raise ConfigError(f"{where}: cpus_per_trial must be > 0 and gpus_per_trial >= 0")
    if cfg.gpus_per_trial > 1 and cfg.gpus_per_trial != int(cfg.gpus_per_trial):
        raise ConfigError(f"{where}: gpus_per_trial above 1 must be a whole number, not {cfg.gpus_per_trial}")
    for name, value in vars(cfg.soups).items():
        if problem := option_problem(name, value):
            raise ConfigError(f"{where}: soups.{name} {problem}, not {value!r}")
    if cfg.gc.keep_top_k < 0 or cfg.gc.keep_last_k < 0:
        raise ConfigError(f"{where}: gc.keep_top_k and gc.keep_last_k must be >= 0")
    import timm  # unknown models fail here, not in a worker

    import ich.models  # noqa: F401  (registers the project's own architectures with timm: coatnet_tiny_ich, ...)
    from ich.checkpoint import ARCHITECTURES_ENV, allowed_architectures
    for m in cfg.models:
        if not timm.is_model(m):
            raise ConfigError(f"{where}: unknown model {m!r} (not a timm architecture)")
        if m not in allowed_architectures():  # its checkpoints would be refused by every reader (ich/checkpoint.py)
            raise ConfigError(f"{where}: model {m!r} is not one of the project's architectures; add it to "
                              f"${ARCHITECTURES_ENV} (on every machine that reads its checkpoints) to allow it")


def _scale_problem(train: dict) -> str | None:
    """Why these training options cannot make a TrainConfig (an out-of-scale value, a bad type), None if they can."""
    try:
        TrainConfig.from_dict(train)
    except (ConfigError, ValueError, TypeError) as e:
        return str(e)
    return None


def _check_scale(train: dict, section: str, where: str) -> None:
    if problem := _scale_problem(train):
        raise ConfigError(f"{where}: {section}: {problem}")


def tune_space(cfg: SweepConfig) -> dict:
    """The search space as Ray Tune domains (OptunaSearch converts them to Optuna distributions), or the grid as
    grid_search entries (Tune's variant generator runs every combination)."""
    from ray import tune
    space = {k: tune.grid_search(list(values)) for k, values in cfg.grid.items()}
    for k, spec in cfg.search.items():
        kind, args = next(iter(spec.items()))
        if kind == "loguniform":
            space[k] = tune.loguniform(args[0], args[1])
        elif kind == "uniform":
            space[k] = tune.uniform(args[0], args[1])
        elif kind == "quniform":
            space[k] = tune.quniform(args[0], args[1], args[2] if len(args) > 2 else 1)
        elif kind == "randint":
            space[k] = tune.randint(int(args[0]), int(args[1]))
        else:
            space[k] = tune.choice(list(args))
    return space
