"""The sweep's Optuna study: where it is stored, so every later run of a sweep (a scheduled one, say)
continues it, and how `ich report` finds it again."""
from __future__ import annotations

import re
from pathlib import Path

from ich.home import own_optuna_storage
from soups.store.tags import TAG_OPTUNA_STORAGE


def optuna_storage_url(cfg, home: Path) -> str:
    return cfg.optuna_storage or own_optuna_storage(home)


def optuna_storage_tag(cfg, home: Path) -> dict:
    """`ich report` finds the study through this tag; a URL holding a password is not written to MLflow."""
    url = optuna_storage_url(cfg, home)
    return {} if re.search(r"//[^/@]*:[^/@]*@", url) else {TAG_OPTUNA_STORAGE: url}


def optuna_study_storage(cfg, home: Path):
    """The sweep's Optuna study lives in a database, so every later run of the sweep (a scheduled one, say)
    continues it: TPE sees all earlier trials."""
    import optuna
    url = optuna_storage_url(cfg, home)
    home.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {})


def study_size(cfg, home: Path, sweep: str) -> int:
    """Trials already in the sweep's study. Offsets the sampler seed: the same seed would replay the same
    first random proposals in every run."""
    import optuna
    try:
        return len(optuna.load_study(study_name=sweep, storage=optuna_study_storage(cfg, home)).trials)
    except KeyError:
        return 0
