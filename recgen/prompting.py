"""Prompting: InterestState (+ candidates) -> Prompt, rendered from the Jinja templates in prompts/.

One renderer serves inference and fine-tuning. Each template defines a ``system`` block (the
fixed instruction, identical for every user so a server's prefix cache can reuse it) and a
``user`` block (the interest summary from the shared ``_summary.jinja`` macro, then the task).
The chat template is applied later by the tokenizer or server, never here.

Item text is data, never instructions: titles and labels are cleaned by :func:`clean_text`
before they reach a template, and templates run in a Jinja sandbox with ``StrictUndefined``.

The models answer in one strict format, one item per line (see :func:`format_answer`)::

    1. Heat (1995) | A tense crime thriller like the action films you rated highly.
"""

# pyright: strict
from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2 import FileSystemLoader, StrictUndefined, Template, TemplateError, TemplateNotFound
from jinja2 import meta as jinja_meta
from jinja2.sandbox import SandboxedEnvironment

from recgen.config import PromptConfig
from recgen.errors import ConfigError, DataError
from recgen.types import InterestState, Item, Message, Prompt

__all__ = [
    "OUTPUT_FORMAT_EXAMPLE",
    "PromptRenderer",
    "clean_text",
    "default_prompts_dir",
    "format_answer",
    "heuristic_token_count",
    "popularity_level",
    "strip_year",
]

_log = logging.getLogger(__name__)

OUTPUT_FORMAT_EXAMPLE = "1. <title> | <one sentence on why it fits>\n2. <title> | <one sentence>"
"""The answer format as the system instructions show it (``k. title | explanation``)."""

_MESSAGE_OVERHEAD = 5
"""Tokens a ChatML template adds around each message (``<|im_start|>role\\n`` ... ``<|im_end|>\\n``)."""
_GENERATION_OVERHEAD = 4
"""Tokens of the assistant header that opens the answer (``<|im_start|>assistant\\n``)."""
_MIN_HISTORY = 1
"""Recent items kept even when the budget is exceeded."""
_MAX_LIKED = 3
_MAX_DISLIKED = 2
_BLOCKS = ("system", "user")

_ROLE_PREFIX = re.compile(
    r"^[\s>#*-]*(?:system|assistant|user|human|instruction|response)\s*:",
    re.IGNORECASE | re.MULTILINE,
)
_ROLE_TOKEN = re.compile(
    r"<\|[^|<>]{0,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|</?(?:system|user|assistant)>|#{2,}",
    re.IGNORECASE,
)
_TEMPLATE_SYNTAX = re.compile(r"\{\{|\}\}|\{%|%\}|\{#|#\}")
_SPACES = re.compile(r"\s+")


def heuristic_token_count(text: str) -> int:
    """A conservative token estimate (``len(text) // 3``) when no tokenizer is at hand."""
    return len(text) // 3


_YEAR_SUFFIX = re.compile(r"\s*\((?:1[89]|20)\d\d\)$")


def popularity_level(count: float) -> int:
    """An interaction count as a one-digit level, ``floor(log2(1 + count))`` capped at 9:
    0 for an item nobody chose, 9 for 511 choices or more (one token a small model can compare).
    """
    return min(9, int(math.log2(1 + max(0.0, count))))


def strip_year(title: str) -> str:
    """``title`` without a trailing release year: ``Heat (1995)`` -> ``Heat`` (the ``no_year``
    template filter; a year costs 6 tokens, and rerank prompts list 20 titles)."""
    return _YEAR_SUFFIX.sub("", title) or title


def clean_text(text: str, max_chars: int) -> str:
    """Make catalog text safe to show the model as data.

    Normalises unicode (NFKC, so full-width look-alikes become plain), drops control and format
    characters, chat role markers (``<|im_start|>``, ``[INST]``, ``system:`` at a line start ...),
    Jinja syntax (``{{ }}``, ``{% %}``, ``{# #}``), the ``|`` answer separator and newlines, then
    collapses whitespace and caps the result at ``max_chars`` characters (ending in ``...`` if
    cut). Cleaning is idempotent.

    Args:
        text: A title, label or other catalog string.
        max_chars: The longest result allowed.

    Returns:
        The cleaned text (possibly empty).
    """
    for _ in range(8):  # removals can expose new markers: repeat until nothing changes
        before = text
        text = unicodedata.normalize("NFKC", text)
        text = _ROLE_PREFIX.sub(" ", text)
        text = "".join(_clean_char(c) for c in text)
        text = _ROLE_TOKEN.sub(" ", text)
        text = _TEMPLATE_SYNTAX.sub(" ", text)
        text = _SPACES.sub(" ", text.replace("|", " ")).strip()
        if text == before:
            break
    if len(text) > max_chars:
        text = text[: max_chars - 3].rstrip() + "..."  # ASCII: NFKC would expand "…" anyway
    return text


def _clean_char(c: str) -> str:
    category = unicodedata.category(c)
    if category == "Cc":
        return " "  # newlines, tabs and other controls separate words
    if category in ("Cf", "Cs", "Co", "Cn"):
        return ""  # zero-width and bidi marks, surrogates, private use, unassigned
    return c


def format_answer(entries: Sequence[tuple[str, str]], *, max_title_chars: int | None = None) -> str:
    """Write (title, explanation) pairs in the strict answer format, one per line.

    ``1. Heat (1995) | A tense crime thriller like the action films you rated highly.``
    Titles and explanations are cleaned as in :func:`clean_text`, so neither can break a line
    or the ``|`` separator.

    Args:
        entries: (title, explanation) pairs, best first.
        max_title_chars: Cap titles at this length (None: no cap), as the prompts do.

    Returns:
        The lines joined with newlines (no trailing newline).
    """
    lines: list[str] = []
    for k, (title, explanation) in enumerate(entries, start=1):
        t = clean_text(title, max_title_chars or max(len(title), 1))
        e = clean_text(explanation, max(len(explanation), 1))
        lines.append(f"{k}. {t} | {e}" if e else f"{k}. {t}")
    return "\n".join(lines)


def default_prompts_dir() -> Path:
    """The packaged templates: ``recgen/_prompts`` in a wheel, else ``<repo>/prompts``.

    Raises:
        ConfigError: if neither folder exists.
    """
    here = Path(__file__).resolve()
    for folder in (here.parent / "_prompts", here.parents[1] / "prompts"):
        if folder.is_dir():
            return folder
    raise ConfigError(
        f"no prompt templates found beside {here.parent} (looked for _prompts/ and ../prompts/); "
        "reinstall recgen or pass prompts_dir="
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class _ItemView:
    """An item as templates see it: cleaned title, a short note (``liked``), its labels, for
    candidates given counts a ``popularity`` level (:func:`popularity_level`; else None), and
    for candidates given ranks the retriever's ``rank`` of it (1 = its best; else None)."""

    title: str
    note: str = ""
    labels: tuple[str, ...] = ()
    popularity: int | None = None
    rank: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class _UserView:
    """An interest state as templates see it: only cleaned strings and counts."""

    n_events: int
    long_term: tuple[str, ...]
    recent_profile: tuple[str, ...]
    rising: tuple[str, ...]
    fading: tuple[str, ...]
    recent: tuple[_ItemView, ...]
    liked: tuple[str, ...]
    disliked: tuple[str, ...]
    time_context: tuple[str, ...]


class PromptRenderer:
    """Renders interest states into chat prompts with one named template.

    Args:
        config: Template name, token budget, title cap and number of titles asked for.
        count_tokens: Token counter for the budget (e.g. ``Generator.count_tokens``); default
            :func:`heuristic_token_count`.
        prompts_dir: A folder of ``<name>.jinja`` templates (default: the packaged ones).

    Raises:
        ConfigError: if the folder or template is missing, does not parse, or lacks a ``system``
            or ``user`` block.
    """

    def __init__(
        self,
        config: PromptConfig,
        *,
        count_tokens: Callable[[str], int] | None = None,
        prompts_dir: str | Path | None = None,
    ) -> None:
        self.config = config
        self.count_tokens = count_tokens or heuristic_token_count
        self.prompts_dir = default_prompts_dir() if prompts_dir is None else Path(prompts_dir)
        if not self.prompts_dir.is_dir():
            raise ConfigError(f"prompts_dir {self.prompts_dir} is not a folder of .jinja templates")
        self._loader = FileSystemLoader(self.prompts_dir)
        self._env = SandboxedEnvironment(
            loader=self._loader,
            undefined=StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.filters["no_year"] = strip_year  # pyright: ignore[reportUnknownMemberType]
        self._template = self._load(config.template)
        self.lists_candidates = "candidates" in self._variables(f"{config.template}.jinja")
        """Whether the template shows candidates (then ``render`` requires them)."""
        self.shows_popularity = any(
            ".popularity" in source for source in self._sources(f"{config.template}.jinja").values()
        )
        """Whether the template shows candidates' popularity (then ``render`` requires counts)."""
        self.shows_rank = any(
            ".rank" in source for source in self._sources(f"{config.template}.jinja").values()
        )
        """Whether the template shows the retriever's rank of each candidate (then ``render``
        requires ranks)."""
        self.template_hash = self._hash(f"{config.template}.jinja")
        self.n_over_budget = 0
        """Prompts rendered over the budget (at the minimum history) so far."""

    @property
    def template(self) -> str:
        """The template name (``recommend``, ``rerank``, ``summary`` or a user template)."""
        return self.config.template

    def available(self) -> list[str]:
        """Template names in the prompts folder (partials starting with ``_`` excluded)."""
        return sorted(p.stem for p in self.prompts_dir.glob("*.jinja") if p.stem[:1] != "_")

    def render(
        self,
        state: InterestState,
        *,
        candidates: Sequence[Item] = (),
        counts: Sequence[float] | None = None,
        ranks: Sequence[int] | None = None,
        answer: str | None = None,
    ) -> Prompt:
        """Render one prompt, cutting the oldest recent items until it fits the token budget.

        Args:
            state: The user's interest state.
            candidates: Items to list for the model to choose from (rerank); never cut.
            counts: Per candidate, its training interaction count, shown as
                ``item.popularity`` (:func:`popularity_level`) to templates that use it
                (``rerank-pop``); those need it.
            ranks: Per candidate, its rank in the retriever's list (1 = the retriever's best),
                shown as ``item.rank`` to templates that use it (``rerank-yesno-rank``); those
                need it.
            answer: The target completion, for fine-tuning examples.

        Returns:
            A ``Prompt`` with (system, user) messages, the template hash, how many recent items
            were rendered (``n_history``) and how many were cut (``truncated``).

        Raises:
            ConfigError: if the template fails (an undefined variable, a sandbox violation).
            DataError: if the template lists candidates and none were given, or ``counts`` or
                ``ranks`` do not pair with them. Candidates given to a template that does not show them are
                ignored (not recorded as offered).
        """
        if self.lists_candidates and not candidates:
            raise DataError(
                f"template {self.template!r} lists candidates for the model to rank: pass "
                "candidates=[...] (catalog items), or use the 'recommend' template"
            )
        if self.shows_popularity and candidates and counts is None:
            raise DataError(
                f"template {self.template!r} shows each candidate's popularity: pass counts=[...] "
                "(training interaction counts, one per candidate)"
            )
        pointwise = self.config.rerank_scoring == "yes-no"
        if pointwise and self.template == self.config.rerank_template and len(candidates) > 1:
            raise DataError(
                f"template {self.template!r} asks yes or no about one candidate "
                f"(prompt.rerank_scoring='yes-no'), got {len(candidates)}: render one prompt "
                "per candidate"
            )
        if self.shows_rank and candidates and ranks is None:
            raise DataError(
                f"template {self.template!r} shows the retriever's rank of each candidate: pass "
                "ranks=[...] (1 = the retriever's best, one per candidate), i.e. rerank retrieved "
                "candidates (ranking.mode='rerank'; for training, negatives='retrieved')"
            )
        for name, values, what in (
            ("counts", counts, "training interaction count"),
            ("ranks", ranks, "retriever rank"),
        ):
            if values is not None and len(values) != len(candidates):
                raise DataError(
                    f"{name} has {len(values)} entries for {len(candidates)} candidates: pass "
                    f"one {what} per candidate, in the same order"
                )
        if not self.lists_candidates:
            candidates = ()  # not shown, so not recorded as offered
        cap = self.config.max_title_chars
        titles = tuple(
            _ItemView(
                title=clean_text(item.title, cap),
                labels=tuple(clean_text(label, cap) for label in item.labels),
                popularity=None if counts is None else popularity_level(counts[j]),
                rank=None if ranks is None else int(ranks[j]),
            )
            for j, item in enumerate(candidates)
        )
        n_recent = keep = len(state.recent)
        messages = self._messages(state, keep, titles)
        size = self._size(messages)
        while size > self.config.max_prompt_tokens and keep > _MIN_HISTORY:
            keep -= 1
            messages = self._messages(state, keep, titles)
            size = self._size(messages)
        if size > self.config.max_prompt_tokens:
            self._over_budget(state, size=size, keep=keep, n_candidates=len(titles))
        return Prompt(
            messages=messages,
            template=self.config.template,
            template_hash=self.template_hash,
            user_id=state.user_id,
            n_history=keep,
            truncated=n_recent - keep,
            candidates=tuple(item.item_id for item in candidates),
            answer=answer,
        )

    def prompt_tokens(self, prompt: Prompt) -> int:
        """Tokens ``prompt`` takes once a ChatML chat template wraps it, with the answer header.

        This is the size the budget checks: message contents counted with ``count_tokens``
        plus the chat template's markers (exact for SmolLM2 with its tokenizer).
        """
        return self._size(prompt.messages)

    # ------------------------------------------------------------------ internals

    def _size(self, messages: tuple[Message, ...]) -> int:
        content = sum(self.count_tokens(m.content) + _MESSAGE_OVERHEAD for m in messages)
        return content + _GENERATION_OVERHEAD

    def _over_budget(
        self, state: InterestState, *, size: int, keep: int, n_candidates: int
    ) -> None:
        self.n_over_budget += 1
        _log.log(
            logging.WARNING if self.n_over_budget == 1 else logging.DEBUG,
            "prompt for user %r takes %d tokens, over max_prompt_tokens=%d even with %d recent "
            "item(s) and %d candidate(s); rendering it anyway (raise prompt.max_prompt_tokens or "
            "pass fewer candidates; further cases log at DEBUG)",
            state.user_id,
            size,
            self.config.max_prompt_tokens,
            keep,
            n_candidates,
        )

    def _messages(
        self, state: InterestState, keep: int, candidates: tuple[_ItemView, ...]
    ) -> tuple[Message, ...]:
        variables: dict[str, object] = {
            "n_titles": self.config.n_titles,
            "n_pick": min(self.config.n_titles, len(candidates)) or self.config.n_titles,
            "output_format": OUTPUT_FORMAT_EXAMPLE,
            "user": self._view(state, keep),
            "candidates": candidates,
        }
        name = f"{self.config.template}.jinja"
        try:
            context = self._template.new_context(variables)
            system, user = ("".join(self._template.blocks[b](context)).strip() for b in _BLOCKS)
        except TemplateError as e:
            raise ConfigError(
                f"template {self.prompts_dir / name} failed: {type(e).__name__}: {e}; templates "
                f"may use only {sorted(variables)} and cannot reach Python internals"
            ) from e
        return (Message(role="system", content=system), Message(role="user", content=user))

    def _view(self, state: InterestState, keep: int) -> _UserView:
        cap = self.config.max_title_chars
        liked_ids = {item.item_id for item in state.liked}
        disliked_ids = {item.item_id for item in state.disliked}
        shown = state.recent[len(state.recent) - keep :] if keep else ()
        shown_ids = {item.item_id for item in shown}
        recent = tuple(
            _ItemView(
                title=clean_text(item.title, cap),
                note="liked"
                if item.item_id in liked_ids
                else "disliked"
                if item.item_id in disliked_ids
                else "",
            )
            for item in shown
        )

        def titles(items: tuple[Item, ...], limit: int) -> tuple[str, ...]:
            rest = [clean_text(i.title, cap) for i in items if i.item_id not in shown_ids]
            return tuple(rest[:limit])

        def labels(profile: tuple[tuple[str, float], ...]) -> tuple[str, ...]:
            return tuple(clean_text(label, cap) for label, _ in profile)  # strongest first

        return _UserView(
            n_events=state.n_events,
            long_term=labels(state.long_term),
            recent_profile=labels(state.recent_profile),
            rising=tuple(clean_text(label, cap) for label in state.rising),
            fading=tuple(clean_text(label, cap) for label in state.fading),
            recent=recent,
            liked=titles(state.liked, _MAX_LIKED),
            disliked=titles(state.disliked, _MAX_DISLIKED),
            time_context=tuple(clean_text(fact, 200) for fact in state.time_context),
        )

    def _load(self, name: str) -> Template:
        path = self.prompts_dir / f"{name}.jinja"
        try:
            template = self._env.get_template(f"{name}.jinja")
        except TemplateNotFound:
            raise ConfigError(
                f"prompt.template={name!r}: no {path}; available templates: {self.available()}"
            ) from None
        except TemplateError as e:
            raise ConfigError(f"template {path} does not parse: {e}") from e
        missing = [b for b in _BLOCKS if b not in template.blocks]
        if missing:
            raise ConfigError(
                f"template {path} lacks block(s) {missing}: define {{% block system %}} (the "
                "fixed instruction) and {% block user %} (the user-specific part)"
            )
        return template

    def _variables(self, name: str) -> set[str]:
        """Context variables the template (with its partials) reads."""
        names: set[str] = set()
        for source in self._sources(name).values():
            names |= jinja_meta.find_undeclared_variables(self._env.parse(source))
        return names

    def _hash(self, name: str) -> str:
        """sha256 of the template's source and every template it includes or imports."""
        sources = self._sources(name)
        digest = hashlib.sha256()
        for ref in sorted(sources):
            digest.update(ref.encode())
            digest.update(b"\x00")
            digest.update(sources[ref].encode())
            digest.update(b"\x00")
        return digest.hexdigest()[:16]

    def _sources(self, name: str) -> dict[str, str]:
        """Sources of the template and every template it includes or imports, by name."""
        sources: dict[str, str] = {}
        todo = [name]
        while todo:
            current = todo.pop()
            if current in sources:
                continue
            source, _, _ = self._loader.get_source(self._env, current)
            sources[current] = source
            todo.extend(
                ref
                for ref in jinja_meta.find_referenced_templates(self._env.parse(source))
                if ref is not None
            )
        return sources
