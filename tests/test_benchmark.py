"""eval/benchmark.py's pairing of fine-tuned rows with zero-shot rows (what its paired tests
compare), on hand-made results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from recgen.evaluate import EvalResult
from recgen.metrics import score_rankings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
benchmark = pytest.importorskip("benchmark")

YESNO = "(ensemble top-20 shuffled + popularity yes-no -> LLM rerank, LLM only)"
LISTWISE = "(ensemble top-20 -> LLM rerank, LLM only)"


def _row(name: str, ranks: list[int], *, sample: bool = False) -> benchmark.Row:
    """A result whose i-th user has the target at ``ranks[i]`` (0: not listed)."""
    lists = [[*(f"x{j}" for j in range(1, r)), "t"] if r else ["x"] for r in ranks]
    metrics = score_rankings(lists, ["t"] * len(ranks), ks=(10,), n_catalog=50)
    result = EvalResult(name=name, user_ids=tuple(map(str, range(len(ranks)))), metrics=metrics,
                        seconds=1.0)  # fmt: skip
    return benchmark.Row(result, users_per_s=1.0, p50_s=1.0, sample=sample)


def _names(pairs: list[tuple[benchmark.Row, benchmark.Row]]) -> list[tuple[str, str]]:
    return [(a.result.name, b.result.name) for a, b in pairs]


def test_a_fine_tuned_row_meets_its_twin_and_the_best_zero_shot_row() -> None:
    rows = [
        _row(f"LLM zero-shot {YESNO}", [0, 0, 5, 0]),
        _row(f"LLM zero-shot {LISTWISE}", [1, 2, 0, 3]),  # zero-shot at its best
        _row(f"LLM LoRA-yesno-top20 {YESNO}", [1, 0, 2, 0]),
        _row(f"LLM LoRA-yesno {YESNO}", [2, 0, 0, 0]),
    ]
    assert _names(benchmark.fine_tuned_pairs(rows)) == [
        (f"LLM LoRA-yesno-top20 {YESNO}", f"LLM zero-shot {YESNO}"),
        (f"LLM LoRA-yesno {YESNO}", f"LLM zero-shot {YESNO}"),
    ]
    assert _names(benchmark.best_zero_shot_pairs(rows)) == [
        (f"LLM LoRA-yesno-top20 {YESNO}", f"LLM zero-shot {LISTWISE}"),
        (f"LLM LoRA-yesno {YESNO}", f"LLM zero-shot {LISTWISE}"),
    ]


def test_no_second_pair_when_the_twin_is_the_best_zero_shot_row() -> None:
    rows = [
        _row(f"LLM zero-shot {YESNO}", [1, 1, 1, 0]),
        _row(f"LLM zero-shot {LISTWISE}", [0, 2, 0, 3]),
        _row(f"LLM LoRA-yesno {YESNO}", [1, 0, 2, 0]),
        # a generation-sample row is paired only with zero-shot rows on the same sample
        _row("LLM LoRA (generate, LLM only)", [1, 0, 0, 0], sample=True),
    ]
    assert benchmark.best_zero_shot_pairs(rows) == []
