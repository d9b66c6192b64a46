"""The OpenAI-compatible server backend (vLLM): async HTTP, retries, and errors that say what to do.

Re-exported by ``recgen.generation``; use it through ``make_generator`` or
``recgen.generation.OpenAIGenerator``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import httpx

from recgen._candidates import CandidateMode
from recgen.config import GenerationConfig
from recgen.errors import ConfigError, ServerError
from recgen.types import Generation, Prompt

__all__ = ["ANSWER_LINE", "ANSWER_REGEX", "OpenAIGenerator", "distinct_texts"]

_log = logging.getLogger(__name__)

T = TypeVar("T")
X = TypeVar("X")

_CONTEXT_HINTS = ("context length", "maximum context", "too long", "max_model_len")
_PROBE_TIMEOUT = 2.0
_CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection: a down server is reported quickly, whatever ``timeout`` is."""
_MAX_RETRY_AFTER = 30.0

ANSWER_LINE = r"[1-9][0-9]?\. [^\n|]{1,80} \| [^\n|]{1,160}"
"""One answer line, ``k. title | explanation``: titles as long as the prompts show them (80
characters), explanations of one sentence. The bounds make every line end, so the first line is
complete within ~80 tokens whatever the model does."""
ANSWER_REGEX = rf"{ANSWER_LINE}(\n{ANSWER_LINE})*"
"""The answer format as a regular expression: one or more answer lines (vLLM compiles it once,
in about a second, and caches it).

``generation.structured = "answer"`` sends it as vLLM structured outputs, so every reply parses;
only a last line cut off by ``max_new_tokens`` can be incomplete.
"""


def distinct_texts(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """The texts without exact repeats, in order, and the positions that were kept."""
    seen: set[str] = set()
    kept: list[int] = []
    for i, text in enumerate(texts):
        if text not in seen:
            seen.add(text)
            kept.append(i)
    return [texts[i] for i in kept], kept


class OpenAIGenerator(CandidateMode):
    """Generation on an OpenAI-compatible server (vLLM), ``config.concurrency`` requests at once.

    Each prompt is one ``POST {base_url}/chat/completions`` carrying every sampling parameter
    explicitly (``temperature``, ``top_p``, ``top_k=-1``, ``max_tokens``, ``n``, ``seed`` and
    vLLM's ``repetition_penalty``), so the server's ``generation_config.json`` never applies.
    Beam search (``num_beams`` > 1) uses vLLM's ``use_beam_search`` with ``n = num_beams`` and
    keeps the best ``num_return_sequences``. Connection errors, timeouts, 5xx and 429 are retried
    ``config.max_retries`` times with exponential backoff (or the server's ``Retry-After``).
    Opening a connection times out after 5 s, so a server that is down or was killed gives a
    ``ServerError`` within seconds; ``config.timeout`` bounds the wait for each answer.

    The prompt's messages are sent in order: the template's fixed instruction (system) first,
    then the user's part, so vLLM's prefix cache reuses the instruction across users.

    Structured outputs (vLLM's ``structured_outputs``; the older top-level ``guided_*`` fields
    are silently ignored by current vLLM) constrain every reply: ``config.structured = "answer"``
    sends :data:`ANSWER_REGEX`; ``structured_regex`` or ``structured_json`` (a JSON schema) set
    another constraint. Candidate mode (see :class:`recgen._candidates.CandidateMode`):
    :meth:`rank_candidates` ranks a given candidate list with ``choice``, and
    :meth:`score_candidates` scores every listed candidate from the answer's first tokens.

    ``count_tokens`` asks the server's ``/tokenize`` endpoint when it answers; otherwise it
    estimates ``ceil(len(text) / 3)``, which over-counts English text (about 4 characters per
    token), the safe side for a prompt budget.

    Args:
        config: Model name, ``base_url``, ``api_key``, sampling and retry settings.
        structured_regex: Constrain outputs to this regular expression (vLLM structured outputs,
            sent as ``"structured_outputs": {"regex": ...}``). Not combinable with beam search.
        structured_json: Constrain outputs to JSON matching this JSON schema (sent as
            ``"structured_outputs": {"json": ...}``). Not combinable with beam search.
        transport: An httpx transport to use instead of the network (tests).
        backoff: Seconds before the first retry; doubled on each further retry.
        tokenize: Whether ``count_tokens`` may ask the server's ``/tokenize`` endpoint.

    Raises:
        ConfigError: if a structured output is combined with ``num_beams`` > 1, or both
            ``structured_regex`` and ``structured_json`` are given.
    """

    def __init__(
        self,
        config: GenerationConfig,
        *,
        structured_regex: str | None = None,
        structured_json: dict[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff: float = 0.5,
        tokenize: bool = True,
    ) -> None:
        self.structured = _structured(config, regex=structured_regex, schema=structured_json)
        self.config = config
        self.name = config.model
        self.base_url = config.base_url.rstrip("/")
        self._transport = transport
        self._backoff = backoff
        self._tokenize: bool | None = None if tokenize else False
        self._counts: dict[str, int] = {}

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        """One ``Generation`` per prompt, in order; texts distinct, in the server's order.

        Raises:
            ServerError: if the server is down, does not serve ``config.model``, finds a prompt
                too long for its context, or keeps failing after the retries.
        """
        if not prompts:
            return []
        return self._map(self._generate_one, prompts)

    def _map(
        self, fn: Callable[[httpx.AsyncClient, X], Awaitable[T]], items: Sequence[X]
    ) -> list[T]:
        """``fn(client, item)`` for every item, ``config.concurrency`` at once, in order."""
        return _run(self._map_async(fn, items))

    async def _map_async(
        self, fn: Callable[[httpx.AsyncClient, X], Awaitable[T]], items: Sequence[X]
    ) -> list[T]:
        limit = asyncio.Semaphore(self.config.concurrency)
        async with self._client() as client:

            async def one(item: X) -> T:
                async with limit:
                    return await fn(client, item)

            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(one(item)) for item in items]
            except BaseExceptionGroup as group_error:
                raise _first_error(group_error) from None
        return [t.result() for t in tasks]

    def _client(self) -> httpx.AsyncClient:
        timeout = self.config.timeout
        return httpx.AsyncClient(
            transport=self._transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, _CONNECT_TIMEOUT)),
            limits=httpx.Limits(max_connections=self.config.concurrency),
            headers={"Authorization": f"Bearer {self.config.api_key}"},
        )

    def payload(self, prompt: Prompt) -> dict[str, Any]:
        """The JSON body sent for ``prompt`` (every sampling parameter explicit)."""
        c = self.config
        beams = c.num_beams > 1
        body: dict[str, Any] = {
            "model": c.model,
            "messages": [{"role": m.role, "content": m.content} for m in prompt.messages],
            "max_tokens": c.max_new_tokens,
            "temperature": c.temperature,
            "top_p": c.top_p,
            "top_k": -1,
            "n": c.num_beams if beams else c.num_return_sequences,
            "seed": c.seed,
            "repetition_penalty": c.repetition_penalty,
        }
        if beams:
            body["use_beam_search"] = True
            body["length_penalty"] = 1.0
        if self.structured is not None:
            body["structured_outputs"] = self.structured
        return body

    async def _generate_one(self, client: httpx.AsyncClient, prompt: Prompt) -> Generation:
        texts = await self._complete(client, prompt, self.payload(prompt))
        kept, _ = distinct_texts(texts[: self.config.num_return_sequences])
        return Generation(prompt=prompt, texts=tuple(kept), model=self.name)

    async def _complete(
        self, client: httpx.AsyncClient, prompt: Prompt, body: dict[str, Any]
    ) -> list[str]:
        """POST one chat completion; its texts in choice order, or a ServerError."""
        choices = await self._complete_json(client, prompt, body)
        return [(ch["message"].get("content") or "").strip() for ch in choices]

    async def _complete_json(
        self, client: httpx.AsyncClient, prompt: Prompt, body: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """POST one chat completion; its choices in order (each with a ``message``)."""
        response = await self._post(client, body)
        if response.status_code != 200:
            await self._raise_refused(client, response, prompt)
        try:
            choices = sorted(response.json()["choices"], key=lambda ch: ch.get("index", 0))
            if not all(isinstance(ch["message"], dict) for ch in choices):
                raise TypeError("message is not an object")
            return choices
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ServerError(
                f"the server at {self.base_url} sent a chat completion without choices/message "
                f"({type(e).__name__}: {e}); is it an OpenAI-compatible server?"
            ) from None

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
        """POST with retries on connection errors, timeouts, 5xx and 429."""
        url = f"{self.base_url}/chat/completions"
        tries = self.config.max_retries + 1
        problem: Exception | str = ""
        for attempt in range(tries):
            delay = self._backoff * 2**attempt
            try:
                response = await client.post(url, json=body)
            except httpx.TransportError as e:
                problem = e
            else:
                if response.status_code < 500 and response.status_code != 429:
                    return response
                problem = f"HTTP {response.status_code}: {_message(response)}"
                delay = _retry_after(response, default=delay)
            if attempt + 1 < tries:
                _log.warning(
                    "%s failed (%s); retry %d in %.1f s",
                    url,
                    _describe(problem),
                    attempt + 1,
                    delay,
                )
                await asyncio.sleep(delay)
        raise self._unreachable(problem, tries)

    def _unreachable(self, problem: Exception | str, tries: int) -> ServerError:
        if isinstance(problem, httpx.ConnectError | httpx.ConnectTimeout):
            return ServerError(
                f"no server at {self.base_url} ({_describe(problem)}; {tries} tries): start one with "
                "`recgen serve` (or `python -m vllm.entrypoints.openai.api_server --model DIR "
                "--host 127.0.0.1`), or set generation.base_url to a running server"
            )
        if isinstance(problem, httpx.TimeoutException):
            return ServerError(
                f"the server at {self.base_url} did not answer within {self.config.timeout} s "
                f"({tries} tries); raise generation.timeout or lower generation.concurrency"
            )
        return ServerError(
            f"the server at {self.base_url} kept failing ({_describe(problem)}; {tries} tries); see the "
            "server's log"
        )

    async def _raise_refused(
        self, client: httpx.AsyncClient, response: httpx.Response, prompt: Prompt
    ) -> NoReturn:
        """Turn a 4xx answer into a ServerError that names the cause and the fix."""
        message = _message(response)
        lowered = message.lower()
        code = response.status_code
        if code == 400 and any(hint in lowered for hint in _CONTEXT_HINTS):
            raise ServerError(
                f"the prompt for user {prompt.user_id!r} is too long for {self.name!r} at "
                f"{self.base_url}: {message}. Lower prompt.max_prompt_tokens or "
                "generation.max_new_tokens, or serve with a larger --max-model-len"
            )
        if code == 404 and "model" not in lowered:
            raise ServerError(
                f"{self.base_url}/chat/completions does not exist (HTTP 404: {message}); "
                "generation.base_url usually ends in /v1"
            )
        if code == 404 or (code == 400 and "model" in lowered and "not exist" in lowered):
            served = await self._served_models(client)
            raise ServerError(
                f"model {self.name!r} is not served at {self.base_url} ({message}); served: "
                f"{', '.join(served) if served else 'unknown'}. Set generation.model to one of "
                "them, or serve the adapter with --lora-modules NAME=DIR"
            )
        raise ServerError(
            f"the server at {self.base_url} refused the request for user {prompt.user_id!r} "
            f"(HTTP {code}): {message}"
        )

    async def _served_models(self, client: httpx.AsyncClient) -> list[str]:
        try:
            response = await client.get(f"{self.base_url}/models")
            return [str(m["id"]) for m in response.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []

    # ------------------------------------------------------------------ token counting

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text``: the server's ``/tokenize`` if it answers, else ceil(len / 3)."""
        if self._tokenize is not False:
            if text in self._counts:
                return self._counts[text]
            count = self._remote_count(text)
            if count is not None:
                self._counts[text] = count
                return count
        return -(-len(text) // 3)

    def _remote_count(self, text: str) -> int | None:
        root = self.base_url.removesuffix("/v1")
        transport = self._transport if isinstance(self._transport, httpx.BaseTransport) else None
        if self._transport is not None and transport is None:
            self._tokenize = False
            return None
        body = {"model": self.name, "prompt": text, "add_special_tokens": False}
        try:
            with httpx.Client(transport=transport, timeout=_PROBE_TIMEOUT) as client:
                response = client.post(f"{root}/tokenize", json=body)
            response.raise_for_status()
            count = int(response.json()["count"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            if self._tokenize is None:
                _log.info("no /tokenize at %s (%s): estimating len/3 tokens", root, e)
            self._tokenize = False
            return None
        self._tokenize = True
        return count


def _message(response: httpx.Response) -> str:
    """The error message of an OpenAI/vLLM error body, else the start of the body."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in data:
            return str(data["message"])
        if isinstance(error, str):
            return error
    return response.text[:300]


def _describe(problem: Exception | str) -> str:
    """An exception as ``Type: message`` (httpx timeouts have empty messages)."""
    if isinstance(problem, Exception):
        return f"{type(problem).__name__}: {problem}" if str(problem) else type(problem).__name__
    return problem


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first ServerError in a (nested) exception group, else its first exception."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_error(error)
        if isinstance(error, ServerError):
            return error
    return group.exceptions[0]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _structured(
    config: GenerationConfig, *, regex: str | None, schema: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The ``structured_outputs`` field to send with every request, if any."""
    if regex is not None and schema is not None:
        raise ConfigError("pass structured_regex or structured_json, not both")
    if regex is None and schema is None and config.structured == "answer":
        regex = ANSWER_REGEX
    if regex is None and schema is None:
        return None
    if config.num_beams > 1:
        raise ConfigError(
            f"structured outputs with generation.num_beams={config.num_beams}: vLLM cannot "
            "combine structured outputs with beam search; set num_beams=1 (or "
            "generation.structured='none')"
        )
    return {"regex": regex} if regex is not None else {"json": schema}


def _retry_after(response: httpx.Response, *, default: float) -> float:
    """The server's ``Retry-After`` in seconds (capped), else ``default``."""
    try:
        return min(max(float(response.headers.get("retry-after", "")), 0.0), _MAX_RETRY_AFTER)
    except ValueError:
        return default
