"""Cutting a chain of blocks into contiguous stages (``lightning_pipe.partition``)."""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_pipe.errors import PipelineError
from lightning_pipe.partition import check_partition, optimal_partition, uniform_partition


def stage_costs(costs: Sequence[float], counts: Sequence[int]) -> list[float]:
    """The summed cost of each stage's blocks."""
    out, start = [], 0
    for c in counts:
        out.append(sum(costs[start : start + c]))
        start += c
    return out


def all_cuts(n: int, p: int) -> Iterator[list[int]]:
    """Every way to cut ``n`` blocks into ``p`` non-empty contiguous stages, as block counts."""
    for inner in itertools.combinations(range(1, n), p - 1):
        bounds = (0, *inner, n)
        yield [bounds[i + 1] - bounds[i] for i in range(p)]


def greedy_partition(costs: Sequence[float], p: int) -> list[int]:
    """Left-to-right fill: each stage takes blocks while it stays within total/p (at least one block each,
    leaving one block for every later stage); the last stage takes the rest."""
    target = sum(costs) / p
    counts, i, n = [], 0, len(costs)
    for s in range(p - 1):
        acc, count = costs[i], 1
        while i + count < n - (p - 1 - s) and acc + costs[i + count] <= target:
            acc += costs[i + count]
            count += 1
        counts.append(count)
        i += count
    counts.append(n - i)
    return counts


# --- uniform_partition ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blocks", "stages", "expected"),
    [(8, 4, [2, 2, 2, 2]), (4, 1, [4]), (3, 3, [1, 1, 1]), (10, 4, [2, 2, 3, 3]), (5, 3, [1, 2, 2]),
     (7, 2, [3, 4]), (9, 4, [2, 2, 2, 3])],
)
def test_uniform_partition(blocks: int, stages: int, expected: list[int]) -> None:
    """Even counts; the later stages get the extra blocks."""
    assert uniform_partition(blocks, stages) == expected


def test_uniform_partition_more_stages_than_blocks() -> None:
    with pytest.raises(PipelineError, match="pipeline_parallel_size=5"):
        uniform_partition(4, 5)


# --- optimal_partition ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("costs", "stages", "expected_counts", "expected_max"),
    [
        ([1, 1, 1, 1], 2, [2, 2], 2),
        ([5, 1, 1, 1, 1, 1], 2, [1, 5], 5),
        ([1, 1, 1, 1, 1, 5], 2, [5, 1], 5),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, [5, 2, 2], 17),  # 15 | 13 | 17
        ([10, 1, 1, 1], 4, [1, 1, 1, 1], 10),
        ([3, 3, 2, 2, 2], 2, [2, 3], 6),
    ],
)
def test_optimal_partition_known(costs: list[float], stages: int, expected_counts: list[int],
                                 expected_max: float) -> None:
    """Hand-checked optima."""
    counts = optimal_partition(costs, stages)
    assert counts == expected_counts
    assert max(stage_costs(costs, counts)) == expected_max


def test_optimal_beats_greedy_fill() -> None:
    """[4,1,1,4,1,1] in 3 stages: greedy fill to total/p=4 gives [4] [1,1] [4,1,1] (max 6); the optimum is
    [4,1] [1,4] [1,1] (max 5)."""
    costs, p = [4, 1, 1, 4, 1, 1], 3
    greedy = greedy_partition(costs, p)
    assert greedy == [1, 2, 3]
    assert max(stage_costs(costs, greedy)) == 6
    best = optimal_partition(costs, p)
    assert best == [2, 2, 2]
    assert max(stage_costs(costs, best)) == 5 < max(stage_costs(costs, greedy))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=8), st.data())
def test_optimal_partition_matches_brute_force(costs: list[int], data: st.DataObject) -> None:
    """The largest stage cost equals the minimum over every contiguous cut."""
    p = data.draw(st.integers(1, min(4, len(costs))))
    counts = optimal_partition(costs, p)
    assert len(counts) == p and sum(counts) == len(costs) and all(c >= 1 for c in counts)
    best = min(max(stage_costs(costs, cut)) for cut in all_cuts(len(costs), p))
    assert max(stage_costs(costs, counts)) == best


def test_optimal_partition_tie_break_most_even() -> None:
    """Among optimal cuts, the one most even in block count. For [1,0,2,4,6] in 3 stages the optimum max cost is 6,
    reached with at most 2 blocks per stage only by [2,2,1] (a single lexicographic DP returned [3,1,1])."""
    costs = [1, 0, 2, 4, 6]
    counts = optimal_partition(costs, 3)
    assert max(stage_costs(costs, counts)) == 6
    assert counts == [2, 2, 1]


def test_optimal_partition_deterministic() -> None:
    """Same answer on every call (every rank computes it on its own)."""
    costs = [3.0, 1.5, 1.5, 3.0, 2.0, 2.0, 1.0, 2.0]
    first = optimal_partition(costs, 3)
    assert all(optimal_partition(list(costs), 3) == first for _ in range(5))
    assert optimal_partition([1] * 7, 3) == optimal_partition([1] * 7, 3)


def test_optimal_partition_more_stages_than_blocks() -> None:
    with pytest.raises(PipelineError, match="pipeline_parallel_size=3"):
        optimal_partition([1.0, 2.0], 3)


# --- check_partition -----------------------------------------------------------------------------------------


def test_check_partition_accepts_valid() -> None:
    assert check_partition((1, 2, 1), num_blocks=4, num_stages=3) == [1, 2, 1]


@pytest.mark.parametrize(
    ("counts", "num_blocks", "num_stages"),
    [([2, 2], 4, 3), ([1, 1, 1, 1], 4, 3), ([0, 2, 2], 4, 3), ([2, 2, 1], 4, 3), ([1, 1, 1], 4, 3),
     ([-1, 3, 2], 4, 3)],
    ids=["too-few", "too-many", "zero-entry", "sum-high", "sum-low", "negative"],
)
def test_check_partition_errors(counts: list[int], num_blocks: int, num_stages: int) -> None:
    with pytest.raises(PipelineError, match=r"balance=\["):
        check_partition(counts, num_blocks=num_blocks, num_stages=num_stages)


@settings(max_examples=200, deadline=None)
@given(costs=st.lists(st.integers(0, 5), min_size=1, max_size=8), p=st.integers(1, 4))
def test_optimal_partition_is_most_even_among_optimal_cuts(costs: list[int], p: int) -> None:
    """Property: against brute force, the largest stage cost is minimal and, among such cuts, so is the largest
    block count (zero-cost blocks, as parameter-free layers under balance="parameters", included)."""
    if p > len(costs):
        return
    counts = optimal_partition(costs, p)
    cuts = list(all_cuts(len(costs), p))
    best_cost = min(max(stage_costs(costs, cut)) for cut in cuts)
    best_even = min(max(cut) for cut in cuts if max(stage_costs(costs, cut)) == best_cost)
    assert max(stage_costs(costs, counts)) == best_cost
    assert max(counts) == best_even
