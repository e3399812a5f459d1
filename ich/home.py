"""Where the project keeps its data: datasets, the local MLflow store, Ray results, reports."""
from __future__ import annotations

import os
from pathlib import Path


def ich_home() -> Path:
    """$ICH_HOME or ./.ich"""
    return Path(os.environ.get("ICH_HOME") or ".ich").resolve()
