"""The report's read (phase 1 of soups/report/build.py): every MLflow and Optuna read, once, into a `Snapshot`.

Files: this one reads (Snapshot and its parts, read_snapshot, ReportError, Candidate); the other modules of
soups/report/ compute, render and write (compute_report, sections, renderers, build_report, `ich report`).
"""
from __future__ import annotations

import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from ich.checkpoint import MAX_META_BYTES, META, CheckpointError, bounded_json
from ich.errors import IchError
from ich.home import own_optuna_storage
from ich.models import family
from soups.store import registry, retry
from soups.champion import ALIAS, current_champion, registered_model_name
from soups.pool import best_first
from soups.pull import find_experiment
from soups.options import SoupError
from soups.store.tags import (GC_DELETED, TAG_CURVE, TAG_DATA, TAG_GC, TAG_OPTUNA_STORAGE, TAG_REGISTERED_MODEL,
                              TAG_SCOPE, TAG_SOUP_MODEL, TAG_SOUP_RECIPE, TAG_STATUS, recipe_param_tag)

TRIAL_STATUS = {"FINISHED": "finished", "KILLED": "stopped by ASHA", "FAILED": "failed", "RUNNING": "running"}
RUNS_PAGE = 5000


class ReportError(IchError):
    """The report cannot be built: unknown experiment, no checkpoints, bad option; one line naming it."""


@dataclass
class Candidate:
    """A checkpoint or soup of the experiment as MLflow records it; `score` (its val metric) is all selection sees."""
    record: registry.CheckpointRecord
    kind: str  # checkpoint | soup
    score: float

    @property
    def id(self) -> str:
        return self.record.model_id

    @property
    def family(self) -> str:
        return family(self.record.architecture)

    @property
    def scope(self) -> str:
        return self.record.tags.get(TAG_SCOPE, "")

    @property
    def recipe(self) -> str:
        return self.record.tags.get(TAG_SOUP_RECIPE, "")


def _best(candidates: list[Candidate], metric: str) -> Candidate | None:
    """Best recorded val score; ties go to the earlier trial/epoch, so the pick is stable."""
    ranked = best_first(candidates, metric, score=lambda c: c.score,
                        tiebreak=lambda c: (c.record.trial, c.record.epoch, c.id))
    return ranked[0] if ranked else None


# ---------------------------------------------------------------------------------------------- snapshot

@dataclass
class SoupRun:
    """A soup's run as `ich soup` logged it: its latest metrics (test_<metric>_low/high, vs_best_*...) and tags (what
    they were computed from: store.tags.TAG_BOOTSTRAP, TAG_BEST_SINGLE). The table takes those figures when they
    are the very numbers it would compute (sections.logged_figures)."""
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class TrialRun:
    """One trial run of the sweep run: its curve (val metric per epoch) and how it ended."""
    trial: str
    run_id: str
    status: str  # finished | stopped by ASHA | failed | running
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, value), one per epoch

    @property
    def stopped(self) -> bool:
        return self.status == "stopped by ASHA"


@dataclass
class ChampionRef:
    """The version the `champion` alias points at, and the soup LoggedModel behind it."""
    registered_model: str
    version: str
    model_id: str | None
    record: registry.CheckpointRecord | None = None  # read only when it is not one of the experiment's soups


@dataclass
class OptunaRecord:
    """The sweep's Optuna study, copied out of its database (FrozenTrials are plain data)."""
    study_name: str
    storage: str  # shown with any password masked
    direction: str  # maximize | minimize
    trials: list = field(default_factory=list)

    def study(self):
        """An in-memory study holding the same trials (for optuna's own importance evaluators)."""
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=self.study_name, direction=self.direction)
        study.add_trials(self.trials)
        return study


@dataclass
class Snapshot:
    """Everything the report reads from MLflow (and the Optuna database), read once; the rest is computation."""
    experiment: str
    experiment_id: str
    tracking_uri: str
    checkpoints: list[registry.CheckpointRecord]
    soups: list[registry.CheckpointRecord] = field(default_factory=list)
    ingredients: dict[str, list[str] | None] = field(default_factory=dict)  # soup model id -> accepted ingredients
    # soup model id -> the parameter its recipe swept on val (ich.curve): {"x", "chosen", "series": {"val accuracy":
    # [(x, value)], "test accuracy": [...], "val <metric>": [...]}} from its run's <x>_<split>_<metric> by step
    curves: dict[str, dict] = field(default_factory=dict)
    soup_runs: dict[str, SoupRun] = field(default_factory=dict)  # soup model id -> its run's figures and tags
    sweep: str | None = None
    sweep_run_id: str | None = None
    sweep_tags: dict[str, str] = field(default_factory=dict)
    curve_key: str = ""  # the trial metric in the curves: val_<metric>, or val_soup_<metric> under trajectory_soup
    trials: list[TrialRun] = field(default_factory=list)
    soup_so_far_key: str | None = None
    soup_so_far: list[tuple[int, float]] = field(default_factory=list)  # (trials done, value)
    registered_model: str = ""
    champion: ChampionRef | None = None
    optuna: OptunaRecord | None = None
    notes: list[str] = field(default_factory=list)  # what could not be read, said once

    @property
    def data(self) -> str | None:
        return self.sweep_tags.get(TAG_DATA)


def _open(experiment: str, tracking_uri: str | None):
    from mlflow import MlflowClient
    if tracking_uri is None:
        from soups.tracking_server import ensure_tracking_uri
        tracking_uri = ensure_tracking_uri()
    client = MlflowClient(tracking_uri)
    try:
        found = find_experiment(client, experiment, tracking_uri)
    except SoupError as e:
        raise ReportError(str(e)) from None
    return client, found.experiment_id, tracking_uri


def _sweep_run(client, experiment_id: str, sweep: str | None):
    """The latest sweep run (of `sweep` if that has one): the report's parent and the default dataset."""
    for tags in ([{registry.TAG_KIND: "sweep", registry.TAG_SWEEP: sweep}] if sweep else []) + [{registry.TAG_KIND: "sweep"}]:
        if (run := registry.latest_run_by_tags(client, experiment_id, tags)) is not None:
            return run
    return None


def _soup_ingredients(client, soup: registry.CheckpointRecord, tmp: Path) -> list[str] | None:
    """Model ids the soup averaged (accepted ingredients), from its checkpoint.json (a small download)."""
    dst = tmp / "soup-meta" / soup.model_id
    dst.mkdir(parents=True, exist_ok=True)
    uri = f"{soup.artifact_uri.rstrip('/')}/{META}"
    if registry.artifact_location_problem(uri, client.tracking_uri) is not None:
        return None  # a location outside the server's artifact proxy is never read (registry.check_artifact_location)
    try:
        path = retry.call_with_retry(f"download {META} of soup {soup.model_id}", download_artifacts,
                                        artifact_uri=uri, dst_path=str(dst), tracking_uri=client.tracking_uri)
        with open(path, "rb") as f:
            meta = bounded_json(f.read(MAX_META_BYTES + 1), path)  # bounded like read_meta
    except (MlflowException, retry.RegistryError, OSError, CheckpointError):
        return None  # selection notes the soup without a soft-voting row
    if not isinstance(meta, dict) or not isinstance(meta.get("extra") or {}, dict):
        return None
    return list((meta.get("extra") or {}).get("ingredients") or [])


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """A metric's history by step; a step logged twice (a retried epoch) keeps its latest value."""
    rows = retry.call_with_retry(f"metric history {key} of run {run_id}", client.get_metric_history, run_id, key)
    by_step = {}
    for m in sorted(rows, key=lambda m: m.timestamp):
        by_step[int(m.step)] = float(m.value)
    return sorted(by_step.items())


def _soup_curve(client, soup: registry.CheckpointRecord, metric: str) -> dict:
    """The parameter curve a soup's recipe logged on its run (step = round(100·x)): val and test accuracy, and val
    of the selection metric; the chosen value from the recipe's tag."""
    x = soup.tags[TAG_CURVE]
    series = {}
    for split, m in (("val", "accuracy"), ("test", "accuracy"), ("val", metric)):
        if f"{split} {m}" not in series:
            series[f"{split} {m}"] = [(step / 100, v) for step, v in _history(client, soup.run_id, f"{x}_{split}_{m}")]
    try:
        chosen = float(soup.tags.get(recipe_param_tag(soup.tags.get(TAG_SOUP_RECIPE, ""), x), "nan"))
    except ValueError:
        chosen = math.nan
    return {"x": x, "chosen": chosen if math.isfinite(chosen) else None, "series": series}


def _soup_runs(client, experiment_id: str, soups: list[registry.CheckpointRecord]) -> dict[str, SoupRun]:
    """The soups' runs by soup model id: one paged search of the experiment's soup runs, not a read per soup."""
    runs, token = {}, None
    while True:
        page = retry.call_with_retry("search soup runs", client.search_runs, [experiment_id],
                                     filter_string=f"tags.`{registry.TAG_KIND}` = 'soup'", max_results=RUNS_PAGE,
                                     page_token=token)
        runs.update({r.info.run_id: SoupRun(r.info.run_id, dict(r.data.metrics), dict(r.data.tags)) for r in page})
        token = page.token
        if not token:
            return {s.model_id: runs[s.run_id] for s in soups if s.run_id in runs}


def _trial_runs(client, experiment_id: str, sweep_run_id: str, key: str) -> list[TrialRun]:
    runs = retry.call_with_retry(
        "search trial runs", client.search_runs, [experiment_id],
        filter_string=f"tags.`{registry.TAG_KIND}` = 'trial' AND tags.`mlflow.parentRunId` = '{sweep_run_id}'",
        max_results=RUNS_PAGE)
    trials = []
    for run in runs:
        tags = run.data.tags
        status = tags.get(TAG_STATUS) or TRIAL_STATUS.get(run.info.status, run.info.status.lower())
        history = _history(client, run.info.run_id, key) if key in run.data.metrics else []
        trials.append(TrialRun(tags.get(registry.TAG_TRIAL, run.info.run_name or run.info.run_id), run.info.run_id,
                               status, history))
    return sorted(trials, key=lambda t: t.trial)


def _registered_model(client, experiment_id: str, experiment: str, sweep: str | None) -> str:
    """The name the soups were registered under: the newest soup run's ich.registered_model tag
    (of this sweep first), else the orchestrator's default "<experiment>-soup"."""
    for tags in ([{registry.TAG_KIND: "soup", registry.TAG_SWEEP: sweep}] if sweep else []) + [{registry.TAG_KIND: "soup"}]:
        runs = retry.call_with_retry(
            "search registered soup runs", client.search_runs, [experiment_id],
            filter_string=registry._tag_filter(tags) + f" AND tags.`{TAG_REGISTERED_MODEL}` LIKE '%'",
            max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0].data.tags[TAG_REGISTERED_MODEL]
    return registered_model_name(experiment)


def _read_champion(client, name: str, soup_ids: set[str], notes: list[str]) -> ChampionRef | None:
    version = current_champion(client, name)
    if version is None:
        return None  # no registered model or no alias yet
    model_id = (version.tags or {}).get(TAG_SOUP_MODEL)
    ref = ChampionRef(name, str(version.version), model_id)
    if model_id and model_id not in soup_ids:
        try:
            ref.record = registry.get_model_record(client, model_id)
        except (MlflowException, retry.RegistryError) as e:
            if isinstance(e, MlflowException) and retry.is_transient(e):
                raise
            notes.append(f"alias {ALIAS} of {name} (v{version.version}): model {model_id} cannot be read ({e})")
    return ref


def _masked(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


def _read_only_storage(storage: str):
    """An Optuna RDBStorage that cannot write. Opening one creates its tables and version rows when missing
    (`sqlite:///` to any SQLite file gained 12 of them), so: no table creation, and a connection that refuses
    writes (SQLite: mode=ro, which never creates the file either; PostgreSQL/MySQL: a read-only session)."""
    import sqlite3
    from urllib.parse import quote

    import optuna
    from sqlalchemy.engine import make_url
    url = make_url(storage)
    backend = url.get_backend_name()
    if backend == "sqlite":
        ro = f"file:{quote(str(Path(url.database).resolve()))}?mode=ro"
        storage, engine_kwargs = "sqlite://", {"creator": lambda: sqlite3.connect(ro, uri=True)}
    elif backend == "postgresql":
        engine_kwargs = {"connect_args": {"options": "-c default_transaction_read_only=on"}}
    elif backend == "mysql":
        engine_kwargs = {"connect_args": {"init_command": "SET SESSION TRANSACTION READ ONLY"}}
    else:  # no read-only connection we know how to ask for
        raise ReportError(f"{_masked(storage)} cannot be opened read-only (a {backend} database)")
    return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs, skip_table_creation=True)


def _is_own_store(storage: str) -> bool:
    """The project's own study database, sqlite:///$ICH_HOME/optuna.db (however the path is spelt)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        url, own = make_url(storage), make_url(own_optuna_storage())
    except ArgumentError:
        return False
    return (url.get_backend_name() == "sqlite" and bool(url.database) and not url.query
            and Path(url.database).resolve() == Path(own.database).resolve())


def optuna_source(given: str | None, tag: str | None, notes: list[str]) -> str | None:
    """The storage the report may open: the one given on the command line, or the sweep run's tag when it names
    the project's own store under ICH_HOME. Any other tag is shown in a note, never followed: a run tag is
    anyone's to write, and following it created databases and connected out."""
    if given or not tag or _is_own_store(tag):
        return given or tag
    notes.append(f"no Optuna figures: the sweep run's {TAG_OPTUNA_STORAGE} tag names {_masked(tag)}, which is not "
                 f"this project's store ({own_optuna_storage()}); a tag is not followed, pass --optuna-storage to "
                 "read it")
    return None


def _read_optuna(storage: str | None, study_name: str | None, notes: list[str]) -> OptunaRecord | None:
    """The study's trials, or a note saying why there are none; opens the database read-only, never creates one."""
    if not storage:
        notes.append("no Optuna figures: the study's storage is unknown (pass --optuna-storage, e.g. "
                     "sqlite:///$ICH_HOME/optuna.db)")
        return None
    if not study_name:
        notes.append("no Optuna figures: no sweep run names the study")
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    try:
        url = make_url(storage)
    except ArgumentError:
        notes.append(f"no Optuna figures: {_masked(storage)} is not a database URL")
        return None
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).is_file()):
        notes.append(f"no Optuna figures: {_masked(storage)} does not exist")
        return None
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=_read_only_storage(storage))
        direction = study.direction.name.lower()
        trials = study.get_trials(deepcopy=True)
    except ReportError as e:
        notes.append(f"no Optuna figures: {e}")
        return None
    except KeyError:
        notes.append(f"no Optuna figures: no study {study_name!r} in {_masked(storage)}")
        return None
    except Exception as e:  # a database that cannot be read is a note, not a failed report
        while e.__cause__ or e.__context__:  # the database's own words (Optuna wraps them)
            e = e.__cause__ or e.__context__
        notes.append(f"no Optuna figures: study {study_name!r} in {_masked(storage)} cannot be read "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None
    return OptunaRecord(study_name, _masked(storage), direction, trials)


def read_snapshot(experiment: str, *, tracking_uri: str | None = None, metric: str = "macro_f1",
                  registered_model: str | None = None, optuna_storage: str | None = None,
                  tmp: Path | None = None) -> tuple[object, Snapshot]:
    """Read the experiment's record once; returns the client (to pull weights later) and the snapshot."""
    client, experiment_id, uri = _open(experiment, tracking_uri)
    records = registry.search_checkpoints(client, [experiment_id])
    if not records:
        raise ReportError(f"experiment {experiment!r}: no checkpoints")
    key = f"val_{metric}"
    scored = [r for r in records if math.isfinite(r.metrics.get(key, float("nan")))]
    top = _best([Candidate(r, "checkpoint", r.metrics[key]) for r in scored if family(r.architecture) == "coatnet"],
                metric)
    snap = Snapshot(experiment, experiment_id, uri, records)
    snap.soups = registry.search_soup_models(client, [experiment_id])
    own_tmp = tmp is None
    tmp = Path(tempfile.mkdtemp(prefix="ich-report-")) if own_tmp else tmp
    try:
        snap.ingredients = {s.model_id: _soup_ingredients(client, s, tmp) for s in snap.soups
                            if family(s.architecture) == "coatnet" and s.tags.get(TAG_GC) != GC_DELETED}
    finally:
        shutil.rmtree(tmp if own_tmp else tmp / "soup-meta", ignore_errors=True)
    snap.curves = {s.model_id: _soup_curve(client, s, metric) for s in snap.soups
                   if s.tags.get(TAG_CURVE) and s.run_id and family(s.architecture) == "coatnet"}
    snap.soup_runs = _soup_runs(client, experiment_id, snap.soups) if snap.soups else {}

    sweep_run = _sweep_run(client, experiment_id, top.record.sweep if top else None)
    if sweep_run is not None:
        snap.sweep_run_id, snap.sweep_tags = sweep_run.info.run_id, dict(sweep_run.data.tags)
        snap.sweep = snap.sweep_tags.get(registry.TAG_SWEEP)
        soup_objective = sweep_run.data.params.get("objective") == "trajectory_soup"
        snap.curve_key = f"val_soup_{metric}" if soup_objective else key  # what ASHA decided on
        snap.trials = _trial_runs(client, experiment_id, snap.sweep_run_id, snap.curve_key)
        so_far = sorted(k for k in sweep_run.data.metrics if k.startswith("soup_so_far_val_"))
        if so_far:
            snap.soup_so_far_key = f"soup_so_far_{key}" if f"soup_so_far_{key}" in so_far else so_far[0]
            snap.soup_so_far = _history(client, snap.sweep_run_id, snap.soup_so_far_key)
    snap.registered_model = registered_model or _registered_model(client, experiment_id, experiment, snap.sweep)
    snap.champion = _read_champion(client, snap.registered_model, {s.model_id for s in snap.soups}, snap.notes)
    tag = snap.sweep_tags.get(TAG_OPTUNA_STORAGE)
    storage = optuna_source(optuna_storage, tag, snap.notes)
    if storage or not tag:  # a tag not followed has its note already
        snap.optuna = _read_optuna(storage, snap.sweep, snap.notes)
    return client, snap
