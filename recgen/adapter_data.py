"""Fine-tuning config and training data: windows of the training split -> tokenized chat examples.

Every example is rendered by :class:`~recgen.prompting.PromptRenderer` (the inference renderer)
and tokenized with the tokenizer's own chat template; labels are -100 on the prompt, so the loss
falls on the answer only. Targets come from the training split alone (validation examples use
the validation targets and are only scored). Tasks, mixed by :class:`TaskWeights`:

* ``next``: recommend template; the answer is the window's next ``prompt.n_titles`` items.
* ``explain``: rerank template with the next item as the only candidate; the answer explains it.
* ``summary``: summary template; the answer is a paragraph derived from the interest state.
* ``rerank``: rerank template over candidates; the answer is ``<its number>. <title> | <why>``.
  With ``negatives="retrieved"`` (LlamaRec's set-up, what inference sees) the candidates are a
  retriever's top unseen items *in its order*, for windows at each user's last ``holdout``
  training positions, scored by a SASRec fitted without those positions (so, as at test time,
  it never saw the targets); windows whose target it does not retrieve are skipped. With
  ``"sasrec"`` / ``"popular"`` the next item is inserted among SASRec's top unseen items or
  popularity samples and the list shuffled: its negatives are then the items SASRec likes
  *more* than the target, a bias inference never has.

Explanations are derived from data (the item's labels shared with the user's profile, a liked
item that shares them), so they are checkable. Datasets are cached on disk under a key of the
config, template hashes, tokenizer and training data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from recgen import collab, evaluate, ranking
from recgen.config import CollabConfig, DataConfig, InterestConfig, PromptConfig, cache_dir
from recgen.errors import DataError
from recgen.interests import build_interest_state, item_labels
from recgen.prompting import PromptRenderer, format_answer
from recgen.types import Catalog, History, InterestState, Item, Message, Prompt, Split

__all__ = [
    "TEMPLATES",
    "FinetuneConfig",
    "LoraSettings",
    "PrefixSettings",
    "TaskWeights",
    "build_datasets",
    "encode_example",
    "explain_item",
    "row_prompt",
    "summarize_state",
    "validation_rows",
]

_log = logging.getLogger(__name__)

TEMPLATES = ("recommend", "rerank", "summary")
"""The templates the training tasks render (their hashes are saved with the adapter)."""
_TASKS = ("next", "explain", "summary", "rerank")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class LoraSettings(_Config):
    """LoRA: low-rank updates of the chosen linear layers (the method vLLM serves)."""

    r: int = Field(default=16, ge=1)
    """Rank of the update matrices."""
    alpha: int = Field(default=32, ge=1)
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names to adapt (``all-linear`` for every linear layer but the output head)."""
    top_layers: int | None = Field(default=None, ge=1)
    """Adapt only the last ``top_layers`` decoder layers (default: all). Backpropagation then
    stops below them, so a step costs little more than a forward pass over the lower layers."""


class PrefixSettings(_Config):
    """Prefix-tuning: trained key/value prefixes (served by the transformers backend only)."""

    num_virtual_tokens: int = Field(default=20, ge=1)


class TaskWeights(_Config):
    """Relative weights of the training tasks (normalised; 0 turns a task off)."""

    next: float = Field(default=0.1, ge=0)
    """Recommend template: the next ``prompt.n_titles`` items of a sliding window, explained."""
    explain: float = Field(default=0.1, ge=0)
    """Rerank template with the held-out next item as the only candidate: explain it."""
    summary: float = Field(default=0.05, ge=0)
    """Summary template: a paragraph derived from the interest state."""
    rerank: float = Field(default=0.75, ge=0)
    """Rerank template: choose the true next item among ``n_candidates`` candidates."""

    @model_validator(mode="after")
    def _check_total(self) -> TaskWeights:
        if self.next + self.explain + self.summary + self.rerank <= 0:
            raise ValueError("task weights are all 0: give at least one task a positive weight")
        return self


class FinetuneConfig(_Config):
    """Everything about one fine-tuning run; saved with the adapter it produces."""

    method: Literal["lora", "prefix"] = "lora"
    """LoRA (mergeable, served by vLLM) or prefix-tuning (transformers backend only)."""
    lora: LoraSettings = LoraSettings()
    prefix: PrefixSettings = PrefixSettings()
    base_model: str = "embedded"
    """``embedded`` (SmolLM2-135M-Instruct) or a local model folder."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Base weights dtype (adapter weights and optimizer state stay float32): ``auto`` is bf16
    where the CPU has native bf16 (AVX512-BF16/AMX), float32 elsewhere (a training step with
    emulated bf16 took 280 s on an AVX2-only CPU, against seconds in float32)."""
    data: DataConfig = DataConfig()
    interests: InterestConfig = InterestConfig()
    prompt: PromptConfig = PromptConfig()
    """Token budget, title cap and titles asked for (as at inference); template is unused."""
    tasks: TaskWeights = TaskWeights()
    samples: int = Field(default=2000, ge=1)
    """Training examples drawn over all tasks."""
    valid_samples: int = Field(default=64, ge=1)
    """Validation rerank examples (from the validation split's targets)."""
    min_history: int = Field(default=5, ge=1)
    """Shortest history a training window shows."""
    n_candidates: int = Field(default=20, ge=2, le=99)
    """Candidates per rerank example (the true next item plus negatives)."""
    negatives: Literal["retrieved", "sasrec", "popular", "uniform"] = "retrieved"
    """Rerank candidates: ``retrieved``, a held-out SASRec's top unseen items in its order, as at
    inference (targets it misses are skipped); or the target inserted among SASRec's top unseen
    items (``sasrec``), popularity samples (``popular``) or uniform samples of the user's unseen
    items (``uniform``: the lists of the sampled-candidates protocol of TALLRec and LLaRA,
    ``splits.sampled_candidates``), shuffled."""
    retriever: Literal["sasrec", "ensemble"] = "sasrec"
    """The collaborative scorer (``collab.method``, default settings) whose top items are the
    rerank candidates: ``ensemble`` is what the pipeline retrieves with by default."""
    holdout: int = Field(default=8, ge=1)
    """With ``negatives="retrieved"``: rerank windows are each user's last ``holdout`` training
    positions; their retriever is fitted on the training split without them."""
    rerank_loss: Literal["index", "answer"] = "index"
    """What rerank examples train on: ``index``, the chosen candidate's number only (what the
    verbalizer scores; LlamaRec's label), or the whole ``n. title | why`` answer, whose other
    ~20 tokens are easy and dilute the one hard token's gradient. Explanations are trained by
    the ``explain`` task either way."""
    loss_norm: Literal["token", "example"] = "token"
    """How a step's loss is averaged: over answer tokens (``token``: a 150-token ``next`` answer
    then outweighs a one-token rerank label 150 to 1, whatever the task weights say), or per
    example, then over examples (``example``: each example counts once, so ``[tasks]`` weights
    are the tasks' shares of the gradient)."""
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to run (default: ``epochs`` passes over the data)."""
    max_minutes: float | None = Field(default=None, gt=0)
    """Stop (saving the best adapter) after this much training time."""
    batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=2, ge=1)
    """Micro-batches per optimizer step."""
    max_len: int = Field(default=640, ge=16)
    """Longest tokenized example (prompt + answer); longer ones are dropped and counted."""
    seed: int = 0
    eval_every: int = Field(default=50, ge=1)
    """Validate every this many optimizer steps (and at the end)."""
    patience: int = Field(default=5, ge=1)
    """Stop after this many validations without improvement."""
    select_by: Literal["loss", "ndcg", "last"] = "ndcg"
    """Validation criterion for the best adapter: loss, or the verbalizer's rerank NDCG (both
    on the validation rerank lists), or ``last`` (the last validated step, no early stopping:
    for an adapter trained mostly on generation, which those lists do not measure)."""
    checkpoint_every: int = Field(default=25, ge=1)
    """Write a resumable checkpoint every this many optimizer steps."""
    threads: int = Field(default=2, ge=1)
    """Torch threads. On a CPU shared with other jobs use 1: oversubscribed threads measured
    ~4x slower (32 vs 130 training tokens/s) on the 2-core machine."""
    init_adapter: str | None = None
    """Continual update: start from this adapter folder instead of fresh weights."""
    new_since: float | None = None
    """Continual update: targets after this unix time are new; others are replayed."""
    replay: float = Field(default=0.3, ge=0, le=1)
    """Continual update: share of training examples replayed from before ``new_since``."""

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        budget = max(self.prompt.max_prompt_tokens, self.prompt.rerank_max_prompt_tokens)
        if budget + 16 > self.max_len:
            raise ValueError(
                f"max_len={self.max_len} leaves no room for an answer after a prompt budget of "
                f"{budget} tokens (prompt.max_prompt_tokens, prompt.rerank_max_prompt_tokens): "
                "raise max_len or lower the budget"
            )
        if self.new_since is None and self.init_adapter is None and self.replay != 0.3:
            raise ValueError("replay only applies to a continual update: set new_since too")
        if self.method == "prefix" and self.init_adapter is None and self.lora != LoraSettings():
            raise ValueError("lora settings were given but method='prefix': drop them")
        return self


# --------------------------------------------------------------------------- target texts


def _join(labels: Sequence[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def explain_item(item: Item, state: InterestState) -> str:
    """A one-sentence explanation of ``item`` for a user, derived from data (so checkable).

    It names the item's labels that the user's profile shares (rising ones first) and a liked
    item with a label in common; an item sharing nothing is called a change of pace.
    """
    labels = item_labels(item)
    profile = {label for label, _ in state.long_term} | {l for l, _ in state.recent_profile}
    rising = [label for label in labels if label in state.rising]
    shared = [label for label in labels if label in profile]
    if rising:
        text = f"It fits your recent turn towards {_join(rising[:3])}"
    elif shared:
        text = f"It matches your taste for {_join(shared[:3])}"
    elif labels:
        text = f"A change of pace: {_join(labels[:3])}"
    else:
        text = "It is a popular pick among similar users"
    wanted = set(rising or shared)
    for liked in state.liked:
        if liked.item_id != item.item_id and wanted & set(item_labels(liked)):
            text += f", like {liked.title}, which you liked"
            break
    return text + "."


def summarize_state(state: InterestState) -> str:
    """A two-to-four sentence paragraph derived from the interest state (the summary target)."""
    top = [label for label, _ in state.long_term[:3]]
    sentences = [
        f"This user mostly enjoys {_join(top)}." if top else "This user has few clear tastes yet."
    ]
    if state.rising or state.fading:
        moves = []
        if state.rising:
            moves.append(f"towards {_join(list(state.rising[:2]))}")
        if state.fading:
            moves.append(f"away from {_join(list(state.fading[:2]))}")
        sentences.append(f"Lately they have moved {' and '.join(moves)}.")
    elif state.recent_profile:
        recent = [label for label, _ in state.recent_profile[:2]]
        sentences.append(f"Recently they have chosen mostly {_join(recent)}.")
    if state.liked:
        sentences.append(f"They recently liked {state.liked[0].title}.")
    active = [fact for fact in state.time_context if fact.startswith(("mostly", "active"))]
    if active:
        sentences.append(f"They are {_join(active)}.")
    return " ".join(sentences[:4])


def _indexed_answer(index: int, item: Item, explanation: str, max_title_chars: int) -> str:
    """``<index>. <title> | <why>``: the candidate's number in the list starts the answer."""
    line = format_answer([(item.title, explanation)], max_title_chars=max_title_chars)
    return f"{index}." + line.split(".", 1)[1]


# --------------------------------------------------------------------------- tokenization


def encode_example(
    tokenizer: Any,
    messages: Sequence[Message],
    answer: str,
    *,
    max_len: int,
    label_prefix: str | None = None,
) -> tuple[list[int], list[int]] | None:
    """Token ids and labels (-100 on the prompt) through the tokenizer's chat template.

    Tokens after the final end-of-turn token (a trailing newline) are not labelled either.
    With ``label_prefix`` (a prefix of ``answer``), only its tokens are labelled: a rerank
    answer trains on the chosen candidate's number alone, as the verbalizer scores it.

    Returns:
        ``(input_ids, labels)``, or None if the example is longer than ``max_len``.

    Raises:
        DataError: if the chat template tokenizes the prompt differently inside the full chat.
    """
    chat = [{"role": m.role, "content": m.content} for m in messages]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*chat, {"role": "assistant", "content": answer}], tokenize=False
    )
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if ids[: len(p_ids)] != p_ids or not full.startswith(prompt):
        raise DataError(
            "the chat template does not render the prompt as a prefix of prompt + answer; "
            "answer-only labels need a template that appends the assistant turn"
        )
    if len(ids) > max_len:
        return None
    labels = [-100] * len(p_ids) + ids[len(p_ids) :]
    end = tokenizer.eos_token_id
    if end in ids[len(p_ids) :]:
        last = len(ids) - 1 - ids[::-1].index(end)
        labels[last + 1 :] = [-100] * (len(ids) - last - 1)
    if label_prefix is not None:
        if not answer.startswith(label_prefix):
            raise DataError(f"label_prefix {label_prefix!r} does not start answer {answer!r}")
        head = tokenizer(prompt + label_prefix, add_special_tokens=False)["input_ids"]
        stop = len(head)
        if ids[:stop] != head:
            raise DataError(f"label_prefix {label_prefix!r} does not end on a token boundary")
        labels[stop:] = [-100] * (len(ids) - stop)
    return ids, labels


def row_prompt(row: Mapping[str, Any], template_hash: str = "") -> Prompt:
    """The :class:`~recgen.types.Prompt` a dataset row was rendered from (for scoring)."""
    return Prompt(
        messages=tuple(Message(role=m["role"], content=m["content"]) for m in row["messages"]),
        template=row["template"],
        template_hash=template_hash,
        user_id=row["user_id"],
        candidates=tuple(row["candidates"]),
        answer=row["answer"],
    )


# --------------------------------------------------------------------------- negatives

Negatives = Callable[[Sequence[History], Sequence[set[str]], int], list[list[str]]]


def _negative_source(
    config: FinetuneConfig, split: Split, catalog: Catalog, counts: np.ndarray
) -> Negatives:
    """A function (histories, excluded ids, k) -> k negatives each, from training data only
    (``counts``: the training interaction counts, :func:`recgen.collab.interaction_counts`)."""
    ids = catalog.item_ids

    def per_user(draw: Callable[[set[str], int], list[str]]) -> Negatives:
        """``draw(items never to return, k)`` for each history, its own items excluded too."""

        def negatives(
            histories: Sequence[History], excluded: Sequence[set[str]], k: int
        ) -> list[list[str]]:
            return [draw(seen | set(h.item_ids), k)
                    for h, seen in zip(histories, excluded, strict=True)]  # fmt: skip

        return negatives

    if config.negatives == "uniform":
        uniform_rng = random.Random(config.seed)
        return per_user(lambda seen, k: uniform_rng.sample([i for i in ids if i not in seen], k))
    if config.negatives == "popular":
        rng = np.random.default_rng(config.seed)
        probs = (counts + 1) / (counts + 1).sum()

        def popular(seen: set[str], k: int) -> list[str]:
            draw = rng.choice(len(ids), size=min(len(ids), 4 * k + len(seen)), p=probs)
            return list(dict.fromkeys(ids[i] for i in draw if ids[i] not in seen))[:k]

        return per_user(popular)
    scorer = _retriever(split, catalog, config.retriever)

    def retrieved(
        histories: Sequence[History], excluded: Sequence[set[str]], k: int
    ) -> list[list[str]]:
        return _top_unseen(scorer, histories, catalog, k, excluded=excluded)

    return retrieved


def _top_unseen(
    scorer: collab.Scorer, histories: Sequence[History], catalog: Catalog, k: int,
    excluded: Sequence[set[str]] | None = None,
) -> list[list[str]]:  # fmt: skip
    """Per history, the scorer's ``k`` best items outside it (and ``excluded``), best first:
    exactly what the pipeline's rerank mode retrieves."""
    excludes = [
        set(h.item_ids) | (excluded[j] if excluded is not None else set())
        for j, h in enumerate(histories)
    ]
    top = ranking.top_n_batch(
        scorer.score(list(histories)), catalog=catalog, excludes=excludes, n=k
    )
    return [[item_id for item_id, _ in row] for row in top]


def _held_out_split(split: Split, holdout: int) -> Split:
    """``split`` with each user's last ``holdout`` training events removed (users left with
    none dropped): the training data of a retriever that never saw those targets."""
    train = {u: h.head(len(h) - holdout) for u, h in split.train.items() if len(h) > holdout}
    info = {**split.info, "held_out": holdout}
    return Split(protocol=split.protocol, train=train, valid=split.valid, test=(),
                 seed=split.seed, info=info)  # fmt: skip


def _retriever(
    split: Split, catalog: Catalog, method: Literal["sasrec", "ensemble"] = "sasrec"
) -> collab.Scorer:
    """The retriever (SASRec+ by default) fitted on the split's training data, cached under the
    pipeline's key, so training candidates come from the retriever the pipeline uses."""
    return evaluate.cached_scorer(CollabConfig(method=method), split=split, catalog=catalog)


# --------------------------------------------------------------------------- examples

_DATA_KEYS = ("data", "interests", "prompt", "tasks", "samples", "valid_samples", "min_history",
              "n_candidates", "negatives", "retriever", "holdout", "seed", "max_len",
              "new_since", "replay", "rerank_loss")  # fmt: skip
_DATA_VERSION = 2
"""Bumped when the rows built for the same config change (2: validation rows no longer
depend on the training rows' random draws)."""


class _Builder:
    """Renders and tokenizes examples for one config, split and tokenizer."""

    def __init__(
        self, config: FinetuneConfig, *, tokenizer: Any, split: Split, catalog: Catalog,
        real_time: bool,
    ) -> None:  # fmt: skip
        self.config, self.tokenizer, self.split, self.catalog = config, tokenizer, split, catalog
        self.real_time = real_time
        self.rng = random.Random(config.seed)
        self.dropped = 0

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        self.renderers = {
            task: PromptRenderer(
                config.prompt.for_template(template, n_titles=n), count_tokens=count
            )
            for task, template, n in (
                ("next", "recommend", config.prompt.n_titles),
                ("explain", "rerank", 1),
                ("summary", "summary", config.prompt.n_titles),
                ("rerank", config.prompt.rerank_template, 1),
            )
        }
        self.counts = collab.interaction_counts(split.train, catalog)
        """Training interaction counts (the rerank prompts' popularity levels)."""
        self.negatives = (
            _negative_source(config, split, catalog, self.counts)
            if config.negatives != "retrieved" and (config.tasks.rerank > 0 or config.valid_samples)
            else None
        )

    @property
    def template_hashes(self) -> dict[str, str]:
        return {r.template: r.template_hash for r in self.renderers.values()}

    def in_pool(self, timestamp: float | None, pool: str) -> bool:
        """Whether a target at ``timestamp`` belongs to ``pool``: ``all``, ``new`` (after
        ``new_since``) or ``old``."""
        new = (timestamp or 0.0) > (self.config.new_since or 0.0)
        return pool == "all" or new == (pool == "new")

    def windows(self, n: int, *, lookahead: int, pool: str) -> list[tuple[History, Item, int]]:
        """``n`` (history prefix, next item, position) windows, users drawn uniformly."""
        cfg = self.config
        eligible: list[tuple[History, list[int]]] = []
        for user in sorted(self.split.train):
            history = self.split.train[user]
            positions = [
                t for t in range(cfg.min_history, len(history) - lookahead + 1)
                if self.in_pool(history.events[t].timestamp, pool)
            ]  # fmt: skip
            if positions:
                eligible.append((history, positions))
        if not eligible and n:
            raise DataError(
                f"no training history has a window of min_history={cfg.min_history} items "
                f"followed by {lookahead} more (pool {pool!r}); lower min_history"
            )
        out = []
        for _ in range(n):
            history, positions = self.rng.choice(eligible)
            t = self.rng.choice(positions)
            out.append((history.head(t), self.catalog[history.events[t].item_id], t))
        return out

    def state(self, history: History) -> InterestState:
        return build_interest_state(
            history, self.catalog, self.config.interests, real_time=self.real_time
        )

    def retrieved(
        self, windows: Sequence[tuple[History, Item, int]], *, held_out: bool
    ) -> tuple[list[tuple[History, Item, int]], list[list[str]]]:
        """The windows whose target SASRec retrieves, with its top ``n_candidates`` unseen
        items in its order; ``held_out``: SASRec fitted without the last ``holdout``
        positions (for training windows there), else the pipeline's own (validation)."""
        split = _held_out_split(self.split, self.config.holdout) if held_out else self.split
        top = _top_unseen(
            _retriever(split, self.catalog, self.config.retriever), [h for h, _, _ in windows],
            self.catalog,
            self.config.n_candidates,
        )  # fmt: skip
        kept = [(w, c) for w, c in zip(windows, top, strict=True) if w[1].item_id in c]
        _log.info("the retriever has the target in its top %d for %d of %d windows",
                  self.config.n_candidates, len(kept), len(windows))  # fmt: skip
        return [w for w, _ in kept], [c for _, c in kept]

    def held_out_windows(self, pool: str) -> list[tuple[History, Item, int]]:
        """Every (history prefix, next item, position) at each user's last ``holdout``
        training positions (at least ``min_history`` items shown)."""
        cfg = self.config
        out = []
        for user in sorted(self.split.train):
            history = self.split.train[user]
            for t in range(max(cfg.min_history, len(history) - cfg.holdout), len(history)):
                if self.in_pool(history.events[t].timestamp, pool):
                    out.append((history.head(t), self.catalog[history.events[t].item_id], t))
        return out

    def rows(
        self, task: str, windows: Sequence[tuple[History, Item, int]],
        candidates: Sequence[Sequence[str]] | None = None,
    ) -> list[dict]:  # fmt: skip
        """Rendered, tokenized examples of ``task`` for the windows (too-long ones dropped);
        rerank ``candidates``, when given, are listed in ``prompt.candidate_order``."""
        renderer = self.renderers[task]
        cap = self.config.prompt.max_title_chars
        order, seed = self.config.prompt.candidate_order, self.config.seed
        cands: list[list[str]] = (
            [
                list(ranking.prompt_order(c, order, seed=seed, user_id=h.user_id, history_length=t))
                for c, (h, _, t) in zip(candidates, windows, strict=True)
            ]
            if candidates
            else [[] for _ in windows]
        )
        # The retriever's rank of each given candidate (1 = its best), for templates showing it;
        # sampled negatives have none, and such templates then refuse to render.
        ranked: list[dict[str, int]] = (
            [{c: r for r, c in enumerate(cs, start=1)} for cs in candidates]
            if candidates
            else [{} for _ in windows]
        )
        pointwise = task == "rerank" and self.config.prompt.rerank_scoring == "yes-no"
        # What each user has in the training split: never a negative, and left out of the
        # counts the prompt shows (as inference shows them, without this user's own choice).
        owns = [
            set(self.split.train.get(h.user_id or "", h).item_ids) if task == "rerank" else set()
            for h, _, _ in windows
        ]
        if task == "rerank" and windows and candidates is None:
            negs = self.negatives(  # type: ignore[misc]
                [h for h, _, _ in windows],
                [{i.item_id, *own} for own, (_, i, _) in zip(owns, windows, strict=True)],
                1 if pointwise else self.config.n_candidates - 1,
            )
            for slot, (neg, (_, item, _)) in enumerate(zip(negs, windows, strict=True)):
                cands[slot] = [*neg, item.item_id]
                self.rng.shuffle(cands[slot])
        out = []
        for slot, (history, item, t) in enumerate(windows):
            state = self.state(history)
            own = owns[slot]
            if pointwise:  # TALLRec: the target answered Yes, one negative No
                for c in [item.item_id, *(x for x in cands[slot] if x != item.item_id)][:2]:
                    answer = "Yes" if c == item.item_id else "No"
                    count = self.counts[self.catalog.position(c)] - (c in own)
                    prompt = renderer.render(
                        state, candidates=[self.catalog[c]], counts=[count],
                        ranks=[ranked[slot][c]] if ranked[slot] else None, answer=answer,
                    )  # fmt: skip
                    out += self._encoded(task, prompt, answer, item, t, history, index_only=False)
                continue
            shown: list[Item] = []
            if task == "next":
                future = self.split.train[history.user_id or ""].events[
                    t : t + renderer.config.n_titles
                ]
                items = [self.catalog[e.item_id] for e in future]
                answer = format_answer(
                    [(i.title, explain_item(i, state)) for i in items], max_title_chars=cap
                )
            elif task == "summary":
                answer = summarize_state(state)
            else:
                shown = [self.catalog[c] for c in cands[slot]] if task == "rerank" else [item]
                index = 1 + [c.item_id for c in shown].index(item.item_id)
                answer = _indexed_answer(index, item, explain_item(item, state), cap)
            counts = ranks = None
            if task == "rerank":
                counts = [self.counts[self.catalog.position(i.item_id)] - (i.item_id in own)
                          for i in shown]  # fmt: skip
                ranks = [ranked[slot][i.item_id] for i in shown] if ranked[slot] else None
            prompt = renderer.render(
                state, candidates=shown, counts=counts, ranks=ranks, answer=answer
            )
            index_only = task == "rerank" and self.config.rerank_loss == "index"
            out += self._encoded(task, prompt, answer, item, t, history, index_only=index_only)
        return out

    def _encoded(
        self, task: str, prompt: Prompt, answer: str, item: Item, t: int, history: History,
        *, index_only: bool,
    ) -> list[dict]:  # fmt: skip
        """The dataset row of one rendered example ([] when it is too long: counted)."""
        encoded = encode_example(
            self.tokenizer, prompt.messages, answer, max_len=self.config.max_len,
            label_prefix=answer.split(".", 1)[0] + "." if index_only else None,
        )  # fmt: skip
        if encoded is None:
            self.dropped += 1
            return []
        cfg = self.config.prompt
        pointwise = cfg.rerank_scoring == "yes-no" and prompt.template == cfg.rerank_template
        listed = item.item_id in prompt.candidates and not pointwise
        return [{
            "task": task, "user_id": history.user_id or "", "template": prompt.template,
            "messages": [{"role": m.role, "content": m.content} for m in prompt.messages],
            "answer": answer, "target": item.item_id, "position": t,
            "candidates": list(prompt.candidates),
            "target_index": 1 + list(prompt.candidates).index(item.item_id) if listed else 0,
            "input_ids": encoded[0], "labels": encoded[1],
        }]  # fmt: skip

    def train_rows(self) -> list[dict]:
        cfg = self.config
        weights = cfg.tasks.model_dump()
        total = sum(weights.values())
        rows: list[dict] = []
        for task in _TASKS:
            n = round(cfg.samples * weights[task] / total)
            lookahead = cfg.prompt.n_titles if task == "next" else 1
            if task == "rerank" and cfg.negatives == "retrieved":
                rows += self.retrieved_rows(n)
                continue
            if cfg.new_since is None:
                windows = self.windows(n, lookahead=lookahead, pool="all")
            else:
                n_old = round(n * cfg.replay)
                windows = self.windows(n - n_old, lookahead=lookahead, pool="new")
                windows += self.windows(n_old, lookahead=lookahead, pool="old")
            rows += self.rows(task, windows)
        self.rng.shuffle(rows)
        return rows

    def valid_rows(self) -> list[dict]:
        """Rerank examples whose targets are the validation split's (scored, never trained)."""
        examples = sorted(self.split.valid, key=lambda ex: ex.user_id)
        chosen = random.Random(self.config.seed + 1).sample(
            examples, k=min(self.config.valid_samples, len(examples))
        )
        windows = [
            (ex.history, self.catalog[ex.target], len(ex.history))
            for ex in chosen
            if len(ex.history) >= 1
        ]
        if self.config.negatives == "retrieved":
            return self.rows("rerank", *self.retrieved(windows, held_out=False))
        return self.rows("rerank", windows)

    def retrieved_rows(self, n: int) -> list[dict]:
        """Up to ``n`` rerank rows at held-out positions whose target is retrieved (continual
        update: ``replay`` of them from before ``new_since``)."""
        cfg = self.config
        pools = [("all", n)] if cfg.new_since is None else [
            ("new", n - round(n * cfg.replay)), ("old", round(n * cfg.replay))
        ]  # fmt: skip
        rows = []
        for pool, k in pools:
            windows, cands = self.retrieved(self.held_out_windows(pool), held_out=True)
            chosen = sorted(self.rng.sample(range(len(windows)), k=min(k, len(windows))))
            rows += self.rows("rerank", [windows[i] for i in chosen], [cands[i] for i in chosen])
        return rows


def _data_key(builder: _Builder, base_name: str) -> str:
    split = builder.split
    payload = [
        _DATA_VERSION,
        {k: getattr(builder.config, k) for k in _DATA_KEYS},
        builder.template_hashes,
        base_name,
        builder.catalog.fingerprint(),
        sorted((u, h.item_ids) for u, h in split.train.items()),
        sorted((ex.user_id, ex.target) for ex in split.valid),
    ]
    blob = json.dumps(payload, sort_keys=True, default=lambda o: getattr(o, "model_dump", str)())
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_datasets(
    config: FinetuneConfig,
    *,
    tokenizer: Any,
    split: Split,
    catalog: Catalog,
    real_time: bool = True,
    base_name: str = "",
    cache: bool = True,
) -> tuple[Any, Any, dict[str, str]]:
    """Training and validation ``datasets.Dataset``s for ``config``, cached on disk.

    Args:
        config: Tasks, weights, sample counts, prompt budget, seed.
        tokenizer: The base model's tokenizer (its chat template is used).
        split: The split; training examples come from ``split.train`` only.
        catalog: The items.
        real_time: Whether timestamps are real times (time context in the prompts).
        base_name: The tokenizer's model name (part of the cache key).
        cache: Reuse / write ``cache_dir("finetune", "data-<key>")``.

    Returns:
        ``(train, valid, template_hashes)``.
    """
    from datasets import Dataset, load_from_disk

    builder = _Builder(config, tokenizer=tokenizer, split=split, catalog=catalog,
                       real_time=real_time)  # fmt: skip
    folder = cache_dir("finetune", f"data-{_data_key(builder, base_name)}") if cache else None
    if folder is not None and (folder / "done").is_file():
        _log.info("reusing the cached training data in %s", folder)
        train, valid = load_from_disk(folder / "train"), load_from_disk(folder / "valid")
        return train, valid, builder.template_hashes
    train = Dataset.from_list(builder.train_rows())
    valid = Dataset.from_list(
        validation_rows(
            config, tokenizer=tokenizer, split=split, catalog=catalog, real_time=real_time
        )
    )
    if builder.dropped:
        _log.warning("dropped %d examples longer than max_len=%d", builder.dropped, config.max_len)
    if folder is not None:
        train.save_to_disk(folder / "train")
        valid.save_to_disk(folder / "valid")
        (folder / "done").write_text(json.dumps({"train": len(train), "valid": len(valid)}))
    _log.info("built %d training and %d validation examples", len(train), len(valid))
    return train, valid, builder.template_hashes


def validation_rows(
    config: FinetuneConfig, *, tokenizer: Any, split: Split, catalog: Catalog,
    real_time: bool = True,
) -> list[dict]:  # fmt: skip
    """The validation rerank rows of ``config`` (``build_datasets``'s validation set), without
    building or caching the training rows: for scripts that only score adapters. A builder of
    their own keeps them independent of the training rows' random draws."""
    builder = _Builder(config, tokenizer=tokenizer, split=split, catalog=catalog,
                       real_time=real_time)  # fmt: skip
    rows = builder.valid_rows()
    if builder.dropped:
        _log.warning("dropped %d validation examples longer than max_len=%d", builder.dropped,
                     config.max_len)  # fmt: skip
    return rows
