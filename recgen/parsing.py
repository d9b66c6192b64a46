"""Parsing: a Generation's texts -> Candidates (title, explanation); every skipped line is recorded.

The templates ask for one item per line, ``<k>. <title> | <one-sentence explanation>``, e.g.
``1. Heat (1995) | A tense crime thriller like the action films you rated highly.``
The parser accepts much more than that (bullets, ``1)``, missing numbers, missing explanations,
quotes, markdown bold, ``Title (1995) - why``), and turns what it cannot use into ``Rejected``
records with one of the ``REASON_*`` reasons (``placeholder``: the model copied the format's
``<title>`` literally). It never raises on model output.
"""

# pyright: strict
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from recgen.types import Candidate, Generation, Parsed, Rejected

__all__ = [
    "MAX_TITLE_CHARS",
    "REASON_DUPLICATE",
    "REASON_EMPTY",
    "REASON_NO_NAME",
    "REASON_NO_TITLE",
    "REASON_PLACEHOLDER",
    "REASON_PROSE",
    "REASON_TOO_LONG",
    "format_items",
    "parse_generation",
    "parse_text",
]

_log = logging.getLogger(__name__)

MAX_TITLE_CHARS = 200
"""Titles longer than this are rejected (a run-on sentence, not a title)."""

REASON_EMPTY = "empty output"
REASON_NO_TITLE = "no title"
REASON_TOO_LONG = "title too long"
REASON_PROSE = "prose"
REASON_PLACEHOLDER = "placeholder"
REASON_NO_NAME = "no name beyond an article and a year"
REASON_DUPLICATE = "duplicate"

_MARKER = re.compile(r"^(?:\d{1,3}[.)](?!\d)|\(\d{1,3}\)|[-*\u2022+\u00b7\u2013\u2014]\s)\s*")
_YEAR_SPLIT = re.compile(r"^(?P<title>.*?\(\d{4}\))\s*[-\u2013\u2014:,;.]*\s*(?P<rest>.*)$")
_DASH_SPLIT = re.compile(r"\s[\u2013\u2014]\s")
_QUOTED = re.compile(
    r"^[\"\u201c\u2018'`*_]+(?P<name>[^\"\u201c\u201d\u2018\u2019`*_]+?)"
    r"[\"\u201d\u2019'`*_]+\s*(?P<year>\(\d{4}\))?$"
)
_LABEL = re.compile(r"^(?:title|movie|item|name)\s*:\s*", re.IGNORECASE)
_EXPLANATION_LABEL = re.compile(
    r"^(?:explanation|reason|why|because)\s*[:\-\u2013]\s*", re.IGNORECASE
)
_YEAR = re.compile(r"\(\d{4}\)")
_PLACEHOLDER = re.compile(r"^<[^<>]*>$")
_SPACES = re.compile(r"\s+")
_NON_ALNUM = re.compile(r"[\W_]+")
_PARENTHETICAL = re.compile(r"^\([^()]*\)$")
_NAME_FILLERS = frozenset({"the", "a", "an", "le", "la", "les", "il", "el", "der", "die", "das"})
_PROSE_STARTERS = frozenset(
    "i i'm i've here sure these this based as if you your hope enjoy let note certainly of okay "  # noqa: SIM905
    "ok great absolutely happy".split()
)
_EDGE_PUNCT = " \t-\u2013\u2014:,;|"
_QUOTE_PAIRS = {
    '"': '"',
    "\u201c": "\u201d",
    "\u2018": "\u2019",
    "'": "'",
    "`": "`",
    "*": "*",
    "_": "_",
}


@dataclass(frozen=True, slots=True)
class _Line:
    """One line's parse: a title and explanation, or the reason it was skipped."""

    title: str = ""
    explanation: str = ""
    reason: str = ""
    continuation: bool = False


def parse_generation(generation: Generation) -> Parsed:
    """Parse every text of a generation into candidates, best text first.

    Candidates keep output order (text 0 first); ``sequence`` is the index of the text and
    ``rank`` the 1-based position among the item lines of that text. A title that repeats an
    earlier one (ignoring case and whitespace) is dropped and recorded with reason
    ``"duplicate"``.

    Args:
        generation: The generator's output for one prompt.

    Returns:
        The candidates and every rejected line (``stage="parse"``).
    """
    candidates: list[Candidate] = []
    failures: list[Rejected] = []
    seen: set[str] = set()
    if not generation.texts:
        failures.append(Rejected(text="", reason=REASON_EMPTY, stage="parse"))
    for sequence, text in enumerate(generation.texts):
        parsed = parse_text(text, sequence=sequence)
        failures.extend(parsed.failures)
        for cand in parsed.candidates:
            key = _key(cand.title)
            if key in seen:
                failures.append(Rejected(text=cand.title, reason=REASON_DUPLICATE, stage="parse"))
                continue
            seen.add(key)
            candidates.append(cand)
    for failure in failures:
        _log.debug("parse rejected %r: %s", failure.text, failure.reason)
    return Parsed(candidates=tuple(candidates), failures=tuple(failures))


def parse_text(text: str, *, sequence: int = 0) -> Parsed:
    """Parse one completion text (no deduplication; see ``parse_generation``).

    Args:
        text: The model's completion.
        sequence: Index of the text within its generation, stored in each candidate.

    Returns:
        Candidates in output order and the rejected lines.
    """
    if not text.strip():
        return Parsed(
            candidates=(), failures=(Rejected(text=text, reason=REASON_EMPTY, stage="parse"),)
        )
    lines = [raw.strip() for raw in text.splitlines() if raw.strip()]
    listed = any("|" in line or _MARKER.match(line.replace("**", "")) for line in lines)
    items: list[list[str]] = []
    failures: list[Rejected] = []
    for line in lines:
        parsed = _parse_line(line, listed=listed)
        if parsed.continuation and items and not items[-1][1]:
            items[-1][1] = parsed.explanation
        elif parsed.reason:
            failures.append(Rejected(text=line, reason=parsed.reason, stage="parse"))
        else:
            items.append([parsed.title, parsed.explanation])
    candidates = tuple(
        Candidate(title=title, explanation=why, rank=i + 1, sequence=sequence)
        for i, (title, why) in enumerate(items)
    )
    return Parsed(candidates=candidates, failures=tuple(failures))


def format_items(entries: list[tuple[str, str]]) -> str:
    """The strict output format for (title, explanation) pairs: the inverse of the parser.

    Used for fine-tuning answers and tests: ``1. Heat (1995) | A tense crime thriller.``
    """
    return "\n".join(
        f"{k}. {title} | {why}" if why else f"{k}. {title}"
        for k, (title, why) in enumerate(entries, start=1)
    )


def _parse_line(line: str, *, listed: bool) -> _Line:
    """Classify one non-blank line as an item, an explanation continuation, or a rejection.

    ``listed`` says whether the text has list lines (a marker or a ``|``); a bare line among
    them is commentary unless it is a short title with a year.
    """
    body = line.replace("**", "").replace("__", "").strip()
    label = _EXPLANATION_LABEL.match(body)
    if label:
        return _Line(
            explanation=body[label.end() :].strip(), continuation=True, reason=REASON_PROSE
        )
    marker = _MARKER.match(body)
    marked = marker is not None
    if marker:
        body = body[marker.end() :].strip()
    if "|" in body:
        title, _, why = body.partition("|")
    else:
        if _is_prose(body, marked=marked, listed=listed):
            return _Line(reason=REASON_PROSE)
        title, why = _split_unpiped(body)
    title = _clean_title(title)
    if not title:
        return _Line(reason=REASON_NO_TITLE)
    if len(title) > MAX_TITLE_CHARS:
        return _Line(reason=REASON_TOO_LONG)
    if _PLACEHOLDER.match(title):
        return _Line(reason=REASON_PLACEHOLDER)
    if not _has_name(title):
        return _Line(reason=REASON_NO_NAME)
    return _Line(title=title, explanation=_clean_explanation(why))


def _has_name(title: str) -> bool:
    """Whether a title names something beyond articles and a year (``"The (1996)"`` does not)."""
    words = _NON_ALNUM.sub(" ", _YEAR.sub(" ", title)).casefold().split()
    return any(w not in _NAME_FILLERS for w in words)


def _is_prose(body: str, *, marked: bool, listed: bool) -> bool:
    """Whether a line without a ``|`` is a sentence rather than a title.

    A line with a year ``(1995)`` is a title unless it ends with ``:`` (or, as a bare line in a
    list, has more than 10 words before the year). Otherwise a line is prose when it ends with
    ``:`` or runs past 15 words; a marked line ending in ``.!?`` needs more than 8 words; a
    bare line is prose in a list, and elsewhere when it opens (``Here are ...``) or ends like a
    sentence.
    """
    if not body:
        return False
    year = _YEAR_SPLIT.match(body)
    if year:
        bare_in_list = listed and not marked
        return body.endswith(":") or (bare_in_list and len(year["title"].split()) > 10)
    words = body.split()
    if body.endswith(":") or len(words) > 15:
        return True
    sentence = body[-1] in ".!?"
    if marked:
        return sentence and len(words) > 8
    if listed:
        return True
    opener = words[0].lower().strip(",!.") in _PROSE_STARTERS and len(words) >= 3
    return opener or sentence


def _split_unpiped(body: str) -> tuple[str, str]:
    """Split ``Title (1995) - why`` or ``Title — why``; otherwise all of it is the title."""
    year = _YEAR_SPLIT.match(body)
    if year:
        return year["title"], year["rest"]
    dash = _DASH_SPLIT.search(body)
    if dash:
        return body[: dash.start()], body[dash.end() :]
    return body, ""


def _clean_title(title: str) -> str:
    title = _SPACES.sub(" ", title).strip(_EDGE_PUNCT)
    title = _LABEL.sub("", title).strip(_EDGE_PUNCT)
    quoted = _QUOTED.match(title)
    if quoted:
        year = quoted["year"]
        title = quoted["name"].strip() + (f" {year}" if year else "")
    elif len(title) >= 2 and _QUOTE_PAIRS.get(title[0]) == title[-1]:
        title = title[1:-1].strip()
    return title.strip(_EDGE_PUNCT)


def _clean_explanation(why: str) -> str:
    """The explanation, or "" when it is only a parenthetical note such as ``(disliked)`` copied
    from the prompt: the ranker then explains the item from data instead."""
    why = _SPACES.sub(" ", why).strip(_EDGE_PUNCT)
    why = _EXPLANATION_LABEL.sub("", why).strip()
    if len(why) >= 2 and why[0] in '"“' and why[-1] in '"”':
        why = why[1:-1].strip()
    if _PARENTHETICAL.match(why):
        return ""
    return why


def _key(title: str) -> str:
    return _SPACES.sub(" ", title).strip().casefold()
