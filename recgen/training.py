"""Training: fine-tune a peft adapter (LoRA or prefix-tuning) with a plain, resumable torch loop.

``train_adapter(config, out_dir)`` builds training data from the training split only (through
the same :class:`~recgen.prompting.PromptRenderer` as inference, see :mod:`recgen.adapter_data`),
trains with bf16 base weights and fp32 adapter weights, loss on answer tokens only, validates on
the validation split (rerank examples scored by :mod:`recgen.verbalizer`), stops early and
checkpoints so that a killed run resumes exactly. The saved folder is a peft adapter plus its
metadata (:func:`recgen.adapters.write_adapter_meta`), ``finetune.toml`` and
``training_log.jsonl``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from recgen.adapter_data import FinetuneConfig, build_datasets, row_prompt
from recgen.adapters import (
    META_FILE,
    base_model_id,
    check_adapter,
    load_base,
    peft_config,
    write_adapter_meta,
)
from recgen.config import dump_config, load_config
from recgen.errors import ConfigError
from recgen.metrics import auc, candidate_list_metrics
from recgen.types import Catalog, Split
from recgen.verbalizer import candidate_scores, yes_no_scores

__all__ = ["train_adapter"]

_log = logging.getLogger(__name__)


def train_adapter(
    config: FinetuneConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    split: Split | None = None,
    catalog: Catalog | None = None,
    real_time: bool = True,
    show_progress: bool = True,
    stop_after: int | None = None,
    cache_data: bool = True,
) -> dict[str, Any]:
    """Fine-tune an adapter and save the best one (by validation) to ``out_dir``.

    A plain torch loop: every step's micro-batches follow from ``(seed, epoch)``, and the
    checkpoint in ``out_dir/checkpoint`` holds adapter weights, optimizer, scheduler, RNG
    states and step, so ``resume=True`` continues exactly where a killed run left off.

    Args:
        config: The run's config.
        out_dir: The adapter folder to write (peft files, ``recgen_adapter.json``,
            ``finetune.toml``, ``training_log.jsonl``, ``checkpoint/``).
        resume: Continue from ``out_dir/checkpoint`` (the config must be the same).
        split: The split to train on (default: load and split ``config.data``).
        catalog: Its catalog (required with ``split``).
        real_time: Whether timestamps are real times (with ``split``).
        show_progress: Show a tqdm bar.
        stop_after: Return after this many optimizer steps without finishing (tests use it
            to simulate a kill; checkpoint first with ``checkpoint_every``).
        cache_data: Reuse / write the built datasets in recgen's cache.

    Returns:
        The training summary (also saved in ``recgen_adapter.json``).

    Raises:
        ConfigError: on a resume without a checkpoint or with another config, a fresh run
            over an existing checkpoint, or an ``init_adapter`` of another method.
    """
    import torch

    out = Path(out_dir)
    _check_resume(config, out, resume)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, out, resume=resume, split=split, catalog=catalog,
                      real_time=real_time, show_progress=show_progress, stop_after=stop_after,
                      cache_data=cache_data)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _train(
    config: FinetuneConfig, out: Path, *, resume: bool, split: Split | None,
    catalog: Catalog | None, real_time: bool, show_progress: bool, stop_after: int | None,
    cache_data: bool,
) -> dict[str, Any]:  # fmt: skip
    import torch

    split, catalog, real_time = _data(config, split, catalog, real_time)
    tokenizer, base = load_base(config.base_model, dtype=config.dtype)
    train, valid, hashes = build_datasets(
        config, tokenizer=tokenizer, split=split, catalog=catalog, real_time=real_time,
        base_name=base_model_id(config.base_model)["name"], cache=cache_data,
    )  # fmt: skip
    if len(train) == 0:
        raise ConfigError(f"no training examples fit max_len={config.max_len}: raise max_len")
    torch.manual_seed(config.seed)  # the adapter's initial weights
    model = _peft_model(config, base)
    run = _Run(config, model, tokenizer, train, valid, out)
    if resume:
        run.load_checkpoint()
    else:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(config, out / "finetune.toml")
        (out / "training_log.jsonl").write_text("", encoding="utf-8")
    finished = run.loop(show_progress=show_progress, stop_after=stop_after)
    if not finished:
        return run.summary()
    run.restore_best()
    model.save_pretrained(out)
    summary = run.summary()
    write_adapter_meta(out, config, template_hashes=hashes, summary=summary)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # finished: nothing to resume
    _log.info("saved the adapter to %s: %s", out, summary)
    return summary


def _check_resume(config: FinetuneConfig, out: Path, resume: bool) -> None:
    has = (out / "checkpoint" / "state.pt").is_file()
    if resume and not has:
        raise ConfigError(f"--resume: {out}/checkpoint/state.pt does not exist; start without it")
    if not resume and has:
        raise ConfigError(
            f"{out} holds a checkpoint of an unfinished run: pass --resume to continue it, or "
            "choose another output folder"
        )
    if not resume and (out / META_FILE).is_file():
        raise ConfigError(
            f"{out} already holds a trained adapter: choose another output folder (or continue "
            f"it with init_adapter={str(out)!r}, new_since=...)"
        )
    if resume:
        saved = load_config(out / "finetune.toml", model=FinetuneConfig)
        if saved.model_dump(exclude={"max_minutes"}) != config.model_dump(exclude={"max_minutes"}):
            raise ConfigError(
                f"--resume with another config than {out}/finetune.toml: resume with the same "
                "config (only max_minutes may change)"
            )


def _data(
    config: FinetuneConfig, split: Split | None, catalog: Catalog | None, real_time: bool
) -> tuple[Split, Catalog, bool]:
    if split is not None:
        if catalog is None:
            raise ConfigError("train_adapter(split=...) needs catalog= too")
        return split, catalog, real_time
    from recgen import data, splits

    dataset = data.load_data(config.data)
    return splits.split_dataset(dataset, config.data), dataset.catalog, dataset.has_timestamps


def _peft_model(config: FinetuneConfig, base: Any) -> Any:
    import peft

    if config.init_adapter is None:
        layers = getattr(base.config, "num_hidden_layers", None)
        return peft.get_peft_model(base, peft_config(config, num_layers=layers))
    meta = check_adapter(config.init_adapter, base_model=config.base_model)
    if meta["method"] != config.method:
        raise ConfigError(
            f"init_adapter={config.init_adapter!r} is a {meta['method']} adapter but "
            f"method={config.method!r}: continue it with the same method"
        )
    return peft.PeftModel.from_pretrained(base, config.init_adapter, is_trainable=True)


class _Run:
    """The state of one training run: model, optimizer, schedule, step, best, log."""

    def __init__(
        self, config: FinetuneConfig, model: Any, tokenizer: Any, train: Any, valid: Any,
        out: Path,
    ) -> None:  # fmt: skip
        import torch

        self.config, self.model, self.tokenizer, self.out = config, model, tokenizer, out
        self.train, self.valid = train, valid
        self.lengths = [len(ids) for ids in train["input_ids"]]
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.opt = torch.optim.AdamW(
            self.params.values(), lr=config.lr, weight_decay=config.weight_decay
        )
        per_epoch = max(len(train) // (config.batch_size * config.grad_accum), 1)
        self.per_epoch = per_epoch
        self.total = config.max_steps or per_epoch * config.epochs
        warmup, total = config.warmup_steps, self.total
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _Schedule(warmup, total))
        self.step, self.bad, self.seconds, self.tokens = 0, 0, 0.0, 0
        self.best: dict[str, Any] = {"step": 0, "value": None, "params": None, "metrics": {}}
        self._orders: dict[int, list[list[int]]] = {}

    # ------------------------------------------------------------------ batches

    def micro_batches(self, step: int) -> list[list[int]]:
        """The example indices of each micro-batch of optimizer step ``step`` (deterministic)."""
        epoch, within = divmod(step, self.per_epoch)
        if epoch not in self._orders:
            import numpy as np

            rng = np.random.default_rng([self.config.seed, epoch])
            perm = rng.permutation(len(self.train)).tolist()
            size = self.config.batch_size
            chunk = size * 16  # sort by length inside chunks: less padding, still shuffled
            batches = []
            for start in range(0, len(perm), chunk):
                part = sorted(perm[start : start + chunk], key=lambda i: self.lengths[i])
                batches += [part[i : i + size] for i in range(0, len(part), size)]
            self._orders = {epoch: [batches[i] for i in rng.permutation(len(batches))]}
        batches = self._orders[epoch]
        accum = self.config.grad_accum
        return [batches[(within * accum + j) % len(batches)] for j in range(accum)]

    def _tensors(self, rows: Any) -> tuple[Any, Any, Any]:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in rows["input_ids"])
        ids = torch.full((len(rows["input_ids"]), width), pad, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for r, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
            ids[r, : len(x)], labels[r, : len(y)], mask[r, : len(x)] = (
                torch.tensor(x), torch.tensor(y), 1,
            )  # fmt: skip
        return ids, mask, labels

    def _loss_sum(self, rows: Any) -> tuple[Any, int]:
        """Summed cross-entropy over answer tokens (logits computed at answer positions only)
        and the number of terms: tokens, or with ``loss_norm = "example"`` the sum of each
        example's mean token loss and the number of examples."""
        import torch.nn.functional as F

        ids, mask, labels = self._tensors(rows)
        targets = labels[:, 1:]
        keep = (targets != -100).any(0).nonzero().flatten()
        logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        gold = targets[:, keep]
        per_token = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), gold.reshape(-1), reduction="none"
        ).reshape(gold.shape)  # ignored (-100) positions are 0
        counts = (gold != -100).sum(1)
        if self.config.loss_norm == "example":
            has = counts > 0
            return (per_token.sum(1)[has] / counts[has]).sum(), int(has.sum())
        return per_token.sum(), int(counts.sum())

    def _terms(self, labels: list[int]) -> int:
        """Loss terms one example contributes (see ``_loss_sum``)."""
        n = sum(1 for y in labels[1:] if y != -100)
        return min(n, 1) if self.config.loss_norm == "example" else n

    # ------------------------------------------------------------------ loop

    def loop(self, *, show_progress: bool, stop_after: int | None) -> bool:
        """Train until the last step, early stopping or the time limit; False if stopped early
        by ``stop_after`` (nothing final is written then)."""
        import time

        import torch
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=self.total, initial=self.step, desc="finetune", unit="step",
                   disable=not show_progress)  # fmt: skip
        start_step = self.step
        while self.step < self.total:
            started = time.perf_counter()
            self.model.train()
            rows = [self.train[batch] for batch in self.micro_batches(self.step)]
            n_terms = sum(self._terms(labels) for part in rows for labels in part["labels"])
            total_loss = 0.0
            self.opt.zero_grad(set_to_none=True)
            for part in rows:  # one graph at a time: memory of one micro-batch
                loss, _ = self._loss_sum(part)
                (loss / max(n_terms, 1)).backward()
                total_loss += loss.item()
            torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0)
            self.opt.step()
            self.sched.step()
            self.step += 1
            took = time.perf_counter() - started
            self.seconds += took
            self.tokens += sum(len(ids) for part in rows for ids in part["input_ids"])
            entry = {"step": self.step, "loss": round(total_loss / max(n_terms, 1), 5),
                     "lr": self.sched.get_last_lr()[0], "seconds": round(took, 2)}  # fmt: skip
            self._log(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", best=self.best["value"])
            stop = False
            if self.step % cfg.eval_every == 0 or self.step == self.total:
                stop = self._validate()
            out_of_time = cfg.max_minutes is not None and self.seconds > cfg.max_minutes * 60
            if out_of_time or stop:
                _log.info("stopping at step %d (%s)", self.step,
                          "time limit" if out_of_time else "no improvement")  # fmt: skip
                if self.step % cfg.eval_every and self.step != self.total:
                    self._validate()
                break
            if self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
            if stop_after is not None and self.step - start_step >= stop_after:
                bar.close()
                return False
        bar.close()
        return True

    def _validate(self) -> bool:
        """Validation loss and verbalizer rerank metrics; returns True to stop early."""
        metrics = self.evaluate()
        value = selection_value(self.config.select_by, metrics, step=self.step)
        better = self.best["value"] is None or value > self.best["value"]
        if better:
            params = {n: p.detach().clone() for n, p in self.params.items()}
            self.best = {"step": self.step, "value": value, "params": params, "metrics": metrics}
            self.bad = 0
        else:
            self.bad += 1
        self._log({"step": self.step, **metrics, "best_step": self.best["step"]})
        _log.info("step %d validation: %s", self.step, metrics)
        return self.bad >= self.config.patience

    def evaluate(self) -> dict[str, float]:
        """Mean answer-token loss and the verbalizer's NDCG / HR@1 over validation candidates."""
        import torch

        self.model.eval()
        total, count = 0.0, 0
        size = self.config.batch_size
        with torch.inference_mode():
            for start in range(0, len(self.valid), size):
                loss, n = self._loss_sum(self.valid[start : start + size])
                total, count = total + float(loss), count + n
        loss = {"loss": round(total / max(count, 1), 5)}
        if self.config.prompt.rerank_scoring == "yes-no":  # pointwise: AUC of Yes over No
            rows = [row for row in self.valid if row["answer"] in ("Yes", "No")]
            scores = yes_no_scores(self.model, self.tokenizer, [row_prompt(r) for r in rows])
            self.model.train()
            return loss | {"auc": round(auc(scores, [r["answer"] == "Yes" for r in rows]), 5)}
        rows = [row for row in self.valid if row["target_index"]]
        scores = candidate_scores(self.model, self.tokenizer, [row_prompt(r) for r in rows])
        ranked = candidate_list_metrics(scores, [r["target_index"] for r in rows])
        self.model.train()
        return loss | {"ndcg": round(ranked["NDCG"], 5), "hr1": round(ranked["HR@1"], 5)}

    # ------------------------------------------------------------------ state

    def _log(self, entry: dict[str, Any]) -> None:
        with (self.out / "training_log.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def save_checkpoint(self) -> None:
        """Write the resumable state atomically (a kill mid-write keeps the previous one)."""
        import random

        import numpy as np
        import torch

        state = {
            "step": self.step, "bad": self.bad, "seconds": self.seconds, "tokens": self.tokens,
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "best": self.best,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": np.random.get_state()},
        }  # fmt: skip
        final, tmp, old = (self.out / n for n in ("checkpoint", "checkpoint.tmp", "checkpoint.old"))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> None:
        """Restore everything ``save_checkpoint`` wrote; drop log lines past its step."""
        import random

        import numpy as np
        import torch

        state = torch.load(self.out / "checkpoint" / "state.pt", weights_only=False)
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.bad = state["step"], state["bad"]
        self.seconds, self.tokens, self.best = state["seconds"], state["tokens"], state["best"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        log = self.out / "training_log.jsonl"
        lines = [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
        log.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        _log.info("resumed from step %d of %d", self.step, self.total)

    def restore_best(self) -> None:
        """Put the best validated weights back into the model."""
        import torch

        if self.best["params"] is not None:
            with torch.no_grad():
                for name, value in self.best["params"].items():
                    self.params[name].copy_(value)

    def summary(self) -> dict[str, Any]:
        import resource

        return {
            "steps": self.step, "total_steps": self.total, "train_examples": len(self.train),
            "valid_examples": len(self.valid), "best_step": self.best["step"],
            "best_valid": self.best["metrics"], "train_seconds": round(self.seconds, 1),
            "tokens": self.tokens,
            "tokens_per_second": round(self.tokens / max(self.seconds, 1e-9), 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        }  # fmt: skip


def selection_value(select_by: str, metrics: dict[str, float], *, step: int) -> float:
    """What a validation is ranked by (higher is better): the verbalizer's NDCG, minus the
    loss, or (``last``) the step itself, so the latest validated adapter is kept and patience
    never stops the run."""
    if select_by == "ndcg":  # pointwise adapters validate AUC instead
        return metrics["ndcg"] if "ndcg" in metrics else metrics["auc"]
    if select_by == "loss":
        return -metrics["loss"]
    return float(step)


class _Schedule:
    """Linear warm-up, then cosine decay to 10% of the peak (a picklable LambdaLR factor)."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        import math

        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(self.total - self.warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
