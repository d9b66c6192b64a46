"""The OpenAI-compatible server backend (vLLM): async HTTP, retries, and errors that say what to do.

Re-exported by ``recgen.generation``; use it through ``make_generator`` or
``recgen.generation.OpenAIGenerator``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import httpx

from recgen.config import GenerationConfig
from recgen.errors import ConfigError, ServerError
from recgen.types import Generation, Prompt

__all__ = ["OpenAIGenerator", "distinct_texts"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

_CONTEXT_HINTS = ("context length", "maximum context", "too long", "max_model_len")
_PROBE_TIMEOUT = 2.0


def distinct_texts(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """The texts without exact repeats, in order, and the positions that were kept."""
    seen: set[str] = set()
    kept: list[int] = []
    for i, text in enumerate(texts):
        if text not in seen:
            seen.add(text)
            kept.append(i)
    return [texts[i] for i in kept], kept


class OpenAIGenerator:
    """Generation on an OpenAI-compatible server (vLLM), ``config.concurrency`` requests at once.

    Each prompt is one ``POST {base_url}/chat/completions`` carrying every sampling parameter
    explicitly (``temperature``, ``top_p``, ``top_k=-1``, ``max_tokens``, ``n``, ``seed`` and
    vLLM's ``repetition_penalty``), so the server's ``generation_config.json`` never applies.
    Beam search (``num_beams`` > 1) uses vLLM's ``use_beam_search`` with ``n = num_beams`` and
    keeps the best ``num_return_sequences``. Connection errors, timeouts, 5xx and 429 are retried
    ``config.max_retries`` times with exponential backoff.

    ``count_tokens`` asks the server's ``/tokenize`` endpoint when it answers; otherwise it
    estimates ``ceil(len(text) / 3)``, which over-counts English text (about 4 characters per
    token), the safe side for a prompt budget.

    Args:
        config: Model name, ``base_url``, ``api_key``, sampling and retry settings.
        structured_regex: Constrain outputs to this regular expression (vLLM structured outputs,
            sent as ``"structured_outputs": {"regex": ...}``). Not combinable with beam search.
        transport: An httpx transport to use instead of the network (tests).
        backoff: Seconds before the first retry; doubled on each further retry.
        tokenize: Whether ``count_tokens`` may ask the server's ``/tokenize`` endpoint.

    Raises:
        ConfigError: if ``structured_regex`` is combined with ``num_beams`` > 1.
    """

    def __init__(
        self,
        config: GenerationConfig,
        *,
        structured_regex: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff: float = 0.5,
        tokenize: bool = True,
    ) -> None:
        if structured_regex is not None and config.num_beams > 1:
            raise ConfigError(
                f"structured_regex with generation.num_beams={config.num_beams}: vLLM cannot "
                "combine structured outputs with beam search; set num_beams=1"
            )
        self.config = config
        self.name = config.model
        self.base_url = config.base_url.rstrip("/")
        self.structured_regex = structured_regex
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
        return _run(self._generate_all(prompts))

    async def _generate_all(self, prompts: Sequence[Prompt]) -> list[Generation]:
        limit = asyncio.Semaphore(self.config.concurrency)
        async with self._client() as client:

            async def one(prompt: Prompt) -> Generation:
                async with limit:
                    return await self._generate_one(client, prompt)

            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(one(p)) for p in prompts]
            except BaseExceptionGroup as group_error:
                raise _first_error(group_error) from None
        return [t.result() for t in tasks]

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=self._transport,
            timeout=httpx.Timeout(self.config.timeout),
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
        if self.structured_regex is not None:
            body["structured_outputs"] = {"regex": self.structured_regex}
        return body

    async def _generate_one(self, client: httpx.AsyncClient, prompt: Prompt) -> Generation:
        response = await self._post(client, prompt)
        if response.status_code != 200:
            await self._raise_refused(client, response, prompt)
        try:
            choices = sorted(response.json()["choices"], key=lambda ch: ch.get("index", 0))
            texts = [(ch["message"].get("content") or "").strip() for ch in choices]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ServerError(
                f"the server at {self.base_url} sent a chat completion without choices/message "
                f"({type(e).__name__}: {e}); is it an OpenAI-compatible server?"
            ) from None
        kept, _ = distinct_texts(texts[: self.config.num_return_sequences])
        return Generation(prompt=prompt, texts=tuple(kept), model=self.name)

    async def _post(self, client: httpx.AsyncClient, prompt: Prompt) -> httpx.Response:
        """POST with retries on connection errors, timeouts, 5xx and 429."""
        url = f"{self.base_url}/chat/completions"
        tries = self.config.max_retries + 1
        problem: Exception | str = ""
        for attempt in range(tries):
            try:
                response = await client.post(url, json=self.payload(prompt))
            except httpx.TransportError as e:
                problem = e
            else:
                if response.status_code < 500 and response.status_code != 429:
                    return response
                problem = f"HTTP {response.status_code}: {_message(response)}"
            if attempt + 1 < tries:
                delay = self._backoff * 2**attempt
                _log.warning("%s failed (%s); retry %d in %.1f s", url, problem, attempt + 1, delay)
                await asyncio.sleep(delay)
        raise self._unreachable(problem, tries)

    def _unreachable(self, problem: Exception | str, tries: int) -> ServerError:
        if isinstance(problem, httpx.ConnectError):
            return ServerError(
                f"no server at {self.base_url} ({problem}; {tries} tries): start one with "
                "`recgen serve` (or `python -m vllm.entrypoints.openai.api_server --model DIR "
                "--host 127.0.0.1`), or set generation.base_url to a running server"
            )
        if isinstance(problem, httpx.TimeoutException):
            return ServerError(
                f"the server at {self.base_url} did not answer within {self.config.timeout} s "
                f"({tries} tries); raise generation.timeout or lower generation.concurrency"
            )
        return ServerError(
            f"the server at {self.base_url} kept failing ({problem}; {tries} tries); see the "
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
