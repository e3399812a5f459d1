"""Where the project keeps its data: datasets, the local MLflow store, Ray results, reports."""
from __future__ import annotations

import os
from pathlib import Path


def ich_home() -> Path:
    """$ICH_HOME or ./.ich"""
    return Path(os.environ.get("ICH_HOME") or ".ich").resolve()


def own_optuna_storage(home: Path | None = None) -> str:
    """The project's own Optuna study database; the only one `ich report` opens without being told on its
    command line (a sweep run's tag naming another is shown, never followed)."""
    return f"sqlite:///{(home if home is not None else ich_home()) / 'optuna.db'}"
