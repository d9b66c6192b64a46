"""Candidate mode on an OpenAI-compatible server (vLLM): rank or score a given candidate list.

Mixed into :class:`recgen._openai.OpenAIGenerator`. Two ways, both greedy and both reusing the
prompt from vLLM's prefix cache across their requests:

- :meth:`CandidateMode.rank_candidates` decodes the answer list line by line, each line forced
  by ``structured_outputs`` ``choice`` to be one of the candidates not picked yet.
- :meth:`CandidateMode.score_candidates` scores every listed candidate by the log-probability of
  its number starting the answer (``7. Heat (1995) | ...``), as :mod:`recgen.verbalizer` does in
  process: the first token's top log-probabilities, plus one more request per leading digit
  when the list has 10 or more candidates. This is the ``CandidateScorer`` protocol that
  ``ranking.mode = "rerank"`` uses.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx

from recgen.config import GenerationConfig
from recgen.errors import ConfigError, DataError
from recgen.types import Generation, Prompt

__all__ = ["TOP_LOGPROBS", "CandidateMode"]

_log = logging.getLogger(__name__)

T = TypeVar("T")
X = TypeVar("X")

TOP_LOGPROBS = 20
"""Top log-probabilities asked per position (vLLM's default ``--max-logprobs``). A candidate
number outside them scores just below the lowest one returned: it cannot be ranked higher than
any number the server did return."""
_BELOW = 1.0
"""How far below the lowest returned log-probability an unreturned token scores."""


class CandidateMode:
    """Rank or score a prompt's candidate list through the server (a mixin)."""

    config: GenerationConfig
    name: str

    def payload(self, prompt: Prompt) -> dict[str, Any]:  # provided by OpenAIGenerator
        raise NotImplementedError

    def _map(
        self, fn: Callable[[httpx.AsyncClient, X], Awaitable[T]], items: Sequence[X]
    ) -> list[T]:
        raise NotImplementedError

    async def _complete_json(
        self, client: httpx.AsyncClient, prompt: Prompt, body: dict[str, Any]
    ) -> list[dict[str, Any]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ ranking by choice

    def rank_candidates(
        self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]], *, k: int
    ) -> list[Generation]:
        """Rank each prompt's candidate titles with constrained choice (vLLM structured outputs).

        Position ``r`` is one request whose reply must be exactly one of the candidates not yet
        picked (``"structured_outputs": {"choice": [...]}``), continuing the assistant's own
        answer so far (``continue_final_message``): the answer list, decoded line by line under
        the constraint that each line is an unused candidate. Prompts run concurrently.

        Args:
            prompts: Prompts that show the candidates (e.g. the ``rerank`` template).
            candidates: For each prompt, the titles to choose from, exactly as the prompt
                shows them (cleaned).
            k: How many to rank (at most the number of candidates).

        Returns:
            One ``Generation`` per prompt with a single text in the answer format without
            explanations (``1. <title>`` lines), best first.

        Raises:
            DataError: if ``prompts`` and ``candidates`` differ in length or a list is empty.
            ConfigError: with beam search, which vLLM cannot combine with structured outputs.
            ServerError: as ``generate``.
        """
        if len(prompts) != len(candidates) or any(not c for c in candidates):
            raise DataError(
                f"rank_candidates needs one non-empty candidate list per prompt (got "
                f"{len(prompts)} prompts and {[len(c) for c in candidates]} candidates)"
            )
        self._check_greedy("candidate mode (choice)")
        if not prompts:
            return []
        pairs = list(zip(prompts, candidates, strict=True))
        return self._map(lambda client, pair: self._rank_one(client, *pair, k=k), pairs)

    async def _rank_one(
        self, client: httpx.AsyncClient, prompt: Prompt, titles: Sequence[str], *, k: int
    ) -> Generation:
        remaining = list(dict.fromkeys(titles))
        lines: list[str] = []
        for position in range(1, min(k, len(remaining)) + 1):
            # The chat template strips the trailing newline of a continued message, so each
            # later choice starts with it: the tokens match a freely written list.
            lead = f"\n{position}. " if lines else f"{position}. "
            body = self.choice_payload(prompt, [lead + t for t in remaining], answer=lines)
            choices = await self._complete_json(client, prompt, body)
            reply = (choices[0]["message"].get("content") or "").strip()
            picked = reply.removeprefix(f"{position}.").strip()
            if picked not in remaining:
                _log.debug("choice reply %r is not a candidate; stopping at %d", reply, position)
                break
            remaining.remove(picked)
            lines.append(f"{position}. {picked}")
        return Generation(prompt=prompt, texts=("\n".join(lines),), model=self.name)

    def choice_payload(
        self, prompt: Prompt, choices: Sequence[str], *, answer: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The JSON body of one ranking request: greedy, one reply out of ``choices``.

        Args:
            prompt: The rendered prompt.
            choices: The allowed replies.
            answer: The answer lines already decoded; sent as an assistant message to continue.
        """
        body = self._greedy_payload(prompt, "\n".join(answer))
        body["structured_outputs"] = {"choice": list(choices)}
        return body

    # ------------------------------------------------------------------ scoring by logprobs

    def score_candidates(self, prompts: Sequence[Prompt]) -> list[list[float]]:
        """Log-score of every listed candidate: its number's log-probability as the answer start.

        The same scores as the transformers backend (:mod:`recgen.verbalizer`): the first
        digit's log-probability, plus for lists of 10 or more the next token's (``.`` after a
        one-digit number that also leads two-digit ones, the second digit otherwise). Each
        prompt takes one ``max_tokens=1`` request with ``top_logprobs``, plus one per leading
        digit that continues the answer with that digit.

        Args:
            prompts: Rendered rerank prompts (``prompt.candidates`` set, fewer than 100).

        Returns:
            Per prompt, one log-score per candidate, in the prompt's candidate order.

        Raises:
            DataError: if a prompt lists no candidates or 100 or more.
            ServerError: as ``generate``.
        """
        bad = [len(p.candidates) for p in prompts if not 0 < len(p.candidates) < 100]
        if bad:
            raise DataError(
                f"score_candidates needs prompts listing 1 to 99 candidates (got {bad[0]}); "
                "render them with the rerank template and candidates=[...]"
            )
        self._check_greedy("candidate scoring")
        return self._map(self._score_one, prompts) if prompts else []

    async def _score_one(self, client: httpx.AsyncClient, prompt: Prompt) -> list[float]:
        n = len(prompt.candidates)
        first = await self._top_logprobs(client, prompt, "")
        tails = {d: await self._top_logprobs(client, prompt, str(d)) for d in range(1, n // 10 + 1)}
        scores: list[float] = []
        for k in range(1, n + 1):
            if k < 10:
                tail = _logprob(tails[k], ".") if k in tails else 0.0
                scores.append(_logprob(first, str(k)) + tail)
            else:
                scores.append(_logprob(first, str(k // 10)) + _logprob(tails[k // 10], str(k % 10)))
        return scores

    async def _top_logprobs(
        self, client: httpx.AsyncClient, prompt: Prompt, answer: str
    ) -> dict[str, float]:
        """Token -> log-probability of the top tokens after the prompt and ``answer``."""
        body = self._greedy_payload(prompt, answer)
        body.update(max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS)
        choices = await self._complete_json(client, prompt, body)
        try:
            top = choices[0]["logprobs"]["content"][0]["top_logprobs"]
            return {str(t["token"]): float(t["logprob"]) for t in top}
        except (KeyError, IndexError, TypeError, ValueError):
            return {}

    # ------------------------------------------------------------------ shared

    def _greedy_payload(self, prompt: Prompt, answer: str) -> dict[str, Any]:
        """The prompt's payload made greedy and single, continuing ``answer`` if given."""
        body = self.payload(prompt)
        body.update(n=1, temperature=0.0, top_p=1.0)
        for key in ("use_beam_search", "length_penalty", "structured_outputs"):
            body.pop(key, None)
        if answer:
            body["messages"].append({"role": "assistant", "content": answer})
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    def _check_greedy(self, what: str) -> None:
        if self.config.num_beams > 1:
            raise ConfigError(
                f"{what} with generation.num_beams={self.config.num_beams}: vLLM cannot combine "
                "structured outputs or logprob scoring with beam search; set num_beams=1"
            )


def _logprob(top: dict[str, float], token: str) -> float:
    """``token``'s log-probability, or just below the lowest returned one if it is missing."""
    if token in top:
        return top[token]
    return (min(top.values()) if top else -100.0) - _BELOW
