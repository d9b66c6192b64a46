"""Tests for recgen.parsing: strict format, leniency, rejections, dedupe, never raising."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recgen.parsing import (
    MAX_TITLE_CHARS,
    REASON_DUPLICATE,
    REASON_EMPTY,
    REASON_NO_NAME,
    REASON_NO_TITLE,
    REASON_PLACEHOLDER,
    REASON_PROSE,
    REASON_TOO_LONG,
    format_items,
    parse_generation,
    parse_text,
)
from recgen.types import Generation, Message, Prompt

PROMPT = Prompt(
    messages=(Message(role="user", content="recommend"),), template="t", template_hash="h"
)


def _gen(*texts: str) -> Generation:
    return Generation(prompt=PROMPT, texts=texts, model="fake")


def _pairs(text: str) -> list[tuple[str, str]]:
    return [(c.title, c.explanation) for c in parse_text(text).candidates]


def test_strict_format_gives_titles_explanations_and_ranks() -> None:
    text = (
        "1. Heat (1995) | A tense crime thriller like the action films you rated highly.\n"
        "2. Alien (1979) | Claustrophobic science-fiction horror.\n"
        "3. Fargo (1996) | A darkly funny crime story."
    )
    parsed = parse_generation(_gen(text))
    assert [(c.title, c.rank, c.sequence) for c in parsed.candidates] == [
        ("Heat (1995)", 1, 0),
        ("Alien (1979)", 2, 0),
        ("Fargo (1996)", 3, 0),
    ]
    assert parsed.candidates[0].explanation == (
        "A tense crime thriller like the action films you rated highly."
    )
    assert parsed.failures == ()


@pytest.mark.parametrize(
    ("line", "title", "explanation"),
    [
        ("- Heat (1995) | Crime.", "Heat (1995)", "Crime."),
        ("* Heat (1995) | Crime.", "Heat (1995)", "Crime."),
        ("• Heat (1995) | Crime.", "Heat (1995)", "Crime."),
        ("1) Heat (1995) | Crime.", "Heat (1995)", "Crime."),
        ("(1) Heat (1995) | Crime.", "Heat (1995)", "Crime."),
        ("Heat (1995) | Crime.", "Heat (1995)", "Crime."),
        ("1. Heat (1995)", "Heat (1995)", ""),
        ("1. Heat (1995) |", "Heat (1995)", ""),
        ('1. "Heat (1995)" | Crime.', "Heat (1995)", "Crime."),
        ('1. "Heat" (1995) | Crime.', "Heat (1995)", "Crime."),
        ("1. \u201cHeat\u201d (1995) | Crime.", "Heat (1995)", "Crime."),
        ("1. **Heat (1995)** | Crime.", "Heat (1995)", "Crime."),
        ("**1. Heat (1995)** | Crime.", "Heat (1995)", "Crime."),
        ("1. *Heat* | Crime.", "Heat", "Crime."),
        ("1.   Heat   (1995)   |   Crime.   ", "Heat (1995)", "Crime."),
        ("1. Heat (1995) - A tense thriller.", "Heat (1995)", "A tense thriller."),
        ("1. Heat (1995): A tense thriller.", "Heat (1995)", "A tense thriller."),
        ("1. Heat \u2014 A tense thriller.", "Heat", "A tense thriller."),
        ("1. Title: Heat (1995) | Explanation: Crime.", "Heat (1995)", "Crime."),
        ("1. Heat (1995) | Crime | with De Niro.", "Heat (1995)", "Crime | with De Niro."),
        ("12. 12 Angry Men (1957) | Jury drama.", "12 Angry Men (1957)", "Jury drama."),
        ("2001: A Space Odyssey (1968) | Kubrick.", "2001: A Space Odyssey (1968)", "Kubrick."),
        ("1. 'Round Midnight (1986) | Jazz.", "'Round Midnight (1986)", "Jazz."),
        (
            "1. Star Wars: Episode IV - A New Hope | Space.",
            "Star Wars: Episode IV - A New Hope",
            "Space.",
        ),
    ],
)
def test_lenient_variants_keep_the_title(line: str, title: str, explanation: str) -> None:
    assert _pairs(line) == [(title, explanation)]


def test_preamble_and_closing_prose_are_rejected_not_parsed() -> None:
    text = (
        "Here are five movies you might enjoy:\n"
        "1. Heat (1995) | Crime.\n"
        "\n"
        "I hope you enjoy these recommendations\n"
        "Enjoy!"
    )
    parsed = parse_text(text)
    assert [c.title for c in parsed.candidates] == ["Heat (1995)"]
    assert [(f.text, f.reason) for f in parsed.failures] == [
        ("Here are five movies you might enjoy:", REASON_PROSE),
        ("I hope you enjoy these recommendations", REASON_PROSE),
        ("Enjoy!", REASON_PROSE),
    ]
    assert all(f.stage == "parse" for f in parsed.failures)


def test_bare_commentary_among_list_lines_is_prose() -> None:
    text = (
        "1. Amelie (2001)\n"
        "The user has a strong preference for Drama, Crime, and Sci\n"
        "Casablanca (1942) | A classic."
    )
    parsed = parse_text(text)
    assert [c.title for c in parsed.candidates] == ["Amelie (2001)", "Casablanca (1942)"]
    assert [f.reason for f in parsed.failures] == [REASON_PROSE]


def test_bare_titles_without_any_list_format_are_kept() -> None:
    assert _pairs("Heat\nThe Matrix\nAlien (1979)") == [
        ("Heat", ""),
        ("The Matrix", ""),
        ("Alien (1979)", ""),
    ]


def test_lines_without_a_title_or_with_an_overlong_one_are_rejected() -> None:
    long_title = "x" * (MAX_TITLE_CHARS + 1)
    text = f"1. | only an explanation\n2.\n3. {long_title} | why\n4. Heat (1995) | ok"
    parsed = parse_text(text)
    assert [c.title for c in parsed.candidates] == ["Heat (1995)"]
    assert [f.reason for f in parsed.failures] == [
        REASON_NO_TITLE,
        REASON_NO_TITLE,
        REASON_TOO_LONG,
    ]
    assert parsed.candidates[0].rank == 1


def test_copied_format_placeholders_are_rejected() -> None:
    parsed = parse_text("1. <title> | <one sentence on why it fits>\n2. Heat (1995) | ok")
    assert [c.title for c in parsed.candidates] == ["Heat (1995)"]
    assert [f.reason for f in parsed.failures] == [REASON_PLACEHOLDER]


def test_title_of_exactly_the_limit_is_kept() -> None:
    title = "y" * MAX_TITLE_CHARS
    assert _pairs(f"1. {title} | why") == [(title, "why")]


def test_explanation_on_the_next_line_is_attached() -> None:
    text = "1. Heat (1995)\n   Reason: A tense crime thriller.\n2. Alien (1979) | Horror."
    assert _pairs(text) == [("Heat (1995)", "A tense crime thriller."), ("Alien (1979)", "Horror.")]


def test_stray_explanation_line_is_rejected_as_prose() -> None:
    parsed = parse_text("1. Heat (1995) | Crime.\nExplanation: more words")
    assert [(f.text, f.reason) for f in parsed.failures] == [
        ("Explanation: more words", REASON_PROSE)
    ]


@pytest.mark.parametrize("texts", [("",), ("   \n\n  ",), ()])
def test_empty_output_is_one_rejection(texts: tuple[str, ...]) -> None:
    parsed = parse_generation(_gen(*texts))
    assert parsed.candidates == ()
    assert [f.reason for f in parsed.failures] == [REASON_EMPTY]


def test_several_texts_keep_order_set_sequence_and_drop_duplicates() -> None:
    parsed = parse_generation(
        _gen(
            "1. Heat (1995) | a\n2. Alien (1979) | b",
            "1. heat  (1995) | again\n2. Fargo (1996) | c\n3. ALIEN (1979) | d",
        )
    )
    assert [(c.title, c.sequence, c.rank) for c in parsed.candidates] == [
        ("Heat (1995)", 0, 1),
        ("Alien (1979)", 0, 2),
        ("Fargo (1996)", 1, 2),
    ]
    assert [(f.text, f.reason) for f in parsed.failures] == [
        ("heat (1995)", REASON_DUPLICATE),
        ("ALIEN (1979)", REASON_DUPLICATE),
    ]


def test_duplicates_within_one_text_keep_the_first() -> None:
    parsed = parse_generation(_gen("1. Heat (1995) | first\n2. Heat (1995) | second"))
    assert [(c.title, c.explanation) for c in parsed.candidates] == [("Heat (1995)", "first")]
    assert [f.reason for f in parsed.failures] == [REASON_DUPLICATE]


def test_rejections_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="recgen.parsing"):
        parse_generation(_gen("Here are some great picks for you:\n1. Heat (1995) | ok"))
    assert any("prose" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


@pytest.mark.parametrize("line", ["1. The (1996) (disliked)", "2. A (1997)", "3. The"])
def test_a_title_that_is_only_an_article_and_a_year_is_rejected(line: str) -> None:
    parsed = parse_generation(_gen(line))
    assert parsed.candidates == ()
    assert [f.reason for f in parsed.failures] == [REASON_NO_NAME]


def test_one_letter_titles_are_real_titles() -> None:
    parsed = parse_generation(_gen("1. M (1931) | Lang's thriller."))
    assert [c.title for c in parsed.candidates] == ["M (1931)"]


def test_a_parenthetical_note_copied_from_the_prompt_is_no_explanation() -> None:
    parsed = parse_generation(_gen("1. Heat (1995) (disliked)", "1. Heat (1995) | (liked)"))
    assert [c.explanation for c in parsed.candidates] == [""]


# --------------------------------------------------------------------------- properties

_WORD = st.text(
    alphabet=st.characters(
        whitelist_categories=("Lu", "Ll", "Nd"), whitelist_characters="'&!?.,()-"
    ),
    min_size=1,
    max_size=10,
).filter(lambda w: w[0].isalnum() and w[-1].isalnum())
_ARTICLES_ONLY = {"the", "a", "an", "le", "la", "les", "il", "el", "der", "die", "das"}
_TITLE = (
    st.lists(_WORD, min_size=1, max_size=8)
    .map(" ".join)
    .filter(lambda t: not set(t.casefold().split()) <= _ARTICLES_ONLY)
)
_EXPLANATION = st.lists(_WORD, min_size=1, max_size=20).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(_TITLE, _EXPLANATION),
        min_size=1,
        max_size=10,
        unique_by=lambda e: e[0].casefold(),
    )
)
def test_format_then_parse_round_trips(entries: list[tuple[str, str]]) -> None:
    parsed = parse_generation(_gen(format_items(entries)))
    assert [(c.title, c.explanation) for c in parsed.candidates] == entries
    assert [c.rank for c in parsed.candidates] == list(range(1, len(entries) + 1))
    assert parsed.failures == ()


@settings(max_examples=100, deadline=None)
@given(st.lists(_TITLE, min_size=1, max_size=10, unique_by=str.casefold))
def test_titles_without_explanations_round_trip(titles: list[str]) -> None:
    parsed = parse_generation(_gen(format_items([(t, "") for t in titles])))
    assert [(c.title, c.explanation) for c in parsed.candidates] == [(t, "") for t in titles]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=300), max_size=3))
def test_arbitrary_text_never_raises_and_yields_clean_candidates(texts: list[str]) -> None:
    parsed = parse_generation(_gen(*texts))
    keys = [" ".join(c.title.split()).casefold() for c in parsed.candidates]
    assert len(keys) == len(set(keys))
    for c in parsed.candidates:
        assert c.title.strip() == c.title
        assert 0 < len(c.title) <= MAX_TITLE_CHARS
        assert "\n" not in c.title
        assert "\n" not in c.explanation
        assert c.rank >= 1
        assert 0 <= c.sequence < len(texts)
    assert all(f.stage == "parse" for f in parsed.failures)
