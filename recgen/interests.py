"""Interests: a time-ordered History and the Catalog -> InterestState (profiles, drift, ratings, time).

``build_interest_state`` summarises a whole history; ``InterestTracker`` keeps the same summary
up to date one event at a time (``observe`` costs O(labels of the item)) and its ``state()`` is
exactly what a rebuild from scratch gives, because the rebuild runs the same tracker.

Definitions (all weights are shares of the profile's total, so they sum to at most 1):

* An item's labels are its attribute values that are tuples of labels (genres, categories) or
  short string labels (brand); descriptions, years and numbers are skipped.
* Each event spreads its weight evenly over its item's labels. The long-term weight of an event
  halves every ``half_life`` interactions back from the newest; when the user's ratings are
  usable (all non-negative, positive mean), a rated event's weight is also scaled by
  ``rating / mean rating``, so liked items count more.
* The recent profile is the same without the recency decay, over the last ``recent_window``
  events. A label is rising (fading) when its recent share exceeds (falls short of) its
  long-term share by more than ``drift_threshold``; there is no drift while the whole history
  fits in the window.
* Liked (disliked) items are the ``recent_window`` most recently rated items whose newest rating
  is at least ``like_margin`` above (below) the user's mean rating (strictly above / below the
  mean when the margin is 0), newest first; the mean is over all rated events.
* Time context (only with ``real_time=True`` and events that carry timestamps, read as UTC unix
  seconds): the median gap between interactions, the gap before the latest one, and a weekday or
  time-of-day pattern when it is clear over at least ``_MIN_ACTIVE_DAYS`` active days.
* ``config.summary`` (the dynamic-interest ablation) decides what the state keeps: ``full``
  all of the above; ``static`` drops the recent profile and the drift (rising, fading) and keeps
  the long-term profile, recent items, liked and disliked items and time context; ``none`` keeps
  the recent items and the event count only (so recent items carry no liked/disliked note). The
  variant applies to the state itself, so prompts, fine-tuning examples and the explanations
  derived from the state can none of them use what it hides.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from itertools import islice

from recgen.config import InterestConfig
from recgen.errors import DataError
from recgen.types import Catalog, Event, History, InterestState, Item

__all__ = ["InterestTracker", "build_interest_state", "item_labels"]

_log = logging.getLogger(__name__)

_RESCALE_BELOW = 1e-150
"""When the running scale falls below this, fold it into the stored weights (rare, O(labels))."""
_DAY = 86_400.0
_MIN_ACTIVE_DAYS = 5
_PATTERN_SHARE = 0.6
_PARTS = ("at night", "in the morning", "in the afternoon", "in the evening")


def item_labels(item: Item) -> tuple[str, ...]:
    """The profile labels of ``item`` (:attr:`recgen.types.Item.labels`).

    Args:
        item: A catalog item.

    Returns:
        Distinct labels in attribute order, whitespace collapsed.
    """
    return item.labels


class _RunningMedian:
    """Exact running median of a growing multiset (two heaps, O(log n) per value)."""

    def __init__(self) -> None:
        self._low: list[float] = []  # max-heap of the lower half, negated
        self._high: list[float] = []

    def add(self, value: float) -> None:
        if self._low and value > -self._low[0]:
            heapq.heappush(self._high, value)
        else:
            heapq.heappush(self._low, -value)
        if len(self._low) > len(self._high) + 1:
            heapq.heappush(self._high, -heapq.heappop(self._low))
        elif len(self._high) > len(self._low):
            heapq.heappush(self._low, -heapq.heappop(self._high))

    def median(self) -> float | None:
        if not self._low:
            return None
        if len(self._low) > len(self._high):
            return -self._low[0]
        return (-self._low[0] + self._high[0]) / 2


class _TimeStats:
    """Gaps and weekday/time-of-day activity over the timestamped events."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.last_gap: float | None = None
        self.gaps = _RunningMedian()
        self.days: set[int] = set()
        self.weekend_days = 0
        self.day_parts: set[tuple[int, int]] = set()
        self.part_counts = [0, 0, 0, 0]

    def add(self, ts: float) -> None:
        if self.last is not None:
            self.last_gap = max(ts - self.last, 0.0)
            self.gaps.add(self.last_gap)
        self.last = ts
        when = datetime.fromtimestamp(ts, UTC)
        day = math.floor(ts / _DAY)
        if day not in self.days:
            self.days.add(day)
            self.weekend_days += when.weekday() >= 5
        part = when.hour // 6
        if (day, part) not in self.day_parts:
            self.day_parts.add((day, part))
            self.part_counts[part] += 1

    def facts(self) -> tuple[str, ...]:
        facts: list[str] = []
        median = self.gaps.median()
        if median is not None and self.last_gap is not None:
            facts.append(f"median gap {_span(median)}")
            facts.append(f"last gap {_span(self.last_gap)}")
        n_days = len(self.days)
        if n_days >= _MIN_ACTIVE_DAYS:
            if self.weekend_days / n_days >= _PATTERN_SHARE:
                facts.append("mostly active on weekends")
            elif self.weekend_days == 0:
                facts.append("active only on weekdays")
            top = max(range(4), key=lambda p: (self.part_counts[p], -p))
            if self.part_counts[top] / len(self.day_parts) >= _PATTERN_SHARE:
                facts.append(f"mostly active {_PARTS[top]} (UTC)")
        return tuple(facts)


def _span(seconds: float) -> str:
    """A short human duration: ``under an hour``, ``5 hours``, ``2.5 days``, ``40 days``."""
    if seconds < 3600:
        return "under an hour"
    if seconds < _DAY:
        hours = round(seconds / 3600)
        return f"{hours} hour" if hours == 1 else f"{hours} hours"
    days = seconds / _DAY
    return f"{days:.1f} days" if days < 10 else f"{days:.0f} days"


class InterestTracker:
    """Keeps a user's :class:`~recgen.types.InterestState` up to date, one event at a time.

    Args:
        catalog: The items events refer to.
        config: Window, half-life, number of labels, drift and like thresholds.
        user_id: Whose events these are (copied into the state).
        real_time: Whether timestamps are real unix times (else no time context).

    Example::

        tracker = InterestTracker(catalog, InterestConfig(), user_id="42")
        for event in history.events:
            tracker.observe(event)
        assert tracker.state() == build_interest_state(history, catalog, InterestConfig())
    """

    def __init__(
        self,
        catalog: Catalog,
        config: InterestConfig,
        *,
        user_id: str | None = None,
        real_time: bool = True,
    ) -> None:
        self.catalog = catalog
        self.config = config
        self.user_id = user_id
        self.real_time = real_time
        self._decay = 0.5 ** (1.0 / config.half_life)
        self._scale = 1.0
        self._n = 0
        # label -> [unrated weight, rated weight, rated weight * rating], in units of _scale
        self._raw: dict[str, list[float]] = {}
        self._recent: deque[Event] = deque(maxlen=config.recent_window)
        self._rating_sum = 0.0
        self._n_rated = 0
        self._min_rating = math.inf
        self._latest_rating: dict[str, float] = {}  # item -> its newest rating
        self._by_rating: dict[
            float, dict[str, int]
        ] = {}  # rating -> {item: position}, oldest first
        self._labels: dict[str, tuple[str, ...]] = {}
        self._time = _TimeStats()

    def __len__(self) -> int:
        return self._n

    def observe(self, event: Event) -> None:
        """Add the user's next (newest) interaction.

        Raises:
            DataError: if the item is not in the catalog, or the rating or timestamp is not a
                finite number.
        """
        labels = self._item_labels(event)
        if self._n:
            self._scale *= self._decay
            if self._scale < _RESCALE_BELOW:
                self._rescale()
        self._n += 1
        self._recent.append(event)
        self._add_labels(labels, event.rating)
        if event.rating is not None:
            self._rating_sum += event.rating
            self._n_rated += 1
            self._min_rating = min(self._min_rating, event.rating)
            previous = self._latest_rating.get(event.item_id)
            if previous is not None:
                del self._by_rating[previous][event.item_id]
            self._latest_rating[event.item_id] = event.rating
            self._by_rating.setdefault(event.rating, {})[event.item_id] = self._n
        if self.real_time and event.timestamp is not None:
            self._time.add(event.timestamp)

    def update(self, events: Iterable[Event]) -> None:
        """Observe several events, oldest first."""
        for event in events:
            self.observe(event)

    def state(self) -> InterestState:
        """The interest state of everything observed so far (the tracker is not changed)."""
        mean = self._rating_sum / self._n_rated if self._n_rated else None
        usable = mean is not None and mean > 0 and self._min_rating >= 0
        long_weights = {
            label: self._scale * (u + (r_weighted / mean if usable and mean else r))
            for label, (u, r, r_weighted) in self._raw.items()
        }
        long_shares = _shares(long_weights)
        recent_shares = _shares(self._recent_weights(mean if usable else None))
        k = self.config.top_labels
        rising: tuple[str, ...] = ()
        fading: tuple[str, ...] = ()
        if self._n > self.config.recent_window:
            rising = _drift(recent_shares, long_shares, self.config.drift_threshold, k)
            fading = _drift(long_shares, recent_shares, self.config.drift_threshold, k)
        liked, disliked = self._rated_extremes(mean)
        state = InterestState(
            user_id=self.user_id,
            n_events=self._n,
            long_term=_top(long_shares, k),
            recent_profile=_top(recent_shares, k),
            recent=tuple(self.catalog[e.item_id] for e in self._recent),
            rising=rising,
            fading=fading,
            liked=liked,
            disliked=disliked,
            mean_rating=mean,
            time_context=self._time.facts() if self.real_time else (),
        )
        return _restrict(state, self.config.summary)

    # ------------------------------------------------------------------ internals

    def _item_labels(self, event: Event) -> tuple[str, ...]:
        item_id = event.item_id
        if item_id not in self.catalog:
            raise DataError(
                f"user {self.user_id!r}: history item_id {item_id!r} (event {self._n}) is not in "
                f"catalog {self.catalog.name!r}; drop it or load the matching catalog"
            )
        for name, value in (("rating", event.rating), ("timestamp", event.timestamp)):
            if value is not None and not math.isfinite(value):
                raise DataError(
                    f"user {self.user_id!r}: event {self._n} (item {item_id!r}) has {name} "
                    f"{value!r}; use a finite number or None"
                )
        labels = self._labels.get(item_id)
        if labels is None:
            labels = self._labels[item_id] = item_labels(self.catalog[item_id])
        return labels

    def _add_labels(self, labels: tuple[str, ...], rating: float | None) -> None:
        """Spread the newest event's weight (1 now, in units of the running scale)."""
        if not labels:
            return
        share = 1.0 / (len(labels) * self._scale)
        for label in labels:
            acc = self._raw.setdefault(label, [0.0, 0.0, 0.0])
            if rating is None:
                acc[0] += share
            else:
                acc[1] += share
                acc[2] += share * rating

    def _rescale(self) -> None:
        for acc in self._raw.values():
            for i in range(3):
                acc[i] *= self._scale
        self._scale = 1.0

    def _recent_weights(self, mean: float | None) -> dict[str, float]:
        weights: dict[str, float] = {}
        for event in self._recent:
            labels = self._labels[event.item_id]
            if not labels:
                continue
            factor = 1.0 if mean is None or event.rating is None else event.rating / mean
            for label in labels:
                weights[label] = weights.get(label, 0.0) + factor / len(labels)
        return weights

    def _rated_extremes(self, mean: float | None) -> tuple[tuple[Item, ...], tuple[Item, ...]]:
        if mean is None:
            return (), ()
        margin = self.config.like_margin
        liked = [r for r in self._by_rating if r > mean and r - mean >= margin]
        disliked = [r for r in self._by_rating if r < mean and mean - r >= margin]
        return self._newest_items(liked), self._newest_items(disliked)

    def _newest_items(self, ratings: list[float]) -> tuple[Item, ...]:
        """The newest ``recent_window`` items whose newest rating is one of ``ratings``."""
        k = self.config.recent_window
        entries = [
            (position, item_id)
            for rating in ratings
            for item_id, position in islice(reversed(self._by_rating[rating].items()), k)
        ]
        newest = sorted(entries, reverse=True)[:k]
        return tuple(self.catalog[item_id] for _, item_id in newest)


_DYNAMIC: dict[str, object] = {"recent_profile": (), "rising": (), "fading": ()}
"""What ``summary="static"`` blanks: the recent profile and the drift."""
_BEYOND_RECENT: dict[str, object] = {
    "long_term": (), "liked": (), "disliked": (), "mean_rating": None, "time_context": (),
}  # fmt: skip
"""What ``summary="none"`` blanks as well: all but the recent items and the event count."""


def _restrict(state: InterestState, summary: str) -> InterestState:
    """``state`` with the fields the ``summary`` variant leaves out blanked."""
    if summary == "full":
        return state
    blank = _DYNAMIC if summary == "static" else _DYNAMIC | _BEYOND_RECENT
    return dataclasses.replace(state, **blank)


def _shares(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0:
        return {}
    return {label: w / total for label, w in weights.items() if w > 0}


def _top(shares: dict[str, float], k: int) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(shares.items(), key=lambda lw: (-lw[1], lw[0]))[:k])


def _drift(
    high: dict[str, float], low: dict[str, float], threshold: float, k: int
) -> tuple[str, ...]:
    """Labels whose share in ``high`` exceeds that in ``low`` by more than ``threshold``."""
    diffs = {label: high.get(label, 0.0) - low.get(label, 0.0) for label in high.keys() | low}
    moved = [(-d, label) for label, d in diffs.items() if d > threshold]
    return tuple(label for _, label in sorted(moved)[:k])


def build_interest_state(
    history: History, catalog: Catalog, config: InterestConfig, *, real_time: bool = True
) -> InterestState:
    """Summarise a user's time-ordered history as an :class:`~recgen.types.InterestState`.

    Args:
        history: The user's interactions, oldest first.
        catalog: The items the history refers to.
        config: Window, half-life, number of labels, drift and like thresholds.
        real_time: Whether timestamps are real unix times; False (sequence positions, as in
            RecBole data) leaves the time context empty.

    Returns:
        The state after the last event; exactly what an ``InterestTracker`` that observed the
        same events returns.

    Raises:
        DataError: naming the item id, if the history refers to an item not in the catalog.
    """
    tracker = InterestTracker(catalog, config, user_id=history.user_id, real_time=real_time)
    tracker.update(history.events)
    _log.debug("interest state for user %r from %d events", history.user_id, len(history))
    return tracker.state()
