"""recgen: a generative recommender on a small local LLM.

The public API is re-exported here. Names that need torch (``Recommender``) load on first use,
so ``import recgen`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from recgen.config import RecommenderConfig, load_config
from recgen.errors import (
    ConfigError,
    DataError,
    DataWarning,
    IndexMismatchError,
    RecgenError,
    ServerError,
)
from recgen.types import Catalog, Event, History, Item, Recommendation

__version__ = "0.1.0"

__all__ = [
    "Catalog",
    "ConfigError",
    "DataError",
    "DataWarning",
    "Event",
    "History",
    "IndexMismatchError",
    "Item",
    "RecgenError",
    "Recommendation",
    "Recommender",
    "RecommenderConfig",
    "ServerError",
    "Trace",
    "__version__",
    "load_config",
]

_LAZY = {"Recommender": "recgen.pipeline", "Trace": "recgen.pipeline"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'recgen' has no attribute {name!r}")
