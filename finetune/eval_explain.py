"""Explanation checks: does the model explain an item with facts from the data, base vs adapter?

    .venv/bin/python finetune/eval_explain.py finetune/adapters/ml100k-lora --users 60

For seeded validation users, the held-out next item is shown as the only candidate of the rerank
template (the fine-tuning ``explain`` task), and each model writes ``1. <title> | <why>``
greedily. The target explanation is derived from data (``adapter_data.explain_item``: the item's
labels that the user's profile shares), so each answer is checked: does it parse, does it copy
the title, does it name at least one of the item's labels, does it name a label the item does
not have (a catalog label absent from the item: a made-up fact), and is it exactly the derived
sentence. Validation targets are never trained on.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from recgen.adapter_data import explain_item
from recgen.grounding import named_labels
from recgen.types import InterestState, Item, Parsed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--users", type=int, default=60, help="validation users")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    from recgen import data, splits
    from recgen.adapters import FinetuneConfig, check_adapter, inference_prompt
    from recgen.config import GenerationConfig, load_config
    from recgen.generation import make_generator
    from recgen.interests import build_interest_state
    from recgen.parsing import parse_generation
    from recgen.prompting import PromptRenderer

    # 1. the adapter's config, data and seeded validation users
    config = load_config(args.adapter / "finetune.toml", model=FinetuneConfig)
    torch.set_num_threads(config.threads)
    check_adapter(args.adapter, base_model=config.base_model)
    dataset = data.load_data(config.data)
    catalog = dataset.catalog
    split = splits.split_dataset(dataset, config.data)
    examples = random.Random(args.seed).sample(list(split.valid), k=args.users)
    vocabulary = {label for item in catalog for label in item.labels}
    # 2. explain prompts (the held-out item as the only candidate), rendered as in training
    base_cfg = GenerationConfig(model=config.base_model, max_new_tokens=48, batch_size=8)
    models = {
        "base model (zero-shot)": make_generator(base_cfg),
        "adapter": make_generator(base_cfg.model_copy(update={"adapter": str(args.adapter)})),
    }
    renderer = PromptRenderer(
        inference_prompt(args.adapter), count_tokens=models["adapter"].count_tokens
    )
    states = [
        build_interest_state(
            ex.history, catalog, config.interests, real_time=dataset.has_timestamps
        )
        for ex in examples
    ]
    items = [catalog[ex.target] for ex in examples]
    prompts = [renderer.render(s, candidates=[i]) for s, i in zip(states, items, strict=True)]
    # 3. generate and check every answer
    table = {}
    samples = {}
    for name, generator in models.items():
        checks = []
        for gen, item, state in zip(generator.generate(prompts), items, states, strict=True):
            checks.append(check(parse_generation(gen), item, state, vocabulary))
        table[name] = {key: round(sum(c[key] for c in checks) / len(checks), 3)
                       for key in checks[0] if key != "text"}  # fmt: skip
        samples[name] = [c["text"] for c in checks[:3]]
    # 4. report
    print(f"{len(examples)} validation users, seed {args.seed}")
    keys = list(next(iter(table.values())))
    print("| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    for name, texts in samples.items():
        print(f"\n{name}, first answers:\n" + "\n".join(f"- {t}" for t in texts))
    if args.out:
        result = {"users": len(examples), "seed": args.seed, "table": table, "samples": samples}
        args.out.write_text(json.dumps(result, indent=2))


def check(parsed: Parsed, item: Item, state: InterestState, vocabulary: set[str]) -> dict:
    """The checks of one answer (1 = passed) and its first line as text."""
    first = parsed.candidates[0] if parsed.candidates else None
    why = first.explanation if first else ""
    own = set(item.labels)
    named = named_labels(why, vocabulary)  # the rule grounding drops explanations by
    return {
        "parsed": int(first is not None),
        "title copied": int(first is not None and first.title.casefold() == item.title.casefold()),
        "names an item label": int(bool(named & own)),
        "names a label the item lacks": int(bool(named - own)),
        "equals the derived sentence": int(
            why.rstrip(".") == explain_item(item, state).rstrip(".")
        ),
        "text": f"{first.title} | {why}" if first else "(no answer parsed)",
    }


if __name__ == "__main__":
    main()
