"""Trie-constrained decoding (D3 style): beam search that can only write allowed catalog titles.

The answer is forced to open with ``1.`` (the format is ``1. <title> | <why>``); a token trie
over the catalog's titles then masks every token that does not continue an allowed title. A
title ends with the `` |`` that closes it in the answer format, so its score includes the
model's belief that it is complete; then only the end token is allowed, at no cost. Beam scores
are summed log-probabilities, not length-normalised (``length_penalty = 0``: D3 found that
normalising favours long titles with near-certain late tokens), so each beam is a distinct
complete title ranked by its probability. transformers 5 moved group (diverse) beam search out
of the library, so instead of diversity groups distinct *items* are guaranteed: beams end at
distinct titles, and titles naming the same item are deduplicated by item id (counted, logged).

The trie is stored as its sorted token paths, one row per title: a node is a row range and a
user's exclusions a sorted array of rows, so memory is the tokens themselves and excluding a
history costs O(len(history) log n) at any catalog size.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor

from recgen.types import Catalog

__all__ = [
    "ANSWER_PREFIX",
    "TITLE_END",
    "AnswerTitles",
    "TitleTrie",
    "TrieLogitsProcessor",
    "TrieView",
    "read_beams",
]

_log = logging.getLogger(__name__)

ANSWER_PREFIX = "1."
"""Appended to every prompt: the answer's first line starts here, and the title follows."""
TITLE_END = " |"
"""What follows a title in the answer format; it is the last token(s) of every trie path."""
Node = tuple[int, int, int]
"""A trie node: the row range ``[lo, hi)`` of the paths sharing its prefix, and the depth."""


@dataclass(frozen=True, kw_only=True)
class AnswerTitles:
    """The titles trie decoding may write, each naming one catalog item. Build with :meth:`build`.

    Attributes:
        titles: Distinct titles as written after ``1.`` (one trie path each).
        item_ids: Per title, the item it names (the one grounding maps it to).
        key: A hash of the titles: tries are cached per key, i.e. per catalog.
        shared: Catalog items whose title is written for another item already (a duplicate).
        skipped: Catalog items whose title does not read back as that item (never written).
    """

    titles: tuple[str, ...]
    item_ids: tuple[str, ...]
    key: str
    shared: int = 0
    skipped: int = 0
    _blocking: dict[str, list[int]] = field(default_factory=dict[str, list[int]], repr=False)
    _naming: dict[str, list[int]] = field(default_factory=dict[str, list[int]], repr=False)

    @classmethod
    def build(
        cls,
        catalog: Catalog,
        *,
        write: Callable[[str], str],
        read: Callable[[str], Sequence[int]],
    ) -> AnswerTitles:
        """Write every catalog title as an answer line and keep those that read back to the item.

        Args:
            catalog: The items.
            write: A catalog title as the answer writes it (e.g. cleaned of the ``|`` separator).
            read: Catalog positions an answer line ``1. <title>`` names, best first (parsing
                then exact grounding); the first names the item, and any of them in a history
                removes the title (grounding rejects it then).
        """
        titles, item_ids, seen, shared, skipped = [], [], set(), 0, 0
        blocking, naming = defaultdict[str, list[int]](list), defaultdict[str, list[int]](list)
        for pos, item in enumerate(catalog):
            text = write(item.title)
            if text in seen:
                shared += 1
                continue
            hits = list(read(f"{ANSWER_PREFIX} {text}")) if text else []
            if pos not in hits:
                skipped += 1
                continue
            seen.add(text)
            t, named = len(titles), catalog.items[hits[0]].item_id
            titles.append(text)
            item_ids.append(named)
            naming[named].append(t)
            for p in hits:
                blocking[catalog.items[p].item_id].append(t)
        _log.info("trie decoding writes %d titles for %d items (%d share a title, %d skipped: "
                  "they do not read back)", len(titles), len(catalog), shared, skipped)  # fmt: skip
        key = hashlib.sha256("\n".join(titles).encode()).hexdigest()[:16]
        return cls(titles=tuple(titles), item_ids=tuple(item_ids), key=key, shared=shared,
                   skipped=skipped, _blocking=dict(blocking), _naming=dict(naming))  # fmt: skip

    def allowed(
        self, *, exclude: Collection[str], candidates: Collection[str] | None = None
    ) -> tuple[set[int] | None, set[int]]:
        """``(only, removed)`` title indices for one user: ``only`` is None without candidates."""
        removed = {t for i in exclude for t in self._blocking.get(i, ())}
        if candidates is None:
            return None, removed
        return {t for i in candidates for t in self._naming.get(i, ())}, removed

    def answer(self, beams: Sequence[tuple[int, float]]) -> tuple[str, tuple[float, ...], int]:
        """``(text, scores, duplicates)``: numbered answer lines, one per item (best beam first),
        their log-probabilities, and how many beams named an item already listed."""
        lines, scores, seen = [], [], set()
        for t, score in beams:
            if self.item_ids[t] not in seen:
                seen.add(self.item_ids[t])
                lines.append(f"{len(lines) + 1}. {self.titles[t]}")
                scores.append(score)
        return "\n".join(lines), tuple(scores), len(beams) - len(lines)


class TitleTrie:
    """A token trie over answer titles, stored as sorted padded paths (see the module docstring).

    Args:
        paths: One row per title: its tokens, then the end token, padded with -1.
        eos_token_id: The end token.

    Attributes:
        depth: The longest path in tokens (the most new tokens a title takes).
    """

    def __init__(self, paths: Sequence[Sequence[int]], *, eos_token_id: int) -> None:
        self.depth = max((len(p) for p in paths), default=1)
        padded = np.full((len(paths), self.depth), -1, dtype=np.int32)
        for i, p in enumerate(paths):
            padded[i, : len(p)] = p
        self.order = np.lexsort(padded.T[::-1])  # row -> title index
        self.rank = np.empty_like(self.order)  # title index -> row
        self.rank[self.order] = np.arange(len(paths))
        self.paths = padded[self.order]
        self.eos_token_id = eos_token_id
        self.root: Node = (0, len(paths), 0)

    @classmethod
    def build(
        cls,
        titles: Sequence[str],
        *,
        tokenize: Callable[[list[str]], list[list[int]]],
        eos_token_id: int,
    ) -> TitleTrie:
        """Tokenize each title as it appears in ``1. <title> |``: the tokens after ``1.``."""
        head = tokenize([ANSWER_PREFIX])[0]
        lines = tokenize([f"{ANSWER_PREFIX} {t}{TITLE_END}" for t in titles]) if titles else []
        paths = [
            ids[len(head) :] if ids[: len(head)] == head else tokenize([f" {t}{TITLE_END}"])[0]
            for t, ids in zip(titles, lines, strict=True)
        ]
        return cls([[*p, eos_token_id] for p in paths], eos_token_id=eos_token_id)

    def step(self, node: Node, token: int) -> Node | None:
        """The child of ``node`` along ``token``, or None if no path continues that way."""
        lo, hi, d = node
        if d >= self.depth or (d and self.paths[lo, d - 1] == self.eos_token_id):
            return None
        column = self.paths[lo:hi, d]
        a, b = np.searchsorted(column, token, "left"), np.searchsorted(column, token, "right")
        return (lo + int(a), lo + int(b), d + 1) if b > a else None

    def walk(self, tokens: Sequence[int]) -> Node | None:
        """The node that ``tokens`` lead to from the root, or None if they leave the trie."""
        node: Node | None = self.root
        for token in tokens:
            node = None if node is None else self.step(node, token)
        return node

    def leaf(self, tokens: Sequence[int]) -> int | None:
        """The title index that ``tokens`` (up to and with the end token) spell, or None."""
        end = list(tokens).index(self.eos_token_id) + 1 if self.eos_token_id in tokens else 0
        node = self.walk(tokens[:end]) if end else None
        return None if node is None else int(self.order[node[0]])

    def view(
        self, *, only: Collection[int] | None = None, removed: Collection[int] = ()
    ) -> TrieView:
        """The trie for one user: only titles in ``only`` (all if None), minus ``removed``."""
        return TrieView(self, only=only, removed=removed)


class TrieView:
    """A :class:`TitleTrie` restricted to one user's allowed titles (built per prompt)."""

    def __init__(
        self, trie: TitleTrie, *, only: Collection[int] | None, removed: Collection[int]
    ) -> None:
        self.trie = trie
        dead = np.sort(trie.rank[list(removed)]) if removed else np.zeros(0, np.intp)
        keep = None if only is None else np.setdiff1d(trie.rank[list(only)], dead)
        self._rows, self._invert = (dead, True) if keep is None else (keep, False)
        self._next: dict[Node, list[int]] = {}

    def alive(self, lo: np.ndarray | int, hi: np.ndarray | int) -> np.ndarray:
        """How many allowed titles lie in the row ranges ``[lo, hi)``."""
        inside = np.searchsorted(self._rows, hi) - np.searchsorted(self._rows, lo)
        return np.subtract(hi, lo) - inside if self._invert else inside

    def next_tokens(self, node: Node) -> list[int]:
        """Tokens that continue ``node`` towards an allowed title (the end token at its end)."""
        if node not in self._next:
            lo, hi, d = node
            if d >= self.trie.depth or hi <= lo:
                return []
            column = self.trie.paths[lo:hi, d]
            starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
            ok = self.alive(lo + starts, lo + np.append(starts[1:], len(column))) > 0
            self._next[node] = [int(t) for t in column[starts][ok] if t >= 0]
        return self._next[node]


class TrieLogitsProcessor(LogitsProcessor):
    """Masks every token that leaves the trie; the end token after a title costs nothing.

    Works on beam search's log-probabilities (transformers applies processors after the log
    softmax there), so a beam's score is the model's log-probability of its title.

    Args:
        views: One view per prompt in the batch.
        num_beams: Beams per prompt (rows ``i * num_beams ...`` belong to prompt ``i``).
        prompt_len: Length of the (left-padded) prompts; later tokens are the answer.
    """

    def __init__(self, views: Sequence[TrieView], *, num_beams: int, prompt_len: int) -> None:
        self.views = views
        self.num_beams = num_beams
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for row, ids in enumerate(input_ids[:, self.prompt_len :].tolist()):
            view = self.views[row // self.num_beams]
            node = view.trie.walk(ids)
            if node is not None:
                allowed[row, view.next_tokens(node)] = True
        out = scores.masked_fill(~allowed, -torch.inf)
        eos = self.views[0].trie.eos_token_id
        out[:, eos] = torch.where(allowed[:, eos], 0.0, -torch.inf)  # the end is free
        return out  # type: ignore[return-value]


def read_beams(
    sequences: torch.Tensor, scores: torch.Tensor, *, views: Sequence[TrieView], k: int
) -> list[list[tuple[int, float]]]:
    """Per prompt, ``(title index, log-probability)`` of its ``k`` returned beams, best first;
    a beam that did not finish an allowed title (fewer allowed titles than beams) is dropped."""
    out: list[list[tuple[int, float]]] = [[] for _ in views]
    for row, (ids, score) in enumerate(zip(sequences.tolist(), scores.tolist(), strict=True)):
        view = views[row // k]
        t = view.trie.leaf(ids)
        if t is not None and score > -1e8:  # unfinished beam slots score -1e9
            r = int(view.trie.rank[t])
            if view.alive(r, r + 1) > 0:
                out[row // k].append((t, float(score)))
    return out
