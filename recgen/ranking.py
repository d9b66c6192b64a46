"""Ranking: turn score vectors over catalog positions into top-N item lists."""

# pyright: strict
from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Collection, Sequence

import numpy as np
from numpy.typing import NDArray

from recgen.config import RankingConfig
from recgen.errors import DataError
from recgen.types import Catalog, Grounded, Grounding, Item, Recommendation

__all__ = ["fuse", "fuse_candidates", "llm_scores", "minmax", "softmax", "top_n", "top_n_batch"]

_log = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]


def _positions(catalog: Catalog, item_ids: Collection[str], *, what: str) -> NDArray[np.intp]:
    """Catalog positions of ``item_ids``; ids absent from the catalog raise (``candidates``)."""
    out: list[int] = []
    for item_id in item_ids:
        if item_id not in catalog:
            raise DataError(
                f"{what} item {item_id!r} is not in catalog {catalog.name!r}; "
                "pass only ids of catalog items"
            )
        out.append(catalog.position(item_id))
    return np.asarray(out, dtype=np.intp)


def _mask_row(
    scores: FloatArray,
    *,
    catalog: Catalog,
    exclude: Collection[str],
    candidates: Sequence[str] | None,
) -> FloatArray:
    """A float64 copy of ``scores`` where NaN, excluded and non-candidate items are -inf."""
    row = np.array(scores, dtype=np.float64, copy=True)
    row[np.isnan(row)] = -np.inf
    if candidates is not None:
        keep = _positions(catalog, candidates, what="candidate")
        masked = np.full_like(row, -np.inf)
        masked[keep] = row[keep]
        row = masked
    drop = [catalog.position(i) for i in exclude if i in catalog]
    if drop:
        row[np.asarray(drop, dtype=np.intp)] = -np.inf
    return row


def _top_positions(row: FloatArray, n: int) -> NDArray[np.intp]:
    """Positions of the ``n`` best finite-or-+inf scores, best first, ties by lower position.

    Selects with ``argpartition`` in O(N), then sorts only the selected few. Ties at the cut
    are resolved by position, so the result never depends on the partition's internals.
    """
    valid = np.flatnonzero(row > -np.inf)
    if valid.size == 0:
        return valid
    if valid.size <= n:
        chosen = valid
    else:
        threshold = row[np.argpartition(-row, n - 1)[n - 1]]
        above = np.flatnonzero(row > threshold)
        tied = np.flatnonzero(row == threshold)[: n - above.size]
        chosen = np.concatenate([above, tied])
    order = np.lexsort((chosen, -row[chosen]))
    return chosen[order]


def _check_n(n: int) -> None:
    if type(n) is not int or n < 1:
        raise DataError(f"n={n!r}: the list length must be a positive int")


def top_n(
    scores: NDArray[np.floating] | Sequence[float],
    *,
    catalog: Catalog,
    exclude: Collection[str] = (),
    candidates: Sequence[str] | None = None,
    n: int,
) -> list[tuple[str, float]]:
    """The ``n`` best-scored catalog items, best first.

    Args:
        scores: One score per catalog position (higher is better).
        catalog: The catalog the positions refer to.
        exclude: Item ids that never appear (the user's history); unknown ids are ignored.
        candidates: If given, only these item ids are ranked.
        n: Maximum list length; fewer are returned when fewer items are eligible.

    Returns:
        ``(item_id, score)`` pairs. Equal scores are ordered by catalog position; NaN and
        -inf scores are never returned.

    Raises:
        DataError: if ``scores`` does not have one value per catalog item, ``n`` < 1, or a
            candidate is not in the catalog.
    """
    _check_n(n)
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape != (len(catalog),):
        raise DataError(
            f"scores have shape {arr.shape} but catalog {catalog.name!r} has {len(catalog)} "
            "items: pass one score per catalog position"
        )
    row = _mask_row(arr, catalog=catalog, exclude=exclude, candidates=candidates)
    ids = catalog.item_ids
    return [(ids[p], float(row[p])) for p in _top_positions(row, n)]


def top_n_batch(
    scores: NDArray[np.floating],
    *,
    catalog: Catalog,
    excludes: Sequence[Collection[str]] | None = None,
    candidates: Sequence[Sequence[str] | None] | None = None,
    n: int,
) -> list[list[tuple[str, float]]]:
    """``top_n`` for each row of a score matrix (one row per user).

    Args:
        scores: Shape ``(n_users, len(catalog))``.
        catalog: The catalog the columns refer to.
        excludes: Per row, item ids to leave out (or None for none).
        candidates: Per row, the only item ids to rank (None in a row: all items).
        n: Maximum list length.

    Returns:
        One list of ``(item_id, score)`` pairs per row, as :func:`top_n` would return.

    Raises:
        DataError: on a shape mismatch, per-row arguments of the wrong length, or ``n`` < 1.
    """
    _check_n(n)
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(catalog):
        raise DataError(
            f"score matrix has shape {arr.shape} but catalog {catalog.name!r} has "
            f"{len(catalog)} items: pass shape (n_users, {len(catalog)})"
        )
    m = arr.shape[0]
    for name, arg in (("excludes", excludes), ("candidates", candidates)):
        if arg is not None and len(arg) != m:
            raise DataError(f"{name} has {len(arg)} entries for {m} score rows: pass one per row")
    ids = catalog.item_ids
    out: list[list[tuple[str, float]]] = []
    for r in range(m):
        row = _mask_row(
            arr[r],
            catalog=catalog,
            exclude=() if excludes is None else excludes[r],
            candidates=None if candidates is None else candidates[r],
        )
        out.append([(ids[p], float(row[p])) for p in _top_positions(row, n)])
    return out


# --------------------------------------------------------------------------- fusion

_TIE_BREAK = 1e-6
"""Weight of normalised popularity in fused scores: it only orders items that tie otherwise."""


def minmax(scores: NDArray[np.floating]) -> FloatArray:
    """Scores mapped to [0, 1] over their finite values (all zeros if they are constant)."""
    arr = np.asarray(scores, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros_like(arr)
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo <= 0:
        return np.zeros_like(arr)
    return np.where(np.isfinite(arr), (arr - lo) / (hi - lo), 0.0)


def llm_scores(
    grounded: Sequence[Grounded],
    *,
    catalog: Catalog,
    popularity: NDArray[np.floating],
    gamma: float,
) -> FloatArray:
    """The LLM's vote per catalog position, in [0, 1]; zero for items it did not propose.

    A grounded item scores ``similarity / log2(1 + rank)`` (its candidate's place in the
    output, as in NDCG), times BIGRec's popularity de-biasing ``(1 + pop) ** -gamma``, and the
    best item is scaled to 1. An item grounded twice keeps its best score.
    """
    out = np.zeros(len(catalog), dtype=np.float64)
    for g in grounded:
        p = catalog.position(g.item_id)
        score = g.similarity / math.log2(1 + g.candidate.rank)
        score *= float(1 + popularity[p]) ** -gamma
        out[p] = max(out[p], score)
    top = float(out.max(initial=0.0))
    return out / top if top > 0 else out


def fuse(
    grounding: Grounding,
    *,
    collab_scores: NDArray[np.floating] | None,
    popularity: NDArray[np.floating],
    catalog: Catalog,
    exclude: Collection[str],
    candidates: Sequence[str] | None,
    n: int,
    config: RankingConfig,
    explain: Callable[[Item], str],
) -> list[Recommendation]:
    """Merge grounded LLM candidates with collaborative scores into the final top-``n`` list.

    ``score = llm_weight * llm + collab_weight * minmax(collab)``, with ``llm`` from
    :func:`llm_scores`; popularity only breaks ties, so the list is filled to ``n`` even when
    the LLM proposed fewer items and there is no collaborative scorer.

    Args:
        grounding: The grounded LLM candidates of one user (history already excluded).
        collab_scores: One collaborative score per catalog position, or None.
        popularity: Training interaction counts per catalog position.
        catalog: The items.
        exclude: Item ids never to return (the user's history).
        candidates: If given, only these item ids are ranked.
        n: List length.
        config: Fusion weights and popularity de-biasing.
        explain: Explanation for an item the LLM did not propose.

    Returns:
        At most ``n`` recommendations, best first, ranks from 1, each with an explanation.
    """
    llm = llm_scores(
        grounding.grounded, catalog=catalog, popularity=popularity, gamma=config.popularity_gamma
    )
    collab = np.zeros(len(catalog)) if collab_scores is None else minmax(collab_scores)
    fused = config.llm_weight * llm + config.collab_weight * collab
    fused += _TIE_BREAK * minmax(popularity)
    by_item = {g.item_id: g for g in grounding.grounded}
    out: list[Recommendation] = []
    for rank, (item_id, score) in enumerate(
        top_n(fused, catalog=catalog, exclude=exclude, candidates=candidates, n=n), start=1
    ):
        g = by_item.get(item_id)
        if g is not None and llm[catalog.position(item_id)] * config.llm_weight > 0:
            source = "hybrid" if collab_scores is not None and config.collab_weight > 0 else "llm"
            out.append(
                Recommendation(
                    item_id=item_id,
                    title=g.title,
                    score=score,
                    rank=rank,
                    source=source,
                    explanation=g.candidate.explanation or explain(catalog[item_id]),
                    similarity=g.similarity,
                    match=g.match,
                )
            )
        else:
            item = catalog[item_id]
            source = "collab" if collab_scores is not None else "popular"
            out.append(
                Recommendation(
                    item_id=item_id,
                    title=item.title,
                    score=score,
                    rank=rank,
                    source=source,
                    explanation=explain(item),
                )
            )
    return out


def softmax(logits: Sequence[float]) -> FloatArray:
    """Probabilities from log-scores (max-shifted, so large logits do not overflow)."""
    arr = np.asarray(logits, dtype=np.float64)
    if arr.size == 0:
        return arr
    e = np.exp(arr - arr.max())
    return e / e.sum()


def prompt_order(
    item_ids: Sequence[str], order: str, *, seed: int, user_id: str | None, history_length: int
) -> tuple[str, ...]:
    """The retrieved ``item_ids`` in the order a rerank prompt lists them
    (``prompt.candidate_order``): as retrieved, or ``shuffled`` by a generator seeded with the
    run's seed, the user and the history length, the same in training and at inference, and on
    every run."""
    ids = list(item_ids)
    if order == "shuffled":
        random.Random(f"{seed}:{user_id or ''}:{history_length}").shuffle(ids)
    elif order != "retrieved":
        raise DataError(f"candidate order {order!r}: use 'retrieved' or 'shuffled'")
    return tuple(ids)


def fuse_candidates(
    candidate_ids: Sequence[str],
    llm_logits: Sequence[float],
    *,
    collab_scores: NDArray[np.floating],
    popularity: NDArray[np.floating],
    catalog: Catalog,
    exclude: Collection[str],
    candidates: Sequence[str] | None = None,
    n: int,
    config: RankingConfig,
    explain: Callable[[Item], str],
) -> list[Recommendation]:
    """Fuse the LLM's scores of retrieved candidates with the collaborative scores (rerank mode).

    ``score = llm_weight * p / max(p) + collab_weight * minmax(collab)``, where ``p`` is the
    softmax of the LLM's candidate log-scores (zero outside the candidates). Items beyond the
    candidates keep their collaborative score, so the list fills to ``n``.

    Args:
        candidate_ids: The retrieved items, in the order the prompt listed them.
        llm_logits: One log-score per candidate (same order); empty when the LLM was skipped.
        collab_scores: One collaborative score per catalog position.
        popularity: Training interaction counts per catalog position (tie-breaks only).
        catalog: The items.
        exclude: Item ids never to return (the user's history).
        candidates: If given, only these item ids are ranked.
        n: List length.
        config: Fusion weights.
        explain: The explanation of each recommended item.

    Raises:
        DataError: if there are log-scores but not one per candidate.
    """
    if llm_logits and len(llm_logits) != len(candidate_ids):
        raise DataError(
            f"got {len(llm_logits)} LLM scores for {len(candidate_ids)} candidates: "
            "pass one score per candidate"
        )
    llm = np.zeros(len(catalog), dtype=np.float64)
    if len(llm_logits):
        p = softmax(llm_logits)
        llm[[catalog.position(i) for i in candidate_ids]] = p / p.max()
    fused = config.llm_weight * llm + config.collab_weight * minmax(collab_scores)
    fused += _TIE_BREAK * minmax(popularity)
    offered = set(candidate_ids)
    return [
        Recommendation(
            item_id=item_id,
            title=catalog[item_id].title,
            score=score,
            rank=rank,
            source="hybrid" if item_id in offered and len(llm_logits) else "collab",
            explanation=explain(catalog[item_id]),
        )
        for rank, (item_id, score) in enumerate(
            top_n(fused, catalog=catalog, exclude=exclude, candidates=candidates, n=n), start=1
        )
    ]
