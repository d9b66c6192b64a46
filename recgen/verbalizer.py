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

__all__ = ["candidate_scores", "yes_no_scores"]


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
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, batch_size: int = 8
) -> list[float]:
    """``log P(Yes) - log P(No)`` of the answer's first token, one forward pass per batch
    (pointwise reranking, TALLRec; ``prompt.rerank_scoring = "yes-no"``).

    Args:
        model: A causal LM (base, peft or merged), in eval mode.
        tokenizer: Its tokenizer (with the chat template); ``Yes`` and ``No`` are read as the
            first token of each word.
        prompts: Rendered prompts that ask a yes-or-no question.
        batch_size: Prompts per forward pass.

    Returns:
        One score per prompt, higher for Yes.
    """
    import torch

    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        rows = tokenizer(_chats(tokenizer, batch), add_special_tokens=False)["input_ids"]
        ids, mask, pos = _left_pad(rows, tokenizer.pad_token_id)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        logp = torch.log_softmax(logits.float(), -1)
        out.extend(float(x) for x in logp[:, yes] - logp[:, no])
    return out


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
    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", 0)
    with torch.inference_mode():
        if prompt_learning:  # prefixes ignore a passed cache: run prompt + digit per lead
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
    key = "cache" if hasattr(out, "cache") else "past_key_values"  # renamed in transformers 5.2x
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
