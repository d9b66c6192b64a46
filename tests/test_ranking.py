"""Tests for recgen.ranking: top-N over score vectors (exclusion, candidates, ties, NaN)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recgen.config import RankingConfig
from recgen.errors import DataError
from recgen.ranking import fuse_candidates, prompt_order, softmax, top_n, top_n_batch
from recgen.types import Catalog, Item


def _catalog(n: int) -> Catalog:
    return Catalog(items=tuple(Item(item_id=f"i{k}", title=f"T{k}") for k in range(n)), name="t")


def test_orders_by_score_and_cuts_to_n() -> None:
    top = top_n([0.1, 0.9, 0.5, 0.7], catalog=_catalog(4), n=2)
    assert top == [("i1", 0.9), ("i3", 0.7)]


def test_excluded_items_never_appear_and_unknown_excludes_are_ignored() -> None:
    top = top_n([0.1, 0.9, 0.5, 0.7], catalog=_catalog(4), exclude={"i1", "zzz"}, n=4)
    assert [i for i, _ in top] == ["i3", "i2", "i0"]


def test_candidates_restrict_the_ranking() -> None:
    top = top_n([0.1, 0.9, 0.5, 0.7], catalog=_catalog(4), candidates=["i0", "i2"], n=3)
    assert [i for i, _ in top] == ["i2", "i0"]


def test_unknown_candidate_raises() -> None:
    with pytest.raises(DataError, match="'nope' is not in catalog"):
        top_n([0.0, 0.0], catalog=_catalog(2), candidates=["nope"], n=1)


def test_ties_break_by_catalog_position_even_at_the_cut() -> None:
    scores = np.zeros(50)
    scores[[40, 7]] = 1.0
    top = top_n(scores, catalog=_catalog(50), n=5)
    assert [i for i, _ in top] == ["i7", "i40", "i0", "i1", "i2"]


def test_nan_and_neg_inf_are_never_returned() -> None:
    top = top_n([math.nan, -math.inf, 0.3, math.inf], catalog=_catalog(4), n=4)
    assert top == [("i3", math.inf), ("i2", 0.3)]


def test_wrong_shape_and_bad_n_raise() -> None:
    with pytest.raises(DataError, match="one score per catalog position"):
        top_n([0.0, 1.0], catalog=_catalog(3), n=1)
    with pytest.raises(DataError, match="positive int"):
        top_n([0.0, 1.0], catalog=_catalog(2), n=0)


def test_batch_matches_single_rows() -> None:
    rng = np.random.default_rng(0)
    cat = _catalog(30)
    scores = rng.integers(0, 5, size=(4, 30)).astype(float)
    excludes = [{"i1"}, set(), {"i3", "i4"}, {"i0"}]
    candidates = [None, ["i5", "i6", "i7"], None, ["i0", "i9"]]
    batch = top_n_batch(scores, catalog=cat, excludes=excludes, candidates=candidates, n=6)
    for r in range(4):
        single = top_n(scores[r], catalog=cat, exclude=excludes[r], candidates=candidates[r], n=6)
        assert batch[r] == single


def test_batch_checks_shapes() -> None:
    with pytest.raises(DataError, match="shape"):
        top_n_batch(np.zeros((2, 3)), catalog=_catalog(4), n=1)
    with pytest.raises(DataError, match="excludes has 1 entries for 2 score rows"):
        top_n_batch(np.zeros((2, 4)), catalog=_catalog(4), excludes=[set()], n=1)


score_values = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0, math.nan, -math.inf]),
    st.floats(-5, 5, allow_nan=False),
)


@given(
    scores=st.lists(score_values, min_size=1, max_size=40),
    n=st.integers(1, 45),
    data=st.data(),
)
def test_properties_match_a_full_stable_sort(
    scores: list[float], n: int, data: st.DataObject
) -> None:
    cat = _catalog(len(scores))
    ids = cat.item_ids
    exclude = set(data.draw(st.lists(st.sampled_from(ids), max_size=5)))
    use_candidates = data.draw(st.booleans())
    candidates = data.draw(st.lists(st.sampled_from(ids), max_size=10)) if use_candidates else None
    top = top_n(scores, catalog=cat, exclude=exclude, candidates=candidates, n=n)
    eligible = [
        p
        for p, s in enumerate(scores)
        if not math.isnan(s)
        and s > -math.inf
        and ids[p] not in exclude
        and (candidates is None or ids[p] in candidates)
    ]
    expected = sorted(eligible, key=lambda p: (-scores[p], p))[:n]
    assert [i for i, _ in top] == [ids[p] for p in expected]
    assert len(top) == min(n, len(eligible))
    assert all(score == scores[cat.position(i)] for i, score in top)


def _explain(item: Item) -> str:
    return f"because {item.title}"


@given(
    st.lists(st.floats(-50, 50), min_size=12, max_size=12),
    st.lists(st.floats(-30, 30), min_size=5, max_size=5),
    st.floats(0, 5),
    st.integers(1, 12),
)
def test_fuse_candidates_returns_ranked_unseen_items(
    collab: list[float], logits: list[float], weight: float, n: int
) -> None:
    catalog = _catalog(12)
    retrieved = ["i3", "i4", "i5", "i6", "i7"]
    recs = fuse_candidates(
        retrieved, logits, collab_scores=np.asarray(collab), popularity=np.zeros(12),
        catalog=catalog, exclude={"i0", "i1"}, n=n,
        config=RankingConfig(mode="rerank", llm_weight=weight), explain=_explain,
    )  # fmt: skip
    ids = [r.item_id for r in recs]
    assert len(ids) == min(n, 10)
    assert len(set(ids)) == len(ids)
    assert not {"i0", "i1"} & set(ids)
    assert [r.rank for r in recs] == list(range(1, len(recs) + 1))
    assert all(a.score >= b.score for a, b in itertools.pairwise(recs))
    assert all(r.explanation.startswith("because ") for r in recs)


def test_fuse_candidates_with_zero_llm_weight_is_the_collaborative_order() -> None:
    catalog = _catalog(6)
    collab = np.array([0.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    recs = fuse_candidates(
        ["i4", "i5"], [9.0, 0.0], collab_scores=collab, popularity=np.zeros(6), catalog=catalog,
        exclude=(), n=6, config=RankingConfig(llm_weight=0.0), explain=_explain,
    )  # fmt: skip
    assert [r.item_id for r in recs] == ["i1", "i2", "i3", "i4", "i5", "i0"]


def test_fuse_candidates_rejects_a_score_count_mismatch() -> None:
    with pytest.raises(DataError, match="2 LLM scores for 3 candidates"):
        fuse_candidates(
            ["i0", "i1", "i2"], [0.0, 1.0], collab_scores=np.zeros(3), popularity=np.zeros(3),
            catalog=_catalog(3), exclude=(), n=2, config=RankingConfig(), explain=_explain,
        )  # fmt: skip


def test_softmax_is_a_distribution_and_survives_large_logits() -> None:
    p = softmax([1000.0, 1000.0, -1000.0])
    assert p.sum() == pytest.approx(1.0)
    assert p[0] == pytest.approx(0.5)


def test_prompt_order_keeps_or_shuffles_by_key() -> None:
    ids = [str(i) for i in range(20)]

    def order(kind: str, n: int) -> tuple[str, ...]:
        return prompt_order(ids, kind, seed=0, user_id="u1", history_length=n)

    assert order("retrieved", 7) == tuple(ids)
    shuffled = order("shuffled", 7)
    assert sorted(shuffled, key=int) == ids
    assert shuffled != tuple(ids)
    assert order("shuffled", 7) == shuffled  # reproducible
    others = {order("shuffled", n) for n in range(8, 12)}
    assert len(others | {shuffled}) == 5, "each prompt gets its own order"
    with pytest.raises(DataError, match="'sorted'"):
        order("sorted", 7)
