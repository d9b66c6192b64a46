"""Shared fixtures: the real data folder beside the repository and a seeded ``rng``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""``../shared/data`` (MovieLens-100K, Amazon Scientific): see its README."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; tests that need it skip, naming the path, when it is absent."""
    if not (SHARED_DATA / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture
def rng() -> np.random.Generator:
    """A fixed-seed generator, so property-style tests repeat exactly."""
    return np.random.default_rng(42)
