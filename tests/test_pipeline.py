"""Tests for recgen.pipeline: the Recommender wires the stages, validates input, saves/loads."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from recgen import ranking
from recgen.adapters import inference_prompt
from recgen.collab import PopularityScorer
from recgen.config import RecommenderConfig, load_config
from recgen.errors import ConfigError, DataError
from recgen.generation import FakeGenerator
from recgen.grounding import CatalogIndex, HashEncoder
from recgen.pipeline import Recommender
from recgen.types import Catalog, Event, Example, History, Item, Prompt

GENRES = ("Action", "Drama", "Comedy", "Sci-Fi")
TITLES = [
    "Heat (1995)",
    "Alien (1979)",
    "Aliens (1986)",
    "Casablanca (1942)",
    "Fargo (1996)",
    "Toy Story (1995)",
    "Se7en (1995)",
    "Brazil (1985)",
    "Clerks (1994)",
    "Ran (1985)",
    "Heat (1986)",
    "Matrix, The (1999)",
    "Amélie (2001)",
    "Big Lebowski, The (1998)",
]


def _catalog() -> Catalog:
    return Catalog(
        items=tuple(
            Item(item_id=str(i + 1), title=t, attributes={"genres": (GENRES[i % 4],)})
            for i, t in enumerate(TITLES)
        ),
        name="tiny",
    )


def _script(prompt: Prompt) -> list[str]:
    del prompt
    return [
        (
            "Here are my picks:\n"
            "1. Aliens (1986) | More xenomorphs after the Alien you liked.\n"
            "2. The Matrix (1999) | Mind-bending action.\n"
            "3. Totally Made Up Film (2031) | Does not exist.\n"
            "4. Heat (1995) | Already seen.\n"
            "garbage line without structure ::::\n"
        )
    ]


def _recommender(config: RecommenderConfig | None = None, *, collab: bool = True) -> Recommender:
    catalog = _catalog()
    config = config or load_config(overrides=["grounding.encoder=hash", "generation.backend=fake"])
    train = {
        "a": History.create(["1", "2", "5", "6"]),
        "b": History.create(["5", "6", "7"]),
        "c": History.create(["6", "9"]),
    }
    scorer = PopularityScorer().fit(train, catalog) if collab else None
    index = CatalogIndex.build(catalog, HashEncoder(), config.grounding, show_progress=False)
    popularity = np.zeros(len(catalog))
    for h in train.values():
        for item_id in h.item_ids:
            popularity[catalog.position(item_id)] += 1
    return Recommender(
        config,
        catalog=catalog,
        generator=FakeGenerator(_script),
        index=index,
        scorer=scorer,
        popularity=popularity,
    )


def test_recommend_returns_n_real_unseen_items_with_explanations() -> None:
    rec = _recommender()
    history = ["Heat (1995)", "2", Event(item_id="4", rating=5.0)]
    recs = rec.recommend(history, n=5)
    assert len(recs) == 5
    ids = [r.item_id for r in recs]
    assert len(set(ids)) == 5
    assert not {"1", "2", "4"} & set(ids), "history items must never be recommended"
    assert all(i in rec.catalog for i in ids)
    assert all(r.explanation.strip() for r in recs)
    assert [r.rank for r in recs] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in itertools.pairwise(recs))
    by_id = {r.item_id: r for r in recs}
    assert by_id["3"].explanation == "More xenomorphs after the Alien you liked."
    assert by_id["3"].match == "exact"


def test_trace_counts_bad_model_output_instead_of_raising() -> None:
    rec = _recommender()
    trace = rec.trace_batch([["1", "2"]], n=5)[0]
    assert trace.parsed is not None
    assert trace.grounding is not None
    reasons = " ".join(r.reason for r in trace.grounding.rejected)
    assert "history" in reasons  # "Heat (1995)" was proposed although already seen
    grounded_ids = {g.item_id for g in trace.grounding.grounded}
    assert "1" not in grounded_ids


def test_llm_only_ranking_puts_the_first_llm_pick_first() -> None:
    config = load_config(
        overrides=["grounding.encoder=hash", "generation.backend=fake", "ranking.collab_weight=0"]
    )
    rec = _recommender(config, collab=False)
    recs = rec.recommend(["1", "2"], n=3)
    assert recs[0].item_id == "3"  # "Aliens (1986)", the first generated title
    assert recs[0].source == "llm"


def test_batch_equals_single_calls() -> None:
    rec = _recommender()
    histories = [["1", "2"], ["5"], ["6", "7", "9"]]
    batch = rec.recommend_batch(histories, n=4)
    singles = [rec.recommend(h, n=4) for h in histories]
    assert [[r.item_id for r in b] for b in batch] == [[r.item_id for r in s] for s in singles]


def test_candidates_restrict_the_list() -> None:
    rec = _recommender()
    recs = rec.recommend(["1"], n=3, candidates=["7", "8", "9", "1"])
    assert {r.item_id for r in recs} <= {"7", "8", "9"}


def test_empty_history_falls_back_to_popular_and_says_so() -> None:
    rec = _recommender()
    recs = rec.recommend([], n=3)
    assert [r.item_id for r in recs] == [
        "6",
        "5",
        "1",
    ]  # training counts 3, 2, then ties by position
    assert all(r.source == "popular" for r in recs)
    assert all("no history" in r.explanation for r in recs)


@pytest.mark.parametrize(
    ("history", "n", "match"),
    [
        (["Heat (2099)"], 3, "neither an item id nor a catalog title"),
        ([Event(item_id="999")], 3, "unknown item_id '999'"),
        (["1"], 0, "n=0 is out of range"),
        (["1"], 10_000, "out of range"),
    ],
)
def test_bad_input_gets_a_clear_error(history: list, n: int, match: str) -> None:
    rec = _recommender()
    with pytest.raises(DataError, match=match):
        rec.recommend(history, n=n)


def test_unknown_candidate_is_rejected() -> None:
    with pytest.raises(DataError, match="not in the catalog"):
        _recommender().recommend(["1"], n=3, candidates=["nope"])


def test_save_load_round_trip(tmp_path: Path) -> None:
    rec = _recommender()
    before = rec.recommend(["1", "2"], n=5)
    rec.save(tmp_path / "rec")
    loaded = Recommender.load(tmp_path / "rec", overrides=["generation.backend=fake"])
    loaded.generator = FakeGenerator(_script)
    after = loaded.recommend(["1", "2"], n=5)
    assert [(r.item_id, round(r.score, 6)) for r in after] == [
        (r.item_id, round(r.score, 6)) for r in before
    ]
    assert loaded.catalog.fingerprint() == rec.catalog.fingerprint()


def test_fuse_traces_with_the_same_config_reproduces_the_lists() -> None:
    rec = _recommender()
    traces = rec.trace_batch([["1", "2"], ["5"], []], n=5)
    again = rec.fuse_traces(traces, n=5)
    assert [[r.item_id for r in recs] for recs in again] == [
        [r.item_id for r in t.recommendations] for t in traces
    ]


def test_fuse_traces_with_llm_only_weights_puts_llm_picks_first() -> None:
    rec = _recommender()
    traces = rec.trace_batch([["1", "2"]], n=5)
    llm_only = rec.config.ranking.model_copy(update={"collab_weight": 0.0})
    recs = rec.fuse_traces(traces, n=5, ranking=llm_only)[0]
    assert recs[0].item_id == "3"
    assert recs[0].source == "llm"


def _reranker(llm_weight: float, prefer_last: bool = True, *extra: str) -> Recommender:
    config = load_config(
        overrides=[
            "grounding.encoder=hash",
            "generation.backend=fake",
            "ranking.mode=rerank",
            "ranking.retrieve=4",
            f"ranking.llm_weight={llm_weight}",
            *extra,
        ]
    )
    rec = _recommender(config)
    rec.generator = FakeGenerator(
        candidate_scores=lambda p: [
            float(k if prefer_last else -k) for k in range(len(p.candidates))
        ]
    )
    return rec


def test_yes_no_rerank_asks_once_per_candidate_and_ranks_by_the_answers() -> None:
    yes_no = ["prompt.rerank_template=rerank-yesno", "prompt.rerank_scoring=yes-no"]
    rec = _reranker(10.0, True, *yes_no, "ranking.collab_weight=0")
    # log P(Yes) - log P(No) per prompt: here the candidate's item id, so "9" outscores "7"
    rec.generator = FakeGenerator(candidate_scores=lambda p: [float(p.candidates[0])])
    trace = rec.trace_batch([["1", "2"]], n=4)[0]
    assert len(rec.generator.calls) == len(trace.retrieved) == 4
    assert [p.candidates for p in rec.generator.calls] == [(c,) for c in trace.retrieved]
    assert trace.candidate_logits == tuple(float(c) for c in trace.retrieved)
    ranked = [r.item_id for r in trace.recommendations]
    assert ranked == sorted(trace.retrieved, key=float, reverse=True)


def test_rank_hint_prompts_show_the_retrievers_order_whatever_the_listed_order() -> None:
    rank_hint = ["prompt.rerank_template=rerank-yesno-rank", "prompt.rerank_scoring=yes-no",
                 "prompt.candidate_order=shuffled"]  # fmt: skip
    rec = _reranker(10.0, True, *rank_hint, "ranking.collab_weight=0")
    rec.generator = FakeGenerator(candidate_scores=lambda p: [0.0])
    history = ["1", "2"]
    trace = rec.trace_batch([history], n=4)[0]
    assert rec.scorer is not None
    scores = rec.scorer.score([trace.history])[0]
    top = [i for i, _ in ranking.top_n(scores, catalog=rec.catalog, exclude={"1", "2"}, n=4)]
    assert sorted(trace.retrieved) == sorted(top)
    for prompt in rec.generator.calls:
        (candidate,) = prompt.candidates
        assert f"[filter rank {top.index(candidate) + 1}]\n" in prompt.messages[1].content


def test_yes_no_rerank_refuses_a_backend_without_yes_no_scores() -> None:
    rec = _reranker(
        10.0, True, "prompt.rerank_template=rerank-yesno", "prompt.rerank_scoring=yes-no"
    )

    class ListOnly:
        name = "list-only"
        generate = rec.generator.generate
        count_tokens = rec.generator.count_tokens
        score_candidates = rec.generator.score_candidates

    rec.generator = ListOnly()  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="cannot: use generation"):
        rec.trace_batch([["1", "2"]], n=4)


def test_rerank_mode_scores_the_retrieved_items_and_fuses_them() -> None:
    collab_only = _reranker(0.0).recommend(["1", "2"], n=6)
    trace = _reranker(10.0).trace_batch([["1", "2"]], n=6)[0]
    assert len(trace.retrieved) == 4
    assert list(trace.retrieved) == [r.item_id for r in collab_only[:4]]
    assert trace.prompt is not None
    assert trace.prompt.candidates == trace.retrieved
    assert trace.prompt.template == "rerank"
    recs = trace.recommendations
    assert recs[0].item_id == trace.retrieved[-1], "the LLM's favourite must win at a high weight"
    assert {r.item_id for r in recs[:4]} == set(trace.retrieved)
    assert not {"1", "2"} & {r.item_id for r in recs}
    assert all(r.explanation for r in recs)
    assert recs[0].source == "hybrid"
    assert recs[5].source == "collab"


def test_shuffled_rerank_prompts_list_a_seeded_permutation_and_score_the_right_items() -> None:
    retrieved = _reranker(0.0).trace_batch([["1", "2"]], n=6)[0].retrieved
    shuffled = "prompt.candidate_order=shuffled"
    traces = [_reranker(10.0, True, shuffled, f"seed={s}").trace_batch([["1", "2"]], n=6)[0]
              for s in range(6)]  # fmt: skip
    orders = {t.retrieved for t in traces}
    assert all(sorted(o) == sorted(retrieved) for o in orders)
    assert len(orders) > 1, "the seed must change the order"
    for trace in traces:
        assert trace.prompt is not None
        assert trace.prompt.candidates == trace.retrieved
        # the fake scores the last listed candidate highest: that item, not a position, wins
        assert trace.recommendations[0].item_id == trace.retrieved[-1]
    again = _reranker(10.0, True, shuffled, "seed=3").trace_batch([["1", "2"]], n=6)[0]
    assert again.retrieved == traces[3].retrieved


def test_trace_examples_rank_each_example_among_its_own_candidates() -> None:
    rec = _reranker(10.0)
    lists = [("7", "8", "9", "3"), ("3", "4", "6", "8")]
    examples = [
        Example(
            user_id="a",
            history=History.create(["1", "2"], user_id="a"),
            target="",
            candidates=lists[0],
        ),
        Example(
            user_id="b", history=History.create(["5"], user_id="b"), target="", candidates=lists[1]
        ),
    ]
    traces = rec.trace_examples(examples, n=4)
    for trace, cands in zip(traces, lists, strict=True):
        assert set(trace.retrieved) == set(cands)  # retrieval reorders only the given items
        assert trace.candidates == cands
        assert trace.recommendations[0].item_id == trace.retrieved[-1]
        assert {r.item_id for r in trace.recommendations} == set(cands)
    fused = rec.fuse_traces(traces, n=4)
    assert [{r.item_id for r in x} for x in fused] == [set(c) for c in lists]
    bad = [
        Example(
            user_id="c", history=History.create(["1"], user_id="c"), target="", candidates=("zz",)
        )
    ]
    with pytest.raises(DataError, match="zz"):
        rec.trace_examples(bad, n=4)


def test_rerank_traces_refuse_with_other_weights() -> None:
    rec = _reranker(10.0)
    traces = rec.trace_batch([["1", "2"], ["5", "6"]], n=5)
    same = rec.fuse_traces(traces, n=5)
    assert [[r.item_id for r in x] for x in same] == [
        [r.item_id for r in t.recommendations] for t in traces
    ]
    collab_only = rec.config.ranking.model_copy(update={"llm_weight": 0.0})
    refused = rec.fuse_traces(traces, n=5, ranking=collab_only)
    assert [r.item_id for r in refused[0]] == [
        r.item_id for r in _reranker(0.0).recommend(["1", "2"], n=5)
    ]


def test_rerank_mode_needs_a_backend_that_scores_candidates() -> None:
    class TextOnly:
        name = "text-only"

        def generate(self, prompts):  # pragma: no cover - never called
            raise AssertionError

        def count_tokens(self, text: str) -> int:
            return len(text.split())

    config = load_config(
        overrides=["grounding.encoder=hash", "generation.backend=fake", "ranking.mode=rerank"]
    )
    catalog = _catalog()
    index = CatalogIndex.build(catalog, HashEncoder(), config.grounding, show_progress=False)
    scorer = PopularityScorer().fit({"a": History.create(["1", "2"])}, catalog)
    with pytest.raises(ConfigError, match="cannot score candidates"):
        Recommender(config, catalog=catalog, generator=TextOnly(), index=index, scorer=scorer)


def test_output_stats_count_parse_and_grounding_outcomes() -> None:
    from recgen.pipeline import output_stats

    traces = _recommender().trace_batch([["1", "2"]], n=5)
    stats = output_stats(traces)
    # 6 lines: 4 parse as titles (an intro and a garbage line are prose); of those, Aliens and
    # The Matrix ground, "Totally Made Up Film" has no close item, "Heat (1995)" was seen.
    assert stats["lines"] == 6
    assert stats["parse_rate"] == pytest.approx(4 / 6)
    assert stats["grounded_rate"] == pytest.approx(2 / 4)
    assert stats["exact_share"] == 1.0
    assert stats["rejected: already in history"] == pytest.approx(1 / 4)
    assert stats["rejected: no catalog item above similarity 0.6"] == pytest.approx(1 / 4)


def test_the_llm_is_loaded_only_when_a_stage_needs_it() -> None:
    config = load_config(overrides=["grounding.encoder=hash"])  # the real transformers backend
    catalog = _catalog()
    index = CatalogIndex.build(catalog, HashEncoder(), config.grounding, show_progress=False)
    rec = Recommender(config, catalog=catalog, index=index, popularity=np.ones(len(catalog)))
    assert rec._generator is None
    assert len(rec.recommend([], n=3)) == 3  # the popular fallback needs no LLM
    assert rec._generator is None


def test_trace_batch_with_progress_gives_the_same_lists() -> None:
    config = load_config(
        overrides=["grounding.encoder=hash", "generation.backend=fake", "generation.batch_size=2"]
    )
    rec = _recommender(config)
    histories = [["1", "2"], ["5"], [], ["6", "7", "9"], ["3"]]
    plain = rec.trace_batch(histories, n=4)
    chunked = rec.trace_batch(histories, n=4, show_progress=True)
    assert [[r.item_id for r in t.recommendations] for t in chunked] == [
        [r.item_id for r in t.recommendations] for t in plain
    ]


# --------------------------------------------------------------------------- the real thing


@pytest.fixture(scope="module")
def real_recommender(shared_data: Path) -> tuple[Recommender, list]:
    """The default pipeline (embedded LLM, MiniLM, greedy) on MovieLens-100K, popularity prior
    (SASRec's training is tested in test_collab; here the LLM stages are under test)."""
    from recgen import data, splits

    config = load_config(
        overrides=[
            f"data.source={shared_data / 'ml-100k'}",
            "collab.method=popular",
            "generation.dtype=float32",
            "ranking.llm_weight=1.0",  # let grounded LLM titles into the top 10
        ]
    )
    dataset = data.load_data(config.data)
    split = splits.split_dataset(dataset, config.data)
    rec = Recommender.fit(config, dataset=dataset, split=split, show_progress=False)
    return rec, list(split.test[:3])


@pytest.mark.model
def test_real_pipeline_grounds_llm_titles_to_unseen_catalog_items(real_recommender) -> None:
    rec, examples = real_recommender
    traces = rec.trace_batch([ex.history for ex in examples], n=10)
    for ex, trace in zip(examples, traces, strict=True):
        ids = [r.item_id for r in trace.recommendations]
        assert len(ids) == 10
        assert len(set(ids)) == 10
        assert not set(ids) & set(ex.history.item_ids)
        assert all(i in rec.catalog for i in ids)
        assert all(r.explanation.strip() for r in trace.recommendations)
        assert trace.prompt is not None
        assert trace.prompt.template_hash
        assert trace.generation is not None
        assert trace.generation.texts
    grounded = [g for t in traces if t.grounding for g in t.grounding.grounded]
    assert grounded, "the embedded LLM's titles never grounded to a catalog item"
    for t in traces:
        assert t.grounding is not None
        assert not {g.item_id for g in t.grounding.grounded} & set(t.history.item_ids)
    llm = [r for t in traces for r in t.recommendations if r.source in ("llm", "hybrid")]
    assert llm, "no grounded LLM title reached the top 10 at llm_weight=1"
    assert all(r.match in ("exact", "semantic") and r.similarity is not None for r in llm)


@pytest.mark.model
def test_real_pipeline_greedy_is_reproducible_and_batch_equals_single(real_recommender) -> None:
    rec, examples = real_recommender
    histories = [ex.history for ex in examples[:2]]
    batch = [[r.item_id for r in recs] for recs in rec.recommend_batch(histories, n=10)]
    single = [[r.item_id for r in rec.recommend(h, n=10)] for h in histories]
    assert batch == single


def test_from_config_refuses_overrides_it_would_silently_drop() -> None:
    with pytest.raises(ConfigError, match="apply them to the config first"):
        Recommender.from_config(RecommenderConfig(), overrides=["n=5"])


@pytest.mark.model
def test_an_adapter_trained_on_another_template_version_is_refused(tmp_path: Path) -> None:
    import json
    import shutil

    from recgen.errors import IndexMismatchError

    adapter = tmp_path / "adapter"
    shutil.copytree(Path(__file__).parents[1] / "finetune" / "adapters" / "ml100k-lora", adapter)
    meta = json.loads((adapter / "recgen_adapter.json").read_text())
    meta["template_hashes"]["rerank"] = "0000000000000000"
    (adapter / "recgen_adapter.json").write_text(json.dumps(meta))
    config = load_config(
        overrides=[
            "grounding.encoder=hash",
            "ranking.mode=rerank",
            f"generation.adapter={adapter}",
        ]
    )
    catalog = _catalog()
    index = CatalogIndex.build(catalog, HashEncoder(), config.grounding, show_progress=False)
    scorer = PopularityScorer().fit({"a": History.create(["1", "2"])}, catalog)
    with pytest.raises(IndexMismatchError, match="prompt changed since training"):
        Recommender(config, catalog=catalog, generator=FakeGenerator(), index=index, scorer=scorer)


@pytest.mark.model
def test_generate_mode_renders_with_the_adapters_token_budget(tmp_path: Path) -> None:
    adapter = Path(__file__).parents[1] / "finetune" / "adapters" / "ml100k-lora"
    config = load_config(
        overrides=[
            "grounding.encoder=hash",
            "prompt.max_prompt_tokens=900",
            "prompt.n_titles=7",
            f"generation.adapter={adapter}",
        ]
    )
    catalog = _catalog()
    index = CatalogIndex.build(catalog, HashEncoder(), config.grounding, show_progress=False)
    rec = Recommender(config, catalog=catalog, generator=FakeGenerator(), index=index)
    trained = inference_prompt(adapter, template="recommend")
    assert trained.max_prompt_tokens != 900
    assert rec.renderer.config.max_prompt_tokens == trained.max_prompt_tokens
    assert (rec.renderer.template, rec.renderer.config.n_titles) == ("recommend", 7)


def test_a_served_adapter_gets_the_prompts_it_was_trained_with(tmp_path: Path) -> None:
    import json
    import shutil

    from recgen.errors import IndexMismatchError

    adapter = tmp_path / "adapter"
    shutil.copytree(Path(__file__).parents[1] / "finetune" / "adapters" / "ml100k-lora", adapter)
    served = ["generation.backend=openai", "generation.model=ml-lora", "ranking.mode=rerank"]
    config = load_config(
        overrides=["grounding.encoder=hash", *served, f"generation.adapter={adapter}"]
    )
    catalog = _catalog()
    index = CatalogIndex.build(catalog, HashEncoder(), config.grounding, show_progress=False)
    scorer = PopularityScorer().fit({"a": History.create(["1", "2"])}, catalog)
    rec = Recommender(
        config, catalog=catalog, generator=FakeGenerator(), index=index, scorer=scorer
    )
    trained = inference_prompt(adapter, template="rerank")
    assert trained != config.prompt.for_template("rerank")  # the adapter's settings differ
    assert rec.renderer.config == trained

    meta = json.loads((adapter / "recgen_adapter.json").read_text())
    meta["template_hashes"]["rerank"] = "0000000000000000"
    (adapter / "recgen_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(IndexMismatchError, match="prompt changed since training"):
        Recommender(config, catalog=catalog, generator=FakeGenerator(), index=index, scorer=scorer)


def test_an_adapter_trained_with_popularity_hints_gets_them_at_inference(tmp_path: Path) -> None:
    import json
    import shutil

    import numpy as np

    from recgen.config import PromptConfig
    from recgen.prompting import PromptRenderer

    adapter = tmp_path / "adapter"
    shutil.copytree(Path(__file__).parents[1] / "finetune" / "adapters" / "ml100k-lora", adapter)
    meta = json.loads((adapter / "recgen_adapter.json").read_text())
    meta["config"]["prompt"]["rerank_template"] = "rerank-pop"
    pop_hash = PromptRenderer(PromptConfig(template="rerank-pop")).template_hash
    meta["template_hashes"]["rerank-pop"] = pop_hash
    (adapter / "recgen_adapter.json").write_text(json.dumps(meta))
    served = ["generation.backend=openai", "generation.model=ml-lora", "ranking.mode=rerank"]
    config = load_config(  # the user's config names the plain template: the adapter's wins
        overrides=["grounding.encoder=hash", *served, f"generation.adapter={adapter}"]
    )
    catalog = _catalog()
    index = CatalogIndex.build(catalog, HashEncoder(), config.grounding, show_progress=False)
    scorer = PopularityScorer().fit({"a": History.create(["1", "2"])}, catalog)
    counts = np.arange(len(catalog), dtype=np.float64) * 100  # levels 0, 6, 7, 8, 8, 9, ...
    gen = FakeGenerator()
    rec = Recommender(
        config, catalog=catalog, generator=gen, index=index, scorer=scorer, popularity=counts
    )
    assert rec.renderer.template == "rerank-pop"
    assert rec.renderer.config.n_titles == 1
    rec.trace_batch([["1"]], n=3)
    prompt = gen.calls[-1]
    user = prompt.messages[1].content
    for k, item_id in enumerate(prompt.candidates, 1):
        level = min(9, int(np.log2(1 + counts[catalog.position(item_id)])))
        assert f"\n{k}. {catalog[item_id].title.split(' (')[0]}" in user
        assert f"[popularity {level}]" in user.split(f"\n{k}. ", 1)[1].split("\n", 1)[0]


def test_an_explanation_with_a_false_genre_is_replaced_by_the_data_derived_one() -> None:
    rec = _recommender()
    rec.generator = FakeGenerator(
        lambda prompt: ["1. Aliens (1986) | A Drama, like the Alien you liked.\n"]
    )
    trace = rec.trace_batch([["1", "2"]], n=5)[0]
    aliens = next(r for r in trace.recommendations if r.item_id == "3")  # genre: Comedy
    assert aliens.source == "hybrid"  # still the LLM's pick, ranked as before
    assert "Drama" not in aliens.explanation
    assert aliens.explanation.startswith("Viewers with histories like yours")
    assert trace.grounding is not None
    assert [r.reason for r in trace.grounding.rejected] == [
        "explanation names a label the item lacks: Drama (Aliens (1986))"
    ]
