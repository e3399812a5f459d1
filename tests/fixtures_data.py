"""Session-scoped data fixtures: the embedded digits, written out and ingested once per test session.

Imported by tests/conftest.py (and by the test modules that need it) so every test shares one copy.
"""
from __future__ import annotations

from pathlib import Path

import pytest

DIGITS_SIZE = 32


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory) -> Path:
    """Folder of scikit-learn's 1,797 digits ingested at 32 px (train/val/test = 1439/179/179).

    Shared by the whole session: treat it as read-only."""
    from ich.demo_data import write_digits
    from ich.ingest import ingest

    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "images")
    ingest(root / "images", root / "dataset", size=DIGITS_SIZE, workers=2, progress=False)
    return root / "dataset"


@pytest.fixture(scope="session")
def digits_data(digits_dataset):
    """The ingested digits loaded into memory (an ich.data.ICHDataset); read-only, shared by the session."""
    from ich.data import load_dataset

    return load_dataset(digits_dataset)
