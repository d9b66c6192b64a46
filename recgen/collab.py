"""Collaborative scorers over catalog positions: most-popular, SASRec+ (full cross-entropy), and
the ensemble of SASRec+ with the item-to-item scorers of ``recgen.itemsim``."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from recgen._scoring import Scorer, check_fitted, read_meta, write_meta
from recgen.config import CollabConfig, EnsembleConfig, SASRecConfig, dump_config, load_config
from recgen.errors import ConfigError
from recgen.itemsim import EASEScorer, TransitionScorer
from recgen.types import Catalog, History

__all__ = [
    "EASEScorer",
    "EnsembleScorer",
    "PopularityScorer",
    "SASRecScorer",
    "Scorer",
    "TransitionScorer",
    "ensemble",
    "fit_scorer",
    "interaction_counts",
    "load_scorer",
]

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- popularity


def interaction_counts(train: Mapping[str, History], catalog: Catalog) -> np.ndarray:
    """Interaction counts over catalog positions, from ``train`` only (items outside the
    catalog are ignored): the popularity prior, most-popular's scores and the rerank prompts'
    popularity levels."""
    counts = np.zeros(len(catalog), dtype=np.float64)
    for history in train.values():
        for item_id in history.item_ids:
            if item_id in catalog:
                counts[catalog.position(item_id)] += 1
    return counts


class PopularityScorer:
    """Scores items by their interaction count in the training histories (same for everyone)."""

    name = "popular"

    def __init__(self) -> None:
        self.catalog: Catalog | None = None
        self.counts = np.zeros(0, dtype=np.float64)

    def fit(self, train: Mapping[str, History], catalog: Catalog) -> PopularityScorer:
        """Count interactions per catalog item; items outside the catalog are ignored."""
        self.catalog, self.counts = catalog, interaction_counts(train, catalog)
        return self

    def score(self, histories: Sequence[History]) -> np.ndarray:
        """The training counts, repeated for each history."""
        check_fitted(self, self.catalog is not None)
        return np.tile(self.counts, (len(histories), 1))

    def save(self, path: str | Path) -> Path:
        """Write the counts and the catalog fingerprint to folder ``path``."""
        if self.catalog is None:
            raise ConfigError("PopularityScorer is not fitted: call fit() or load() first")
        path = Path(path)
        write_meta(path, "popular", self.catalog)
        np.save(path / "counts.npy", self.counts)
        return path

    @classmethod
    def load(cls, path: str | Path, catalog: Catalog) -> PopularityScorer:
        """Reload from ``save``; raises IndexMismatchError for another catalog."""
        read_meta(Path(path), catalog)
        scorer = cls()
        scorer.catalog, scorer.counts = catalog, np.load(Path(path) / "counts.npy")
        return scorer


# --------------------------------------------------------------------------- SASRec


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then a position-wise FFN."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(h, dim=2)
        q, k, v = (
            t.view(b, length, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v)
        )
        p = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, length, h)))
        return x + self.drop(self.ffn(self.norm2(x)))


class _SASRec(nn.Module):
    """SASRec (Kang & McAuley 2018): item + learned position embeddings, causal blocks.

    Token 0 is padding; catalog position ``p`` is token ``p + 1``. Output logits are dot
    products with the (shared) item embeddings.
    """

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.max_len = cfg.max_len
        self.positions = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            _Block(cfg.hidden, cfg.heads, cfg.dropout) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.hidden)
        nn.init.normal_(self.items.weight, std=cfg.hidden**-0.5)
        nn.init.normal_(self.positions.weight, std=0.02)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Shape ``(batch, len, hidden)`` for left-padded token ids ``(batch, len)``."""
        length = tokens.shape[1]
        real = tokens > 0
        # Right-aligned positions: the newest item always has the last position, as if every
        # sequence were padded to max_len.
        pos = torch.arange(self.max_len - length, self.max_len, device=tokens.device)
        x = self.items(tokens) * math.sqrt(self.items.embedding_dim) + self.positions(pos)
        x = self.drop(x) * real.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        # Real queries see earlier real keys; padding queries see only themselves (no NaN).
        mask = causal & (
            real.unsqueeze(1) | torch.eye(length, dtype=torch.bool, device=tokens.device)
        )
        mask = mask.unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask) * real.unsqueeze(-1)
        return self.norm(x)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Scores over catalog positions (padding token dropped)."""
        return states @ self.items.weight[1:].T


def _encode(history: History, catalog: Catalog, max_len: int) -> list[int]:
    """Token ids (catalog position + 1) of the newest ``max_len`` known items."""
    tokens = [catalog.position(i) + 1 for i in history.item_ids if i in catalog]
    return tokens[-max_len:]


def _length_batches(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator, *, pool: int = 8
) -> list[np.ndarray]:
    """Shuffled batches of similar length (less padding): shuffle, sort within pools of
    ``pool`` batches by length, cut into batches, shuffle the batches."""
    order = rng.permutation(len(lengths))
    lens = np.asarray(lengths)
    batches: list[np.ndarray] = []
    step = batch_size * pool
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _pad_left(seqs: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for r, seq in enumerate(seqs):
        if seq:
            out[r, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
    return out


class SASRecScorer:
    """SASRec trained with full cross-entropy over the catalog at every position ("SASRec+").

    Use ``SASRecScorer().fit(train, catalog, config, validate=...)``; ``validate`` returns the
    validation NDCG@10 of the scorer and drives early stopping (best weights are kept).
    """

    name = "sasrec"

    def __init__(self) -> None:
        self.catalog: Catalog | None = None
        self.config = SASRecConfig()
        self.model: _SASRec | None = None
        self.history: list[dict[str, float]] = []
        """Per epoch: loss, validation metric and seconds."""
        self.best_epoch = 0
        self.best_valid = float("nan")
        self.train_seconds = 0.0

    @property
    def epochs(self) -> int:
        """Epochs trained (including those after the best one)."""
        return len(self.history)

    # ------------------------------------------------------------------ training

    def fit(
        self,
        train: Mapping[str, History],
        catalog: Catalog,
        config: SASRecConfig | None = None,
        *,
        validate: Callable[[SASRecScorer], float] | None = None,
        show_progress: bool = True,
    ) -> SASRecScorer:
        """Train on each user's training sequence (next item at every position).

        Args:
            train: user_id -> training history (oldest first).
            catalog: The items scores refer to.
            config: Hyper-parameters (defaults: ``SASRecConfig()``).
            validate: Returns validation NDCG@10 for the current weights; without it the model
                trains for ``max_epochs`` and keeps the last weights.
            show_progress: Show a tqdm bar over epochs with the loss and validation metric.

        Raises:
            ConfigError: if no training history has two known items.
        """
        self.config, self.catalog = config or SASRecConfig(), catalog
        cfg = self.config
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.threads)
        rng = np.random.default_rng(cfg.seed)
        seqs = [s for h in train.values() if len(s := _encode(h, catalog, cfg.max_len + 1)) > 1]
        if not seqs:
            raise ConfigError("no training history has two catalog items: nothing to learn")
        self.model = _SASRec(len(catalog), cfg)
        opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best_state, bad, self.history = None, 0, []
        bar = tqdm(range(cfg.max_epochs), desc="SASRec", unit="epoch", disable=not show_progress)
        start = time.perf_counter()
        for epoch in bar:
            loss = self._epoch(seqs, opt, rng)
            metric = validate(self) if validate is not None else float("nan")
            self.history.append(
                {"loss": loss, "valid": metric, "seconds": time.perf_counter() - start}
            )
            bar.set_postfix(loss=f"{loss:.3f}", ndcg10=f"{metric:.4f}")
            if validate is None:
                continue
            if best_state is None or metric > self.best_valid:
                self.best_valid, self.best_epoch, bad = metric, epoch + 1, 0
                best_state = copy.deepcopy(self.model.state_dict())
            elif (bad := bad + 1) >= cfg.patience:
                break
        bar.close()
        self.train_seconds = time.perf_counter() - start
        if best_state is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()
        _log.info(
            "SASRec: %d epochs in %.1fs, best valid NDCG@10 %.4f at epoch %d",
            self.epochs,
            self.train_seconds,
            self.best_valid,
            self.best_epoch,
        )
        return self

    def _epoch(
        self, seqs: list[list[int]], opt: torch.optim.Optimizer, rng: np.random.Generator
    ) -> float:
        """One pass over the shuffled sequences; returns the mean loss per predicted item."""
        model, _ = self._fitted()
        model.train()
        total, count = 0.0, 0
        for idx in _length_batches([len(s) for s in seqs], self.config.batch_size, rng):
            batch = [seqs[i] for i in idx]
            tokens = _pad_left(batch, max(len(s) for s in batch))
            inputs, targets = tokens[:, :-1], tokens[:, 1:] - 1  # -1: padding target
            real = targets >= 0
            states = model.hidden_states(inputs)[real]
            loss = F.cross_entropy(model.logits(states), targets[real])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * int(real.sum()), count + int(real.sum())
        return total / max(count, 1)

    # ------------------------------------------------------------------ scoring

    def _fitted(self) -> tuple[_SASRec, Catalog]:
        if self.model is None or self.catalog is None:
            raise ConfigError("SASRecScorer is not fitted: call fit() or load() first")
        return self.model, self.catalog

    @torch.no_grad()
    def score(self, histories: Sequence[History], *, batch_size: int = 256) -> np.ndarray:
        """Next-item scores over catalog positions; a history with no known item scores 0."""
        model, catalog = self._fitted()
        model.eval()
        out = np.zeros((len(histories), len(catalog)), dtype=np.float32)
        for start in range(0, len(histories), batch_size):
            seqs = [
                _encode(h, catalog, self.config.max_len)
                for h in histories[start : start + batch_size]
            ]
            live = [r for r, s in enumerate(seqs) if s]
            if not live:
                continue
            tokens = _pad_left([seqs[r] for r in live], max(len(seqs[r]) for r in live))
            states = model.hidden_states(tokens)[:, -1]
            out[[start + r for r in live]] = model.logits(states).numpy()
        return out

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | Path) -> Path:
        """Write config, weights, training log and the catalog fingerprint to folder ``path``."""
        model, catalog = self._fitted()
        path = Path(path)
        write_meta(
            path,
            "sasrec",
            catalog,
            history=self.history,
            best_epoch=self.best_epoch,
            best_valid=self.best_valid,
            train_seconds=self.train_seconds,
        )
        dump_config(self.config, path / "config.toml")
        torch.save(model.state_dict(), path / "model.pt")
        return path

    @classmethod
    def load(cls, path: str | Path, catalog: Catalog) -> SASRecScorer:
        """Reload from ``save``; raises IndexMismatchError for another catalog."""
        path = Path(path)
        meta = read_meta(path, catalog)
        scorer = cls()
        scorer.config = load_config(path / "config.toml", model=SASRecConfig)
        scorer.catalog = catalog
        scorer.model = _SASRec(len(catalog), scorer.config)
        scorer.model.load_state_dict(torch.load(path / "model.pt", weights_only=True))
        scorer.model.eval()
        scorer.history = list(meta.get("history", []))
        scorer.best_epoch = int(meta.get("best_epoch", 0))
        scorer.best_valid = float(meta.get("best_valid", float("nan")))
        scorer.train_seconds = float(meta.get("train_seconds", 0.0))
        return scorer


# --------------------------------------------------------------------------- ensemble


def _zscore(scores: np.ndarray) -> np.ndarray:
    """Each row centred and scaled to unit deviation over the catalog (constant rows: 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    std = scores.std(axis=1, keepdims=True)
    return (scores - scores.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)


class _Memo:
    """A scorer that remembers every batch it scored (tuning re-scores the same validation
    histories once per weight vector tried)."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer, self.name = scorer, scorer.name
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    def score(self, histories: Sequence[History]) -> np.ndarray:
        """The member's scores, computed once per batch of history objects."""
        key = tuple(id(h) for h in histories)
        if key not in self._cache:
            self._cache[key] = self.scorer.score(histories)
        return self._cache[key]


class EnsembleScorer:
    """A weighted sum of member scorers' per-user z-scored scores.

    Members see different things: SASRec+ the order of the whole history, EASE which items go
    together, transitions what follows the newest items. Weights are fixed in the config or
    tuned on the validation split when fitting (the first member keeps weight 1).
    """

    name = "ensemble"

    def __init__(self, members: Sequence[Scorer] = (), weights: Sequence[float] = ()) -> None:
        if len(members) != len(weights):
            raise ConfigError(f"{len(members)} ensemble members but {len(weights)} weights")
        self.members, self.weights = list(members), [float(w) for w in weights]
        self.catalog: Catalog | None = None
        self.tuning: list[dict[str, Any]] = []
        """Every weight vector tried on validation, with its NDCG@10."""

    def score(self, histories: Sequence[History]) -> np.ndarray:
        """The weighted sum of the members' z-scored scores (zero-weight members skipped)."""
        check_fitted(self, bool(self.members))
        out = np.zeros(0)
        for member, weight in zip(self.members, self.weights, strict=True):
            if weight == 0 and out.size:
                continue
            part = weight * _zscore(member.score(histories))
            out = part if not out.size else out + part
        return out.astype(np.float32)

    def tune(self, validate: Callable[[Scorer], float], grid: Sequence[float]) -> EnsembleScorer:
        """Coordinate ascent over ``grid`` for every weight but the first, twice, keeping the
        best validation metric (ties keep the earlier, smaller weight)."""
        real = self.members
        self.members = [_Memo(m) for m in real]
        weights = [1.0] + [0.0] * (len(real) - 1)
        best = self._try(validate, weights)
        for _ in range(2):
            for k in range(1, len(weights)):
                for w in grid:
                    trial = [*weights[:k], float(w), *weights[k + 1 :]]
                    if trial != weights and (metric := self._try(validate, trial)) > best:
                        best, weights = metric, trial
        self.members, self.weights = real, weights
        _log.info("ensemble weights %s: validation NDCG@10 %.4f",
                  dict(zip([m.name for m in real], weights, strict=True)), best)  # fmt: skip
        return self

    def _try(self, validate: Callable[[Scorer], float], weights: list[float]) -> float:
        self.weights = weights
        metric = float(validate(self))
        self.tuning.append({"weights": list(weights), "valid_ndcg10": metric})
        return metric

    def save(self, path: str | Path) -> Path:
        """Write every member into a subfolder, the weights and tuning log into meta.json."""
        check_fitted(self, self.catalog is not None)
        assert self.catalog is not None
        path = Path(path)
        names = [m.name for m in self.members]
        for member in self.members:
            member.save(path / member.name)  # type: ignore[attr-defined]
        write_meta(path, "ensemble", self.catalog, members=names, weights=self.weights,
                   tuning=self.tuning)  # fmt: skip
        return path

    @classmethod
    def load(cls, path: str | Path, catalog: Catalog) -> EnsembleScorer:
        """Reload from ``save``; raises IndexMismatchError for another catalog."""
        path = Path(path)
        meta = read_meta(path, catalog)
        members = [load_scorer(path / name, catalog=catalog) for name in meta["members"]]
        scorer = cls(members, meta["weights"])
        scorer.catalog, scorer.tuning = catalog, list(meta.get("tuning", []))
        return scorer


# --------------------------------------------------------------------------- factories


def fit_scorer(
    config: CollabConfig,
    *,
    train: Mapping[str, History],
    catalog: Catalog,
    validate: Callable[[Any], float] | None = None,
    show_progress: bool = True,
) -> Scorer:
    """Fit the configured collaborative scorer on the training histories.

    Args:
        config: Which scorer, with its settings.
        train: user_id -> training history (oldest first).
        catalog: The items scores refer to.
        validate: Validation NDCG@10 of a scorer: SASRec+ stops early on it, the ensemble tunes
            its weights on it (without it, SASRec+ trains ``max_epochs`` and the ensemble
            needs ``ensemble.weights``).
        show_progress: Show SASRec+'s progress bar.

    Raises:
        ConfigError: for ``method="none"`` (there is nothing to fit), or an ensemble with
            neither weights nor ``validate``.
    """
    if config.method == "popular":
        return PopularityScorer().fit(train, catalog)
    if config.method == "sasrec":
        return SASRecScorer().fit(
            train, catalog, config.sasrec, validate=validate, show_progress=show_progress
        )
    if config.method == "ease":
        return EASEScorer().fit(train, catalog, config.ease)
    if config.method == "transitions":
        return TransitionScorer().fit(train, catalog, config.transitions)
    if config.method == "ensemble":
        return _fit_ensemble(config, config.ensemble, train, catalog, validate, show_progress)
    raise ConfigError(
        f"collab.method={config.method!r} has no scorer to fit; use 'ensemble', 'sasrec', "
        "'ease', 'transitions' or 'popular'"
    )


def _fit_ensemble(
    config: CollabConfig,
    ens: EnsembleConfig,
    train: Mapping[str, History],
    catalog: Catalog,
    validate: Callable[[Any], float] | None,
    show_progress: bool,
) -> EnsembleScorer:
    _check_tunable(ens, validate)  # before fitting members, which can take minutes
    members = [
        fit_scorer(config.model_copy(update={"method": m}), train=train, catalog=catalog,
                   validate=validate, show_progress=show_progress)
        for m in ens.members
    ]  # fmt: skip
    return ensemble(members, ens, catalog=catalog, validate=validate)


def _check_tunable(config: EnsembleConfig, validate: Callable[[Any], float] | None) -> None:
    if config.weights is None and validate is None:
        raise ConfigError(
            "collab.method='ensemble' tunes its weights on validation: pass validate=..., or "
            "set collab.ensemble.weights (one per member)"
        )


def ensemble(
    members: Sequence[Scorer],
    config: EnsembleConfig,
    *,
    catalog: Catalog,
    validate: Callable[[Any], float] | None,
) -> EnsembleScorer:
    """Combine fitted members (in ``config.members`` order) with the configured weights, or
    with weights tuned by ``validate``.

    Raises:
        ConfigError: with neither ``config.weights`` nor ``validate``.
    """
    _check_tunable(config, validate)
    scorer = EnsembleScorer(members, config.weights or [1.0] + [0.0] * (len(members) - 1))
    scorer.catalog = catalog
    if config.weights is None and validate is not None:
        scorer.tune(validate, config.grid)
    return scorer


def load_scorer(path: str | Path, *, catalog: Catalog) -> Scorer:
    """Reload any scorer saved with ``save`` (the kind is read from its meta.json).

    Raises:
        ConfigError: if the folder holds no saved scorer or an unknown kind.
        IndexMismatchError: if it was fitted on another catalog.
    """
    kinds: dict[str, Any] = {
        "popular": PopularityScorer, "sasrec": SASRecScorer, "ease": EASEScorer,
        "transitions": TransitionScorer, "ensemble": EnsembleScorer,
    }  # fmt: skip
    kind = read_meta(Path(path), catalog).get("kind")
    if kind not in kinds:
        raise ConfigError(f"{path}/meta.json: unknown scorer kind {kind!r} ({', '.join(kinds)})")
    return kinds[kind].load(path, catalog)
