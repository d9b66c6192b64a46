"""Item-to-item collaborative scorers: EASE and recency-weighted next-item transitions.

Both are fitted in seconds, with no training loop, and see the data differently from SASRec+:
EASE (Steck 2019) learns which items go together in a history regardless of order; transitions
count which item follows which, and let a history's newest items vote. Fused with SASRec+ in
``recgen.collab.EnsembleScorer`` they measured clearly better than SASRec+ alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import sparse

from recgen._scoring import catalog_positions, check_fitted, read_meta, write_meta
from recgen.config import EASEConfig, TransitionConfig, dump_config, load_config
from recgen.errors import ConfigError
from recgen.types import Catalog, History

__all__ = ["EASEScorer", "TransitionScorer"]


def _interactions(histories: Sequence[History], catalog: Catalog) -> sparse.csr_matrix:
    """Binary users x items matrix of the histories' catalog items."""
    rows, cols = [], []
    for r, history in enumerate(histories):
        positions = sorted(set(catalog_positions(history, catalog)))
        rows += [r] * len(positions)
        cols += positions
    data = np.ones(len(rows), dtype=np.float32)
    return sparse.csr_matrix((data, (rows, cols)), shape=(len(histories), len(catalog)))


class EASEScorer:
    """EASE: ``B = I - P / diag(P)`` with ``P = (XᵀX + l2·I)⁻¹``, zero diagonal; a history
    ``x`` scores ``x B``. Order-free: it knows which items go together."""

    name = "ease"

    def __init__(self) -> None:
        self.catalog: Catalog | None = None
        self.config = EASEConfig()
        self.weights = np.zeros((0, 0), dtype=np.float32)

    def fit(
        self, train: Mapping[str, History], catalog: Catalog, config: EASEConfig | None = None
    ) -> EASEScorer:
        """Solve EASE in closed form on the training histories.

        Raises:
            ConfigError: if the catalog has more than ``config.max_items`` items.
        """
        cfg = config or EASEConfig()
        if len(catalog) > cfg.max_items:
            raise ConfigError(
                f"EASE inverts a {len(catalog)} x {len(catalog)} matrix, over "
                f"collab.ease.max_items={cfg.max_items}: raise it if memory allows, or use "
                "collab.ensemble.members without 'ease'"
            )
        x = _interactions(list(train.values()), catalog)
        gram = sparse.csr_matrix(x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += cfg.l2
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)
        np.fill_diagonal(b, 0.0)
        self.catalog, self.config, self.weights = catalog, cfg, b.astype(np.float32)
        return self

    def score(self, histories: Sequence[History]) -> np.ndarray:
        """``x B`` per history (0 for a history with no catalog item)."""
        check_fitted(self, self.catalog is not None)
        assert self.catalog is not None
        return np.asarray(_interactions(histories, self.catalog) @ self.weights)

    def save(self, path: str | Path) -> Path:
        """Write config, weights and the catalog fingerprint to folder ``path``."""
        check_fitted(self, self.catalog is not None)
        assert self.catalog is not None
        path = Path(path)
        write_meta(path, "ease", self.catalog)
        dump_config(self.config, path / "config.toml")
        np.save(path / "weights.npy", self.weights)
        return path

    @classmethod
    def load(cls, path: str | Path, catalog: Catalog) -> EASEScorer:
        """Reload from ``save``; raises IndexMismatchError for another catalog."""
        path = Path(path)
        read_meta(path, catalog)
        scorer = cls()
        scorer.config = load_config(path / "config.toml", model=EASEConfig)
        scorer.catalog, scorer.weights = catalog, np.load(path / "weights.npy")
        return scorer


class TransitionScorer:
    """Next-item transitions: ``T[a, b]`` counts ``b`` right after ``a`` in training histories
    (plus ``skip`` for ``b`` two steps after ``a``), each row divided by its total + 1; a
    history scores ``sum_k decay**k * T[newest k-th item]`` over its ``window`` newest items."""

    name = "transitions"

    def __init__(self) -> None:
        self.catalog: Catalog | None = None
        self.config = TransitionConfig()
        self.matrix = sparse.csr_matrix((0, 0), dtype=np.float32)

    def fit(
        self,
        train: Mapping[str, History],
        catalog: Catalog,
        config: TransitionConfig | None = None,
    ) -> TransitionScorer:
        """Count the transitions of the training histories (sparse, any catalog size)."""
        cfg = config or TransitionConfig()
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for history in train.values():
            p = catalog_positions(history, catalog)
            for gap, weight in ((1, 1.0), (2, cfg.skip)):
                if weight > 0 and len(p) > gap:
                    rows += p[:-gap]
                    cols += p[gap:]
                    vals += [weight] * (len(p) - gap)
        n = len(catalog)
        counts = sparse.csr_matrix((vals, (rows, cols)), shape=(n, n), dtype=np.float64)
        totals = np.asarray(counts.sum(axis=1)).ravel() + 1.0
        matrix = sparse.diags(1.0 / totals) @ counts
        self.catalog, self.config = catalog, cfg
        self.matrix = sparse.csr_matrix(matrix, dtype=np.float32)
        return self

    def score(self, histories: Sequence[History]) -> np.ndarray:
        """Recency-weighted transition scores per history (0 for an empty one)."""
        check_fitted(self, self.catalog is not None)
        assert self.catalog is not None
        cfg = self.config
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for r, history in enumerate(histories):
            newest = catalog_positions(history, self.catalog)[::-1][: cfg.window]
            rows += [r] * len(newest)
            cols += newest
            vals += [cfg.decay**k for k in range(len(newest))]
        votes = sparse.csr_matrix(
            (vals, (rows, cols)), shape=(len(histories), len(self.catalog)), dtype=np.float32
        )
        return sparse.csr_matrix(votes @ self.matrix).toarray()

    def save(self, path: str | Path) -> Path:
        """Write config, the transition matrix and the catalog fingerprint to folder ``path``."""
        check_fitted(self, self.catalog is not None)
        assert self.catalog is not None
        path = Path(path)
        write_meta(path, "transitions", self.catalog)
        dump_config(self.config, path / "config.toml")
        sparse.save_npz(path / "transitions.npz", self.matrix)
        return path

    @classmethod
    def load(cls, path: str | Path, catalog: Catalog) -> TransitionScorer:
        """Reload from ``save``; raises IndexMismatchError for another catalog."""
        path = Path(path)
        read_meta(path, catalog)
        scorer = cls()
        scorer.config = load_config(path / "config.toml", model=TransitionConfig)
        scorer.catalog = catalog
        scorer.matrix = sparse.csr_matrix(sparse.load_npz(path / "transitions.npz"))
        return scorer
