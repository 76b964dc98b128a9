"""Optimal contiguous partitions of a chain of blocks for a per-stage cost that may depend on the stage.

``min_max_partition`` is exact: a dynamic programme over (stage, prefix) that minimises the largest stage cost,
then, among the cuts that reach that optimum, the one whose largest stage has the fewest blocks (earliest cut on
ties). It is deterministic, so every rank that runs it on the same numbers gets the same cut; the strategy still
decides on one rank and broadcasts, because profiled times differ between ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from lightning_pipe.errors import PipelineError

__all__ = ["PartitionResult", "min_max_partition", "time_partition", "memory_partition", "greedy_partition"]

StageCost = Callable[[int, int, int], float]
"""``cost(stage, first_block, stop_block)``: the cost of giving blocks ``first..stop-1`` to ``stage``."""


@dataclass(frozen=True)
class PartitionResult:
    counts: list[int]
    """Blocks per stage."""
    stage_costs: list[float]
    """Each stage's cost under the partition."""

    @property
    def bottleneck(self) -> float:
        return max(self.stage_costs)


def min_max_partition(num_blocks: int, num_stages: int, cost: StageCost) -> PartitionResult:
    """The contiguous partition into ``num_stages`` non-empty stages that minimises ``max_s cost(s, ...)``.

    ``cost`` may return ``inf`` for an infeasible stage (over a memory budget); if every partition is infeasible,
    :class:`PipelineError` is raised. O(n^2 p) evaluations of ``cost``.
    """
    n, p = num_blocks, num_stages
    if p < 1 or p > n:
        raise PipelineError(f"cannot cut {n} blocks into {p} non-empty stages")
    table = [[cost(k, j, i) if i > j else math.inf for i in range(n + 1)] for k in range(p) for j in range(n + 1)]

    def c(k: int, j: int, i: int) -> float:
        return table[k * (n + 1) + j][i]

    def solve(score: Callable[[int, int, int], float]) -> tuple[float, list[int]]:
        best = [[math.inf] * (n + 1) for _ in range(p + 1)]
        cut = [[-1] * (n + 1) for _ in range(p + 1)]
        best[0][0] = -math.inf
        for k in range(1, p + 1):
            for i in range(k, n - (p - k) + 1):
                for j in range(k - 1, i):
                    if best[k - 1][j] == math.inf:
                        continue
                    value = max(best[k - 1][j], score(k - 1, j, i))
                    if value < best[k][i]:
                        best[k][i], cut[k][i] = value, j
        if best[p][n] == math.inf:
            return math.inf, []
        counts, i = [], n
        for k in range(p, 0, -1):
            j = cut[k][i]
            counts.append(i - j)
            i = j
        return best[p][n], counts[::-1]

    optimum, counts = solve(c)
    if optimum == math.inf:
        raise PipelineError(f"no cut of {n} blocks into {p} stages fits (every partition has a stage over the "
                            "budget)")
    limit = optimum + 1e-9 * abs(optimum)  # sums may round differently for equal stage costs (relative: any unit)
    _, even = solve(lambda k, j, i: float(i - j) if c(k, j, i) <= limit else math.inf)
    counts = even or counts
    bounds = [sum(counts[:s]) for s in range(p + 1)]
    return PartitionResult(counts, [c(s, bounds[s], bounds[s + 1]) for s in range(p)])


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + float(v))
    return out


def time_partition(forward: Sequence[float], backward: Sequence[float], num_stages: int, *,
                   first_extra: float = 0.0, last_extra: float = 0.0, every_extra: float = 0.0,
                   memory: Callable[[int, int, int], float] | None = None,
                   memory_budget: float | None = None, stages_per_device: int = 1) -> PartitionResult:
    """Cut blocks with per-block ``forward`` + ``backward`` times so that the slowest stage is fastest.

    ``first_extra``/``last_extra``: work outside the chain done only on the first/last stage (embedding
    backward; head, loss and their backward); ``every_extra``: work every stage does (code before the chain runs
    on every stage). With ``memory`` (a stage cost like :func:`memory_partition`'s) and ``memory_budget`` (bytes
    per device), only cuts whose every stage fits its share of the budget (``1 / stages_per_device``) are
    considered.
    """
    if len(forward) != len(backward):
        raise ValueError("forward and backward need one entry per block")
    pre = _prefix([f + b for f, b in zip(forward, backward)])
    last = num_stages - 1
    share = memory_budget / stages_per_device if memory_budget is not None else None

    def cost(s: int, j: int, i: int) -> float:
        if memory is not None and share is not None and memory(s, j, i) > share:
            return math.inf
        return pre[i] - pre[j] + every_extra + (first_extra if s == 0 else 0.0) + (last_extra if s == last else 0.0)

    try:
        return min_max_partition(len(forward), num_stages, cost)
    except PipelineError:
        if memory is None or memory_budget is None:
            raise
        # Only the budget makes stages infeasible: say how much the least-memory cut would need.
        least = min_max_partition(len(forward), num_stages, memory).bottleneck
        raise PipelineError(f"balance='time': no cut of {len(forward)} blocks into {num_stages} stages fits "
                            f"memory_budget={memory_budget:.4g} bytes: the cut with the least memory needs "
                            f"{least:.4g} bytes on its largest stage{_per_stage(stages_per_device)}. Raise "
                            "memory_budget, use more stages or fewer micro-batches in flight (1f1b)") from None


def _per_stage(stages_per_device: int) -> str:
    if stages_per_device == 1:
        return ""
    return f" (each device holds {stages_per_device} stages: each stage may use 1/{stages_per_device} of the budget)"


def memory_cost(param_bytes: Sequence[float], activation_bytes: Sequence[float], held: Sequence[int], *,
                state_factor: float = 3.0, first_extra: float = 0.0, last_extra: float = 0.0,
                every_extra: float = 0.0) -> Callable[[int, int, int], float]:
    """Bytes a stage needs: its blocks' parameters x (1 + ``state_factor``: gradient + Adam's two moments by
    default) + their saved activations per micro-batch x ``held[stage]`` micro-batches in flight (from the
    schedule: ``SimulationResult.stage_peak_activations``), plus the stage's share of what lies outside the chain.
    A device's stages together need at most the sum of their costs."""
    pp, pa = _prefix(param_bytes), _prefix(activation_bytes)
    last = len(held) - 1

    def cost(s: int, j: int, i: int) -> float:
        return ((pp[i] - pp[j]) * (1.0 + state_factor) + (pa[i] - pa[j]) * held[s] + every_extra
                + (first_extra if s == 0 else 0.0) + (last_extra if s == last else 0.0))

    return cost


def memory_partition(param_bytes: Sequence[float], activation_bytes: Sequence[float], held: Sequence[int], *,
                     state_factor: float = 3.0, first_extra: float = 0.0, last_extra: float = 0.0,
                     every_extra: float = 0.0, memory_budget: float | None = None,
                     stages_per_device: int = 1) -> PartitionResult:
    """The cut that minimises the largest stage's memory (see :func:`memory_cost`); with ``memory_budget`` (bytes
    per device, of which each of a device's ``stages_per_device`` stages may use its share),
    :class:`PipelineError` if even that cut does not fit."""
    cost = memory_cost(param_bytes, activation_bytes, held, state_factor=state_factor, first_extra=first_extra,
                       last_extra=last_extra, every_extra=every_extra)
    result = min_max_partition(len(param_bytes), len(held), cost)
    if memory_budget is not None and result.bottleneck > memory_budget / stages_per_device:
        raise PipelineError(f"balance='memory': the best cut {result.counts} needs {result.bottleneck / 2**20:.1f} "
                            f"MiB on its largest stage, over the budget of {memory_budget / 2**20:.1f} MiB per "
                            f"device{_per_stage(stages_per_device)}; use more stages, fewer micro-batches in flight "
                            "(1f1b) or a larger budget")
    return result


def greedy_partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """The usual greedy cut (fill each stage up to the average, keeping one block for each later stage), for
    comparison only: it can be worse than :func:`min_max_partition`."""
    n, target = len(costs), sum(costs) / num_stages
    counts, i = [], 0
    for s in range(num_stages):
        left = num_stages - s - 1
        if left == 0:
            counts.append(n - i)
            break
        acc, k = 0.0, 0
        while i + k < n - left and (k == 0 or acc + costs[i + k] <= target):
            acc += costs[i + k]
            k += 1
        counts.append(k)
        i += k
    return counts
