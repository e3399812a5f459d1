"""Session-scoped data fixtures: the embedded digits, written out and ingested once per test session.

Use from tests/conftest.py or a test module with
    from tests.fixtures_data import digits_data, digits_dataset  # noqa: F401
pytest makes a separate fixture definition in every module that imports these names, so the work is cached
here, per session temp folder: however many modules import them, the digits are ingested and loaded once.
"""
from __future__ import annotations

from pathlib import Path

import pytest

DIGITS_SIZE = 32
_cache: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory) -> Path:
    """Folder of scikit-learn's 1,797 digits ingested at 32 px (train/val/test = 1439/179/179).

    Shared by the whole session: treat it as read-only."""
    key = ("dataset", str(tmp_path_factory.getbasetemp()))
    if key not in _cache:
        from ich.demo_data import write_digits
        from ich.ingest import ingest

        root = tmp_path_factory.mktemp("digits")
        write_digits(root / "images")
        ingest(root / "images", root / "dataset", size=DIGITS_SIZE, workers=2, progress=False)
        _cache[key] = root / "dataset"
    return _cache[key]


@pytest.fixture(scope="session")
def digits_data(digits_dataset):
    """The ingested digits loaded into memory (an ich.data.ICHDataset); read-only, shared by the session."""
    key = ("data", str(digits_dataset))
    if key not in _cache:
        from ich.data import load_dataset

        _cache[key] = load_dataset(digits_dataset)
    return _cache[key]
