"""The Recommender: wires history -> interests -> prompt -> LLM -> parse -> ground -> rank.

This is the only module that composes the stages; each stage stays ignorant of the others.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from recgen import (
    __version__,
    adapters,
    collab,
    data,
    evaluate,
    generation,
    grounding,
    interests,
    parsing,
    prompting,
    ranking,
    splits,
)
from recgen.config import RankingConfig, RecommenderConfig, cache_dir, dump_config, load_config
from recgen.errors import ConfigError, DataError, IndexMismatchError
from recgen.types import (
    Catalog,
    Event,
    Example,
    Generation,
    Grounding,
    History,
    InterestState,
    Item,
    Parsed,
    Prompt,
    RecDataset,
    Recommendation,
    Split,
)

if TYPE_CHECKING:
    from recgen.constrained import AnswerTitles

__all__ = ["Recommender", "Trace", "output_stats"]

_log = logging.getLogger(__name__)

HistoryLike = History | Sequence[str | Event | Mapping[str, object]]


@dataclass(frozen=True, kw_only=True)
class Trace:
    """Everything the stages produced for one user: for the demo, debugging and evaluation."""

    history: History
    state: InterestState | None
    prompt: Prompt | None
    generation: Generation | None
    parsed: Parsed | None
    grounding: Grounding | None
    recommendations: tuple[Recommendation, ...]
    fallback: str | None = None
    """Why the LLM stages were skipped (e.g. an empty history), if they were."""
    candidates: tuple[str, ...] | None = None
    """The candidate restriction the list was ranked under, if any."""
    retrieved: tuple[str, ...] = ()
    """Rerank mode: the items the collaborative scorer retrieved, in the order shown."""
    candidate_logits: tuple[float, ...] = ()
    """Rerank mode: the LLM's log-score of each retrieved item."""


class Recommender:
    """A configured generative recommender over one catalog.

    Build it with :meth:`from_config` (loads data, fits the collaborative scorer, builds the
    index, loads the LLM) or pass ready components. ``recommend`` and ``recommend_batch`` run
    the same stages; ``rank`` makes it a :class:`recgen.types.Ranker` for the evaluator.

    Args:
        config: The pipeline configuration.
        catalog: The items that may be recommended.
        generator: The LLM backend (``recgen.generation.make_generator`` by default).
        index: The catalog's title index (built with the configured encoder by default).
        scorer: The collaborative scorer, or None for LLM-only ranking.
        popularity: Training interaction counts over catalog positions (empty-history fallback
            and popularity de-biasing); zeros if not given.
        real_time: Whether history timestamps are real times (enables time context).
    """

    name = "recgen"

    def __init__(
        self,
        config: RecommenderConfig,
        *,
        catalog: Catalog,
        generator: generation.Generator | None = None,
        index: grounding.CatalogIndex | None = None,
        scorer: collab.Scorer | None = None,
        popularity: np.ndarray | None = None,
        real_time: bool = True,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self._generator = generator  # loaded on first use: baselines never load the LLM
        if index is None:
            encoder = grounding.make_encoder(config.grounding)
            index = grounding.CatalogIndex.build(catalog, encoder, config.grounding)
        self.index = index
        self.scorer = scorer
        self.popularity = (
            np.zeros(len(catalog), dtype=np.float64) if popularity is None else popularity
        )
        self.real_time = real_time
        self.renderer = prompting.PromptRenderer(config.prompt, count_tokens=self._count_tokens)
        if config.ranking.mode == "rerank":
            self._check_rerank()
            self.renderer = prompting.PromptRenderer(
                config.prompt.for_template(config.prompt.rerank_template),
                count_tokens=self._count_tokens,
            )
        if config.generation.adapter and config.generation.backend != "fake":
            self._use_adapter(config.generation.adapter)
        self._by_title = {item.title.casefold(): item.item_id for item in catalog}
        self._answer_titles: AnswerTitles | None = None  # built on the first trie decoding

    @property
    def generator(self) -> generation.Generator:
        """The LLM backend, loaded from ``config.generation`` on first use."""
        if self._generator is None:
            self._generator = generation.make_generator(self.config.generation)
        return self._generator

    @generator.setter
    def generator(self, generator: generation.Generator) -> None:
        self._generator = generator

    def _count_tokens(self, text: str) -> int:
        return self.generator.count_tokens(text)

    # ------------------------------------------------------------------ public API

    def recommend(
        self, history: HistoryLike, *, n: int | None = None, candidates: Sequence[str] | None = None
    ) -> list[Recommendation]:
        """Recommend ``n`` catalog items for one history, each with an explanation.

        Args:
            history: Item ids or exact catalog titles (oldest first), ``Event`` s, or a ``History``.
            n: List length (default ``config.n``).
            candidates: If given, only these item ids may be recommended.

        Returns:
            Recommendations, best first; never an item of the history.

        Raises:
            DataError: for an unknown item id or title, or ``n`` out of range.
        """
        return self.recommend_batch([history], n=n, candidates=candidates)[0]

    def recommend_batch(
        self,
        histories: Sequence[HistoryLike],
        *,
        n: int | None = None,
        candidates: Sequence[str] | None = None,
    ) -> list[list[Recommendation]]:
        """``recommend`` for many histories at once (batched LLM and encoder calls)."""
        traces = self.trace_batch(histories, n=n, candidates=candidates)
        return [list(t.recommendations) for t in traces]

    def rank(self, examples: Sequence[Example], *, n: int) -> list[list[str]]:
        """The evaluator's interface: item ids for each example, best first."""
        traces = self._trace_examples(examples, n=n)
        return [[r.item_id for r in t.recommendations] for t in traces]

    def trace_batch(
        self,
        histories: Sequence[HistoryLike],
        *,
        n: int | None = None,
        candidates: Sequence[str] | None = None,
        show_progress: bool = False,
    ) -> list[Trace]:
        """Run every stage and keep each stage's output (the demo prints these).

        With ``show_progress``, histories run in chunks of ``generation.batch_size`` under a
        progress bar (the long evaluation runs use it).
        """
        resolved = [self._resolve(h) for h in histories]
        cands = None if candidates is None else tuple(candidates)  # checked by trace_examples
        examples = [
            Example(user_id=h.user_id or "", history=h, target="", candidates=cands)
            for h in resolved
        ]
        return self.trace_examples(examples, n=n, show_progress=show_progress)

    def trace_examples(
        self, examples: Sequence[Example], *, n: int | None = None, show_progress: bool = False
    ) -> list[Trace]:
        """:meth:`trace_batch` for evaluation examples: each ranked under its own
        ``candidates`` (the sampled-candidates protocol), if it has them. Targets are unused."""
        for cands in {ex.candidates for ex in examples if ex.candidates is not None}:
            self._check_candidates(cands)  # each distinct list once (trace_batch shares one)
        if not show_progress:
            return self._trace_examples(examples, n=n)
        size = self.config.generation.batch_size
        out: list[Trace] = []
        for b in tqdm(range(0, len(examples), size), desc=self.generator.name, unit="batch"):
            out.extend(self._trace_examples(examples[b : b + size], n=n))
        return out

    # ------------------------------------------------------------------ stages

    def _trace_examples(self, examples: Sequence[Example], *, n: int | None) -> list[Trace]:
        n = self._check_n(n)
        traces: dict[int, Trace] = {}
        live = [i for i, ex in enumerate(examples) if len(ex.history) > 0]
        for i, ex in enumerate(examples):
            if len(ex.history) == 0:
                traces[i] = self._popular_fallback(ex, n=n)
        if live and self.config.ranking.mode == "rerank":
            for i, trace in zip(live, self._rerank([examples[i] for i in live], n=n), strict=True):
                traces[i] = trace
        elif live:
            states = [self._state(examples[i].history) for i in live]
            prompts = [self.renderer.render(s) for s in states]
            gens = self._generate(prompts, [examples[i] for i in live], n=n)
            parsed = [parsing.parse_generation(g) for g in gens]
            excludes = [set(examples[i].history.item_ids) for i in live]
            grounded = grounding.ground_batch(
                parsed, index=self.index, excludes=excludes, config=self.config.grounding
            )
            collab_scores = self._collab_scores([examples[i].history for i in live])
            for j, i in enumerate(live):
                ex = examples[i]
                recs = self._fuse(
                    grounded[j],
                    state=states[j],
                    collab_scores=None if collab_scores is None else collab_scores[j],
                    exclude=excludes[j],
                    candidates=ex.candidates,
                    n=n,
                    config=self.config.ranking,
                )
                traces[i] = Trace(
                    history=ex.history,
                    state=states[j],
                    prompt=prompts[j],
                    generation=gens[j],
                    parsed=parsed[j],
                    grounding=grounded[j],
                    recommendations=tuple(recs),
                    candidates=ex.candidates,
                )
        return [traces[i] for i in range(len(examples))]

    def _generate(
        self, prompts: list[Prompt], examples: list[Example], *, n: int
    ) -> list[Generation]:
        """Free generation, or (``generation.decoding="trie"``) beam search over the titles each
        user may be recommended, written so that they parse and ground back to their items."""
        if self.config.generation.decoding == "free":
            return self.generator.generate(prompts)
        decoder = self.generator
        if not isinstance(decoder, generation.TitleDecoder):
            raise ConfigError(
                "generation.decoding='trie' needs a generator that decodes under a title trie "
                f"(TransformersGenerator), not {type(decoder).__name__}; or set decoding='free'"
            )
        if self._answer_titles is None:
            from recgen.constrained import AnswerTitles

            self._answer_titles = AnswerTitles.build(
                self.catalog, write=_answer_title, read=self._read_answer
            )
        return decoder.generate_titles(
            prompts,
            titles=self._answer_titles,
            excludes=[set(ex.history.item_ids) for ex in examples],
            candidates=[ex.candidates for ex in examples],
            n=n,
        )

    def _read_answer(self, line: str) -> tuple[int, ...]:
        """Catalog positions an answer line names, as parsing and exact grounding read it."""
        parsed = parsing.parse_text(line).candidates
        return self.index.match_exact(parsed[0].title) if len(parsed) == 1 else ()

    def fuse_traces(
        self, traces: Sequence[Trace], *, n: int | None = None, ranking: RankingConfig | None = None
    ) -> list[list[Recommendation]]:
        """Re-run only the ranking stage on traces, e.g. with other fusion weights.

        The LLM's grounded candidates are reused, so tuning weights on validation costs no
        generation. Traces of the empty-history fallback are returned as they are.

        Args:
            traces: Traces from :meth:`trace_batch` of this recommender.
            n: List length (default ``config.n``).
            ranking: Fusion weights and de-biasing (default ``config.ranking``).
        """
        n = self._check_n(n)
        config = ranking or self.config.ranking
        live = [t for t in traces if t.state is not None]
        scores = None
        if self.scorer is not None and (config.collab_weight > 0 or config.mode == "rerank"):
            scores = self.scorer.score([t.history for t in live])
        fused: dict[int, list[Recommendation]] = {}
        for j, t in enumerate(live):
            if t.retrieved:
                assert scores is not None
                fused[id(t)] = self._fuse_retrieved(t, scores[j], n=n, config=config)
                continue
            fused[id(t)] = self._fuse(
                t.grounding,  # type: ignore[arg-type]
                state=t.state,  # type: ignore[arg-type]
                collab_scores=None if scores is None else scores[j],
                exclude=set(t.history.item_ids),
                candidates=t.candidates,
                n=n,
                config=config,
            )
        return [fused.get(id(t), list(t.recommendations)) for t in traces]

    def _fuse(
        self,
        grounded: Grounding,
        *,
        state: InterestState,
        collab_scores: np.ndarray | None,
        exclude: set[str],
        candidates: tuple[str, ...] | None,
        n: int,
        config: RankingConfig,
    ) -> list[Recommendation]:
        return ranking.fuse(
            grounded,
            collab_scores=collab_scores,
            popularity=self.popularity,
            catalog=self.catalog,
            exclude=exclude,
            candidates=candidates,
            n=n,
            config=config,
            explain=lambda item: _profile_explanation(item, state),
        )

    def _rerank(self, examples: Sequence[Example], *, n: int) -> list[Trace]:
        """Retrieve with the collaborative scorer, score the candidates with the LLM, fuse."""
        assert self.scorer is not None  # checked in __init__
        collab_scores = self.scorer.score([ex.history for ex in examples])
        order = self.renderer.config.candidate_order
        tops = [
            [
                item_id
                for item_id, _ in ranking.top_n(
                    collab_scores[j],
                    catalog=self.catalog,
                    exclude=set(ex.history.item_ids),
                    candidates=ex.candidates,
                    n=self.config.ranking.retrieve,
                )
            ]
            for j, ex in enumerate(examples)
        ]
        retrieved = [
            ranking.prompt_order(
                top, order, seed=self.config.seed, user_id=ex.history.user_id,
                history_length=len(ex.history),
            )
            for top, ex in zip(tops, examples, strict=True)
        ]  # fmt: skip
        # The retriever's rank of each candidate (1 = its best), for templates that show it.
        ranks = [{c: r for r, c in enumerate(top, start=1)} for top in tops]
        states = [self._state(ex.history) for ex in examples]
        render = self.renderer.render

        def count(c: str) -> float:
            return float(self.popularity[self.catalog.position(c)])

        if self.renderer.config.rerank_scoring == "yes-no":  # one prompt per candidate
            if not hasattr(self.generator, "score_yes_no"):
                raise ConfigError(
                    "prompt.rerank_scoring='yes-no' (set by config or adapter) scores one prompt "
                    f"per candidate, which backend {self.config.generation.backend!r} cannot: "
                    "use generation.backend='transformers' or prompt.rerank_scoring='list'"
                )
            asked = [
                [
                    render(s, candidates=[self.catalog[c]], counts=[count(c)], ranks=[rank[c]])
                    for c in cands
                ]
                for s, cands, rank in zip(states, retrieved, ranks, strict=True)
            ]
            flat = self.generator.score_yes_no([p for ps in asked for p in ps])  # type: ignore[attr-defined]
            bounds = np.cumsum([0, *(len(ps) for ps in asked)])
            logits = [flat[a:b] for a, b in itertools.pairwise(bounds)]
            prompts = [ps[0] if ps else None for ps in asked]
        else:
            prompts = [
                render(
                    s, candidates=[self.catalog[c] for c in cands],
                    counts=[count(c) for c in cands], ranks=[rank[c] for c in cands],
                )
                for s, cands, rank in zip(states, retrieved, ranks, strict=True)
            ]  # fmt: skip
            logits = self.generator.score_candidates(prompts)  # type: ignore[attr-defined]
        out = []
        for j, ex in enumerate(examples):
            trace = Trace(
                history=ex.history,
                state=states[j],
                prompt=prompts[j],
                generation=None,
                parsed=None,
                grounding=None,
                recommendations=(),
                candidates=ex.candidates,
                retrieved=retrieved[j],
                candidate_logits=tuple(logits[j]),
            )
            recs = self._fuse_retrieved(trace, collab_scores[j], n=n, config=self.config.ranking)
            out.append(dataclasses.replace(trace, recommendations=tuple(recs)))
        return out

    def _fuse_retrieved(
        self, trace: Trace, collab_scores: np.ndarray, *, n: int, config: RankingConfig
    ) -> list[Recommendation]:
        state = trace.state
        assert state is not None
        return ranking.fuse_candidates(
            trace.retrieved,
            trace.candidate_logits,
            collab_scores=collab_scores,
            popularity=self.popularity,
            catalog=self.catalog,
            exclude=set(trace.history.item_ids),
            candidates=trace.candidates,
            n=n,
            config=config,
            explain=lambda item: _profile_explanation(item, state),
        )

    def _use_adapter(self, folder: str) -> None:
        """Refuse an adapter trained on another base model (in-process) or template version;
        render prompts as its examples of this template were: in rerank mode exactly (one
        pick, its token budget and its rerank template), in generate mode with its token budget
        (the titles asked for stay ``n_titles``). A served adapter gets the same prompts as an
        in-process one."""
        rerank = self.config.ranking.mode == "rerank"
        trained = adapters.inference_prompt(
            folder, template="rerank" if rerank else self.renderer.template
        )
        template = trained.template
        if not rerank:
            budget = {"max_prompt_tokens": trained.max_prompt_tokens}
            trained = self.renderer.config.model_copy(update=budget)
        if trained != self.renderer.config:
            self.renderer = prompting.PromptRenderer(trained, count_tokens=self._count_tokens)
        served = self.config.generation.backend == "openai"  # the server checks its base
        adapters.check_adapter(
            folder,
            base_model=None if served else self.config.generation.model,
            template=template,
            template_hash=self.renderer.template_hash,
        )

    def _check_rerank(self) -> None:
        if self.scorer is None:
            raise ConfigError(
                "ranking.mode='rerank' needs a collaborative scorer to retrieve candidates: "
                "pass scorer=... or set collab.method to 'sasrec' or 'popular'"
            )
        scores = (
            self.config.generation.backend in ("transformers", "openai", "fake")
            if self._generator is None
            else isinstance(self._generator, generation.CandidateScorer)
        )
        if not scores:
            raise ConfigError(
                f"generation backend {self.config.generation.backend!r} cannot score candidates "
                "in one pass; use the transformers or openai backend for ranking.mode='rerank'"
            )

    def _state(self, history: History) -> InterestState:
        return interests.build_interest_state(
            history, self.catalog, self.config.interests, real_time=self.real_time
        )

    def _collab_scores(self, histories: list[History]) -> np.ndarray | None:
        if self.scorer is None or self.config.ranking.collab_weight == 0:
            return None
        return self.scorer.score(histories)

    def _popular_fallback(self, ex: Example, *, n: int) -> Trace:
        _log.info("empty history for user %r: recommending popular items", ex.user_id)
        top = ranking.top_n(
            self.popularity.astype(np.float64),
            catalog=self.catalog,
            candidates=ex.candidates,
            n=n,
        )
        recs = tuple(
            Recommendation(
                item_id=item_id,
                title=self.catalog[item_id].title,
                score=score,
                explanation="Popular with many users; there is no history to personalise from yet.",
                rank=k + 1,
                source="popular",
            )
            for k, (item_id, score) in enumerate(top)
        )
        return Trace(
            history=ex.history,
            state=None,
            prompt=None,
            generation=None,
            parsed=None,
            grounding=None,
            recommendations=recs,
            fallback="empty history: popular items",
        )

    # ------------------------------------------------------------------ validation

    def _check_n(self, n: int | None) -> int:
        n = self.config.n if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(self.catalog):
            raise DataError(
                f"n={n!r} is out of range: ask for 1 to {len(self.catalog)} items "
                "(the catalog size)"
            )
        return n

    def _check_candidates(self, candidates: Sequence[str]) -> tuple[str, ...]:
        unknown = [c for c in candidates if c not in self.catalog]
        if unknown:
            raise DataError(
                f"{len(unknown)} candidate item id(s) are not in the catalog, e.g. "
                f"{unknown[:3]!r}; pass ids from the catalog"
            )
        return tuple(candidates)

    def _resolve(self, history: HistoryLike) -> History:
        """Accept item ids or exact titles; unknown ones are an error naming them."""
        h = History.create(
            [
                self._resolve_one(el, i) if isinstance(el, str) else el
                for i, el in enumerate(history)
            ]
            if not isinstance(history, History)
            else history
        )
        for i, e in enumerate(h.events):
            if e.item_id not in self.catalog:
                raise DataError(
                    f"history item {i} has unknown item_id {e.item_id!r}: "
                    "use ids or exact titles from the catalog"
                )
        return h

    def _resolve_one(self, text: str, i: int) -> str:
        if text in self.catalog:
            return text
        item_id = self._by_title.get(text.casefold())
        if item_id is None:
            raise DataError(
                f"history item {i} ({text!r}) is neither an item id nor a catalog title; "
                "use `recgen recommend --search` to find the exact title"
            )
        return item_id

    # ------------------------------------------------------------------ building and saving

    @classmethod
    def from_config(
        cls,
        config: RecommenderConfig | str | Path | None = None,
        *,
        overrides: Sequence[str] = (),
        show_progress: bool = True,
        **values: Any,
    ) -> Recommender:
        """Build from a TOML config (or defaults): load and split data, fit, index, load the LLM.

        Args:
            config: A config object, a TOML path, or None for the defaults.
            overrides: ``section.key=value`` strings.
            show_progress: Show progress bars for training and indexing.
            **values: Top-level config keys or whole sections.
        """
        if isinstance(config, RecommenderConfig):
            if overrides or values:
                raise ConfigError(
                    "from_config got a RecommenderConfig and overrides: apply them to the "
                    "config first (config.model_copy(update=...)) or pass a TOML path"
                )
            cfg = config
        else:
            cfg = load_config(config, overrides=list(overrides), **values)
        dataset = data.load_data(cfg.data)
        return cls.fit(cfg, dataset=dataset, show_progress=show_progress)

    @classmethod
    def fit(
        cls,
        config: RecommenderConfig,
        *,
        dataset: RecDataset,
        split: Split | None = None,
        generator: generation.Generator | None = None,
        show_progress: bool = True,
    ) -> Recommender:
        """Fit the collaborative parts on ``split.train`` (validating on ``split.valid``).

        Nothing from the validation or test targets reaches training or the popularity counts.
        Fitted scorers and indexes are cached by catalog fingerprint and config.
        """
        split = split or splits.split_dataset(dataset, config.data)
        catalog = dataset.catalog
        popularity = collab.interaction_counts(split.train, catalog)
        scorer = None
        if config.collab.method != "none":
            scorer = evaluate.cached_scorer(
                config.collab, split=split, catalog=catalog, show_progress=show_progress
            )
        encoder = grounding.make_encoder(config.grounding)
        index_dir = cache_dir("index", f"{catalog.fingerprint()}-{encoder.name.replace('/', '_')}")
        try:
            index = grounding.CatalogIndex.load(index_dir, catalog=catalog, encoder=encoder)
        except (FileNotFoundError, IndexMismatchError):
            index = grounding.CatalogIndex.build(
                catalog, encoder, config.grounding, show_progress=show_progress
            )
            index.save(index_dir)
        return cls(
            config,
            catalog=catalog,
            generator=generator,
            index=index,
            scorer=scorer,
            popularity=popularity,
            real_time=dataset.has_timestamps,
        )

    def save(self, path: str | Path) -> Path:
        """Save config, catalog, index, collaborative scorer and popularity counts to ``path``.

        ``Recommender.load(path)`` rebuilds the same pipeline without re-encoding or
        re-training; the LLM is referenced by its configured name, not copied.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dump_config(self.config, path / "config.toml")
        data.save_catalog(self.catalog, path / "catalog.jsonl")
        self.index.save(path / "index")
        np.save(path / "popularity.npy", self.popularity)
        if self.scorer is not None and hasattr(self.scorer, "save"):
            self.scorer.save(path / "collab")  # type: ignore[attr-defined]
        meta = {
            "recgen_version": __version__,
            "catalog_fingerprint": self.catalog.fingerprint(),
            "template": self.config.prompt.template,
            "template_hash": self.renderer.template_hash,
            "real_time": self.real_time,
        }
        (path / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, *, overrides: Sequence[str] = ()) -> Recommender:
        """Reload a pipeline saved with :meth:`save` (``overrides`` as in ``from_config``).

        Raises:
            ConfigError: if the folder is not a saved recommender.
            IndexMismatchError: if its parts belong to another catalog or encoder.
        """
        path = Path(path)
        if not (path / "config.toml").is_file() or not (path / "meta.json").is_file():
            raise ConfigError(f"{path} is not a saved recommender (no config.toml/meta.json)")
        config = load_config(path / "config.toml", overrides=list(overrides))
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        catalog = data.load_catalog(path / "catalog.jsonl")
        if catalog.fingerprint() != meta["catalog_fingerprint"]:
            raise IndexMismatchError(f"{path}/catalog.jsonl was changed after saving")
        encoder = grounding.make_encoder(config.grounding)
        index = grounding.CatalogIndex.load(path / "index", catalog=catalog, encoder=encoder)
        scorer = None
        if (path / "collab").exists():
            scorer = collab.load_scorer(path / "collab", catalog=catalog)
        return cls(
            config,
            catalog=catalog,
            index=index,
            scorer=scorer,
            popularity=np.load(path / "popularity.npy"),
            real_time=bool(meta.get("real_time", True)),
        )


def _answer_title(title: str) -> str:
    """A catalog title as an answer line writes it: cleaned as prompts show titles, uncut."""
    return prompting.clean_text(title, parsing.MAX_TITLE_CHARS)


def _profile_explanation(item: Item, state: InterestState) -> str:
    """A data-derived explanation for an item the LLM did not propose."""
    labels = set(item.labels)  # the rule the interest state's profile labels come from
    liked = [label for label, _ in state.recent_profile + state.long_term if label in labels]
    shared = list(dict.fromkeys(liked))[:2]
    if shared:
        return (
            f"Viewers with histories like yours pick it next, and it is {' and '.join(shared)}, "
            "like much of what you chose."
        )
    return "Viewers with histories like yours often choose it next."


def output_stats(traces: Sequence[Trace]) -> dict[str, float]:
    """How the LLM's output fared over many traces (free generation; rerank traces count 0).

    Returns:
        ``lines`` (non-blank output lines seen), ``parse_rate`` (lines that parsed into a
        title), ``grounded_rate`` (parsed titles matched to an unseen catalog item),
        ``exact_share`` (grounded by exact title), ``llm_in_top10`` (mean LLM-proposed items in
        the top 10) and ``rejected: REASON`` (share of parsed titles rejected for that reason).
    """
    parsed = [t.parsed for t in traces if t.parsed is not None]
    grounded = [t.grounding for t in traces if t.grounding is not None]
    n_parsed = sum(len(p.candidates) for p in parsed)
    n_lines = n_parsed + sum(len(p.failures) for p in parsed)
    n_grounded = sum(len(g.grounded) for g in grounded)
    n_exact = sum(x.match == "exact" for g in grounded for x in g.grounded)
    reasons = Counter(r.reason.split(":")[0].split(" (")[0] for g in grounded for r in g.rejected)
    in_top = [sum(r.source in ("llm", "hybrid") for r in t.recommendations[:10]) for t in traces]
    stats = {
        "lines": float(n_lines),
        "parse_rate": n_parsed / max(n_lines, 1),
        "grounded_rate": n_grounded / max(n_parsed, 1),
        "exact_share": n_exact / max(n_grounded, 1),
        "llm_in_top10": float(np.mean(in_top)) if in_top else 0.0,
    }
    stats.update({f"rejected: {k}": v / max(n_parsed, 1) for k, v in reasons.most_common()})
    return stats
