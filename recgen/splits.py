"""Evaluation protocols over a RecDataset: leave-one-out and the global temporal split.

* ``leave_one_out``: per user, the last event is the test target and the second to last the
  validation target (each with every earlier event as history); the rest is training data.
* ``temporal_split`` (BIGRec/D3): every prefix of every history is an example (at most
  ``max_history`` items before the target), sorted by the target's time and cut 8:1:1, so
  training never sees an event at or after the first validation time.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence

from recgen.config import DataConfig
from recgen.errors import ConfigError, DataError
from recgen.types import Example, History, RecDataset, Split

__all__ = [
    "leave_one_out",
    "sampled_candidates",
    "split_dataset",
    "temporal_split",
    "with_candidates",
]

_log = logging.getLogger(__name__)

_MIN_EVENTS = 3


def leave_one_out(dataset: RecDataset, *, seed: int = 0) -> Split:
    """Hold out each user's last event for test and second to last for validation.

    Args:
        dataset: The loaded data; histories are already in time order (ties shuffled with the
            loader's seed).
        seed: Recorded in the split (leave-one-out itself draws nothing at random).

    Returns:
        A split whose ``train[user]`` is the history without its last two events, ``valid`` one
        example per user (target: second to last event) and ``test`` one per user (target: last
        event, history including the validation target). Users with fewer than 3 events go to
        ``train`` whole and are counted in ``info["short_users"]``.
    """
    train: dict[str, History] = {}
    valid: list[Example] = []
    test: list[Example] = []
    short = 0
    for user, history in dataset.histories.items():
        if len(history) < _MIN_EVENTS:
            short += 1
            if len(history):
                train[user] = history
            continue
        n = len(history)
        train[user] = history.head(n - 2)
        valid.append(
            Example(user_id=user, history=history.head(n - 2), target=history.events[-2].item_id)
        )
        test.append(
            Example(user_id=user, history=history.head(n - 1), target=history.events[-1].item_id)
        )
    if short:
        _log.info(
            "leave-one-out: %d users with fewer than %d events only in train", short, _MIN_EVENTS
        )
    info = {
        "dataset": dataset.name,
        "n_users": len(test),
        "short_users": short,
        "min_events": _MIN_EVENTS,
    }
    return Split(
        protocol="leave-one-out",
        train=train,
        valid=tuple(valid),
        test=tuple(test),
        seed=seed,
        info=info,
    )


def temporal_split(
    dataset: RecDataset,
    *,
    max_history: int = 10,
    ratios: tuple[float, float, float] = (8, 1, 1),
    seed: int = 0,
) -> Split:
    """The BIGRec/D3 protocol: every prefix as an example, cut by the target's time.

    Examples are sorted by target time (ties in a shuffle seeded with ``seed``) and cut by
    ``ratios``; each cut moves forward past any examples sharing the boundary time, so that
    every training time is strictly earlier than every validation time, and so on.

    Args:
        dataset: Loaded data with real timestamps.
        max_history: At most this many events before the target form an example's history.
        ratios: Relative sizes of train, valid and test.
        seed: Seed of the tie-breaking shuffle.

    Returns:
        A split whose ``train[user]`` holds the user's events up to the train cut time,
        ``valid``/``test`` the examples whose targets fall in the later periods, and ``info``
        the cut times (``train_end``, ``valid_start``, ``valid_end``, ``test_start``; None for
        an empty period).

    Raises:
        DataError: if the data set only has sequence positions instead of times.
        ConfigError: for bad ``ratios`` or ``max_history``.
    """
    if not dataset.has_timestamps:
        raise DataError(
            f"data set {dataset.name!r} has no real timestamps (only sequence positions), so a "
            "temporal split is meaningless; use protocol='leave-one-out'"
        )
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0 or max_history < 1:
        raise ConfigError(
            f"temporal_split needs three non-negative ratios with a positive sum and "
            f"max_history >= 1 (got ratios={ratios!r}, max_history={max_history})"
        )
    keyed = _examples(dataset, max_history, seed)
    times = [t for t, _, _ in keyed]
    total = sum(ratios)
    a = _cut(times, round(len(keyed) * ratios[0] / total))
    b = _cut(times, max(a, round(len(keyed) * (ratios[0] + ratios[1]) / total)))
    train_end = times[a - 1] if a else float("-inf")
    train = {
        user: History(
            events=tuple(e for e in h.events if (e.timestamp or 0.0) <= train_end), user_id=user
        )
        for user, h in dataset.histories.items()
    }
    info = {
        "dataset": dataset.name,
        "max_history": max_history,
        "ratios": list(ratios),
        "n_examples": [a, b - a, len(keyed) - b],
        "train_end": train_end if a else None,
        "valid_start": times[a] if a < len(times) else None,
        "valid_end": times[b - 1] if b > a else None,
        "test_start": times[b] if b < len(times) else None,
    }
    return Split(
        protocol="temporal",
        train={u: h for u, h in train.items() if len(h)},
        valid=tuple(ex for _, _, ex in keyed[a:b]),
        test=tuple(ex for _, _, ex in keyed[b:]),
        seed=seed,
        info=info,
    )


def _examples(
    dataset: RecDataset, max_history: int, seed: int
) -> list[tuple[float, float, Example]]:
    """(target time, tie-break key, example) for every prefix, sorted by time then key."""
    rng = random.Random(seed)
    keyed: list[tuple[float, float, Example]] = []
    for user, history in dataset.histories.items():
        for i in range(1, len(history)):
            window = History(events=history.events[max(0, i - max_history) : i], user_id=user)
            example = Example(user_id=user, history=window, target=history.events[i].item_id)
            keyed.append((_time(history, i), rng.random(), example))
    keyed.sort(key=lambda t: t[:2])
    return keyed


def _time(history: History, i: int) -> float:
    ts = history.events[i].timestamp
    return float(i) if ts is None else ts


def _cut(times: list[float], at: int) -> int:
    """Move a cut index forward until it does not separate two equal times."""
    at = min(max(at, 0), len(times))
    while 0 < at < len(times) and times[at] == times[at - 1]:
        at += 1
    return at


def split_dataset(dataset: RecDataset, config: DataConfig) -> Split:
    """Split ``dataset`` with the protocol, history length and seed of ``config``."""
    if config.protocol == "temporal":
        return temporal_split(dataset, max_history=config.max_history, seed=config.seed)
    return leave_one_out(dataset, seed=config.seed)


def with_candidates(
    examples: Sequence[Example], candidates: Mapping[str, Sequence[str]]
) -> tuple[Example, ...]:
    """Attach a candidate list to each example (for the 20-candidate reranking protocols).

    Args:
        examples: Examples from a split.
        candidates: user_id -> candidate item ids, in the order to show them.

    Returns:
        Copies of the examples with ``candidates`` set.

    Raises:
        DataError: if an example's user has no candidate list.
    """
    out: list[Example] = []
    for ex in examples:
        if ex.user_id not in candidates:
            raise DataError(
                f"no candidate list for user {ex.user_id!r}; give candidates for every example's "
                "user_id"
            )
        out.append(
            Example(
                user_id=ex.user_id,
                history=ex.history,
                target=ex.target,
                candidates=tuple(candidates[ex.user_id]),
            )
        )
    return tuple(out)


def sampled_candidates(
    examples: Sequence[Example], item_ids: Sequence[str], *, n_negatives: int, seed: int = 0
) -> tuple[Example, ...]:
    """The sampled-candidates protocol of TALLRec and LLaRA: each example's target among
    ``n_negatives`` items drawn uniformly from those its user never interacted with, shuffled.

    Sampled metrics are not full-ranking metrics (Krichene & Rendle, 2020): they measure how
    well a model tells the held-out item from random ones, which is what a candidate-scoring
    LLM can be compared on; report them beside, never instead of, full-ranking results. Each
    user's list depends only on ``seed``, the user id and the catalog, so every method and
    every run sees the same lists.

    Args:
        examples: Examples from a split.
        item_ids: The catalog's item ids (negatives are drawn from these).
        n_negatives: Negatives per list.
        seed: Seed of the draw.

    Raises:
        DataError: if a user has fewer than ``n_negatives`` unseen items.
    """
    pool = sorted(item_ids)
    lists: dict[str, list[str]] = {}
    for ex in examples:
        seen = {*ex.history.item_ids, ex.target}
        unseen = [i for i in pool if i not in seen]
        if len(unseen) < n_negatives:
            raise DataError(
                f"user {ex.user_id!r} has {len(unseen)} unseen items, fewer than "
                f"n_negatives={n_negatives}; lower n_negatives"
            )
        rng = random.Random(f"{seed}:{ex.user_id}")
        cands = [*rng.sample(unseen, n_negatives), ex.target]
        rng.shuffle(cands)
        lists[ex.user_id] = cands
    return with_candidates(examples, lists)
