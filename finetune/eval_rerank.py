"""Rerank quality of the base model vs an adapter on validation users, read top to bottom.

    .venv/bin/python finetune/eval_rerank.py finetune/adapters/ml100k-lora --users 100

Each validation user's candidates are built as the adapter's training candidates were: with
``negatives = "retrieved"`` (LlamaRec's set-up), SASRec's top ``n_candidates`` unseen items in its
order, for the users whose validation target SASRec retrieves (what a reranker can change); with
``"sasrec"``, the target plus SASRec's top unseen items, shuffled. They are rendered by the rerank
template exactly as in training. Every candidate is scored from one forward pass (``recgen.verbalizer``); the table
compares the base model, the adapter, SASRec's own order of the same candidates and chance, by
HR@1, HR@5 and NDCG over the candidate list. Validation targets are never trained on.

A pointwise adapter (``prompt.rerank_scoring = "yes-no"``) is scored on its validation pairs
(the target, answered Yes, and one negative, No) by AUC of log P(Yes) - log P(No), beside the
AUC of each collaborative hint its prompts show, read alone (the popularity level, and the
retriever's rank with ``rerank-yesno-rank``): how much there was to learn from them.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--users", type=int, default=100, help="validation users")
    parser.add_argument(
        "--order", choices=["retrieved", "shuffled"],
        help="list the candidates in this order (default: the adapter's prompt.candidate_order)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from recgen import data, splits
    from recgen.adapter_data import _retriever, row_prompt, validation_rows
    from recgen.adapters import FinetuneConfig, check_adapter, load_base
    from recgen.config import load_config
    from recgen.metrics import candidate_list_metrics
    from recgen.verbalizer import candidate_scores

    # 1. the adapter's own config, with more validation users
    config = load_config(args.adapter / "finetune.toml", model=FinetuneConfig)
    config = config.model_copy(update={"valid_samples": args.users})
    if args.order:
        prompt = config.prompt.model_copy(update={"candidate_order": args.order})
        config = config.model_copy(update={"prompt": prompt})
    torch.set_num_threads(config.threads)
    check_adapter(args.adapter, base_model=config.base_model)
    # 2. validation rerank examples, built as in training
    dataset = data.load_data(config.data)
    split = splits.split_dataset(dataset, config.data)
    tokenizer, base = load_base(config.base_model, dtype=config.dtype)
    rows = validation_rows(config, tokenizer=tokenizer, split=split, catalog=dataset.catalog,
                           real_time=dataset.has_timestamps)  # fmt: skip
    prompts = [row_prompt(r) for r in rows]
    targets = [r["target_index"] for r in rows]
    if config.prompt.rerank_scoring == "yes-no":
        return pointwise(args, config, base, tokenizer, rows, prompts)

    # 3. scores: base, adapter, SASRec's order of the same candidates, chance
    def metrics(scores: list[list[float]], targets: list[int]) -> dict[str, float]:
        return candidate_list_metrics(scores, targets, ndigits=4)

    table = {}
    table["base model (zero-shot)"] = metrics(
        candidate_scores(base.eval(), tokenizer, prompts), targets
    )
    tuned = PeftModel.from_pretrained(base, str(args.adapter)).eval()
    table["adapter"] = metrics(candidate_scores(tuned, tokenizer, prompts), targets)
    sasrec = _retriever(split, dataset.catalog, config.retriever).score(
        [split.train[r["user_id"]] for r in rows]
    )
    pos = dataset.catalog.position
    collab = [
        [float(s[pos(c)]) for c in r["candidates"]] for s, r in zip(sasrec, rows, strict=True)
    ]
    table["SASRec order" if config.retriever == "sasrec" else "retriever order"] = metrics(
        collab, targets
    )
    rng = np.random.default_rng(0)
    table["chance"] = metrics([rng.random(len(r["candidates"])).tolist() for r in rows], targets)
    # 4. report
    order = config.prompt.candidate_order
    print(f"{len(rows)} validation users, {config.n_candidates} candidates each ({order} order)")
    print("| method | HR@1 | HR@5 | NDCG |\n|---|---|---|---|")
    for name, m in table.items():
        print(f"| {name} | {m['HR@1']:.3f} | {m['HR@5']:.3f} | {m['NDCG']:.3f} |")
    if args.out:
        args.out.write_text(
            json.dumps({"users": len(rows), "order": order, "table": table}, indent=2)
        )


HINTS = {
    "popularity level alone": (re.compile(r"\[popularity (\d+)\]"), 1.0),
    "retriever rank alone": (re.compile(r"\[filter rank (\d+)\]"), -1.0),
}
"""A hint as the prompt shows it -> (pattern, sign of its score: a better rank is smaller)."""


def pointwise(
    args: argparse.Namespace, config: Any, base: Any, tokenizer: Any, rows: list[dict],
    prompts: list[Any],
) -> None:  # fmt: skip
    """AUC over the validation pairs: base model, adapter, each shown hint alone, chance."""
    from peft import PeftModel

    from recgen.metrics import auc
    from recgen.verbalizer import yes_no_scores

    positive = [r["answer"] == "Yes" for r in rows]
    table = {"base model (zero-shot)": yes_no_scores(base.eval(), tokenizer, prompts)}
    tuned = PeftModel.from_pretrained(base, str(args.adapter)).eval()
    table["adapter"] = yes_no_scores(tuned, tokenizer, prompts)
    texts = [r["messages"][-1]["content"] for r in rows]
    for name, (pattern, sign) in HINTS.items():
        found = [pattern.search(t) for t in texts]
        if all(found):
            table[name] = [sign * float(m.group(1)) for m in found if m]
    table["chance"] = np.random.default_rng(0).random(len(rows)).tolist()
    aucs = {name: round(auc(scores, positive), 4) for name, scores in table.items()}
    print(f"{sum(positive)} validation pairs (the target and one negative), "
          f"{config.prompt.rerank_template} prompts")  # fmt: skip
    print("| method | AUC |\n|---|---|")
    for name, value in aucs.items():
        print(f"| {name} | {value:.3f} |")
    if args.out:
        args.out.write_text(
            json.dumps({"pairs": sum(positive), "template": config.prompt.rerank_template,
                        "table": {k: {"AUC": v} for k, v in aucs.items()}}, indent=2)
        )  # fmt: skip


if __name__ == "__main__":
    main()
