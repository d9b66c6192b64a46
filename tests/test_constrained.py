"""Tests for recgen.constrained: the title trie, its logits processor, trie decoding through the
pipeline with a tiny random model (fast), and the embedded model on MovieLens users (``model``)."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recgen import data, parsing
from recgen.config import GenerationConfig, load_config
from recgen.constrained import ANSWER_PREFIX, AnswerTitles, TitleTrie, TrieLogitsProcessor
from recgen.errors import ConfigError
from recgen.generation import FakeGenerator, TransformersGenerator, _prefill
from recgen.grounding import CatalogIndex, HashEncoder
from recgen.pipeline import Recommender, _answer_title
from recgen.types import Catalog, History, Item

EOS = 2
CATALOG = Path(__file__).parent / "data" / "catalog.jsonl"
LONG = "A " + "very " * 45 + "long title (2001)"  # over parsing.MAX_TITLE_CHARS
EXTRA = {"51": "The Matrix (1999)", "52": "Foo | Bar (2000)", "53": LONG, "54": "Heat (1986)"}


class WordTokenizer:
    """A fake tokenizer like byte-level BPE: a word with its leading space is one token, digits
    one by one; ids are handed out on first sight. Enough of the transformers API for the
    generator (chat template, left-padded batches)."""

    pad_token_id = eos_token_id = EOS
    _PIECES = re.compile(r" ?[^\W\d_]+| ?\d| ?[^\w\s]| ?_|\s")

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.vocab.setdefault(p, len(self.vocab) + 3) for p in self._PIECES.findall(text)]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def __call__(self, texts: Any, return_tensors: str | None = None, **_: Any) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts)}
        ids = self.tokenize(texts)
        if return_tensors != "pt":
            return {"input_ids": ids}
        width = max(map(len, ids))
        pad = [[EOS] * (width - len(x)) for x in ids]
        return {
            "input_ids": torch.tensor([p + x for p, x in zip(pad, ids, strict=True)]),
            "attention_mask": torch.tensor(
                [[0] * len(p) + [1] * len(x) for p, x in zip(pad, ids, strict=True)]
            ),
        }

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
        return "".join(f"<{m['role']}> {m['content']}\n" for m in messages) + "<assistant>\n"


def _trie(titles: list[str], tok: WordTokenizer | None = None) -> tuple[TitleTrie, WordTokenizer]:
    tok = tok or WordTokenizer()
    return TitleTrie.build(titles, tokenize=tok.tokenize, eos_token_id=EOS), tok


def _path(tok: WordTokenizer, title: str) -> list[int]:
    return tok.encode(f" {title} |")


def _allowed(processor: TrieLogitsProcessor, rows: list[list[int]]) -> list[dict[int, float]]:
    """Run the processor on uniform log-probs over 64 tokens for rows of one length (as beam
    search has them): per row, the tokens left finite and their values."""
    ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1)
    scores = torch.full((len(rows), 64), -math.log(64))
    out = processor(ids, scores)  # type: ignore[arg-type]
    return [
        {int(t): float(out[i, t]) for t in torch.nonzero(out[i] > -math.inf)}
        for i in range(len(rows))
    ]


# --------------------------------------------------------------------------- the trie


TITLES = ["Heat (1995)", "Heat (1986)", "Alien (1979)", "Aliens (1986)", "Fargo (1996)"]


def test_paths_are_titles_as_written_after_the_answer_prefix() -> None:
    trie, tok = _trie(TITLES)
    assert trie.leaf([*_path(tok, "Heat (1995)"), EOS]) == 0
    assert trie.leaf([*_path(tok, "Fargo (1996)"), EOS]) == 4
    assert trie.leaf([*tok.encode("Fargo (1996) |"), EOS]) is None  # no leading space
    assert trie.leaf(_path(tok, "Fargo (1996)")) is None  # not ended
    assert trie.leaf([*tok.encode(" Fargo (1997) |"), EOS]) is None
    assert trie.depth == max(len(_path(tok, t)) for t in TITLES) + 1


def test_a_prefix_that_tokenizes_with_the_title_falls_back_to_the_title_alone() -> None:
    tok = WordTokenizer()

    def merging(texts: list[str]) -> list[list[int]]:  # "1." then " Heat" merges into "1.␣Heat"
        return [[99, *tok.encode(t[3:])] if t.startswith("1. ") else tok.encode(t) for t in texts]

    trie = TitleTrie.build(["Heat (1995)"], tokenize=merging, eos_token_id=EOS)
    assert trie.leaf([*_path(tok, "Heat (1995)"), EOS]) == 0


def test_processor_masks_everything_but_the_continuations() -> None:
    trie, tok = _trie(TITLES)
    heat, paren = tok.encode(" Heat (")

    def allowed(generated: list[int]) -> dict[int, float]:  # after a one-token prompt
        processor = TrieLogitsProcessor([trie.view()], num_beams=1, prompt_len=1)
        return _allowed(processor, [[7, *generated]])[0]

    root, after_heat = allowed([]), allowed([heat])
    after_19 = allowed([heat, paren, *tok.encode("19")])
    assert set(root) == {tok.encode(f" {w}")[0] for w in ("Heat", "Alien", "Aliens", "Fargo")}
    assert set(after_heat) == {paren}
    assert set(after_19) == {tok.encode("9")[0], tok.encode("8")[0]}
    assert all(
        v == pytest.approx(-math.log(64)) for v in root.values()
    )  # log-probs kept as they are


def test_after_a_complete_title_only_the_end_token_is_allowed_at_no_cost() -> None:
    trie, tok = _trie(TITLES)
    processor = TrieLogitsProcessor([trie.view()], num_beams=1, prompt_len=0)
    (done,) = _allowed(processor, [_path(tok, "Fargo (1996)")])
    assert done == {EOS: 0.0}
    (almost,) = _allowed(processor, [_path(tok, "Fargo (1996)")[:-1]])
    assert EOS not in almost
    assert set(almost) == {tok.encode(" |")[0]}


def test_off_trie_rows_get_nothing() -> None:
    trie, tok = _trie(TITLES)
    processor = TrieLogitsProcessor([trie.view()], num_beams=1, prompt_len=0)
    assert _allowed(processor, [tok.encode(" Casablanca")]) == [{}]


def test_history_removes_its_title_and_prefixes_with_nothing_left() -> None:
    trie, tok = _trie(TITLES)
    view = trie.view(removed={0, 2, 3})  # Heat (1995), Alien, Aliens
    processor = TrieLogitsProcessor([view], num_beams=1, prompt_len=0)
    heat = tok.encode(" Heat (19")
    (root,) = _allowed(processor, [[]])
    assert set(root) == {tok.encode(" Heat")[0], tok.encode(" Fargo")[0]}  # Alien* all seen
    (year,) = _allowed(processor, [heat])
    assert set(year) == {tok.encode("8")[0]}  # Heat (1986) is still allowed, (1995) is not
    assert view.next_tokens(trie.root) == trie.view(only={1, 4}).next_tokens(trie.root)


def test_candidates_restrict_the_trie_and_history_still_wins() -> None:
    trie, tok = _trie(TITLES)
    view = trie.view(only={2, 3, 4}, removed={4})
    assert set(view.next_tokens(trie.root)) == {tok.encode(" Alien")[0], tok.encode(" Aliens")[0]}
    assert int(view.alive(*trie.root[:2])) == 2


def test_trie_rows_are_independent_per_prompt() -> None:
    trie, tok = _trie(TITLES)
    processor = TrieLogitsProcessor(
        [trie.view(removed={4}), trie.view(only={4})], num_beams=2, prompt_len=0
    )
    a, b, c, d = _allowed(processor, [[], [], [], []])
    fargo = tok.encode(" Fargo")[0]
    assert fargo not in a
    assert fargo not in b
    assert set(c) == set(d) == {fargo}


# --------------------------------------------------------------------------- answer titles


def _catalog() -> Catalog:
    items = data.load_catalog(CATALOG).items
    extra = tuple(Item(item_id=k, title=t) for k, t in EXTRA.items())
    return Catalog(items=items + extra, name="fixture")


def _reader(index: CatalogIndex):
    def read(line: str) -> tuple[int, ...]:  # what Recommender._read_answer does
        parsed = parsing.parse_text(line).candidates
        return index.match_exact(parsed[0].title) if len(parsed) == 1 else ()

    return read


def _titles(catalog: Catalog) -> AnswerTitles:
    config = load_config(overrides=["grounding.encoder=hash"]).grounding
    index = CatalogIndex.build(catalog, HashEncoder(), config, show_progress=False)
    return AnswerTitles.build(catalog, write=_answer_title, read=_reader(index))


def test_answer_titles_read_back_to_their_items() -> None:
    catalog = _catalog()
    titles = _titles(catalog)
    by_title = dict(zip(titles.titles, titles.item_ids, strict=True))
    assert by_title["Chasing Amy (1997)"] == "18"  # "19" shares the title: written once
    assert titles.shared == 2  # Chasing Amy, Ice Storm
    assert by_title["The Matrix (1999)"] == "4"  # grounding reads it as "Matrix, The (1999)"
    assert by_title["Foo Bar (2000)"] == "52"  # the answer separator is cleaned away
    assert LONG not in by_title
    assert "53" not in titles.item_ids
    assert titles.skipped >= 1
    assert len(set(titles.titles)) == len(titles.titles)


def test_a_seen_duplicate_blocks_the_shared_title() -> None:
    titles = _titles(_catalog())
    amy = titles.titles.index("Chasing Amy (1997)")
    matrix = {titles.titles.index(t) for t in ("Matrix, The (1999)", "The Matrix (1999)")}
    assert titles.allowed(exclude={"19"}) == (None, {amy})
    assert titles.allowed(exclude={"4"}) == (None, matrix)
    only, removed = titles.allowed(exclude={"3"}, candidates=["3", "4", "54"])
    assert only == matrix | {titles.titles.index(t) for t in ("Heat (1995)", "Heat (1986)")}
    assert removed == {titles.titles.index("Heat (1995)")}


def test_answer_dedupes_beams_by_item_and_counts_them() -> None:
    titles = _titles(_catalog())
    picks = [("Matrix, The (1999)", -1.0), ("Fargo (1996)", -2.0), ("The Matrix (1999)", -3.0)]
    beams = [(titles.titles.index(t), s) for t, s in picks]
    text, scores, duplicates = titles.answer(beams)
    assert text == "1. Matrix, The (1999)\n2. Fargo (1996)"
    assert scores == (-1.0, -2.0)
    assert duplicates == 1


# --------------------------------------------------------------------------- tiny model


def _tiny_generator(**config: Any) -> TransformersGenerator:
    """A TransformersGenerator around a 2-layer random Llama and the word tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    eos_token_id=EOS, pad_token_id=EOS, bos_token_id=1)
    ).eval()  # fmt: skip
    settings = GenerationConfig(decoding="trie", num_beams=4, batch_size=2, **config)
    gen = object.__new__(TransformersGenerator)  # what __init__ sets, without loading a model
    gen.__dict__.update(config=settings, name="tiny", tokenizer=WordTokenizer(), model=model,
                        tokens_per_second=None, _tries={})  # fmt: skip
    return gen


def _tiny_recommender(**config: Any) -> Recommender:
    overrides = ["grounding.encoder=hash", "generation.decoding=trie", "generation.num_beams=4",
                 "ranking.collab_weight=0", "prompt.max_prompt_tokens=2000"]  # fmt: skip
    cfg = load_config(overrides=overrides)
    catalog = _catalog()
    index = CatalogIndex.build(catalog, HashEncoder(), cfg.grounding, show_progress=False)
    return Recommender(cfg, catalog=catalog, generator=_tiny_generator(**config), index=index)


HISTORIES = [["3", "4", "18"], ["7", "8", "9", "10", "40"], ["37"]]


def test_trie_decoding_through_the_pipeline_grounds_every_line_exactly() -> None:
    rec = _tiny_recommender()
    traces = rec.trace_batch(HISTORIES, n=4)
    titles = set(rec.catalog.titles)
    for history, trace in zip(HISTORIES, traces, strict=True):
        assert trace.generation is not None
        assert trace.grounding is not None
        (text,) = trace.generation.texts
        assert text.startswith("1. ")
        assert trace.parsed is not None
        assert not trace.parsed.failures
        assert not trace.grounding.rejected
        grounded = trace.grounding.grounded
        assert len(grounded) == 4
        assert all(g.match == "exact" and g.similarity == 1.0 for g in grounded)
        assert {g.candidate.title for g in grounded} <= titles | {
            "The Matrix (1999)",
            "Foo Bar (2000)",
        }
        assert not {g.item_id for g in grounded} & set(history)
        assert not {g.item_id for g in grounded} & {"19", "51", "53"}  # never named by a title
        assert len({g.item_id for g in grounded}) == 4
        scores = trace.generation.scores
        assert scores is not None
        assert len(scores) == 4
        assert list(scores) == sorted(scores, reverse=True)
        assert [r.item_id for r in trace.recommendations] == [g.item_id for g in grounded]
        assert all(r.source == "llm" for r in trace.recommendations)


def test_scores_are_the_models_log_probabilities_of_the_titles() -> None:
    gen = _tiny_generator()
    catalog = _catalog()
    titles = _titles(catalog)
    (g,) = gen.generate_titles([_prompt()], titles=titles, excludes=[set()], n=3)
    batch = gen._tokenize([_prompt()], answer=ANSWER_PREFIX)
    tok = gen.tokenizer
    for line, score in zip(g.texts[0].splitlines(), g.scores or (), strict=True):
        path = tok.encode(f" {line.split('. ', 1)[1]} |")
        ids = torch.cat([batch["input_ids"][0], torch.tensor(path)])[None]
        with torch.no_grad():
            logp = torch.log_softmax(gen.model(ids).logits[0, :-1], -1)
        start = batch["input_ids"].shape[1] - 1
        expected = sum(float(logp[start + i, t]) for i, t in enumerate(path))
        assert score == pytest.approx(expected, abs=1e-4)  # summed, no length penalty; end free


def test_candidates_and_fewer_titles_than_beams() -> None:
    rec = _tiny_recommender()
    trace = rec.trace_batch([["3"]], n=4, candidates=["3", "37", "40"])[0]
    assert trace.grounding is not None
    assert {g.item_id for g in trace.grounding.grounded} == {"37", "40"}
    assert [r.item_id for r in trace.recommendations][:2] == [
        g.item_id for g in trace.grounding.grounded
    ]
    empty = rec.trace_batch([["3"]], n=2, candidates=["3"])[0]
    assert empty.generation is not None
    assert empty.generation.texts == ()
    assert empty.recommendations == ()


def test_shared_prefill_equals_beam_search_over_whole_prompts() -> None:
    gen = _tiny_generator()
    batch = gen._tokenize(
        [_prompt("Name one film."), _prompt("A much longer prompt here, padded less.")]
    )
    kw: dict[str, Any] = {
        "num_beams": 3,
        "num_return_sequences": 3,
        "max_new_tokens": 5,
        "do_sample": False,
        "length_penalty": 0.0,
        "pad_token_id": EOS,
        "return_dict_in_generate": True,
        "output_scores": True,
    }
    with torch.inference_mode():
        plain = gen.model.generate(**batch, **kw)
        shared = gen.model.generate(**batch, cache=_prefill(gen.model, batch, copies=3), **kw)
    assert torch.equal(plain.sequences, shared.sequences)
    assert torch.allclose(plain.sequences_scores, shared.sequences_scores, atol=1e-5)


def _prompt(text: str = "I liked Heat (1995). Suggest films.") -> Any:
    from recgen.types import Message, Prompt

    return Prompt(messages=(Message(role="user", content=text),), template="t", template_hash="0")


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generation.backend=openai", "needs backend='transformers'"),
        ("generation.temperature=0.7", "is beam search"),
        ("generation.num_beams=1", "num_beams >= 2"),
    ],
)
def test_trie_decoding_config_errors_name_the_fix(override: str, message: str) -> None:
    base = ["generation.decoding=trie", "generation.num_beams=4"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=[*base, override])


def test_more_items_than_beams_is_a_config_error() -> None:
    rec = _tiny_recommender()
    with pytest.raises(ConfigError, match=r"num_beams >= 5 \(got 4\)"):
        rec.recommend(["3"], n=5)


def test_a_generator_without_trie_decoding_is_refused() -> None:
    rec = _tiny_recommender()
    rec.generator = FakeGenerator()
    with pytest.raises(ConfigError, match="decodes under a title trie"):
        rec.recommend(["3"], n=2)


# --------------------------------------------------------------------------- the real model


@pytest.mark.model
def test_embedded_model_trie_decoding_on_movielens_users(shared_data: Path) -> None:
    from recgen import splits

    config = load_config(
        overrides=[
            f"data.source={shared_data / 'ml-100k'}",
            "collab.method=popular",
            "grounding.encoder=hash",  # exact grounding needs no embeddings
            "generation.dtype=float32",
            "generation.decoding=trie",
            "generation.num_beams=5",
            "ranking.collab_weight=0",
        ]
    )
    torch.set_num_threads(2)
    dataset = data.load_data(config.data)
    split = splits.split_dataset(dataset, config.data)
    rec = Recommender.fit(config, dataset=dataset, split=split, show_progress=False)
    examples = list(split.test[:2])
    traces = rec.trace_batch([ex.history for ex in examples], n=5)
    catalog_titles = set(rec.catalog.titles)
    for ex, trace in zip(examples, traces, strict=True):
        assert trace.generation is not None
        assert trace.parsed is not None
        lines = [c.title for c in trace.parsed.candidates]
        assert len(lines) == 5
        assert set(lines) <= catalog_titles
        ids = [r.item_id for r in trace.recommendations]
        assert len(set(ids)) == 5
        assert not set(ids) & set(History.create(ex.history).item_ids)
        assert [rec.catalog[i].title for i in ids] == lines
        assert trace.grounding is not None
        assert all(g.match == "exact" and g.similarity == 1.0 for g in trace.grounding.grounded)
        scores = trace.generation.scores
        assert scores is not None
        assert len(scores) == 5
        assert all(a >= b for a, b in itertools.pairwise(scores))
        assert all(np.isfinite(scores))
