"""Collaborative baselines (most-popular, SASRec+) under leave-one-out, ranked against all items.

Reproduce the committed report (MovieLens-100K, 5-core, seed 0, reads the test split once):

    .venv/bin/python eval/baselines.py ml-100k

Tune on validation only (never reads test):

    .venv/bin/python eval/baselines.py ml-100k --split valid --set sasrec.dropout=0.5 --out /tmp/t

Another data set (RecBole atomic files, already filtered):

    .venv/bin/python eval/baselines.py ../shared/data/amazon-scientific --set data.kcore=0 \
        --name amazon-scientific
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recgen.collab import PopularityScorer, SASRecScorer
from recgen.config import DataConfig, SASRecConfig, parse_override
from recgen.data import load_dataset
from recgen.errors import ConfigError
from recgen.evaluate import (
    EvalResult,
    ScorerRanker,
    compare,
    popular_items,
    run_evaluation,
    validation_callback,
)
from recgen.splits import split_dataset
from recgen.types import Catalog, Example, RecDataset, Split

# ----------------------------------------------------------------------------- config


class BaselinesConfig(BaseModel):
    """Everything that determines a baselines run (saved as each run's config.toml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "ml100k"
    """Short data set name used in the report and folder names."""
    data: DataConfig = DataConfig(source="ml-100k", kcore=5, protocol="leave-one-out", seed=0)
    sasrec: SASRecConfig = SASRecConfig(
        max_len=200, hidden=64, layers=2, heads=1, dropout=0.2, lr=1e-3,
        batch_size=64, max_epochs=200, patience=10, seed=0, threads=2,
    )  # fmt: skip
    popular_share: float = Field(default=0.2, gt=0, le=1)
    """Items in the top ``popular_share`` by training count are "popular" (POP@K)."""
    ks: tuple[int, ...] = (1, 5, 10, 20)


PUBLISHED = {  # LlamaRec (Yue et al. 2023), ML-100K, 5-core, leave-one-out, all items
    "SASRec": (0.0522, 0.0993),
    "BERT4Rec": (0.0366, 0.0785),
    "NARM": (0.0441, 0.0801),
    "LRURec": (0.0705, 0.1426),
    "LlamaRec": (0.0759, 0.1524),
}
"""Published NDCG@10 / Recall@10 (HR@10) on MovieLens-100K."""

# ----------------------------------------------------------------------------- steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "source",
        nargs="?",
        default="ml-100k",
        help="'ml-100k' (fetched) or a data folder (default: ml-100k)",
    )
    p.add_argument(
        "--split",
        choices=["valid", "test"],
        default="test",
        help="evaluate on valid (tuning) or test (read once per reported run)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set sasrec.hidden=128",
    )
    p.add_argument("--name", default=None, help="data set name for folders and the report")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default eval/reports/baselines-NAME)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)  # fmt: skip


def make_config(args: argparse.Namespace) -> BaselinesConfig:
    """The defaults above, then the source, ``--set`` overrides and ``--name``."""
    data = BaselinesConfig().model_dump()
    overrides = [f"data.source={args.source}", *args.overrides]
    for text in overrides + ([f"name={args.name}"] if args.name else []):
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    try:
        return BaselinesConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid override in {overrides}: {e}") from None


def load_split(cfg: BaselinesConfig) -> tuple[RecDataset, Split]:
    d = cfg.data
    dataset = load_dataset(d.source, format=d.format, kcore=d.kcore, seed=d.seed)
    return dataset, split_dataset(dataset, d)


def evaluate(
    ranker: ScorerRanker, examples: list[Example], *, cfg: BaselinesConfig, split: Split,
    catalog: Catalog, run_dir: Path, args: argparse.Namespace, extra: dict[str, object],
) -> EvalResult:  # fmt: skip
    return run_evaluation(
        ranker,
        examples,
        catalog=catalog,
        popular=popular_items(split.train, catalog, share=cfg.popular_share),
        run_dir=run_dir,
        config=cfg,
        ks=cfg.ks,
        split=args.split,
        extra=extra,
        show_progress=not args.quiet,
    )


def fit_popular(split: Split, catalog: Catalog) -> tuple[PopularityScorer, dict[str, object]]:
    start = time.perf_counter()
    scorer = PopularityScorer().fit(split.train, catalog)
    return scorer, {"train_seconds": round(time.perf_counter() - start, 3), "epochs": 0}


def fit_sasrec(
    cfg: BaselinesConfig, split: Split, catalog: Catalog, *, run_dir: Path, show_progress: bool
) -> tuple[SASRecScorer, dict[str, object]]:
    validate = validation_callback(split.valid, catalog)
    scorer = SASRecScorer().fit(
        split.train, catalog, cfg.sasrec, validate=validate, show_progress=show_progress
    )
    scorer.save(run_dir / "model")
    return scorer, {
        "train_seconds": round(scorer.train_seconds, 1),
        "epochs": scorer.epochs,
        "best_epoch": scorer.best_epoch,
        "best_valid_ndcg10": round(scorer.best_valid, 4),
        "valid_curve": [round(h["valid"], 4) for h in scorer.history],
        "torch": torch.__version__,
        "threads": cfg.sasrec.threads,
    }


def _relative(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        return path


def _fmt(x: float) -> str:
    return f"{x:.4f}".lstrip("0")


def ours_table(results: list[EvalResult], ks: tuple[int, ...]) -> str:
    cols = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG", "MRR")]
    cov = f"COV@{max(ks)}"
    head = ["method", *cols, cov, "POP@10", "train s", "epochs (best)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s, info = r.summary(), r.info
        best = f" ({info['best_epoch']})" if "best_epoch" in info else ""
        cells = [r.name, *(_fmt(s[c]) for c in cols), _fmt(s[cov]), _fmt(s.get("POP@10", 0.0)),
                 f"{info['train_seconds']:.1f}", f"{info['epochs']}{best}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def published_table(results: list[EvalResult]) -> str:
    lines = ["| method | NDCG@10 | HR@10 (Recall@10) | source |", "|---|---|---|---|"]
    for name, (ndcg, hr) in PUBLISHED.items():
        lines.append(f"| {name} | {_fmt(ndcg)} | {_fmt(hr)} | LlamaRec paper |")
    for r in results:
        s = r.summary()
        lines.append(
            f"| **{r.name} (ours)** | {_fmt(s['NDCG@10'])} | {_fmt(s['HR@10'])} | this run |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    cfg: BaselinesConfig, args: argparse.Namespace, dataset: RecDataset, split: Split,
    results: list[EvalResult], path: Path, out: Path,
) -> None:  # fmt: skip
    rep = dataset.report
    command = "python eval/baselines.py " + " ".join(
        [args.source, f"--split {args.split}", *(f"--set {o}" for o in args.overrides)]
        + ([f"--name {args.name}"] if args.name else [])
    )
    body = [
        f"# Collaborative baselines on {cfg.name} ({args.split} split)\n",
        (
            f"Data: `{cfg.data.source}` ({dataset.name}), k-core {cfg.data.kcore}: "
            f"{rep.n_users} users, {rep.n_items} items, {rep.n_interactions} interactions. "
            f"Protocol: {split.protocol} (last item test, second-to-last validation), ranked "
            f"against all {len(dataset.catalog)} items, history items excluded, "
            f"{len(results[0].user_ids)} users. SASRec+ is early-stopped on validation NDCG@10.\n"
        ),
        "## Our runs\n",
        ours_table(results, cfg.ks),
        (
            f"\nPOP@10: share of the top-10 among the top {cfg.popular_share:.0%} items by training "
            f"count. Machine: {platform.machine()}, {cfg.sasrec.threads} torch threads, "
            f"torch {torch.__version__}.\n"
        ),
        "## Beside published numbers\n",
        published_table(results),
        "\n## Paired significance (per-user NDCG@10 vs most-popular)\n",
        compare(results, baseline="most-popular"),
        "\n## SASRec+ configuration\n",
        "```toml\n"
        + "\n".join(f"{k} = {v!r}" for k, v in cfg.sasrec.model_dump().items())
        + "\n```\n",
        "\n## Reproduce\n",
        f"From the repository root:\n\n```\n.venv/bin/python {command.removeprefix('python ')}\n```\n",
        f"Run folders (config.toml, recs.jsonl, metrics.json, report.md): `{_relative(out)}/`\n",
    ]
    path.write_text("\n".join(body), encoding="utf-8")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = make_config(args)
    out = args.out or Path(__file__).resolve().parent / "reports" / f"baselines-{cfg.name}"
    dataset, split = load_split(cfg)
    catalog = dataset.catalog
    examples = list(split.test if args.split == "test" else split.valid)
    print(f"{dataset.name}: {len(catalog)} items, {len(examples)} {args.split} users")
    kw = {"cfg": cfg, "split": split, "catalog": catalog, "args": args}
    pop, pop_info = fit_popular(split, catalog)
    pop_ranker = ScorerRanker("most-popular", pop, catalog)
    results = [evaluate(pop_ranker, examples, run_dir=out / "popular", extra=pop_info, **kw)]
    sas, sas_info = fit_sasrec(cfg, split, catalog, run_dir=out / "sasrec",
                               show_progress=not args.quiet)  # fmt: skip
    sas_ranker = ScorerRanker("SASRec+", sas, catalog)
    results.append(evaluate(sas_ranker, examples, run_dir=out / "sasrec", extra=sas_info, **kw))
    print(ours_table(results, cfg.ks))
    print(compare(results, baseline="most-popular"))
    report = out.with_suffix(".md") if args.split == "test" else out / "report-valid.md"
    write_report(cfg, args, dataset, split, results, report, out)
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
