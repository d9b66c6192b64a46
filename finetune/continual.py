"""Continual update, before and after: does an adapter learn new interactions and keep old ones?

    .venv/bin/python finetune/continual.py finetune/ml100k-lora.toml

1. The cut ``T``: the ``--quantile`` of the training split's interaction times.
2. Before: an adapter trained from scratch on windows whose targets are at or before ``T``
   (``new_since=T, replay=1``: every example is "old").
3. After: that adapter continued on windows whose targets are after ``T``, with a ``--replay``
   share of older ones (``init_adapter``, ``new_since=T``), as a user updating a deployed
   adapter with a new week of data would.
4. Validation users are split by their training history: *old* users have nothing after ``T``,
   *new* users do. The base model, the before- and after-adapters score each user's rerank
   example (the validation target among the candidates; never trained on).
   The report gives HR@1/HR@5/NDCG per group and checks forgetting: the after-adapter's NDCG on
   old users must stay within ``--margin`` of the before-adapter's. The candidates are built as
   in training (``negatives = "retrieved"``: the retriever's top unseen items in its order).

Writes ``eval/reports/continual-update.md`` (and ``.json``); the adapters go to ``--work``
(not committed: they are an experiment's intermediate products).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("config", type=Path, help="fine-tuning TOML (the LoRA run's)")
    parser.add_argument("--quantile", type=float, default=0.8, help="cut at this time quantile")
    parser.add_argument("--samples", type=int, default=800, help="examples before the cut")
    parser.add_argument("--update-samples", type=int, default=400, help="examples in the update")
    parser.add_argument("--replay", type=float, default=0.3, help="replayed share of the update")
    parser.add_argument("--minutes", type=float, default=15, help="time cap per training run")
    parser.add_argument("--users", type=int, default=300, help="validation users per group (max)")
    parser.add_argument("--margin", type=float, default=0.02, help="allowed NDCG drop, old users")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "continual")
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "reports" / "continual-update")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch
    from peft import PeftModel

    from recgen import data, splits
    from recgen.adapter_data import row_prompt, validation_rows
    from recgen.adapters import FinetuneConfig, load_base
    from recgen.config import load_config
    from recgen.metrics import candidate_list_values, paired_test
    from recgen.training import train_adapter
    from recgen.verbalizer import candidate_scores

    # 1. data and the cut
    config = load_config(args.config, model=FinetuneConfig)
    torch.set_num_threads(config.threads)
    dataset = data.load_data(config.data)
    split = splits.split_dataset(dataset, config.data)
    times = [e.timestamp or 0.0 for h in split.train.values() for e in h.events]
    cut = float(np.quantile(times, args.quantile))
    # 2-3. before (old targets only) and after (update from it, with replay)
    before_cfg = config.model_copy(update={
        "samples": args.samples, "new_since": cut, "replay": 1.0, "max_minutes": args.minutes,
    })  # fmt: skip
    before_dir, after_dir = args.work / "before", args.work / "after"
    start = time.perf_counter()
    before_log = train_adapter(before_cfg, before_dir, split=split, catalog=dataset.catalog,
                               real_time=dataset.has_timestamps)  # fmt: skip
    before_min = (time.perf_counter() - start) / 60
    after_cfg = config.model_copy(update={
        "samples": args.update_samples, "new_since": cut, "replay": args.replay,
        "init_adapter": str(before_dir), "max_minutes": args.minutes,
    })  # fmt: skip
    start = time.perf_counter()
    after_log = train_adapter(after_cfg, after_dir, split=split, catalog=dataset.catalog,
                              real_time=dataset.has_timestamps)  # fmt: skip
    after_min = (time.perf_counter() - start) / 60
    # 4. validation users by group, scored by base / before / after
    new_users = {
        u for u, h in split.train.items() if any((e.timestamp or 0) > cut for e in h.events)
    }
    eval_cfg = config.model_copy(update={"valid_samples": len(split.valid)})
    tokenizer, base = load_base(config.base_model, dtype=config.dtype)
    rows = validation_rows(eval_cfg, tokenizer=tokenizer, split=split, catalog=dataset.catalog,
                           real_time=dataset.has_timestamps)  # fmt: skip
    groups = {
        "old users": [r for r in rows if r["user_id"] not in new_users][: args.users],
        "new users": [r for r in rows if r["user_id"] in new_users][: args.users],
    }

    def score(model) -> dict[str, dict[str, np.ndarray]]:
        return {
            group: candidate_list_values(
                candidate_scores(model, tokenizer, [row_prompt(r) for r in group_rows]),
                [r["target_index"] for r in group_rows],
            )
            for group, group_rows in groups.items()
        }

    per_user = {"base model (zero-shot)": score(base.eval())}
    tuned = PeftModel.from_pretrained(base, str(before_dir), adapter_name="before").eval()
    per_user["before update"] = score(tuned)
    tuned.load_adapter(str(after_dir), adapter_name="after")
    tuned.set_adapter("after")
    per_user["after update"] = score(tuned)
    table = {
        model: {g: {k: round(float(v.mean()), 4) for k, v in m.items()} for g, m in groups_.items()}
        for model, groups_ in per_user.items()
    }
    # the update's effect per group, paired over the same users (after against before)
    tests = {
        group: paired_test(per_user["after update"][group]["NDCG"],
                           per_user["before update"][group]["NDCG"])
        for group in groups
    }  # fmt: skip
    drop, gain = -tests["old users"].diff, tests["new users"].diff  # the paired means
    result = {
        "cut": cut, "quantile": args.quantile, "groups": {g: len(r) for g, r in groups.items()},
        "table": table, "old_users_ndcg_drop": round(drop, 4), "new_users_ndcg_gain": round(gain, 4),
        "update_paired_tests": {g: {"diff": round(t.diff, 4), "p_t": round(t.p_t, 3),
                                    "p_wilcoxon": round(t.p_wilcoxon, 3)}
                                for g, t in tests.items()},
        "margin": args.margin, "forgetting_within_margin": drop <= args.margin,
        "minutes": {"before": round(before_min, 1), "after": round(after_min, 1)},
        "steps": {"before": before_log.get("steps"), "after": after_log.get("steps")},
    }  # fmt: skip
    write_report(args, config, result)


def candidates(config) -> str:
    """How the validation candidates were built, in words (as ``build_datasets`` builds them)."""
    if config.negatives == "retrieved":
        return (f"the {config.retriever}'s top {config.n_candidates} unseen items in its "
                "order, for the users whose target it retrieves")  # fmt: skip
    return f"the target and {config.negatives} negatives, shuffled"


def write_report(args: argparse.Namespace, config, result: dict) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    cmd = f".venv/bin/python finetune/continual.py {args.config.relative_to(ROOT) if args.config.is_absolute() else args.config}"
    lines = [
        "# Continual update: new interactions learned, old ones kept?",
        "",
        (
            f"Reproduce: `{cmd}` (defaults: cut at the {args.quantile:g} time quantile, "
            f"{args.samples} examples before it, an update of {args.update_samples} with "
            f"{args.replay:g} replay; at most {args.minutes:g} min per run)."
        ),
        "",
        (
            f"Machine: {platform.machine()}, 2 cores, {config.threads} torch thread(s); other jobs "
            "may have shared the cores. Training: "
            f"{result['minutes']['before']} min ({result['steps']['before']} steps) before, "
            f"{result['minutes']['after']} min ({result['steps']['after']} steps) for the update."
        ),
        "",
        (
            f"Validation users: {result['groups']['old users']} old (no training interaction after "
            f"the cut), {result['groups']['new users']} new (some after it). Each ranks its "
            f"validation target among {config.n_candidates} candidates ({candidates(config)}) "
            "by the verbalizer's scores."
        ),
        "",
        "| model | old HR@1 | old HR@5 | old NDCG | new HR@1 | new HR@5 | new NDCG |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, groups in result["table"].items():
        o, n = groups["old users"], groups["new users"]
        lines.append(f"| {name} | {o['HR@1']:.3f} | {o['HR@5']:.3f} | {o['NDCG']:.3f} | "
                     f"{n['HR@1']:.3f} | {n['HR@5']:.3f} | {n['NDCG']:.3f} |")  # fmt: skip
    verdict = "within" if result["forgetting_within_margin"] else "BEYOND"
    lines += [
        "",
        (
            f"Old users' NDCG changed by {-result['old_users_ndcg_drop']:+.4f} with the update "
            f"({verdict} the stated margin of {result['margin']:g}); new users' by "
            f"{result['new_users_ndcg_gain']:+.4f}."
        ),
        "",
        "The update's NDCG change per group, paired over the same users (after against before):",
        "",
        "| group | users | ΔNDCG | p (t-test) | p (Wilcoxon) |",
        "|---|---|---|---|---|",
        *(
            f"| {g} | {result['groups'][g]} | {t['diff']:+.4f} | {t['p_t']:.3g} | "
            f"{t['p_wilcoxon']:.3g} |"
            for g, t in result["update_paired_tests"].items()
        ),
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
