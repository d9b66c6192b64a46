"""Fine-tuning report: zero-shot vs LoRA vs prefix-tuning vs the classical baselines (ML-100K).

    .venv/bin/python eval/finetune_report.py

Computes nothing: it reads committed outputs of committed commands and puts them side by side,
so it runs on a fresh clone.

- Test metrics (leave-one-out, HR/NDCG@5/10/20) per method, and the parse and grounding rates of
  free generation: ``metrics.json`` in the run folders of ``eval/benchmark.py``
  (``eval/reports/benchmark/ml-100k``; shuffled candidate lists:
  ``eval/reports/benchmark-shuffled/ml-100k``; the generation-weighted LoRA on a second
  sample of test users: ``eval/reports/benchmark-generate/ml-100k``).
- Fine-tuned against zero-shot, paired on the same test users: the sections of the benchmark
  reports (``benchmark.md``, ``benchmark-shuffled.md``) that ``eval/benchmark.py`` computed.
- Training time, throughput and peak memory: each adapter's ``recgen_adapter.json``.
- Quality against training samples: validation NDCG in each adapter's ``training_log.jsonl``
  (optimizer step x batch size x gradient accumulation = examples seen), with the base model's
  and the retriever's NDCG on the same validation lists (``eval_rerank_valid.json``).
- Explanation checks: ``eval_explain_valid.json`` (``finetune/eval_explain.py``).

Writes ``eval/reports/finetune.md`` and ``eval/reports/finetune-samples.png``. A missing input
is named in the report, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmark import ADAPTERS as BENCH_ADAPTERS  # eval/ is the script's folder
from benchmark import slug

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "eval" / "reports"
ADAPTERS = {f"{kind} ({folder.name})": folder for kind, folder in BENCH_ADAPTERS["ml-100k"]
            if (folder / "adapter_config.json").is_file()}  # fmt: skip
"""The benchmark's committed MovieLens-100K adapters (folders holding weights), labelled by
kind and folder."""
ORDERED, SHUFFLED, GENERATE = "benchmark", "benchmark-shuffled", "benchmark-generate"
VLLM, TRIE, SAMPLED = "benchmark-vllm", "benchmark-trie", "benchmark-sampled"
YESNO, YESNO_TOP20 = "benchmark-yesno", "benchmark-yesno-top20"
ROWS = {
    "most-popular": (ORDERED, "most-popular"),
    "SASRec+": (ORDERED, "SASRec+"),
    "ensemble (recgen's retriever)": (ORDERED, "ensemble"),
    "zero-shot, free generation": (ORDERED, "LLM zero-shot (generate, LLM only)"),
    "LoRA, free generation": (ORDERED, "LLM LoRA (generate, LLM only)"),
    "zero-shot, rerank of the ensemble's top 20":
        (ORDERED, "LLM zero-shot (ensemble top-20 -> LLM rerank, LLM only)"),
    "LoRA, rerank of the ensemble's top 20":
        (ORDERED, "LLM LoRA (ensemble top-20 -> LLM rerank, LLM only)"),
    "prefix, rerank of the ensemble's top 20":
        (ORDERED, "LLM prefix (ensemble top-20 -> LLM rerank, LLM only)"),
    "zero-shot, rerank of the top 20 shuffled":
        (SHUFFLED, "LLM zero-shot (ensemble top-20 shuffled -> LLM rerank, LLM only)"),
    "hybrid zero-shot, top 20 shuffled":
        (SHUFFLED, "hybrid zero-shot (ensemble top-20 shuffled -> LLM rerank)"),
    "LoRA-shuffled, rerank of the top 20 shuffled":
        (SHUFFLED, "LLM LoRA (ensemble top-20 shuffled -> LLM rerank, LLM only)"),
    "hybrid LoRA-shuffled, top 20 shuffled":
        (SHUFFLED, "hybrid LoRA (ensemble top-20 shuffled -> LLM rerank)"),
    "zero-shot, free generation (2nd sample)": (GENERATE, "LLM zero-shot (generate, LLM only)"),
    "LoRA-gen, free generation (2nd sample)": (GENERATE, "LLM LoRA-gen (generate, LLM only)"),
    "zero-shot, free generation (vLLM)": (VLLM, "LLM zero-shot (generate, LLM only)"),
    "LoRA, free generation (vLLM)": (VLLM, "LLM LoRA (generate, LLM only)"),
    "LoRA-gen, free generation (vLLM)": (VLLM, "LLM LoRA-gen (generate, LLM only)"),
    "zero-shot, trie decoding": (TRIE, "LLM zero-shot (trie decoding, LLM only)"),
    "LoRA-next, trie decoding": (TRIE, "LLM LoRA-next (trie decoding, LLM only)"),
    "most-popular, sampled lists": (SAMPLED, "most-popular"),
    "SASRec+, sampled lists": (SAMPLED, "SASRec+"),
    "ensemble, sampled lists": (SAMPLED, "ensemble"),
    "zero-shot, sampled lists":
        (SAMPLED, "LLM zero-shot (20 sampled shuffled -> LLM rerank, LLM only)"),
    "LoRA-sampled, sampled lists":
        (SAMPLED, "LLM LoRA-sampled (20 sampled shuffled -> LLM rerank, LLM only)"),
    "zero-shot yes-no, sampled lists":
        (YESNO, "LLM zero-shot (20 sampled shuffled + popularity yes-no -> LLM rerank, LLM only)"),
    "LoRA-yesno, sampled lists":
        (YESNO, "LLM LoRA-yesno (20 sampled shuffled + popularity yes-no -> LLM rerank, LLM only)"),
    "ensemble, full ranking (yes-no sample)": (YESNO_TOP20, "ensemble"),
    "zero-shot yes-no, rerank of the top 20 shuffled": (YESNO_TOP20,
        "LLM zero-shot (ensemble top-20 shuffled + popularity yes-no -> LLM rerank, LLM only)"),
    "LoRA-yesno, rerank of the top 20 shuffled": (YESNO_TOP20,
        "LLM LoRA-yesno (ensemble top-20 shuffled + popularity yes-no -> LLM rerank, LLM only)"),
}  # fmt: skip
"""Report label -> (benchmark ``--out`` under ``eval/reports``, the benchmark's method label).
The LLM rows are the LLM's own order (no fusion); hybrid rows fuse it with the ensemble
(weights tuned on validation). The shuffled rows' LoRA is the one trained on shuffled lists
(``finetune/ml100k-lora-shuffled.toml``); in the benchmark its label is plain ``LoRA``.
The 2nd sample rows are another seeded sample of test users on which the generation-weighted
LoRA (``LoRA-gen``) and zero-shot free generation were run side by side. The vLLM rows are
free generation on every test user through a vLLM server (``eval/benchmark.py --vllm``: the
adapters merged into the weights, bfloat16). The trie rows are D3-style trie decoding (beam
search that can only write unseen catalog titles) on a seeded sample of test users, zero-shot
and the next-title LoRA (``LoRA-next``, ``finetune/ml100k-lora-next.toml``) on the same users.
The sampled rows are the sampled-candidates protocol of TALLRec and LLaRA (``eval/benchmark.py
--sampled 19``): every method ranks only the held-out item and 19 uniform draws from the items
its user never saw, the LLM rows in a seeded random order; ``LoRA-sampled`` is trained on such
lists (``finetune/ml100k-lora-sampled.toml``). The yes-no rows are the same protocol scored
pointwise as TALLRec does (``eval/reports/benchmark-yesno``): one prompt per candidate with its
training-split popularity level, ranked by log P(Yes) - log P(No); ``LoRA-yesno`` is trained on
such prompts (``finetune/ml100k-lora-yesno.toml``); the yes-no top-20 rows score the ensemble's
top 20 the same way, in full ranking (``eval/reports/benchmark-yesno-top20``). Sampled metrics are not comparable with the
full-ranking rows above them (Krichene & Rendle, 2020)."""
BENCHMARKS = ("benchmark.md", "benchmark-shuffled.md", "benchmark-generate.md",
              "benchmark-vllm.md", "benchmark-trie.md", "benchmark-sampled.md",
              "benchmark-yesno.md", "benchmark-yesno-top20.md")  # fmt: skip
"""Benchmark reports whose fine-tuned-against-zero-shot sections are quoted."""
COLUMNS = ("HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20")
STATS = {"parse_rate": "parse rate", "grounded_rate": "grounded",
         "rejected: already in history": "in history",
         "rejected: explanation names a label the item lacks": "false label"}  # fmt: skip
"""Free-generation output stats (``recgen.pipeline.output_stats``) -> column: shares of output
lines that parsed, of parsed titles grounded, named a history item, or whose explanation named
a genre the item lacks (dropped by grounding; runs before that check have no value)."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reports", type=Path, default=REPORTS, help="benchmark outputs")
    parser.add_argument("--out", type=Path, default=REPORTS / "finetune")
    return parser.parse_args()


def metrics_table(reports: Path) -> list[str]:
    head = ["method", "test users", *COLUMNS, *STATS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    missing = []
    for label, (out, method) in ROWS.items():
        folder = f"{out}/ml-100k/{slug(method)}"
        path = reports / folder / "metrics.json"
        if not path.is_file():
            missing.append(f"`{folder}`")
            continue
        info = json.loads(path.read_text(encoding="utf-8"))
        s = info["summary"]
        stats = [f"{info[k]:.3f}" if k in info else "" for k in STATS]
        lines.append("| " + " | ".join([label, str(info["n_users"]),
                     *(f"{s[c]:.4f}" for c in COLUMNS), *stats]) + " |")  # fmt: skip
    if missing:
        lines += ["", f"Not found (not run yet): {', '.join(missing)}."]
    return lines


def paired_sections(reports: Path) -> list[str]:
    """The sections of the benchmark reports that test a fine-tuned row against zero-shot (its
    twin on the same prompts, or the best zero-shot row of the run), as written."""
    lines: list[str] = []
    for name in BENCHMARKS:
        path = reports / name
        if not path.is_file():
            lines += [f"`{name}` is missing: run `eval/benchmark.py` (see its docstring).", ""]
            continue
        text = path.read_text(encoding="utf-8")
        for part in text.split("\n### ")[1:]:
            title, _, body = part.partition("\n")
            for prefix, against in (("Fine-tuned against zero-shot: ", ""),
                                    ("Fine-tuned against the best zero-shot row: ",
                                     ", against the run's best zero-shot row")):  # fmt: skip
                if title.startswith(prefix):
                    table = body.strip().split("\n\n")[0]
                    pair = title.removeprefix(prefix)
                    lines += [f"**{pair}** (`{name}`{against})", "", table, ""]
    return lines


def adapter_table(metas: dict[str, dict]) -> list[str]:
    keys = ("steps", "train_examples", "best_step", "train_seconds", "tokens_per_second",
            "peak_rss_gb")  # fmt: skip
    lines = ["| adapter | " + " | ".join(k.replace("_", " ") for k in keys)
             + " | best validation |", "|---|" + "---|" * (len(keys) + 1)]  # fmt: skip
    for kind, meta in metas.items():
        s = meta["summary"]
        lines.append(f"| {kind} | " + " | ".join(str(s.get(k, "")) for k in keys)
                     + f" | {validation(s.get('best_valid', {}))} |")  # fmt: skip
    return lines


def validation(row: dict) -> str:
    """A validation row's ranking metric: NDCG over the 20 candidates of a listwise adapter,
    AUC of Yes over No of a pointwise (yes-no) one."""
    return (
        f"NDCG {row['ndcg']:.3f}"
        if "ndcg" in row
        else f"AUC {row['auc']:.3f}"
        if "auc" in row
        else ""
    )


def samples_curve(metas: dict[str, dict], path: Path) -> list[str]:
    """Validation NDCG against training examples seen, per adapter (a table and a plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| adapter | examples seen | validation (NDCG over 20 candidates; AUC of yes-no) |",
             "|---|---|---|"]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6.5, 4))
    refs: dict[str, float] = {}
    for kind, folder in ADAPTERS.items():
        if kind not in metas:
            continue
        cfg = metas[kind]["config"]
        per_step = cfg["batch_size"] * cfg["grad_accum"]
        rows = [row for row in map(json.loads, (folder / "training_log.jsonl").open())
                if "ndcg" in row or "auc" in row]  # fmt: skip
        lines += [f"| {kind} | {row['step'] * per_step} | {validation(row)} |" for row in rows]
        points = [(row["step"] * per_step, row["ndcg"]) for row in rows if "ndcg" in row]
        if not points:  # AUC is not on the NDCG scale: table only
            continue
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=kind)
        rerank = folder / "eval_rerank_valid.json"
        if rerank.is_file():
            table = json.loads(rerank.read_text())["table"]
            refs.setdefault("zero-shot", table["base model (zero-shot)"]["NDCG"])
            for name in ("retriever order", "SASRec order"):
                if name in table:
                    refs.setdefault(name, table[name]["NDCG"])
            refs.setdefault("chance", table["chance"]["NDCG"])
    for (name, y), style in zip(refs.items(), (":", "--", "-."), strict=False):
        ax.axhline(y, linestyle=style, color="grey", linewidth=1)
        ax.annotate(name, (0, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("validation NDCG over 20 candidates")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    if refs:
        lines += ["", "Same validation lists: " + ", ".join(f"{k} {v:.3f}" for k, v in refs.items())
                  + " (`eval_rerank_valid.json`)."]  # fmt: skip
    return lines


def pointwise_table() -> list[str]:
    """Yes-no adapters on their validation pairs (``finetune/eval_rerank.py``): AUC of the base
    model, the adapter and each collaborative hint its prompts show, read alone."""
    found = {kind: json.loads((folder / "eval_rerank_valid.json").read_text())
             for kind, folder in ADAPTERS.items() if (folder / "eval_rerank_valid.json").is_file()}  # fmt: skip
    found = {kind: result for kind, result in found.items() if "pairs" in result}
    names = list(dict.fromkeys(name for r in found.values() for name in r["table"]))
    names = [n for n in names if n != "chance"] + ["chance"] * ("chance" in names)
    lines = ["| adapter | pairs | template | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]  # fmt: skip
    for kind, r in found.items():
        cells = [f"{r['table'][n]['AUC']:.3f}" if n in r["table"] else "" for n in names]
        lines.append(f"| {kind} | {r['pairs']} | {r['template']} | " + " | ".join(cells) + " |")
    return lines


def explain_table() -> list[str]:
    lines: list[str] = []
    for kind, folder in ADAPTERS.items():
        path = folder / "eval_explain_valid.json"
        if not path.is_file():
            lines.append(f"- {kind}: no explanation check (`{path.relative_to(ROOT)}` is missing).")
            continue
        result = json.loads(path.read_text())
        table = result["table"]
        keys = list(next(iter(table.values())))
        lines += [f"**{kind}** ({result['users']} validation users, seed {result['seed']}):", "",
                  "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]  # fmt: skip
        lines += [f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |"
                  for name, row in table.items()]  # fmt: skip
        for name, texts in result["samples"].items():
            lines += ["", f"{name}, first answers:", *(f"- `{t}`" for t in texts)]
        lines.append("")
    return lines


def main() -> None:
    args = parse_args()
    metas = {kind: json.loads((folder / "recgen_adapter.json").read_text())
             for kind, folder in ADAPTERS.items() if (folder / "recgen_adapter.json").is_file()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_name(args.out.name + "-samples.png")
    body = [
        "# Fine-tuning: zero-shot vs LoRA vs prefix-tuning vs the classical baselines",
        "",
        (
            "Reproduce: `.venv/bin/python eval/finetune_report.py` (reads the outputs of "
            "`eval/benchmark.py`, `finetune/train.py`, `finetune/eval_rerank.py` and "
            "`finetune/eval_explain.py`; see each section)."
        ),
        "",
        "## MovieLens-100K leave-one-out, test split",
        "",
        (
            "From `eval/reports/benchmark/ml-100k/` and `eval/reports/benchmark-shuffled/ml-100k/` "
            "(`eval/benchmark.py`; free generation on its seeded sample of test users, everything "
            "else on all of them). The LLM rows are the LLM's own order, no fusion. In the "
            "shuffled rows the rerank prompt lists the ensemble's top 20 in a seeded random "
            "order (`prompt.candidate_order = \"shuffled\"`), so the LLM cannot copy the "
            "retriever's order; the LoRA-shuffled rows are the adapter trained on such lists "
            "(`finetune/ml100k-lora-shuffled.toml`). The 2nd-sample rows (`eval/reports/benchmark-generate/`) are "
            "free generation on another seeded sample of test users, zero-shot and the "
            "generation-weighted LoRA (`finetune/ml100k-lora-gen.toml`) on the same users. "
            "The vLLM rows (`eval/reports/benchmark-vllm/`) are free generation on every test "
            "user through a vLLM server, each adapter merged into the weights (bfloat16). "
            "The trie rows (`eval/reports/benchmark-trie/`) are D3-style trie decoding (beam "
            "search over unseen catalog titles only, 20 beams) on a seeded sample of test users, "
            "zero-shot and the next-title LoRA (`finetune/ml100k-lora-next.toml`) on the same users. "
            "The sampled rows (`eval/reports/benchmark-sampled/`) are TALLRec's and LLaRA's "
            "protocol: every method ranks only the held-out item among 19 items drawn uniformly "
            "from those its user never saw (HR@1 is LLaRA's HitRatio@1; HR@20 is 1 by "
            "construction); they are not comparable with the full-ranking rows. The yes-no "
            "rows (`eval/reports/benchmark-yesno/`, the same 300 test users and lists) score the "
            "lists pointwise as TALLRec does: one prompt per candidate with its "
            "training-split popularity level, ranked by log P(Yes) - log P(No); LoRA-yesno is "
            "trained on such prompts (`finetune/ml100k-lora-yesno.toml`). The yes-no top-20 rows "
            "(`eval/reports/benchmark-yesno-top20/`, full ranking, 300 seeded test users) score "
            "the ensemble's top 20, shuffled, the same way."
        ),
        "",
        *metrics_table(args.reports),
        "",
        "## Fine-tuned against zero-shot (paired, same users)",
        "",
        *paired_sections(args.reports),
        "## Training: time and memory (2 CPU cores)", "", *adapter_table(metas), "",
        "## Quality against training samples", "", *samples_curve(metas, png), "",
        f"![validation NDCG against examples seen]({png.name})", "",
        "## Pointwise (yes-no) adapters on their validation pairs", "",
        ("AUC of log P(Yes) - log P(No) over each adapter's validation pairs (the validation "
         "target, answered Yes, and one negative built as in its training), beside each "
         "collaborative hint its prompts show, read alone: `finetune/eval_rerank.py ADAPTER "
         "--users 400 --out ADAPTER/eval_rerank_valid.json`."), "",
        *pointwise_table(), "",
        "## Explanation checks (validation users)", "", *explain_table(),
    ]  # fmt: skip
    path = args.out.with_suffix(".md")
    path.write_text("\n".join(body) + "\n", encoding="utf-8")
    print(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
