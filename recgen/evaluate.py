"""Evaluation: rank held-out examples with any Ranker, score them, and write a run folder."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from pydantic import BaseModel
from tqdm.auto import tqdm

from recgen.collab import Scorer, ensemble, fit_scorer, load_scorer
from recgen.config import CollabConfig, cache_dir, dump_config
from recgen.errors import ConfigError, DataError, IndexMismatchError
from recgen.metrics import DEFAULT_KS, Metrics, paired_test, score_rankings
from recgen.ranking import top_n_batch
from recgen.types import Catalog, Example, History, Ranker, Split

__all__ = [
    "EvalResult",
    "ListRanker",
    "ScorerRanker",
    "cached_scorer",
    "compare",
    "load_run",
    "popular_items",
    "run_evaluation",
    "validation_callback",
]

_log = logging.getLogger(__name__)

TABLE_COLUMNS = ("HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20")
"""Metrics shown in Markdown tables (metrics.json holds all of them)."""


class ScorerRanker:
    """Adapts a collaborative :class:`~recgen.collab.Scorer` to the ``Ranker`` protocol.

    Each example's history items are excluded and, when ``example.candidates`` is set, only
    those are ranked. Scoring runs in batches of ``batch_size`` examples.
    """

    def __init__(
        self, name: str, scorer: Scorer | None, catalog: Catalog, *, batch_size: int = 256
    ) -> None:
        if scorer is None:
            raise DataError(f"ScorerRanker {name!r} got no scorer: fit or load one first")
        self.name, self.catalog, self.batch_size = name, catalog, batch_size
        self.scorer: Scorer = scorer

    def rank(self, examples: Sequence[Example], *, n: int) -> list[list[str]]:
        """Item ids for each example, best first, at most ``n`` each."""
        out: list[list[str]] = []
        for start in range(0, len(examples), self.batch_size):
            batch = examples[start : start + self.batch_size]
            scores = self.scorer.score([ex.history for ex in batch])
            tops = top_n_batch(
                scores,
                catalog=self.catalog,
                excludes=[set(ex.history.item_ids) for ex in batch],
                candidates=[ex.candidates for ex in batch],
                n=n,
            )
            out.extend([item_id for item_id, _ in top] for top in tops)
        return out


class ListRanker:
    """A :class:`~recgen.types.Ranker` over lists computed beforehand, one per user id.

    Lets one expensive pass (e.g. LLM generation) be scored under several fusion settings.

    Raises:
        DataError: from ``rank``, for an example whose user has no list.
    """

    def __init__(self, name: str, lists: Mapping[str, Sequence[str]]) -> None:
        self.name, self.lists = name, dict(lists)

    def rank(self, examples: Sequence[Example], *, n: int) -> list[list[str]]:
        """Each example's precomputed list, cut to ``n``."""
        missing = [ex.user_id for ex in examples if ex.user_id not in self.lists]
        if missing:
            raise DataError(f"ListRanker {self.name!r} has no list for users {missing[:3]}")
        return [list(self.lists[ex.user_id][:n]) for ex in examples]


def validation_callback(
    valid: Sequence[Example], catalog: Catalog, *, k: int = 10
) -> Callable[[Scorer], float]:
    """A callback giving a scorer's validation NDCG@k (for SASRec early stopping).

    Args:
        valid: Validation examples (their histories exclude the validation target).
        catalog: The catalog the scorer scores.
        k: Cut-off of the NDCG returned.
    """
    examples = tuple(valid)
    targets = [ex.target for ex in examples]

    def ndcg(scorer: Scorer) -> float:
        rankings = ScorerRanker("valid", scorer, catalog).rank(examples, n=k)
        metrics = score_rankings(rankings, targets, ks=(k,), n_catalog=len(catalog))
        return metrics.summary()[f"NDCG@{k}"]

    return ndcg


def popular_items(
    train: Mapping[str, History], catalog: Catalog, *, share: float = 0.2
) -> frozenset[str]:
    """The top ``share`` of catalog items by training interaction count (ties by position)."""
    counts = np.zeros(len(catalog), dtype=np.int64)
    for history in train.values():
        for item_id in history.item_ids:
            if item_id in catalog:
                counts[catalog.position(item_id)] += 1
    n_top = round(share * len(catalog))
    order = np.lexsort((np.arange(len(catalog)), -counts))[:n_top]
    ids = catalog.item_ids
    return frozenset(ids[p] for p in order)


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """One evaluated ranker on one set of examples.

    Attributes:
        name: The ranker's name.
        user_ids: The users evaluated, in the order of the per-user metric arrays.
        metrics: Per-user values and coverage.
        seconds: Wall time of ranking.
        info: Everything else written to metrics.json (split, n, timing, extras).
        run_dir: Where the run folder was written, if anywhere.
    """

    name: str
    user_ids: tuple[str, ...]
    metrics: Metrics
    seconds: float
    info: Mapping[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None

    def summary(self) -> dict[str, float]:
        """Mean metrics (``"NDCG@10"``, ``"COV@10"`` ...)."""
        return self.metrics.summary()

    def markdown(self, columns: Sequence[str] = TABLE_COLUMNS) -> str:
        """A one-row Markdown table of this result."""
        return _table([self], columns)


def _fmt(value: float) -> str:
    return f"{value:.4f}".lstrip("0") if 0 <= value < 1 else f"{value:.4f}"


def _table(results: Sequence[EvalResult], columns: Sequence[str]) -> str:
    cov = f"COV@{max(results[0].metrics.ks)}" if results else "COV"
    head = ["method", "users", *columns, cov]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r.summary()
        cells = [r.name, str(r.metrics.n_users), *(_fmt(s.get(c, float("nan"))) for c in columns)]
        lines.append("| " + " | ".join([*cells, _fmt(s.get(cov, float("nan")))]) + " |")
    return "\n".join(lines) + "\n"


def _write_config(config: BaseModel | Mapping[str, Any] | None, path: Path) -> None:
    if config is None:
        return
    if isinstance(config, BaseModel):
        dump_config(config, path)
    else:
        path.write_text(tomli_w.dumps(json.loads(json.dumps(dict(config)))), encoding="utf-8")


def _write_run(result: EvalResult, examples: Sequence[Example], rankings: list[list[str]]) -> None:
    run_dir = result.run_dir
    if run_dir is None:
        return
    with (run_dir / "recs.jsonl").open("w", encoding="utf-8") as f:
        for ex, ranking in zip(examples, rankings, strict=True):
            f.write(json.dumps({"user_id": ex.user_id, "target": ex.target, "items": ranking}))
            f.write("\n")
    payload = {"name": result.name, "summary": result.summary(), **result.info}
    (run_dir / "metrics.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    report = f"# {result.name}\n\n{result.markdown()}"
    (run_dir / "report.md").write_text(report, encoding="utf-8")


def load_run(run_dir: str | Path, *, popular: Collection[str] = ()) -> EvalResult:
    """Re-read a run folder written by :func:`run_evaluation`: its per-user metrics are
    recomputed from ``recs.jsonl`` (so committed runs can be compared with :func:`compare`).

    Raises:
        DataError: if the folder lacks ``metrics.json`` or ``recs.jsonl``, or a line of
            ``recs.jsonl`` is not a JSON object with ``user_id``, ``target`` and ``items``.
    """
    path = Path(run_dir)
    meta_path, recs_path = path / "metrics.json", path / "recs.jsonl"
    for f in (meta_path, recs_path):
        if not f.is_file():
            raise DataError(f"{f} does not exist: pass a folder written by run_evaluation")
    info = json.loads(meta_path.read_text(encoding="utf-8"))
    users, targets, rankings = [], [], []
    with recs_path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
                users.append(str(row["user_id"]))
                targets.append(str(row["target"]))
                rankings.append([str(i) for i in row["items"]])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(
                    f"{recs_path}:{number}: expected a JSON object with user_id, target and "
                    f"items ({err}); re-run the evaluation to rewrite the folder"
                ) from err
    ks = sorted({int(k.split("@")[1]) for k in info.get("summary", {}) if k.startswith("HR@")})
    metrics = score_rankings(rankings, targets, ks=ks or DEFAULT_KS,
                             n_catalog=int(info["n_catalog"]), popular=popular)  # fmt: skip
    name = str(info.get("name", path.name))
    info = {k: v for k, v in info.items() if k not in ("name", "summary")}
    return EvalResult(name=name, user_ids=tuple(users), metrics=metrics,
                      seconds=float(info.get("seconds", 0.0)), info=info, run_dir=path)  # fmt: skip


def run_evaluation(
    ranker: Ranker,
    examples: Sequence[Example],
    *,
    catalog: Catalog,
    popular: Collection[str] = (),
    run_dir: str | Path | None = None,
    config: BaseModel | Mapping[str, Any] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    split: str = "test",
    extra: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    show_progress: bool = True,
) -> EvalResult:
    """Rank every example, score the lists, and (optionally) write a run folder.

    The run folder gets ``config.toml`` (the exact config), ``recs.jsonl`` (user_id, target,
    ranked item ids), ``metrics.json`` (summary, users, users/s, timing, ``extra``) and
    ``report.md`` (a Markdown table).

    Args:
        ranker: Anything with ``name`` and ``rank(examples, *, n)``.
        examples: The examples to rank (validation or test).
        catalog: The catalog (coverage denominator).
        popular: The "popular" item ids for the POP@K share (see :func:`popular_items`).
        run_dir: Folder to write, or None.
        config: The config that produced the ranker (incl. seeds, data source, protocol).
        ks: Cut-offs; lists of length ``max(ks)`` are requested.
        split: ``"valid"`` or ``"test"``, recorded in metrics.json.
        extra: More facts for metrics.json (training time, epochs ...).
        batch_size: Examples passed to ``ranker.rank`` at once.
        show_progress: Show a tqdm bar over batches.

    Raises:
        DataError: if there are no examples.
    """
    if not examples:
        raise DataError("run_evaluation got no examples: pass the valid or test examples")
    n = max(ks)
    start = time.perf_counter()
    rankings: list[list[str]] = []
    with tqdm(total=len(examples), desc=f"eval {ranker.name}", disable=not show_progress) as bar:
        for b in range(0, len(examples), batch_size):
            batch = examples[b : b + batch_size]
            rankings.extend(ranker.rank(batch, n=n))
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    metrics = score_rankings(
        rankings, [ex.target for ex in examples], ks=ks, n_catalog=len(catalog), popular=popular
    )
    info = {
        "split": split,
        "n_users": len(examples),
        "n_catalog": len(catalog),
        "list_length": n,
        "seconds": round(seconds, 3),
        "users_per_s": round(len(examples) / max(seconds, 1e-9), 1),
        **(extra or {}),
    }
    path = None if run_dir is None else Path(run_dir)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        _write_config(config, path / "config.toml")
    result = EvalResult(
        name=ranker.name,
        user_ids=tuple(ex.user_id for ex in examples),
        metrics=metrics,
        seconds=seconds,
        info=info,
        run_dir=path,
    )
    _write_run(result, examples, rankings)
    _log.info("%s on %d %s users: %s", ranker.name, len(examples), split, result.summary())
    return result


def compare(
    results: Sequence[EvalResult],
    baseline: str,
    *,
    columns: Sequence[str] = ("HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20"),
    test_metric: str = "NDCG@10",
) -> str:
    """A Markdown table of several results with paired significance against ``baseline``.

    For ``test_metric``, each non-baseline row gets the mean per-user difference and the
    p-values of a paired t-test and a Wilcoxon signed-rank test on the same users.

    Raises:
        DataError: if ``baseline`` is not among the results, or the results were computed on
            different users (or in a different order).
    """
    by_name = {r.name: r for r in results}
    if baseline not in by_name:
        raise DataError(f"baseline {baseline!r} is not among the results {sorted(by_name)}")
    base = by_name[baseline]
    head = ["method", *columns, f"Δ{test_metric}", "p (t-test)", "p (Wilcoxon)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.user_ids != base.user_ids:
            raise DataError(
                f"{r.name!r} and {baseline!r} were evaluated on different users or orders: "
                "compare runs on the same examples"
            )
        s = r.summary()
        cells = [r.name, *(_fmt(s[c]) for c in columns)]
        if r is base:
            cells += ["(baseline)", "", ""]
        else:
            t = paired_test(r.metrics.per_user[test_metric], base.metrics.per_user[test_metric])
            cells += [f"{t.diff:+.4f}", f"{t.p_t:.2g}", f"{t.p_wilcoxon:.2g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _key_config(config: CollabConfig) -> dict[str, Any]:
    """The part of ``config`` a scorer depends on (an ensemble: all of it), so that changing
    one member's settings never refits the others."""
    if config.method in ("sasrec", "ease", "transitions"):
        return {"method": config.method, config.method: getattr(config, config.method).model_dump()}
    return config.model_dump()


def cached_scorer(
    config: CollabConfig, *, split: Split, catalog: Catalog, show_progress: bool = True
) -> Scorer:
    """The configured collaborative scorer, fitted once (early-stopped on ``split.valid``) per
    catalog, training data, validation targets and collab config, then reloaded from recgen's
    cache; another split never matches the key.

    Raises:
        ConfigError: for ``method="none"``.
    """
    key = hashlib.sha256(
        json.dumps(
            [catalog.fingerprint(), _key_config(config), split.protocol, split.seed,
             sorted((u, h.item_ids) for u, h in split.train.items()),
             [(ex.user_id, ex.target) for ex in split.valid]],
            sort_keys=True, default=str,
        ).encode()
    ).hexdigest()[:16]  # fmt: skip
    path = cache_dir("collab", f"{config.method}-{key}")
    try:
        return load_scorer(path, catalog=catalog)
    except (ConfigError, IndexMismatchError, FileNotFoundError):
        pass
    validate = validation_callback(split.valid, catalog)
    if config.method == "ensemble":  # members come from (and go to) the cache one by one
        members = [
            cached_scorer(config.model_copy(update={"method": m}), split=split, catalog=catalog,
                          show_progress=show_progress)
            for m in config.ensemble.members
        ]  # fmt: skip
        scorer = ensemble(members, config.ensemble, catalog=catalog, validate=validate)
    else:
        scorer = fit_scorer(
            config, train=split.train, catalog=catalog, validate=validate,
            show_progress=show_progress,
        )  # fmt: skip
    if hasattr(scorer, "save"):
        scorer.save(path)  # type: ignore[attr-defined]
    return scorer
