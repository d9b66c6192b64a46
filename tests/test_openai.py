"""Tests for recgen._openai beyond the basics in test_generation: structured outputs, candidate
mode by constrained choice, timeouts, Retry-After and dropped connections (scripted servers)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from recgen._openai import ANSWER_REGEX, OpenAIGenerator
from recgen.config import GenerationConfig
from recgen.errors import ConfigError, DataError, ServerError
from recgen.parsing import parse_text
from recgen.prompting import clean_text, format_answer
from recgen.types import Message, Prompt

PROMPT = Prompt(
    messages=(
        Message(role="system", content="You are a recommender. Pick from the candidates."),
        Message(role="user", content="Candidates:\n1. Heat (1995)\n2. Alien (1979)\n3. Ran (1985)"),
    ),
    template="rerank",
    template_hash="0",
    user_id="u1",
)
TITLES = ["Heat (1995)", "Alien (1979)", "Ran (1985)"]


def _completion(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def _generator(
    handler: Callable[[httpx.Request], httpx.Response], **config: Any
) -> tuple[OpenAIGenerator, list[dict[str, Any]]]:
    bodies: list[dict[str, Any]] = []

    def record(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content) if request.content else {})
        return handler(request)

    settings = {"backend": "openai", "model": "smol", "max_retries": 2, "timeout": 5.0, **config}
    gen = OpenAIGenerator(
        GenerationConfig(**settings), transport=httpx.MockTransport(record), backoff=0.001
    )
    return gen, bodies


# --------------------------------------------------------------------------- structured outputs


def test_answer_regex_is_sent_when_configured() -> None:
    gen, bodies = _generator(lambda r: httpx.Response(200, json=_completion("1. Heat (1995) | x")))
    assert "structured_outputs" not in gen.payload(PROMPT)
    constrained, bodies = _generator(
        lambda r: httpx.Response(200, json=_completion("1. Heat (1995) | x")), structured="answer"
    )
    constrained.generate([PROMPT])
    assert bodies[0]["structured_outputs"] == {"regex": ANSWER_REGEX}
    assert "guided_regex" not in bodies[0]  # the old field is silently ignored by vLLM


def test_json_schema_and_conflicts() -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    gen = OpenAIGenerator(GenerationConfig(backend="openai"), structured_json=schema)
    assert gen.payload(PROMPT)["structured_outputs"] == {"json": schema}
    with pytest.raises(ConfigError, match="not both"):
        OpenAIGenerator(GenerationConfig(), structured_regex="a", structured_json=schema)
    with pytest.raises(ConfigError, match="beam search"):
        OpenAIGenerator(GenerationConfig(num_beams=2, structured="answer"))


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)


@given(st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=12))
def test_answer_regex_accepts_the_strict_format_and_parses(entries: list[tuple[str, str]]) -> None:
    assume(all(clean_text(t, 80) and clean_text(e, 200) for t, e in entries))
    text = format_answer(entries, max_title_chars=80)
    assert re.fullmatch(ANSWER_REGEX, text)
    parsed = parse_text(text)
    assert len(parsed.candidates) + len(parsed.failures) == len(entries)


def test_answer_regex_rejects_prose_and_blank_lines() -> None:
    prose = ("Here are some picks:\n1. Heat (1995) | x", "1. Heat | a\n\n2. Ran | b", "Heat")
    for text in (*prose, f"1. {'x' * 81} | too long a title"):
        assert re.fullmatch(ANSWER_REGEX, text) is None
    assert re.fullmatch(ANSWER_REGEX, "1. Heat (1995) | Crime.\n2. Ran (1985) | Epic.")


# --------------------------------------------------------------------------- candidate mode


def _chooser(order: list[str]) -> Callable[[httpx.Request], httpx.Response]:
    """A server that answers each choice request with the first allowed title in ``order``."""

    def handler(request: httpx.Request) -> httpx.Response:
        choices = json.loads(request.content)["structured_outputs"]["choice"]
        for title in order:
            for choice in choices:
                if choice.strip().split(". ", 1)[1] == title:
                    return httpx.Response(200, json=_completion(choice))
        return httpx.Response(200, json=_completion("not a candidate"))

    return handler


def test_rank_candidates_continues_the_answer_with_the_unused_candidates() -> None:
    gen, bodies = _generator(_chooser(["Ran (1985)", "Heat (1995)", "Alien (1979)"]))
    (out,) = gen.rank_candidates([PROMPT], [TITLES], k=2)
    assert out.texts == ("1. Ran (1985)\n2. Heat (1995)",)
    first, second = bodies
    assert first["structured_outputs"]["choice"] == [f"1. {t}" for t in TITLES]
    assert len(first["messages"]) == 2
    assert "continue_final_message" not in first
    assert (first["temperature"], first["n"]) == (0.0, 1)
    assert second["structured_outputs"]["choice"] == ["\n2. Heat (1995)", "\n2. Alien (1979)"]
    assert second["messages"][:2] == first["messages"]  # same prefix: the prefix cache reuses it
    assert second["messages"][2] == {"role": "assistant", "content": "1. Ran (1985)"}
    assert (second["continue_final_message"], second["add_generation_prompt"]) == (True, False)


def test_rank_candidates_many_prompts_and_bad_replies() -> None:
    gen, bodies = _generator(_chooser(["Alien (1979)"]))
    out = gen.rank_candidates([PROMPT, PROMPT], [TITLES, ["Heat (1995)"]], k=5)
    # the second prompt's only candidate is never chosen by this server: no lines, no error
    assert [g.texts for g in out] == [("1. Alien (1979)",), ("",)]
    assert len(bodies) == 3
    with pytest.raises(DataError, match="one non-empty candidate list per prompt"):
        gen.rank_candidates([PROMPT], [TITLES, TITLES], k=1)
    with pytest.raises(DataError):
        gen.rank_candidates([PROMPT], [[]], k=1)
    beams = OpenAIGenerator(GenerationConfig(num_beams=2))
    with pytest.raises(ConfigError, match="beam search"):
        beams.rank_candidates([PROMPT], [TITLES], k=1)


def _listing(n: int) -> Prompt:
    return Prompt(
        messages=PROMPT.messages,
        template="rerank",
        template_hash="0",
        user_id="u1",
        candidates=tuple(str(i) for i in range(1, n + 1)),
    )


def _logprobs(top: dict[str, float]) -> dict[str, Any]:
    entries = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top.items()]
    content = [{"token": next(iter(top)), "logprob": 0.0, "top_logprobs": entries}]
    return {
        "choices": [{"index": 0, "message": {"content": "1"}, "logprobs": {"content": content}}]
    }


def test_score_candidates_matches_the_verbalizer_definition() -> None:
    first = {"1": -1.0, "2": -2.0, "3": -3.0, "9": -4.0}
    after = {"1": {".": -0.1, "0": -0.5, "1": -0.7, "2": -3.0}, "2": {".": -0.2, "0": -0.3}}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        answer = body["messages"][-1]["content"] if body.get("continue_final_message") else ""
        return httpx.Response(200, json=_logprobs(after[answer] if answer else first))

    gen, bodies = _generator(handler)
    (scores,) = gen.score_candidates([_listing(12)])
    assert len(scores) == 12
    assert scores[0] == pytest.approx(-1.0 - 0.1)  # "1" then "."
    assert scores[2] == pytest.approx(-3.0)  # "3" leads no two-digit number of 12
    assert scores[9] == pytest.approx(-1.0 - 0.5)  # "10"
    assert scores[11] == pytest.approx(-1.0 - 3.0)  # "12"
    assert scores[4] == pytest.approx(-4.0 - 1.0)  # "5" was not returned: below the lowest
    assert len(bodies) == 2  # the prompt, then the prompt continued with "1"
    assert (bodies[0]["max_tokens"], bodies[0]["top_logprobs"], bodies[0]["logprobs"]) == (
        1,
        20,
        True,
    )
    assert bodies[1]["messages"][-1] == {"role": "assistant", "content": "1"}
    (short,) = gen.score_candidates([_listing(3)])
    assert short == pytest.approx([-1.0, -2.0, -3.0])


def test_score_candidates_needs_listed_candidates() -> None:
    gen, _ = _generator(lambda r: httpx.Response(200, json=_logprobs({"1": -1.0})))
    with pytest.raises(DataError, match="1 to 99 candidates"):
        gen.score_candidates([PROMPT])
    assert gen.score_candidates([]) == []


# --------------------------------------------------------------------------- timeouts, retries


def test_read_timeouts_are_retried_then_named() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    gen, bodies = _generator(handler, timeout=7.0)
    with pytest.raises(ServerError, match=r"did not answer within 7\.0 s \(3 tries\)"):
        gen.generate([PROMPT])
    assert len(bodies) == 3


def test_a_dropped_connection_is_retried() -> None:
    answers = iter(["drop", "ok"])

    def handler(request: httpx.Request) -> httpx.Response:
        if next(answers) == "drop":
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        return httpx.Response(200, json=_completion("1. Heat (1995) | x"))

    gen, bodies = _generator(handler)
    assert gen.generate([PROMPT])[0].texts == ("1. Heat (1995) | x",)
    assert len(bodies) == 2


def test_retry_after_is_honoured_and_capped() -> None:
    answers = iter([httpx.Response(429, headers={"Retry-After": "0"}, json={"message": "busy"})])

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or httpx.Response(200, json=_completion("ok"))

    gen, _ = _generator(handler)
    gen._backoff = 60.0  # without Retry-After: 0 the retry would wait a minute
    start = time.perf_counter()
    assert gen.generate([PROMPT])[0].texts == ("ok",)
    assert time.perf_counter() - start < 5


def test_connecting_has_its_own_short_timeout() -> None:
    gen = OpenAIGenerator(GenerationConfig(backend="openai", timeout=300.0, concurrency=4))
    client = gen._client()
    assert (client.timeout.connect, client.timeout.read) == (5.0, 300.0)


def test_messages_keep_the_fixed_instruction_first() -> None:
    body = OpenAIGenerator(GenerationConfig(backend="openai")).payload(PROMPT)
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == PROMPT.messages[0].content
