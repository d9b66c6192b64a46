"""Tests for recgen.collab: popularity and SASRec+ scorers, early stopping, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recgen.collab import (
    EnsembleScorer,
    PopularityScorer,
    SASRecScorer,
    Scorer,
    TransitionScorer,
    ensemble,
    fit_scorer,
    load_scorer,
)
from recgen.config import CollabConfig, EnsembleConfig, SASRecConfig
from recgen.errors import ConfigError, IndexMismatchError
from recgen.types import Catalog, History, Item

N_ITEMS = 12
TINY = SASRecConfig(max_len=8, hidden=16, layers=1, heads=2, dropout=0.0, lr=1e-2, batch_size=16)


def _catalog(n: int = N_ITEMS, name: str = "tiny") -> Catalog:
    return Catalog(items=tuple(Item(item_id=f"i{k}", title=f"T{k}") for k in range(n)), name=name)


def _cyclic_train(n_users: int = 48, length: int = 10) -> dict[str, History]:
    """Each user walks the catalog in a cycle i -> i+1 from a different start."""
    return {
        f"u{u}": History.create([f"i{(u + t) % N_ITEMS}" for t in range(length)], user_id=f"u{u}")
        for u in range(n_users)
    }


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


def test_popularity_counts_training_items_only() -> None:
    cat = _catalog(4)
    train = {"a": History.create(["i1", "i1", "i2"]), "b": History.create(["i1", "zzz"])}
    scorer = PopularityScorer().fit(train, cat)
    assert isinstance(scorer, Scorer)
    scores = scorer.score([History.create([]), History.create(["i0"])])
    assert scores.shape == (2, 4)
    assert scores[0].tolist() == [0.0, 3.0, 1.0, 0.0]
    assert np.array_equal(scores[0], scores[1])


def test_popularity_save_load_round_trip_and_catalog_check(tmp_path: Path) -> None:
    cat = _catalog(4)
    scorer = PopularityScorer().fit({"a": History.create(["i3", "i3", "i0"])}, cat)
    scorer.save(tmp_path / "pop")
    loaded = load_scorer(tmp_path / "pop", catalog=cat)
    assert isinstance(loaded, PopularityScorer)
    assert loaded.score([History.create([])]).tolist() == [[1.0, 0.0, 0.0, 2.0]]
    with pytest.raises(IndexMismatchError, match="refit it on this catalog"):
        load_scorer(tmp_path / "pop", catalog=_catalog(5))


def test_unfitted_scorers_raise() -> None:
    with pytest.raises(ConfigError, match="not fitted"):
        PopularityScorer().score([History.create([])])
    with pytest.raises(ConfigError, match="not fitted"):
        SASRecScorer().score([History.create([])])


def test_sasrec_learns_a_cyclic_sequence() -> None:
    cat = _catalog()
    cfg = TINY.model_copy(update={"max_epochs": 40})
    scorer = SASRecScorer().fit(_cyclic_train(), cat, cfg, show_progress=False)
    histories = [History.create([f"i{(s + t) % N_ITEMS}" for t in range(5)]) for s in range(12)]
    scores = scorer.score(histories)
    assert scores.shape == (12, N_ITEMS)
    predicted = scores.argmax(axis=1)
    expected = np.array([(s + 5) % N_ITEMS for s in range(12)])
    assert (predicted == expected).mean() >= 0.9
    assert scorer.epochs == 40


def test_sasrec_is_deterministic_for_a_seed_and_changes_with_it() -> None:
    cat, train = _catalog(), _cyclic_train()
    cfg = TINY.model_copy(update={"max_epochs": 3, "dropout": 0.2})
    h = [History.create(["i1", "i2", "i3"])]
    a = SASRecScorer().fit(train, cat, cfg, show_progress=False).score(h)
    b = SASRecScorer().fit(train, cat, cfg, show_progress=False).score(h)
    c = SASRecScorer().fit(train, cat, cfg.model_copy(update={"seed": 1}), show_progress=False)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c.score(h))


def test_early_stopping_keeps_the_best_weights() -> None:
    script = iter([0.1, 0.5, 0.2, 0.1, 0.3, 0.9])
    seen: list[np.ndarray] = []
    probe = [History.create(["i0", "i1"])]

    def validate(scorer: SASRecScorer) -> float:
        seen.append(scorer.score(probe))
        return next(script)

    cfg = TINY.model_copy(update={"max_epochs": 6, "patience": 3})
    scorer = SASRecScorer().fit(
        _cyclic_train(), _catalog(), cfg, validate=validate, show_progress=False
    )
    assert scorer.epochs == 5  # epochs 3, 4, 5 brought no improvement on 0.5
    assert scorer.best_epoch == 2
    assert scorer.best_valid == 0.5
    assert np.array_equal(scorer.score(probe), seen[1])
    assert [round(h["valid"], 2) for h in scorer.history] == [0.1, 0.5, 0.2, 0.1, 0.3]


def test_empty_and_unknown_histories_score_zero_rows() -> None:
    cat = _catalog()
    cfg = TINY.model_copy(update={"max_epochs": 1})
    scorer = SASRecScorer().fit(_cyclic_train(), cat, cfg, show_progress=False)
    scores = scorer.score([History.create([]), History.create(["i1"]), History.create(["zzz"])])
    assert not scores[0].any()
    assert not scores[2].any()
    assert scores[1].any()


def test_long_histories_are_cut_to_max_len(rng: np.random.Generator) -> None:
    cat = _catalog()
    cfg = TINY.model_copy(update={"max_epochs": 2})
    scorer = SASRecScorer().fit(_cyclic_train(length=30), cat, cfg, show_progress=False)
    tail = [f"i{k}" for k in rng.integers(0, N_ITEMS, size=cfg.max_len)]
    long = History.create([*(f"i{k}" for k in rng.integers(0, N_ITEMS, size=20)), *tail])
    assert np.allclose(scorer.score([long]), scorer.score([History.create(tail)]), atol=1e-5)


def test_sasrec_save_load_round_trip(tmp_path: Path) -> None:
    cat = _catalog()
    cfg = TINY.model_copy(update={"max_epochs": 2})
    scorer = SASRecScorer().fit(_cyclic_train(), cat, cfg, show_progress=False)
    scorer.save(tmp_path / "sasrec")
    loaded = load_scorer(tmp_path / "sasrec", catalog=cat)
    assert isinstance(loaded, SASRecScorer)
    assert loaded.config == cfg
    assert loaded.epochs == 2
    h = [History.create(["i3", "i4"]), History.create(["i9"])]
    assert np.allclose(loaded.score(h), scorer.score(h))
    with pytest.raises(IndexMismatchError, match="not on 'other'"):
        SASRecScorer.load(tmp_path / "sasrec", _catalog(name="other", n=N_ITEMS + 1))


def test_sasrec_needs_sequences_of_two_items() -> None:
    with pytest.raises(ConfigError, match="two catalog items"):
        SASRecScorer().fit({"a": History.create(["i1"])}, _catalog(), TINY, show_progress=False)


def test_fit_scorer_dispatches_on_method(tmp_path: Path) -> None:
    cat, train = _catalog(), _cyclic_train()
    assert isinstance(
        fit_scorer(CollabConfig(method="popular"), train=train, catalog=cat), PopularityScorer
    )
    config = CollabConfig(method="sasrec", sasrec=TINY.model_copy(update={"max_epochs": 1}))
    fitted = fit_scorer(config, train=train, catalog=cat, show_progress=False)
    assert isinstance(fitted, SASRecScorer)
    with pytest.raises(ConfigError, match="method='none'"):
        fit_scorer(CollabConfig(method="none"), train=train, catalog=cat)
    with pytest.raises(ConfigError, match="not a saved scorer"):
        load_scorer(tmp_path, catalog=cat)


def test_ensemble_tunes_weights_on_validation_and_round_trips(tmp_path: Path) -> None:
    cat, train = _catalog(), _cyclic_train()
    members = [PopularityScorer().fit(train, cat), TransitionScorer().fit(train, cat)]
    probe = [History.create([f"i{s}", f"i{(s + 1) % N_ITEMS}"]) for s in range(N_ITEMS)]
    truth = [(s + 2) % N_ITEMS for s in range(N_ITEMS)]

    def validate(scorer: Scorer) -> float:  # share of probes whose next item is ranked first
        return float((scorer.score(probe).argmax(axis=1) == truth).mean())

    config = EnsembleConfig(members=("popular", "transitions"), grid=(0.0, 0.5, 2.0))
    scorer = ensemble(members, config, catalog=cat, validate=validate)
    assert scorer.weights[0] == 1.0
    assert scorer.weights[1] > 0  # popularity alone is flat here: transitions must be used
    assert validate(scorer) == 1.0
    assert scorer.tuning[0] == {"weights": [1.0, 0.0], "valid_ndcg10": validate(members[0])}
    scorer.save(tmp_path / "ens")
    loaded = load_scorer(tmp_path / "ens", catalog=cat)
    assert isinstance(loaded, EnsembleScorer)
    assert loaded.weights == scorer.weights
    assert np.allclose(loaded.score(probe), scorer.score(probe))


def test_ensemble_scores_are_the_weighted_sum_of_z_scores() -> None:
    cat, train = _catalog(), _cyclic_train()
    pop, trans = PopularityScorer().fit(train, cat), TransitionScorer().fit(train, cat)
    scorer = EnsembleScorer([trans, pop], [1.0, 0.3])
    h = [History.create(["i1", "i2"]), History.create(["i7"])]

    def z(a: np.ndarray) -> np.ndarray:
        sd = a.std(axis=1, keepdims=True)
        return (a - a.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1)

    expected = z(trans.score(h)) + 0.3 * z(pop.score(h))
    assert np.allclose(scorer.score(h), expected, atol=1e-5)


def test_ensemble_config_is_checked() -> None:
    with pytest.raises(ValueError, match="one weight per member"):
        EnsembleConfig(members=("sasrec", "ease"), weights=(1.0,))
    with pytest.raises(ValueError, match="distinct"):
        EnsembleConfig(members=("ease", "ease"))
    with pytest.raises(ConfigError, match="tunes its weights on validation"):
        fit_scorer(CollabConfig(method="ensemble"), train=_cyclic_train(), catalog=_catalog())


def test_fit_scorer_builds_a_fixed_weight_ensemble() -> None:
    cat, train = _catalog(), _cyclic_train()
    config = CollabConfig(
        method="ensemble",
        ensemble=EnsembleConfig(members=("transitions", "ease"), weights=(1.0, 0.5)),
    )
    scorer = fit_scorer(config, train=train, catalog=cat)
    assert isinstance(scorer, EnsembleScorer)
    assert [m.name for m in scorer.members] == ["transitions", "ease"]
    assert scorer.weights == [1.0, 0.5]
