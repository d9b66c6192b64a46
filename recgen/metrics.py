"""Top-N accuracy and beyond-accuracy metrics, with per-user values for paired tests."""

# pyright: strict
from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from recgen.errors import DataError

__all__ = [
    "DEFAULT_KS", "Metrics", "PairedTest", "auc", "candidate_list_metrics", "candidate_list_values",
    "paired_test",
    "score_rankings",
]  # fmt: skip

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)
"""Cut-offs reported by default."""

FloatArray = NDArray[np.float64]


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """Metrics of one ranked list per user against one held-out target per user.

    Attributes:
        ks: The cut-offs.
        n_users: How many (ranking, target) pairs were scored.
        n_catalog: Catalog size (denominator of coverage).
        per_user: ``"HR@10"``, ``"NDCG@10"``, ``"MRR@10"``, ``"POP@10"`` ... -> one value per user,
            in input order (for paired significance tests); ``"rank"`` holds the target's 1-based
            rank in the list (0 when absent).
        coverage: K -> distinct items recommended in any top-K / catalog size.
    """

    ks: tuple[int, ...]
    n_users: int
    n_catalog: int
    per_user: dict[str, FloatArray]
    coverage: dict[int, float]

    def summary(self) -> dict[str, float]:
        """Means of every per-user metric plus coverage, keyed ``"NDCG@10"``, ``"COV@10"`` ...

        Means over zero users are 0.0.
        """
        out: dict[str, float] = {}
        for name, values in self.per_user.items():
            if name != "rank":
                out[name] = float(values.mean()) if values.size else 0.0
        for k, value in self.coverage.items():
            out[f"COV@{k}"] = value
        return out


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out or any(type(k) is not int or k < 1 for k in out):
        raise DataError(f"ks={out!r}: cut-offs must be a non-empty sequence of positive ints")
    return tuple(sorted(set(out)))


def _target_ranks(rankings: Sequence[Sequence[str]], targets: Sequence[str]) -> NDArray[np.int64]:
    """1-based rank of the first occurrence of each target in its list; 0 when absent."""
    ranks = np.zeros(len(targets), dtype=np.int64)
    for u, (ranking, target) in enumerate(zip(rankings, targets, strict=True)):
        for pos, item_id in enumerate(ranking):
            if item_id == target:
                ranks[u] = pos + 1
                break
    return ranks


def _popular_share(
    rankings: Sequence[Sequence[str]], popular: Collection[str], k: int
) -> FloatArray:
    """Per user: the share of the top-k slots filled with popular items (0 for an empty list)."""
    out = np.zeros(len(rankings), dtype=np.float64)
    for u, ranking in enumerate(rankings):
        top = ranking[:k]
        if top:
            out[u] = sum(item_id in popular for item_id in top) / len(top)
    return out


def score_rankings(
    rankings: Sequence[Sequence[str]],
    targets: Sequence[str],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    n_catalog: int,
    popular: Collection[str] = (),
) -> Metrics:
    """Score ranked lists against one held-out target each (leave-one-out style).

    With one relevant item, HR@K is 1 when the target is in the top K, NDCG@K is
    ``1 / log2(rank + 1)`` (the ideal DCG is 1) and MRR@K is ``1 / rank``, all 0 beyond K.
    A ranking may be shorter than K or empty (a miss). If an item id repeats in a ranking, the
    target's rank is its *first* position and the repeats still use up slots, so a ranker
    gains nothing from duplicates; coverage counts distinct ids.

    Args:
        rankings: One list of item ids per user, best first.
        targets: The held-out item of each user.
        ks: Cut-offs.
        n_catalog: Number of items in the catalog (coverage denominator).
        popular: The "popular" items (e.g. the top 20% by training count); adds ``POP@K``,
            the per-user share of the top-K that are popular. Omitted when empty.

    Returns:
        The per-user values and coverage.

    Raises:
        DataError: if the lengths differ, ``ks`` holds a non-positive value, or
            ``n_catalog`` < 1.
    """
    ks_ = _check_ks(ks)
    if len(rankings) != len(targets):
        raise DataError(
            f"{len(rankings)} rankings but {len(targets)} targets: pass one target per ranking"
        )
    if n_catalog < 1:
        raise DataError(f"n_catalog={n_catalog}: the catalog must hold at least one item")
    ranks = _target_ranks(rankings, targets)
    hit_rank = np.where(ranks > 0, ranks, np.iinfo(np.int64).max).astype(np.float64)
    per_user: dict[str, FloatArray] = {"rank": ranks.astype(np.float64)}
    coverage: dict[int, float] = {}
    popular_set = frozenset(popular)
    for k in ks_:
        hit = (ranks > 0) & (ranks <= k)
        per_user[f"HR@{k}"] = hit.astype(np.float64)
        per_user[f"NDCG@{k}"] = np.where(hit, 1.0 / np.log2(np.minimum(hit_rank, k) + 1.0), 0.0)
        per_user[f"MRR@{k}"] = np.where(hit, 1.0 / np.minimum(hit_rank, k), 0.0)
        if popular_set:
            per_user[f"POP@{k}"] = _popular_share(rankings, popular_set, k)
        distinct = {item_id for ranking in rankings for item_id in ranking[:k]}
        coverage[k] = len(distinct) / n_catalog
    return Metrics(
        ks=ks_, n_users=len(targets), n_catalog=n_catalog, per_user=per_user, coverage=coverage
    )


@dataclass(frozen=True, kw_only=True)
class PairedTest:
    """A paired comparison of two systems on the same users.

    Attributes:
        n: Number of users.
        mean_a: Mean of system A.
        mean_b: Mean of system B.
        diff: ``mean_a - mean_b``.
        t_stat: Paired t statistic (0 when all differences are 0).
        p_t: Two-sided p-value of the paired t-test.
        p_wilcoxon: Two-sided p-value of the Wilcoxon signed-rank test (zero differences dropped).
    """

    n: int
    mean_a: float
    mean_b: float
    diff: float
    t_stat: float
    p_t: float
    p_wilcoxon: float


def paired_test(a: NDArray[Any], b: NDArray[Any]) -> PairedTest:
    """Paired t-test and Wilcoxon signed-rank test of per-user values ``a`` against ``b``.

    When every difference is zero both p-values are 1.0; when every difference is the same
    non-zero value the t-test p-value is 0.0.

    Raises:
        DataError: if the arrays differ in shape or are empty.
    """
    from scipy import stats  # pyright: ignore[reportMissingTypeStubs]

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise DataError(
            f"paired_test needs two non-empty 1-D arrays of equal length (got shapes "
            f"{x.shape} and {y.shape}); pass per-user values of the same users in the same order"
        )
    d = x - y
    mean_a, mean_b, diff = float(x.mean()), float(y.mean()), float(d.mean())
    if not d.any():
        return PairedTest(
            n=x.size, mean_a=mean_a, mean_b=mean_b, diff=0.0, t_stat=0.0, p_t=1.0, p_wilcoxon=1.0
        )
    if np.all(d == d[0]) or x.size < 2:
        t_stat, p_t = math.copysign(math.inf, diff), 0.0
    else:
        res_t = cast(Any, stats.ttest_rel(x, y))  # pyright: ignore[reportUnknownMemberType]
        t_stat, p_t = float(res_t.statistic), float(res_t.pvalue)
    res_w = cast(Any, stats.wilcoxon(d, zero_method="wilcox"))  # pyright: ignore[reportUnknownMemberType]
    return PairedTest(
        n=x.size,
        mean_a=mean_a,
        mean_b=mean_b,
        diff=diff,
        t_stat=t_stat,
        p_t=p_t,
        p_wilcoxon=float(res_w.pvalue),
    )


def candidate_list_values(
    scores: Sequence[Sequence[float]], targets: Sequence[int]
) -> dict[str, FloatArray]:
    """Per list, HR@1, HR@5 and NDCG of the target (for paired tests between two models).

    Args:
        scores: Per list, one score per candidate (higher is better), in list order.
        targets: Per list, the target's 1-based position in it.

    Returns:
        ``{"HR@1", "HR@5", "NDCG"}`` -> one value per list, in input order. A target's rank
        counts the candidates scored strictly higher, so ties favour the target.
    """
    ranks = np.array(
        [sum(1 for s in row if s > row[t - 1]) for row, t in zip(scores, targets, strict=True)],
        dtype=np.float64,
    )
    return {
        "HR@1": (ranks < 1).astype(np.float64),
        "HR@5": (ranks < 5).astype(np.float64),
        "NDCG": 1.0 / np.log2(ranks + 2.0),
    }


def candidate_list_metrics(
    scores: Sequence[Sequence[float]], targets: Sequence[int], *, ndigits: int | None = None
) -> dict[str, float]:
    """HR@1, HR@5 and NDCG of the target over short candidate lists (rerank validation): the
    means of :func:`candidate_list_values` (0.0 for no lists).

    Args:
        scores: Per list, one score per candidate (higher is better), in list order.
        targets: Per list, the target's 1-based position in it.
        ndigits: Round the means to this many digits (``None``: no rounding).
    """
    values = candidate_list_values(scores, targets)
    out = {k: float(v.mean()) if v.size else 0.0 for k, v in values.items()}
    return out if ndigits is None else {k: round(v, ndigits) for k, v in out.items()}


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve: the chance a positive outscores a negative (ties count half),
    TALLRec's metric for yes/no answers; 0.5 is chance. Raises ValueError without both kinds."""
    from scipy import stats  # pyright: ignore[reportMissingTypeStubs]

    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if len(scores) != len(pos) or not n_pos or not n_neg:
        raise ValueError(
            f"auc needs one score per label and both labels, got {len(scores)} scores, "
            f"{n_pos} positives, {n_neg} negatives"
        )
    ranked = stats.rankdata(np.asarray(scores, dtype=np.float64))  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    ranks = np.asarray(ranked, dtype=np.float64)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
