"""Tests for recgen.evaluate: scorer rankers, validation callback, run folders, comparisons."""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from recgen.collab import PopularityScorer
from recgen.config import DataConfig, load_config
from recgen.errors import DataError
from recgen.evaluate import (
    ScorerRanker,
    compare,
    popular_items,
    run_evaluation,
    validation_callback,
)
from recgen.types import Catalog, Example, History, Item, Ranker

N = 8


def _catalog() -> Catalog:
    return Catalog(items=tuple(Item(item_id=f"i{k}", title=f"T{k}") for k in range(N)), name="t")


class _FixedScorer:
    """Scores item k as N - k for everyone (i0 best), plus a bonus for the history's length."""

    name = "fixed"

    def score(self, histories: Sequence[History]) -> np.ndarray:
        base = np.arange(N, 0, -1, dtype=np.float64)
        return np.stack([base for _ in histories]) if histories else np.zeros((0, N))


def _ex(user: str, history: list[str], target: str, candidates: tuple[str, ...] | None = None):
    return Example(
        user_id=user, history=History.create(history), target=target, candidates=candidates
    )


def _examples() -> list[Example]:
    return [
        _ex("u0", ["i0"], "i1"),  # rank 1
        _ex("u1", ["i0", "i1"], "i3"),  # rank 2 (i2 first)
        _ex("u2", [], "i7", candidates=("i7", "i5")),  # rank 2 among candidates
        _ex("u3", ["i2"], "i2"),  # target in history: never ranked
        _ex("u4", ["i5"], "i0"),  # rank 1
    ]


def test_scorer_ranker_excludes_history_and_respects_candidates() -> None:
    ranker = ScorerRanker("fixed", _FixedScorer(), _catalog(), batch_size=2)
    assert isinstance(ranker, Ranker)
    lists = ranker.rank(_examples(), n=3)
    assert lists[0] == ["i1", "i2", "i3"]
    assert lists[1] == ["i2", "i3", "i4"]
    assert lists[2] == ["i5", "i7"]
    assert "i2" not in lists[3]
    big = ScorerRanker("fixed", _FixedScorer(), _catalog(), batch_size=100)
    assert big.rank(_examples(), n=3) == lists


def test_scorer_ranker_refuses_a_missing_scorer() -> None:
    with pytest.raises(DataError, match="no scorer"):
        ScorerRanker("x", None, _catalog())  # type: ignore[arg-type]


def test_validation_callback_returns_ndcg_at_10() -> None:
    callback = validation_callback(_examples(), _catalog())
    expected = (1 + 1 / math.log2(3) + 1 / math.log2(3) + 0 + 1) / 5
    assert callback(_FixedScorer()) == pytest.approx(expected)


def test_popular_items_takes_the_top_share_by_training_count() -> None:
    train = {
        "a": History.create(["i3", "i3", "i1", "i5"]),
        "b": History.create(["i3", "i5", "i5", "i6"]),
    }
    assert popular_items(train, _catalog(), share=0.25) == {"i3", "i5"}
    # ties in count (i1, i6: 1 each) are broken by catalog position
    assert popular_items(train, _catalog(), share=0.375) == {"i3", "i5", "i1"}


def test_run_evaluation_writes_a_complete_run_folder(tmp_path: Path) -> None:
    ranker = ScorerRanker("fixed", _FixedScorer(), _catalog())
    config = load_config(data=DataConfig(source="somewhere", kcore=0))
    result = run_evaluation(
        ranker,
        _examples(),
        catalog=_catalog(),
        popular={"i1"},
        run_dir=tmp_path / "run",
        config=config,
        ks=(1, 5),
        extra={"epochs": 7},
        show_progress=False,
    )
    assert result.summary()["HR@1"] == pytest.approx(2 / 5)
    assert result.summary()["HR@5"] == pytest.approx(4 / 5)
    run = tmp_path / "run"
    assert load_config(run / "config.toml") == config
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_users"] == 5
    assert metrics["epochs"] == 7
    assert metrics["split"] == "test"
    assert metrics["summary"]["HR@5"] == pytest.approx(4 / 5)
    assert metrics["users_per_s"] > 0
    recs = [json.loads(line) for line in (run / "recs.jsonl").read_text().splitlines()]
    assert [r["user_id"] for r in recs] == ["u0", "u1", "u2", "u3", "u4"]
    assert recs[2] == {"user_id": "u2", "target": "i7", "items": ["i5", "i7"]}
    assert all(len(r["items"]) <= 5 for r in recs)
    report = (run / "report.md").read_text()
    assert "| fixed | 5 |" in report


def test_load_run_recomputes_the_per_user_metrics_of_a_run_folder(tmp_path: Path) -> None:
    from recgen.evaluate import load_run

    ranker = ScorerRanker("fixed", _FixedScorer(), _catalog())
    result = run_evaluation(ranker, _examples(), catalog=_catalog(), popular={"i1"},
                            run_dir=tmp_path / "run", show_progress=False)  # fmt: skip
    loaded = load_run(tmp_path / "run", popular={"i1"})
    assert loaded.name == "fixed"
    assert loaded.user_ids == result.user_ids
    assert loaded.summary() == pytest.approx(result.summary())
    assert "(baseline)" in compare([result, loaded], baseline="fixed")
    recs = tmp_path / "run" / "recs.jsonl"
    recs.write_text(recs.read_text() + '{"user_id": "u9", "items": []}\n')
    with pytest.raises(DataError, match=r"recs.jsonl:6: .*target"):
        load_run(tmp_path / "run")
    with pytest.raises(DataError, match=r"metrics\.json does not exist"):
        load_run(tmp_path / "nowhere")


def test_run_evaluation_accepts_a_plain_dict_config(tmp_path: Path) -> None:
    ranker = ScorerRanker("fixed", _FixedScorer(), _catalog())
    cfg = {"data": {"source": "ml-100k", "seed": 3}, "note": "x"}
    run_evaluation(
        ranker, _examples(), catalog=_catalog(), run_dir=tmp_path, config=cfg, show_progress=False
    )
    assert tomllib.loads((tmp_path / "config.toml").read_text()) == cfg


def test_run_evaluation_without_examples_raises() -> None:
    ranker = ScorerRanker("fixed", _FixedScorer(), _catalog())
    with pytest.raises(DataError, match="no examples"):
        run_evaluation(ranker, [], catalog=_catalog(), show_progress=False)


def test_compare_reports_differences_and_checks_users() -> None:
    cat = _catalog()
    examples = _examples()
    pop = PopularityScorer().fit({"a": History.create(["i7", "i7", "i5"])}, cat)
    a = run_evaluation(
        ScorerRanker("fixed", _FixedScorer(), cat), examples, catalog=cat, show_progress=False
    )
    b = run_evaluation(
        ScorerRanker("popular", pop, cat), examples, catalog=cat, show_progress=False
    )
    table = compare([b, a], baseline="popular")
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| popular |")
    assert "(baseline)" in lines[2]
    diff = a.summary()["NDCG@10"] - b.summary()["NDCG@10"]
    assert f"{diff:+.4f}" in lines[3]
    with pytest.raises(DataError, match="not among the results"):
        compare([a], baseline="popular")
    c = run_evaluation(
        ScorerRanker("fixed2", _FixedScorer(), cat), examples[:3], catalog=cat, show_progress=False
    )
    with pytest.raises(DataError, match="different users"):
        compare([a, c], baseline="fixed")


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.slow
def test_sasrec_beats_popularity_on_ml100k_validation() -> None:
    """A short SASRec+ run on real MovieLens-100K must beat most-popular on validation."""
    if not (DATA / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real data not found at {DATA}/ml-100k (see ../shared/data/README.md)")
    data = pytest.importorskip("recgen.data")
    splits = pytest.importorskip("recgen.splits")
    from recgen.collab import SASRecScorer
    from recgen.config import SASRecConfig

    dataset = data.load_dataset(str(DATA / "ml-100k"), kcore=5)
    split = splits.leave_one_out(dataset)
    catalog = dataset.catalog
    pop = PopularityScorer().fit(split.train, catalog)
    cfg = SASRecConfig(max_epochs=15, patience=15)
    sas = SASRecScorer().fit(split.train, catalog, cfg, show_progress=False)
    results = [
        run_evaluation(ScorerRanker(name, s, catalog), split.valid, catalog=catalog,
                       split="valid", show_progress=False)
        for name, s in (("popular", pop), ("sasrec", sas))
    ]  # fmt: skip
    assert results[1].summary()["NDCG@10"] > results[0].summary()["NDCG@10"]
    assert results[1].summary()["COV@20"] > results[0].summary()["COV@20"]


def test_list_ranker_cuts_precomputed_lists_and_names_missing_users() -> None:
    from recgen.evaluate import ListRanker
    from recgen.types import Example, History

    ranker = ListRanker("pre", {"u1": ["a", "b", "c"]})
    ex = Example(user_id="u1", history=History.create(["x"]), target="b")
    assert ranker.rank([ex], n=2) == [["a", "b"]]
    other = Example(user_id="u2", history=History.create(["x"]), target="b")
    with pytest.raises(DataError, match="no list for users \\['u2'\\]"):
        ranker.rank([other], n=2)


def test_cached_scorer_fits_once_then_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recgen.config import CollabConfig
    from recgen.evaluate import cached_scorer
    from recgen.types import Catalog, Example, History, Item, Split

    monkeypatch.setenv("RECGEN_CACHE", str(tmp_path))
    catalog = Catalog(items=tuple(Item(item_id=str(i), title=f"T{i}") for i in range(4)))
    train = {"u": History.create(["0", "1", "1"])}
    valid = (Example(user_id="u", history=train["u"], target="2"),)
    split = Split(protocol="leave-one-out", train=train, valid=valid, test=valid, seed=0)
    first = cached_scorer(CollabConfig(method="popular"), split=split, catalog=catalog)
    assert list((tmp_path / "collab").iterdir()), "the fitted scorer was not cached"
    again = cached_scorer(CollabConfig(method="popular"), split=split, catalog=catalog)
    assert again is not first
    assert np.array_equal(again.score([train["u"]]), first.score([train["u"]]))


def test_cached_ensemble_caches_and_reuses_its_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recgen.collab import EnsembleScorer
    from recgen.config import CollabConfig, EnsembleConfig
    from recgen.evaluate import cached_scorer
    from recgen.types import Catalog, Example, History, Item, Split

    monkeypatch.setenv("RECGEN_CACHE", str(tmp_path))
    catalog = Catalog(items=tuple(Item(item_id=str(i), title=f"T{i}") for i in range(10)))
    train = {f"u{u}": History.create([str((u + t) % 10) for t in range(4)]) for u in range(20)}
    valid = tuple(
        Example(user_id=u, history=h, target=str((int(h.item_ids[-1]) + 1) % 10))
        for u, h in train.items()
    )
    split = Split(protocol="leave-one-out", train=train, valid=valid, test=valid, seed=0)
    config = CollabConfig(
        method="ensemble", ensemble=EnsembleConfig(members=("popular", "transitions"))
    )
    scorer = cached_scorer(config, split=split, catalog=catalog)
    assert isinstance(scorer, EnsembleScorer)
    assert scorer.weights[1] > 0  # popularity is flat on a cycle; transitions predict it
    kinds = sorted(p.name.split("-")[0] for p in (tmp_path / "collab").iterdir())
    assert kinds == ["ensemble", "popular", "transitions"]
    alone = cached_scorer(CollabConfig(method="transitions"), split=split, catalog=catalog)
    assert len(list((tmp_path / "collab").iterdir())) == 3  # reused, not refitted
    h = [train["u0"]]
    assert np.allclose(alone.score(h), scorer.members[1].score(h))
    again = cached_scorer(config, split=split, catalog=catalog)
    assert isinstance(again, EnsembleScorer)
    assert again.weights == scorer.weights


def test_item_scorers_fuse_better_than_alone_on_ml100k_test() -> None:
    """EASE + transitions, weights tuned on validation, must beat each on the test split."""
    if not (DATA / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real data not found at {DATA}/ml-100k (see ../shared/data/README.md)")
    from recgen import data, splits
    from recgen.collab import EASEScorer, TransitionScorer, ensemble
    from recgen.config import EnsembleConfig
    from recgen.evaluate import validation_callback

    dataset = data.load_dataset(str(DATA / "ml-100k"), kcore=5)
    split = splits.leave_one_out(dataset)
    catalog = dataset.catalog
    members = [TransitionScorer().fit(split.train, catalog), EASEScorer().fit(split.train, catalog)]
    fused = ensemble(members, EnsembleConfig(members=("transitions", "ease")), catalog=catalog,
                     validate=validation_callback(split.valid, catalog))  # fmt: skip
    ndcg = {
        s.name: run_evaluation(ScorerRanker(s.name, s, catalog), split.test, catalog=catalog,
                               show_progress=False).summary()["NDCG@10"]
        for s in (*members, fused)
    }  # fmt: skip
    assert fused.weights[1] > 0
    assert ndcg["ensemble"] > max(ndcg["transitions"], ndcg["ease"]), ndcg
