"""Tests for recgen.itemsim: EASE and transition scorers, their save/load and limits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recgen.collab import Scorer, load_scorer
from recgen.config import EASEConfig, TransitionConfig
from recgen.errors import ConfigError, IndexMismatchError
from recgen.itemsim import EASEScorer, TransitionScorer
from recgen.types import Catalog, History, Item


def _catalog(n: int = 6, name: str = "tiny") -> Catalog:
    return Catalog(items=tuple(Item(item_id=f"i{k}", title=f"T{k}") for k in range(n)), name=name)


def _h(*ids: str) -> History:
    return History.create(list(ids))


# Two item groups that always co-occur, each in a fixed order: 0 -> 1 -> 2 and 3 -> 4 -> 5.
TRAIN = {f"u{u}": _h(*(["i0", "i1", "i2"] if u % 2 else ["i3", "i4", "i5"])) for u in range(20)}


def test_ease_scores_items_that_go_together() -> None:
    scorer = EASEScorer().fit(TRAIN, _catalog(), EASEConfig(l2=1.0))
    assert isinstance(scorer, Scorer)
    scores = scorer.score([_h("i0"), _h("i4"), _h()])
    assert scores.shape == (3, 6)
    assert set(np.argsort(-scores[0])[:2]) == {1, 2}  # the other items of i0's group
    assert set(np.argsort(-scores[1])[:2]) == {3, 5}
    assert not scores[2].any()
    assert scores[0, 0] == 0  # zero diagonal: an item never recommends itself


def test_ease_is_order_free_and_closed_form() -> None:
    scorer = EASEScorer().fit(TRAIN, _catalog(), EASEConfig(l2=5.0))
    assert np.allclose(scorer.score([_h("i0", "i1")]), scorer.score([_h("i1", "i0")]))
    x = np.zeros((20, 6))
    for r, h in enumerate(TRAIN.values()):
        x[r, [int(i[1:]) for i in h.item_ids]] = 1
    p = np.linalg.inv(x.T @ x + 5.0 * np.eye(6))
    b = np.eye(6) - p / np.diag(p)
    assert np.allclose(scorer.weights, b, atol=1e-5)


def test_ease_refuses_catalogs_over_max_items() -> None:
    with pytest.raises(ConfigError, match=r"max_items=3: raise it"):
        EASEScorer().fit(TRAIN, _catalog(), EASEConfig(max_items=3))


def test_transitions_follow_the_newest_items_in_order() -> None:
    cfg = TransitionConfig(window=2, decay=0.5, skip=0.0)
    scorer = TransitionScorer().fit(TRAIN, _catalog(), cfg)
    scores = scorer.score([_h("i0"), _h("i3", "i1"), _h("zzz")])
    assert int(np.argmax(scores[0])) == 1  # 0 -> 1
    assert scores[0, 2] == 0  # no skip transitions
    # newest i1 votes for i2 with weight 1, the older i3 for i4 with 0.5; counts are 10/(10+1)
    assert scores[1, 2] == pytest.approx(10 / 11)
    assert scores[1, 4] == pytest.approx(0.5 * 10 / 11)
    assert not scores[2].any()


def test_transitions_count_skips_with_their_weight() -> None:
    scorer = TransitionScorer().fit(TRAIN, _catalog(), TransitionConfig(skip=0.5))
    row = scorer.score([_h("i0")])[0]
    # i0 -> i1 ten times (10), i0 -> i2 skipping one ten times (5); total 15 + 1
    assert row[1] == pytest.approx(10 / 16)
    assert row[2] == pytest.approx(5 / 16)


@pytest.mark.parametrize("cls", [EASEScorer, TransitionScorer])
def test_save_load_round_trip_and_catalog_check(cls: type, tmp_path: Path) -> None:
    scorer = cls().fit(TRAIN, _catalog())
    scorer.save(tmp_path / "s")
    loaded = load_scorer(tmp_path / "s", catalog=_catalog())
    assert type(loaded) is cls
    histories = [_h("i0", "i4"), _h("i5")]
    assert np.allclose(loaded.score(histories), scorer.score(histories))
    with pytest.raises(IndexMismatchError, match="refit it on this catalog"):
        load_scorer(tmp_path / "s", catalog=_catalog(7, name="other"))


@pytest.mark.parametrize("cls", [EASEScorer, TransitionScorer])
def test_unfitted_item_scorers_raise(cls: type) -> None:
    with pytest.raises(ConfigError, match="not fitted"):
        cls().score([_h("i0")])
