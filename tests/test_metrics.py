"""Tests for recgen.metrics: hand-computed HR/NDCG/MRR, coverage, popularity share, paired tests."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recgen.errors import DataError
from recgen.metrics import (
    auc,
    candidate_list_metrics,
    candidate_list_values,
    paired_test,
    score_rankings,
)


def test_hand_computed_single_user_at_rank_3() -> None:
    m = score_rankings([["a", "b", "t", "c"]], ["t"], ks=(1, 2, 3, 10), n_catalog=10)
    s = m.summary()
    assert s["HR@1"] == 0.0
    assert s["HR@2"] == 0.0
    assert s["HR@3"] == 1.0
    assert s["HR@10"] == 1.0
    assert s["NDCG@3"] == pytest.approx(1 / math.log2(4))
    assert s["NDCG@10"] == pytest.approx(0.5)
    assert s["MRR@3"] == pytest.approx(1 / 3)
    assert s["MRR@2"] == 0.0
    assert m.per_user["rank"].tolist() == [3.0]


def test_means_over_users_and_per_user_arrays_keep_order() -> None:
    rankings = [["t1", "x"], ["x", "t2"], ["x", "y"]]
    m = score_rankings(rankings, ["t1", "t2", "t3"], ks=(1, 5), n_catalog=5)
    assert m.per_user["HR@5"].tolist() == [1.0, 1.0, 0.0]
    assert m.per_user["MRR@5"].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert m.summary()["HR@1"] == pytest.approx(1 / 3)
    assert m.summary()["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert m.n_users == 3


def test_empty_ranking_and_absent_target_are_misses() -> None:
    m = score_rankings([[], ["a", "b"]], ["t", "t"], ks=(1, 20), n_catalog=4)
    for name in ("HR@20", "NDCG@20", "MRR@20"):
        assert m.per_user[name].tolist() == [0.0, 0.0]
    assert m.coverage[20] == pytest.approx(2 / 4)


def test_duplicates_count_first_occurrence_and_use_up_slots() -> None:
    # "a" repeated: the target sits at position 3 even though it is the 2nd distinct item.
    m = score_rankings([["a", "a", "t", "t"]], ["t"], ks=(2, 3), n_catalog=10)
    assert m.per_user["HR@2"].tolist() == [0.0]
    assert m.per_user["MRR@3"].tolist() == pytest.approx([1 / 3])
    assert m.coverage[3] == pytest.approx(2 / 10)


def test_k_larger_than_list() -> None:
    m = score_rankings([["a", "t"]], ["t"], ks=(20,), n_catalog=3)
    assert m.summary()["HR@20"] == 1.0
    assert m.coverage[20] == pytest.approx(2 / 3)


def test_coverage_per_cutoff_and_popular_share() -> None:
    rankings = [["p1", "a", "b"], ["p1", "p2", "c"]]
    m = score_rankings(rankings, ["a", "z"], ks=(1, 3), n_catalog=10, popular={"p1", "p2"})
    assert m.coverage[1] == pytest.approx(1 / 10)
    assert m.coverage[3] == pytest.approx(5 / 10)
    assert m.per_user["POP@3"].tolist() == pytest.approx([1 / 3, 2 / 3])
    assert m.summary()["POP@1"] == 1.0
    assert m.summary()["COV@3"] == pytest.approx(0.5)


def test_no_popular_set_means_no_pop_metric() -> None:
    assert "POP@10" not in score_rankings([["a"]], ["a"], ks=(10,), n_catalog=1).per_user


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ks": (0, 5)}, "positive"),
        ({"ks": ()}, "non-empty"),
        ({"ks": (2.5,)}, "positive ints"),
        ({"n_catalog": 0}, "at least one"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"ks": (10,), "n_catalog": 5} | kwargs
    with pytest.raises(DataError, match=match):
        score_rankings([["a"]], ["a"], **args)  # type: ignore[arg-type]


def test_length_mismatch_raises() -> None:
    with pytest.raises(DataError, match="2 rankings but 1 targets"):
        score_rankings([["a"], ["b"]], ["a"], n_catalog=5)


items = st.sampled_from([f"i{k}" for k in range(12)])


@given(
    rankings=st.lists(st.lists(items, max_size=25), min_size=1, max_size=15),
    data=st.data(),
)
def test_properties_bounds_and_monotone_in_k(
    rankings: list[list[str]], data: st.DataObject
) -> None:
    targets = [data.draw(items) for _ in rankings]
    ks = (1, 5, 10, 20)
    m = score_rankings(rankings, targets, ks=ks, n_catalog=12)
    for k in ks:
        hr, ndcg, mrr = (m.per_user[f"{x}@{k}"] for x in ("HR", "NDCG", "MRR"))
        assert np.all((ndcg >= 0) & (ndcg <= hr + 1e-12) & (hr <= 1))
        assert np.all((mrr >= 0) & (mrr <= ndcg + 1e-12))
        assert 0 <= m.coverage[k] <= 1
    for lo, hi in itertools.pairwise(ks):
        for x in ("HR", "NDCG", "MRR"):
            assert np.all(m.per_user[f"{x}@{lo}"] <= m.per_user[f"{x}@{hi}"] + 1e-12)
        assert m.coverage[lo] <= m.coverage[hi]


def test_paired_test_detects_a_clear_difference() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(200)
    a = b + 0.1 + rng.normal(0, 0.05, 200)
    t = paired_test(a, b)
    assert t.n == 200
    assert t.diff == pytest.approx(float(np.mean(a - b)))
    assert t.p_t < 1e-6
    assert t.p_wilcoxon < 1e-6
    assert t.t_stat > 0


def test_paired_test_no_difference_and_constant_difference() -> None:
    x = np.array([0.0, 1.0, 0.5, 0.2])
    same = paired_test(x, x.copy())
    assert (same.diff, same.p_t, same.p_wilcoxon) == (0.0, 1.0, 1.0)
    shifted = paired_test(x + 1, x)
    assert shifted.diff == pytest.approx(1.0)
    assert shifted.p_t == 0.0
    assert math.isinf(shifted.t_stat)


def test_paired_test_is_symmetric_in_sign() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.random(50), rng.random(50)
    ab, ba = paired_test(a, b), paired_test(b, a)
    assert ab.diff == pytest.approx(-ba.diff)
    assert ab.p_t == pytest.approx(ba.p_t)
    assert ab.p_wilcoxon == pytest.approx(ba.p_wilcoxon)


def test_paired_test_rejects_mismatched_shapes() -> None:
    with pytest.raises(DataError, match="equal length"):
        paired_test(np.zeros(3), np.zeros(4))
    with pytest.raises(DataError, match="non-empty"):
        paired_test(np.zeros(0), np.zeros(0))


def test_candidate_list_metrics_hand_computed() -> None:
    # list 1: target (position 2) scored highest -> rank 0; list 2: target (position 1) has
    # 5 higher scores -> rank 5 (outside HR@5); list 3: a tie with the target favours it.
    scores = [[0.1, 0.9, 0.2], [0.0, 1, 2, 3, 4, 5], [0.5, 0.5]]
    m = candidate_list_metrics(scores, [2, 1, 1])
    assert m["HR@1"] == pytest.approx(2 / 3)
    assert m["HR@5"] == pytest.approx(2 / 3)
    assert m["NDCG"] == pytest.approx((1 + 1 / math.log2(7) + 1) / 3)
    assert candidate_list_metrics(scores, [2, 1, 1], ndigits=2)["NDCG"] == round(m["NDCG"], 2)
    with pytest.raises(ValueError, match="shorter"):
        candidate_list_metrics(scores, [1, 1])
    per_list = candidate_list_values(scores, [2, 1, 1])  # the same, one value per list
    assert per_list["HR@1"].tolist() == [1.0, 0.0, 1.0]
    assert per_list["NDCG"].tolist() == pytest.approx([1.0, 1 / math.log2(7), 1.0])
    assert candidate_list_metrics([], []) == {"HR@1": 0.0, "HR@5": 0.0, "NDCG": 0.0}


def test_auc_counts_pairs_a_positive_wins_and_ties_as_half() -> None:
    assert auc([0.9, 0.1, 0.5], [True, False, False]) == 1.0
    assert auc([0.1, 0.9], [True, False]) == 0.0
    # 2 positives x 2 negatives: 0.8 beats both, 0.3 beats 0.2 and ties 0.3 -> 3.5 / 4
    assert auc([0.8, 0.3, 0.3, 0.2], [True, True, False, False]) == pytest.approx(0.875)


def test_auc_needs_both_labels_and_one_score_per_label() -> None:
    with pytest.raises(ValueError, match="0 negatives"):
        auc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="one score per label"):
        auc([0.1], [True, False])
