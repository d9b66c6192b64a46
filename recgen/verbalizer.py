"""Verbalizer: score rerank candidates from the answer's first tokens.

Rerank answers start with the chosen candidate's number in the prompt's list
(``7. Heat (1995) | ...``), so the log-probability of each number is that candidate's score,
LlamaRec-style: the first digit comes from one forward pass over the prompt, and for numbers
that share a leading digit with longer ones one cached step more per leading digit. Used by the
``transformers`` generator in rerank mode and by fine-tuning's validation. Pointwise prompts
(``prompt.rerank_scoring = "yes-no"``) ask about one candidate each and are scored by
``log P(Yes) - log P(No)`` (:func:`yes_no_scores`, TALLRec).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from recgen.types import Prompt

__all__ = ["candidate_scores", "is_prompt_learning", "yes_no_scores"]


def candidate_scores(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, batch_size: int = 8
) -> list[list[float]]:
    """Score every candidate of rerank prompts from the logits of the answer's first tokens.

    The answer starts with the chosen candidate's number (``7. Title | why``). A candidate's
    score is the log-probability of its number: the first digit from one forward pass over the
    prompt, and for numbers that share a leading digit with longer ones (``1`` vs ``12``) the
    next token (``.`` or a digit) from one more cached step per leading digit. Prompts are
    batched with left padding.

    Args:
        model: A causal LM (base, peft or merged), in eval mode.
        tokenizer: Its tokenizer (with the chat template).
        prompts: Rendered rerank prompts (``len(prompt.candidates)`` candidates each, < 100).
        batch_size: Prompts per forward pass.

    Returns:
        Per prompt, one log-probability per candidate, in the prompt's candidate order.
    """
    out: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        out.extend(_score_batch(model, tokenizer, prompts[start : start + batch_size]))
    return out


def yes_no_scores(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, batch_size: int = 8,
    share_prefix: bool = True,
) -> list[float]:  # fmt: skip
    """``log P(Yes) - log P(No)`` of the answer's first token (pointwise reranking, TALLRec;
    ``prompt.rerank_scoring = "yes-no"``).

    The prompts of one user differ only in their candidate line (and in how many recent items
    the token budget keeps beside it), so consecutive prompts with the same ``user_id`` share
    one forward pass over their common token prefix (about half of each yes-no prompt,
    ``eval/reports/bench-yesno.md``); only each prompt's remaining tokens run per prompt, on a
    copy of the prefix's KV cache. The scores are those of a full forward pass per prompt (to
    float rounding). Prefix-tuning models, whose virtual tokens take the
    cache's place, run every prompt in full.

    Args:
        model: A causal LM (base, peft or merged), in eval mode.
        tokenizer: Its tokenizer (with the chat template); ``Yes`` and ``No`` are read as the
            first token of each word.
        prompts: Rendered prompts that ask a yes-or-no question.
        batch_size: Prompts per forward pass where prompts share no prefix (one user's prompts
            share one pass, at most ``_MAX_SHARED`` of them).
        share_prefix: Run common prefixes once (``False``: a full pass per prompt, batched;
            for comparisons, ``eval/bench_yesno.py``).

    Returns:
        One score per prompt, higher for Yes.
    """
    import torch

    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    rows = tokenizer(_chats(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    share = share_prefix and not is_prompt_learning(model)
    out: list[float] = []
    with torch.inference_mode():
        for group in _groups(prompts, batch_size, shared=share):
            batch = [rows[i] for i in group]
            shared = _common_prefix(batch) if len(batch) > 1 and share else 0
            if shared >= _MIN_SHARED:
                logits = _last_logits_shared(model, batch, shared, tokenizer.pad_token_id)
            else:
                ids, mask, pos = _left_pad(batch, tokenizer.pad_token_id)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               logits_to_keep=1).logits[:, -1]  # fmt: skip
            logp = torch.log_softmax(logits.float(), -1)
            out.extend(float(x) for x in logp[:, yes] - logp[:, no])
    return out


def is_prompt_learning(model: Any) -> bool:
    """Whether ``model`` runs a prompt-learning adapter (prefix-tuning): its virtual tokens take
    the KV cache's place, so it can take no cache of ours, and batched left-padded generation
    differs from one prompt at a time."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


_MIN_SHARED = 16
"""Shortest common prefix (tokens) worth a pass of its own."""
_MAX_SHARED = 64
"""Most prompts scored on one shared prefix (their remaining tokens run as one batch)."""


def _groups(prompts: Sequence[Prompt], batch_size: int, *, shared: bool) -> list[list[int]]:
    """Index groups scored together: runs of consecutive prompts of one user (``shared``), else
    plain batches of ``batch_size``."""
    groups: list[list[int]] = []
    for i in range(len(prompts)):
        last = groups[-1] if groups else None
        same = last is not None and prompts[last[0]].user_id == prompts[i].user_id
        limit = _MAX_SHARED if shared and same else batch_size
        if last is not None and len(last) < limit and (same or not shared):
            last.append(i)
        else:
            groups.append([i])
    return groups


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own (the
    position whose logits are read)."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    for k in range(n):
        if any(r[k] != first[k] for r in rows[1:]):
            return k
    return n


def _cache_key(out: Any) -> str:
    """The forward output's (and argument's) name for the KV cache (renamed in transformers
    5.2x)."""
    return "cache" if hasattr(out, "cache") else "past_key_values"


def _last_logits_shared(model: Any, rows: Sequence[Sequence[int]], shared: int, pad: int) -> Any:
    """Last-position logits (B, V) of ``rows``, whose first ``shared`` tokens are the same:
    one pass over them, then the rows' remaining tokens (left-padded) on copies of its cache."""
    import torch

    out = model(input_ids=torch.tensor([list(rows[0][:shared])]), use_cache=True,
                logits_to_keep=1)  # fmt: skip
    key = _cache_key(out)
    cache = getattr(out, key)
    cache.batch_repeat_interleave(len(rows))
    ids, mask, pos = _left_pad([r[shared:] for r in rows], pad)
    full = torch.cat([torch.ones(len(rows), shared, dtype=mask.dtype), mask], 1)
    rest = model(input_ids=ids, attention_mask=full, position_ids=pos + shared,
                 logits_to_keep=1, **{key: cache})  # fmt: skip
    return rest.logits[:, -1]


def _chats(tokenizer: Any, prompts: Sequence[Prompt]) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in p.messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        for p in prompts
    ]


def _score_batch(model: Any, tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[float]]:
    import torch

    digit = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    dot = tokenizer.convert_tokens_to_ids(".")
    rows = tokenizer(_chats(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    leads = list(range(1, max(len(p.candidates) for p in prompts) // 10 + 1))
    with torch.inference_mode():
        if is_prompt_learning(model):  # prefixes ignore a passed cache: run prompt + digit per lead
            first, second = _score_uncached(model, rows, leads, digit, tokenizer.pad_token_id)
        else:
            first, second = _score_cached(model, rows, leads, digit, tokenizer.pad_token_id)
    scores: list[list[float]] = []
    for b, prompt in enumerate(prompts):
        row: list[float] = []
        for k in range(1, len(prompt.candidates) + 1):
            if k < 10:
                shared = k <= len(prompt.candidates) // 10  # "1" vs "1x" in this prompt's list
                tail = second[b, leads.index(k), dot] if shared else 0.0
                row.append(float(first[b, digit[k]] + tail))
            else:
                row.append(float(first[b, digit[k // 10]] + second[b, k // 10 - 1, digit[k % 10]]))
        scores.append(row)
    return scores


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any, Any]:
    """(ids, mask, position ids) of left-padded rows."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _score_cached(
    model: Any, rows: Sequence[Sequence[int]], leads: list[int], digit: list[int], pad: int
) -> tuple[Any, Any]:
    """First-token log-probs (B, V) and, per lead digit, next-token log-probs (B, L, V)."""
    import torch

    ids, mask, pos = _left_pad(rows, pad)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        use_cache=bool(leads),
        logits_to_keep=1,
    )
    first = torch.log_softmax(out.logits[:, -1].float(), -1)
    if not leads:
        return first, None
    n, size = len(rows), len(leads)
    key = _cache_key(out)
    cache = getattr(out, key)
    cache.batch_repeat_interleave(size)
    step = torch.tensor([[digit[d]] for _ in range(n) for d in leads])
    mask2 = torch.cat(
        [mask.repeat_interleave(size, 0), torch.ones(n * size, 1, dtype=torch.long)], 1
    )
    pos2 = mask.sum(-1, keepdim=True).repeat_interleave(size, 0)
    nxt = model(input_ids=step, attention_mask=mask2, position_ids=pos2, **{key: cache})
    second = torch.log_softmax(nxt.logits[:, -1].float(), -1).view(n, size, -1)
    return first, second


def _score_uncached(
    model: Any, rows: Sequence[Sequence[int]], leads: list[int], digit: list[int], pad: int
) -> tuple[Any, Any]:
    """As ``_score_cached`` for models that cannot take a cache (prefix-tuning)."""
    import torch

    if not leads:
        ids, mask, pos = _left_pad(rows, pad)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos)
        return torch.log_softmax(out.logits[:, -1].float(), -1), None
    extended = [[*r, digit[d]] for r in rows for d in leads]
    ids, mask, pos = _left_pad(extended, pad)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, -2:], -1).view(len(rows), len(leads), 2, -1)
    return logp[:, 0, 0], logp[:, :, 1]
