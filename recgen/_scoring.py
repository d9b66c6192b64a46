"""The collaborative ``Scorer`` protocol and the save/load helpers its implementations share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from recgen.errors import ConfigError, IndexMismatchError
from recgen.types import Catalog, History

__all__ = ["Scorer", "catalog_positions", "check_fitted", "read_meta", "write_meta"]


@runtime_checkable
class Scorer(Protocol):
    """Scores every catalog item for each history (higher is better)."""

    name: str

    def score(self, histories: Sequence[History]) -> np.ndarray:
        """Shape ``(len(histories), len(catalog))``, columns in catalog order."""
        ...


def check_fitted(scorer: object, fitted: bool) -> None:
    """Raise ConfigError naming ``scorer``'s class if it is not fitted."""
    if not fitted:
        raise ConfigError(f"{type(scorer).__name__} is not fitted: call fit() or load() first")


def catalog_positions(history: History, catalog: Catalog) -> list[int]:
    """Catalog positions of the history's items, oldest first (unknown items skipped)."""
    return [catalog.position(i) for i in history.item_ids if i in catalog]


def write_meta(path: Path, kind: str, catalog: Catalog, **extra: Any) -> None:
    """Write ``meta.json`` (kind, catalog fingerprint and size, ``extra``) into folder ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "catalog_fingerprint": catalog.fingerprint(), "n_items": len(catalog)}
    (path / "meta.json").write_text(json.dumps(meta | extra, indent=2), encoding="utf-8")


def read_meta(path: Path, catalog: Catalog) -> dict[str, Any]:
    """Read ``meta.json`` from ``path``.

    Raises:
        ConfigError: if the folder holds no saved scorer.
        IndexMismatchError: if it was fitted on another catalog.
    """
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        raise ConfigError(f"{path} is not a saved scorer (no meta.json)")
    meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("catalog_fingerprint") != catalog.fingerprint():
        raise IndexMismatchError(
            f"scorer in {path} was fitted on catalog {meta.get('catalog_fingerprint')} "
            f"({meta.get('n_items')} items), not on {catalog.name!r} ({catalog.fingerprint()}, "
            f"{len(catalog)} items): refit it on this catalog"
        )
    return meta
