"""Tests for recgen.splits: leave-one-out, the temporal split, and that nothing leaks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recgen.config import DataConfig
from recgen.data import load_dataset
from recgen.errors import ConfigError, DataError
from recgen.splits import (
    leave_one_out,
    sampled_candidates,
    split_dataset,
    temporal_split,
    with_candidates,
)
from recgen.types import Catalog, Event, Example, History, Item, LoadReport, RecDataset, Split

GENERIC = Path(__file__).resolve().parent / "data" / "generic"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def fixture_data() -> RecDataset:
    return load_dataset(GENERIC)


@pytest.fixture(scope="module")
def movielens() -> RecDataset:
    if not (SHARED / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real data not found at {SHARED}/ml-100k (see ../shared/data/README.md)")
    return load_dataset(SHARED / "ml-100k", kcore=5)


def _dataset(histories: Mapping[str, list[tuple[str, float]]]) -> RecDataset:
    """A RecDataset from user -> [(item_id, time)], already in time order."""
    ids = sorted({i for events in histories.values() for i, _ in events})
    return RecDataset(
        name="made",
        catalog=Catalog(items=tuple(Item(item_id=i, title=f"Item {i}") for i in ids)),
        histories={
            u: History(events=tuple(Event(item_id=i, timestamp=t) for i, t in events), user_id=u)
            for u, events in histories.items()
        },
        has_timestamps=True,
        report=LoadReport(
            source="test", n_users=len(histories), n_items=len(ids), n_interactions=0
        ),
    )


# --------------------------------------------------------------------------- leave-one-out


def _check_leave_one_out(dataset: RecDataset, split: Split) -> None:
    """Each evaluated user: train = all but the last two events; nothing held out leaks."""
    valid = {ex.user_id: ex for ex in split.valid}
    test = {ex.user_id: ex for ex in split.test}
    assert valid.keys() == test.keys()
    for user, history in dataset.histories.items():
        events = history.events
        if user not in test:
            assert len(events) < 3
            continue
        assert split.train[user].events == events[:-2]
        assert valid[user].history.events == events[:-2]
        assert valid[user].target == events[-2].item_id
        assert test[user].history.events == events[:-1]
        assert test[user].target == events[-1].item_id
    counts = Counter(e.item_id for h in split.train.values() for e in h.events)
    total = sum(len(h) for h in dataset.histories.values())
    assert sum(counts.values()) == total - 2 * len(test), "held-out events are counted in train"


def test_leave_one_out_on_the_fixture(fixture_data: RecDataset) -> None:
    split = leave_one_out(fixture_data, seed=4)
    _check_leave_one_out(fixture_data, split)
    assert (split.protocol, split.seed) == ("leave-one-out", 4)
    assert "dave" not in {ex.user_id for ex in split.test}  # two events only
    assert split.train["dave"] == fixture_data.histories["dave"]
    assert split.info["short_users"] == 1
    assert len(split.test) == len(fixture_data.histories) - 1


def test_leave_one_out_on_movielens(movielens: RecDataset) -> None:
    split = leave_one_out(movielens)
    _check_leave_one_out(movielens, split)
    assert len(split.test) == len(split.valid) == 943


def test_leave_one_out_follows_the_loader_tie_break() -> None:
    """When the last two events tie in time, the loader's seed decides which one is test."""
    targets = {leave_one_out(load_dataset(GENERIC, seed=s)).test for s in range(10)}
    erin = {next(ex.target for ex in t if ex.user_id == "erin") for t in targets}
    assert erin == {"43"}  # erin's last event is not tied: always the same
    alice_valid = {
        next(ex.history.item_ids for ex in leave_one_out(load_dataset(GENERIC, seed=s)).valid if ex.user_id == "alice")
        for s in range(10)
    }  # fmt: skip
    assert len(alice_valid) == 2  # alice's tied pair (34, 35) sits in the history in either order


# --------------------------------------------------------------------------- temporal


def _check_temporal(dataset: RecDataset, split: Split, max_history: int) -> None:
    """Train < valid < test in time, with every cut strictly between periods."""
    info = {**split.info}
    if info["train_end"] is None:
        assert not split.train
        info["train_end"] = float("-inf")
    train_times = [e.timestamp for h in split.train.values() for e in h.events]
    valid_times = [_target_time(dataset, ex) for ex in split.valid]
    test_times = [_target_time(dataset, ex) for ex in split.test]
    assert all(t <= info["train_end"] for t in train_times)  # type: ignore[operator]
    if valid_times:
        assert info["train_end"] < info["valid_start"] == min(valid_times)  # type: ignore[operator]
        assert max(valid_times) == info["valid_end"]
    if test_times:
        assert info["valid_end"] is None or info["valid_end"] < info["test_start"]  # type: ignore[operator]
        assert min(test_times) == info["test_start"]
        assert info["train_end"] < info["test_start"]  # type: ignore[operator]
    assert valid_times == sorted(valid_times)
    assert test_times == sorted(test_times)
    for user, history in dataset.histories.items():
        before = tuple(e for e in history.events if e.timestamp <= info["train_end"])  # type: ignore[operator]
        assert split.train.get(user, History(events=())).events == before
    for ex in (*split.valid, *split.test):
        assert 1 <= len(ex.history) <= max_history
        target_time = _target_time(dataset, ex)
        assert all(e.timestamp <= target_time for e in ex.history.events)  # type: ignore[operator]


def _target_time(dataset: RecDataset, ex: Example) -> float:
    """The time of ex's target: the event right after its history in the user's sequence."""
    events = dataset.histories[ex.user_id].events
    end = next(
        k + len(ex.history)
        for k in range(len(events))
        if events[k : k + len(ex.history)] == ex.history.events
        and k + len(ex.history) < len(events)
        and events[k + len(ex.history)].item_id == ex.target
    )
    return events[end].timestamp  # type: ignore[return-value]


def test_temporal_split_on_the_fixture(fixture_data: RecDataset) -> None:
    split = temporal_split(fixture_data, max_history=3)
    _check_temporal(fixture_data, split, 3)
    n_examples = sum(len(h) - 1 for h in fixture_data.histories.values())
    assert len(split.valid) + len(split.test) + split.info["n_examples"][0] == n_examples  # type: ignore[index]
    assert split.protocol == "temporal"


def test_temporal_split_on_movielens(movielens: RecDataset) -> None:
    split = temporal_split(movielens, max_history=10)
    info = split.info
    train_times = [e.timestamp for h in split.train.values() for e in h.events]
    assert max(train_times) <= info["train_end"] < info["valid_start"]  # type: ignore[operator]
    valid_times = {ex.user_id: ex for ex in split.valid}
    assert valid_times
    assert info["valid_end"] < info["test_start"]  # type: ignore[operator]
    n = sum(info["n_examples"])  # type: ignore[arg-type]
    assert n == sum(len(h) - 1 for h in movielens.histories.values())
    assert abs(info["n_examples"][0] / n - 0.8) < 0.01  # type: ignore[index]
    assert all(1 <= len(ex.history) <= 10 for ex in (*split.valid, *split.test))
    for ex in split.test[::50]:  # histories are the events right before the target
        assert _target_time(movielens, ex) >= info["test_start"]  # type: ignore[operator]


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["u1", "u2", "u3", "u4"]),
        st.lists(st.integers(0, 6), min_size=1, max_size=8).map(sorted),
        min_size=1,
    ),
    st.integers(1, 4),
    st.integers(0, 3),
)
def test_temporal_never_leaks_with_many_ties(
    times: dict[str, list[int]], max_history: int, seed: int
) -> None:
    dataset = _dataset(
        {u: [(f"{u}-{k}", float(t)) for k, t in enumerate(ts)] for u, ts in times.items()}
    )
    split = temporal_split(dataset, max_history=max_history, seed=seed)
    _check_temporal(dataset, split, max_history)


def test_temporal_ties_are_broken_by_the_seed() -> None:
    dataset = _dataset({u: [(f"{u}-a", 1.0), (f"{u}-b", 2.0)] for u in "pqrstuvw"})
    orders = {temporal_split(dataset, ratios=(0, 0, 1), seed=s).test for s in range(6)}
    assert temporal_split(dataset, ratios=(0, 0, 1), seed=2).test in orders
    assert len(orders) > 1
    targets = [tuple(ex.target for ex in order) for order in orders]
    assert any(list(t) != sorted(t) for t in targets), "ties look sorted by item id"
    same = temporal_split(dataset, ratios=(0, 0, 1), seed=5)
    assert same == temporal_split(dataset, ratios=(0, 0, 1), seed=5)


def test_temporal_refuses_sequence_positions_and_bad_ratios(fixture_data: RecDataset) -> None:
    positions = RecDataset(
        name="seq",
        catalog=fixture_data.catalog,
        histories=fixture_data.histories,
        has_timestamps=False,
        report=fixture_data.report,
    )
    with pytest.raises(DataError, match="use protocol='leave-one-out'"):
        temporal_split(positions)
    with pytest.raises(ConfigError, match="ratios"):
        temporal_split(fixture_data, ratios=(8, -1, 1))
    with pytest.raises(ConfigError, match="max_history"):
        temporal_split(fixture_data, max_history=0)


# --------------------------------------------------------------------------- dispatch and candidates


def test_split_dataset_dispatches_on_the_protocol(fixture_data: RecDataset) -> None:
    loo = split_dataset(fixture_data, DataConfig(source="x", seed=2))
    assert loo == leave_one_out(fixture_data, seed=2)
    config = DataConfig(source="x", protocol="temporal", max_history=2, seed=1)
    assert split_dataset(fixture_data, config) == temporal_split(
        fixture_data, max_history=2, seed=1
    )


def test_with_candidates_attaches_copies(fixture_data: RecDataset) -> None:
    test = leave_one_out(fixture_data).test
    lists = {ex.user_id: [ex.target, "1", "2"] for ex in test}
    out = with_candidates(test, lists)
    assert [ex.candidates for ex in out] == [tuple(lists[ex.user_id]) for ex in test]
    assert all(ex.candidates is None for ex in test)
    assert [(ex.user_id, ex.target, ex.history) for ex in out] == [
        (ex.user_id, ex.target, ex.history) for ex in test
    ]
    with pytest.raises(DataError, match="no candidate list for user 'alice'"):
        with_candidates(test, {k: v for k, v in lists.items() if k != "alice"})


def test_sampled_candidates_hide_the_target_among_unseen_items(fixture_data: RecDataset) -> None:
    test = leave_one_out(fixture_data).test
    ids = fixture_data.catalog.item_ids
    out = sampled_candidates(test, ids, n_negatives=9, seed=3)
    positions = set()
    for ex, orig in zip(out, test, strict=True):
        assert (ex.user_id, ex.target, ex.history) == (orig.user_id, orig.target, orig.history)
        assert ex.candidates is not None
        assert len(set(ex.candidates)) == 10
        assert ex.candidates.count(ex.target) == 1
        assert not set(ex.candidates) & set(ex.history.item_ids)  # never an item the user saw
        assert set(ex.candidates) <= set(ids)
        positions.add(ex.candidates.index(ex.target))
    assert len(positions) > 1  # shuffled: the target's place is not fixed
    # The same lists on every call, and a user's list does not depend on who else is evaluated.
    assert sampled_candidates(test, ids, n_negatives=9, seed=3) == out
    alone = sampled_candidates(test[-1:], ids, n_negatives=9, seed=3)
    assert alone[0].candidates == out[-1].candidates
    assert sampled_candidates(test, ids, n_negatives=9, seed=4) != out
    with pytest.raises(DataError, match=r"fewer than n_negatives=60; lower n_negatives"):
        sampled_candidates(test, ids, n_negatives=60)
