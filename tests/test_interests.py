"""Tests for recgen.interests: profiles, drift, ratings, time context, incremental == rebuild."""

from __future__ import annotations

import dataclasses
import math
import statistics
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recgen.config import InterestConfig, PromptConfig
from recgen.errors import DataError
from recgen.interests import InterestTracker, build_interest_state, item_labels
from recgen.prompting import PromptRenderer
from recgen.types import Catalog, Event, History, InterestState, Item

GENRES = ("Action", "Drama", "Comedy", "Sci-Fi", "Romance")


def _catalog() -> Catalog:
    items = [
        Item(
            item_id=f"m{i}",
            title=f"Movie {i} ({1980 + i})",
            attributes={
                "genres": (GENRES[i % 5],) if i % 3 else (GENRES[i % 5], GENRES[(i + 1) % 5]),
                "year": 1980 + i,
                "description": "A long description that is not a label at all, ever.",
            },
        )
        for i in range(20)
    ]
    items.append(Item(item_id="bare", title="No Attributes"))
    items.append(
        Item(item_id="scope", title="Microscope", attributes={"brand": "Acme", "price": 9.5})
    )
    return Catalog(items=tuple(items), name="inline")


CATALOG = _catalog()
LABELLED = [f"m{i}" for i in range(20)]
FLAT = InterestConfig(half_life=1e12)  # effectively no recency decay


def _history(item_ids: list[str], ratings: list[float | None] | None = None) -> History:
    ratings = ratings or [None] * len(item_ids)
    return History(
        events=tuple(Event(item_id=i, rating=r) for i, r in zip(item_ids, ratings, strict=True)),
        user_id="u",
    )


def _ids(items: tuple[Item, ...]) -> list[str]:
    return [item.item_id for item in items]


# --------------------------------------------------------------------------- labels and profiles


def test_item_labels_keep_label_attributes_and_skip_text_and_numbers() -> None:
    item = Item(
        item_id="x",
        title="X",
        attributes={
            "genres": ("Drama", " Film-Noir ", "Drama", ""),
            "brand": "Acme Optics",
            "description": "Short",
            "year": 1999,
            "price": 3.5,
            "code": "1234",
            "blurb": "This string is far too long to be a label for a profile of tastes",
        },
    )
    assert item_labels(item) == ("Drama", "Film-Noir", "Acme Optics")


def test_recency_weight_halves_every_half_life_interactions() -> None:
    # m1 is Drama, m2 is Comedy (single-label items); with half_life=1 the older weighs half.
    state = build_interest_state(_history(["m1", "m2"]), CATALOG, InterestConfig(half_life=1))
    assert dict(state.long_term) == pytest.approx({"Comedy": 2 / 3, "Drama": 1 / 3})
    assert state.long_term[0][0] == "Comedy"


def test_multi_label_items_split_their_weight_and_shares_sum_to_one() -> None:
    # m0 is (Action, Drama); m4 is Romance.
    state = build_interest_state(_history(["m0", "m4"]), CATALOG, FLAT)
    assert dict(state.long_term) == pytest.approx({"Romance": 0.5, "Action": 0.25, "Drama": 0.25})
    assert sum(w for _, w in state.long_term) == pytest.approx(1.0)


def test_top_labels_keeps_the_strongest_and_weights_sum_below_one() -> None:
    history = _history(["m1", "m1", "m1", "m2", "m2", "m4", "m8"])  # Drama x3, Comedy x2, ...
    state = build_interest_state(history, CATALOG, InterestConfig(half_life=1e12, top_labels=2))
    assert [label for label, _ in state.long_term] == ["Drama", "Comedy"]
    assert sum(w for _, w in state.long_term) < 1.0


def test_ratings_scale_weights_by_rating_over_mean() -> None:
    state = build_interest_state(_history(["m1", "m2"], [5.0, 1.0]), CATALOG, FLAT)
    assert state.mean_rating == 3.0
    assert dict(state.long_term) == pytest.approx({"Drama": 5 / 6, "Comedy": 1 / 6})
    assert dict(state.recent_profile) == pytest.approx({"Drama": 5 / 6, "Comedy": 1 / 6})


def test_negative_ratings_are_not_used_as_weights() -> None:
    state = build_interest_state(_history(["m1", "m2"], [-1.0, 3.0]), CATALOG, FLAT)
    assert dict(state.long_term) == pytest.approx({"Drama": 0.5, "Comedy": 0.5})


def test_items_without_labels_and_brands() -> None:
    state = build_interest_state(_history(["bare", "scope"]), CATALOG, FLAT)
    assert state.long_term == (("Acme", 1.0),)
    assert _ids(state.recent) == ["bare", "scope"]


def test_empty_history_gives_an_empty_state() -> None:
    state = build_interest_state(History(events=()), CATALOG, InterestConfig())
    assert state.n_events == 0
    assert state.long_term == state.recent_profile == ()
    assert state.recent == state.liked == state.disliked == ()
    assert state.mean_rating is None
    assert state.time_context == ()


# --------------------------------------------------------------------------- window and drift


def test_recent_window_and_drift() -> None:
    # 20 Drama items, then 10 Comedy ones: the window is all Comedy.
    history = _history(["m1"] * 20 + ["m2"] * 10)
    state = build_interest_state(history, CATALOG, InterestConfig(half_life=1e12))
    assert _ids(state.recent) == ["m2"] * 10
    assert state.recent_profile == (("Comedy", 1.0),)
    assert state.rising == ("Comedy",)
    assert state.fading == ("Drama",)
    assert dict(state.long_term) == pytest.approx({"Drama": 2 / 3, "Comedy": 1 / 3})


def test_no_drift_below_threshold_or_while_history_fits_the_window() -> None:
    short = build_interest_state(_history(["m1", "m2", "m2"]), CATALOG, InterestConfig())
    assert short.rising == short.fading == ()
    # window share of Comedy 0.5 vs long-term 5/12: difference 0.083 < 0.10
    balanced = _history(["m1"] * 7 + ["m2"] * 5 + ["m1"] * 5 + ["m2"] * 5)
    state = build_interest_state(balanced, CATALOG, InterestConfig(half_life=1e12))
    assert state.rising == state.fading == ()


# --------------------------------------------------------------------------- ratings


def test_liked_and_disliked_relative_to_the_mean_newest_first() -> None:
    ids = ["m1", "m2", "m3", "m4", "m5", "m6", "m1"]
    ratings: list[float | None] = [5.0, 1.0, 4.0, 3.0, None, 2.0, 5.0]
    state = build_interest_state(_history(ids, ratings), CATALOG, InterestConfig())
    assert state.mean_rating == pytest.approx(20 / 6)
    assert _ids(state.liked) == ["m1", "m3"]  # m1 twice: once, at its newest position
    assert _ids(state.disliked) == ["m6", "m2"]


def test_liked_is_capped_at_the_window_size() -> None:
    ids = LABELLED[:16]
    ratings: list[float | None] = [5.0] * 12 + [1.0] * 4  # mean 4.0
    state = build_interest_state(_history(ids, ratings), CATALOG, InterestConfig(recent_window=4))
    assert _ids(state.liked) == ["m11", "m10", "m9", "m8"]
    assert _ids(state.disliked) == ["m15", "m14", "m13", "m12"]


def test_an_item_counts_by_its_newest_rating() -> None:
    ids = ["m1", "m2", "m1", "m3"]
    ratings: list[float | None] = [1.0, 5.0, 5.0, 1.0]  # m1 first disliked, then liked
    state = build_interest_state(_history(ids, ratings), CATALOG, InterestConfig())
    assert _ids(state.liked) == ["m1", "m2"]
    assert _ids(state.disliked) == ["m3"]


# --------------------------------------------------------------------------- time context


def _at(year: int, month: int, day: int, hour: int) -> float:
    return datetime(year, month, day, hour, tzinfo=UTC).timestamp()


def test_time_context_from_real_timestamps() -> None:
    # Saturdays at 20:00 UTC, one week apart, then a 14-day break.
    times = [_at(2024, 1, 6, 20) + 7 * 86_400 * k for k in range(6)] + [_at(2024, 2, 24, 20)]
    events = tuple(Event(item_id=f"m{k}", timestamp=t) for k, t in enumerate(times))
    facts = build_interest_state(History(events=events), CATALOG, InterestConfig()).time_context
    assert facts == (
        "median gap 7.0 days",
        "last gap 14 days",
        "mostly active on weekends",
        "mostly active in the evening (UTC)",
    )


def test_no_time_context_without_real_times() -> None:
    events = tuple(Event(item_id=f"m{k}", timestamp=float(k)) for k in range(8))
    positions = build_interest_state(
        History(events=events), CATALOG, InterestConfig(), real_time=False
    )
    assert positions.time_context == ()
    untimed = build_interest_state(_history(LABELLED[:8]), CATALOG, InterestConfig())
    assert untimed.time_context == ()


def test_short_gaps_and_no_pattern_over_few_days() -> None:
    times = [_at(2024, 3, 4, 9) + 60 * k for k in range(5)]  # five minutes on one Monday
    events = tuple(Event(item_id=f"m{k}", timestamp=t) for k, t in enumerate(times))
    facts = build_interest_state(History(events=events), CATALOG, InterestConfig()).time_context
    assert facts == (
        "median gap under an hour",
        "last gap under an hour",
    )


# --------------------------------------------------------------------------- errors


def test_unknown_item_id_names_the_id() -> None:
    with pytest.raises(DataError, match="'nope'"):
        build_interest_state(_history(["m1", "nope"]), CATALOG, InterestConfig())


@pytest.mark.parametrize("field", ["rating", "timestamp"])
def test_non_finite_numbers_are_rejected(field: str) -> None:
    event = Event(item_id="m1", **{field: math.nan})
    with pytest.raises(DataError, match=field):
        build_interest_state(History(events=(event,)), CATALOG, InterestConfig())


# --------------------------------------------------------------------------- summary variants

# Drama/Comedy for ten events, then Sci-Fi and Action: every section of the summary is present.
_DRIFTING = ["m1", "m2", "m11", "m16", "m7", "m17", "m6", "m8", "m13", "m5"]
_DRIFT_RATINGS = [5.0, 1.0, 4.0, 2.0, 5.0, 1.0, 3.0, 5.0, 1.0, 3.0]
_SECTIONS = {
    "long_term": "Long-term tastes, strongest first:",
    "recent_profile": "Recent tastes:",
    "rising": "Rising:",
    "fading": "Fading:",
    "recent": "Recent items, newest last:\n- Movie 8 (1988)",
    "notes": "- Movie 8 (1988) (liked)\n- Movie 13 (1993) (disliked)\n",
    "liked": "Also liked:",
    "disliked": "Also disliked:",
    "time_context": "Timing:",
}
_SHOWN = {
    "full": set(_SECTIONS),
    "static": set(_SECTIONS) - {"recent_profile", "rising", "fading"},
    "none": {"recent"},
}
"""Sections each variant's full (``recommend``) summary shows."""
_COMPACT = {"liked", "disliked", "time_context"}
"""Sections the compact summary of rerank prompts never shows."""


_BLANKED = {
    "full": set(),
    "static": {"recent_profile", "rising", "fading"},
    "none": {"recent_profile", "rising", "fading", "long_term", "liked", "disliked",
             "mean_rating", "time_context"},
}  # fmt: skip


def _drifting_history() -> History:
    return History(
        events=tuple(
            Event(item_id=i, rating=r, timestamp=86_400.0 * (k + 1) + 43_200.0)
            for k, (i, r) in enumerate(zip(_DRIFTING, _DRIFT_RATINGS, strict=True))
        ),
        user_id="u",
    )


def _variant_state(summary: str) -> InterestState:
    config = InterestConfig(recent_window=3, summary=summary)  # type: ignore[arg-type]
    return build_interest_state(_drifting_history(), CATALOG, config)


@pytest.mark.parametrize("summary", ["full", "static", "none"])
def test_summary_variant_blanks_exactly_its_fields(summary: str) -> None:
    full, state = _variant_state("full"), _variant_state(summary)
    for field in dataclasses.fields(InterestState):
        full_value, value = getattr(full, field.name), getattr(state, field.name)
        assert full_value not in ((), None), f"the fixture must fill {field.name}"
        blank = None if field.name == "mean_rating" else ()
        assert value == (blank if field.name in _BLANKED[summary] else full_value), field.name
    config = InterestConfig(recent_window=3, summary=summary)  # type: ignore[arg-type]
    tracker = InterestTracker(CATALOG, config, user_id="u")
    tracker.update(_drifting_history().events)
    assert tracker.state() == state


@pytest.mark.parametrize("template", ["recommend", "rerank"])
@pytest.mark.parametrize("summary", ["full", "static", "none"])
def test_summary_variant_renders_exactly_its_sections(template: str, summary: str) -> None:
    renderer = PromptRenderer(PromptConfig(template=template))
    candidates = [CATALOG["m0"], CATALOG["m9"]] if template == "rerank" else ()
    user = renderer.render(_variant_state(summary), candidates=candidates).messages[1].content
    expected = _SHOWN[summary] - (_COMPACT if template == "rerank" else set())
    shown = {name for name, text in _SECTIONS.items() if text in user}
    assert shown == expected, user
    assert "- Movie 5 (1985)\n" in user  # the newest item, never cut
    if summary == "none":
        assert "(liked)" not in user
        assert "(disliked)" not in user


# --------------------------------------------------------------------------- incremental == rebuild


def _reference_long_term(history: History, config: InterestConfig) -> dict[str, float]:
    """The long-term shares computed directly from the definition (no running scale)."""
    rated = [e.rating for e in history.events if e.rating is not None]
    mean = sum(rated) / len(rated) if rated else None
    usable = mean is not None and mean > 0 and min(rated) >= 0
    n = len(history)
    weights: dict[str, float] = {}
    for i, e in enumerate(history.events):
        labels = item_labels(CATALOG[e.item_id])
        w = 0.5 ** ((n - 1 - i) / config.half_life)
        if usable and e.rating is not None and mean:
            w *= e.rating / mean
        for label in labels:
            weights[label] = weights.get(label, 0.0) + w / len(labels)
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items() if v > 0} if total > 0 else {}


_events = st.lists(
    st.builds(
        Event,
        item_id=st.sampled_from([*LABELLED, "bare", "scope"]),
        timestamp=st.one_of(st.none(), st.floats(1e9, 1.1e9)),
        rating=st.one_of(st.none(), st.sampled_from([1.0, 2.0, 3.0, 3.5, 4.0, 5.0])),
    ),
    max_size=60,
)
_configs = st.builds(
    InterestConfig,
    recent_window=st.integers(1, 12),
    half_life=st.sampled_from([0.05, 1.0, 7.5, 50.0]),
    top_labels=st.integers(1, 6),
    drift_threshold=st.sampled_from([0.0, 0.1, 0.3]),
    like_margin=st.sampled_from([0.0, 0.5, 1.0]),
)


@settings(max_examples=150, deadline=None)
@given(events=_events, config=_configs, real_time=st.booleans())
def test_tracker_state_equals_rebuild_after_every_event(
    events: list[Event], config: InterestConfig, real_time: bool
) -> None:
    tracker = InterestTracker(CATALOG, config, user_id="u", real_time=real_time)
    for k, event in enumerate(events, start=1):
        tracker.observe(event)
        prefix = History(events=tuple(events[:k]), user_id="u")
        rebuilt = build_interest_state(prefix, CATALOG, config, real_time=real_time)
        assert tracker.state() == rebuilt
        assert tracker.state() == rebuilt  # state() does not change the tracker


@settings(max_examples=150, deadline=None)
@given(events=_events, config=_configs)
def test_state_matches_the_direct_definition(events: list[Event], config: InterestConfig) -> None:
    history = History(events=tuple(events))
    state = build_interest_state(history, CATALOG, config)
    reference = _reference_long_term(history, config)
    expected = sorted(reference.values(), reverse=True)[: config.top_labels]
    assert [w for _, w in state.long_term] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    for label, w in state.long_term:
        assert w == pytest.approx(reference[label], rel=1e-9, abs=1e-12)
    assert _ids(state.recent) == [e.item_id for e in events[-config.recent_window :]]
    rated = [e.rating for e in events if e.rating is not None]
    assert state.mean_rating == (pytest.approx(statistics.mean(rated)) if rated else None)
    assert set(_ids(state.liked)).isdisjoint(_ids(state.disliked))
    assert set(state.rising).isdisjoint(state.fading)


# --------------------------------------------------------------------------- real data


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"


def test_movielens_states_are_consistent() -> None:
    if not (DATA / "u.data").is_file():
        pytest.skip(f"MovieLens-100K not found at {DATA} (shared data folder absent)")
    genre_names = [
        line.split("|")[0] for line in (DATA / "u.genre").read_text("latin-1").splitlines() if line
    ]
    items = []
    for line in (DATA / "u.item").read_text("latin-1").splitlines():
        f = line.split("|")
        genres = tuple(g for g, flag in zip(genre_names, f[5:], strict=True) if flag == "1")
        items.append(Item(item_id=f[0], title=f[1], attributes={"genres": genres}))
    catalog = Catalog(items=tuple(items), name="ml-100k")
    by_user: dict[str, list[Event]] = {}
    for line in (DATA / "u.data").read_text().splitlines():
        user, item, rating, ts = line.split("\t")
        by_user.setdefault(user, []).append(
            Event(item_id=item, rating=float(rating), timestamp=float(ts))
        )
    config = InterestConfig()
    for user in sorted(by_user, key=int)[:50]:
        events = sorted(by_user[user], key=lambda e: e.timestamp or 0.0)
        state = build_interest_state(History(events=tuple(events), user_id=user), catalog, config)
        assert state.n_events == len(events) >= 20
        assert 0 < sum(w for _, w in state.long_term) <= 1 + 1e-9
        assert len(state.recent) == config.recent_window
        assert state.liked
        assert state.time_context
        assert all(r.item_id in catalog for r in state.liked + state.disliked)
