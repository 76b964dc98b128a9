"""Cutting a chain of blocks into contiguous stages (plain Python: no torch.distributed, no Lightning)."""

from __future__ import annotations

from typing import Sequence

from lightning_pipe.errors import PipelineError

__all__ = ["uniform_partition", "optimal_partition", "check_partition"]


def check_partition(counts: Sequence[int], *, num_blocks: int, num_stages: int) -> list[int]:
    """Validate explicit block counts per stage (``PipelineStrategy(balance=[...])``)."""
    counts = [int(c) for c in counts]
    if len(counts) != num_stages:
        raise PipelineError(f"balance={counts} has {len(counts)} entries for {num_stages} pipeline stages "
                            "(pipeline_parallel_size); give one block count per stage")
    if any(c < 1 for c in counts) or sum(counts) != num_blocks:
        raise PipelineError(f"balance={counts} must be positive block counts that sum to the chain's {num_blocks} "
                            "blocks")
    return counts


def _check_sizes(num_blocks: int, num_stages: int) -> None:
    if num_stages > num_blocks:
        raise PipelineError(f"pipeline_parallel_size={num_stages} is more stages than the chain's {num_blocks} blocks; "
                            "use fewer stages or a model with more blocks (or point `blocks=` at a longer chain)")


def uniform_partition(num_blocks: int, num_stages: int) -> list[int]:
    """Block counts as even as possible; the later stages get the extra blocks (the first and last stages
    usually also carry the embedding and the head)."""
    _check_sizes(num_blocks, num_stages)
    base, extra = divmod(num_blocks, num_stages)
    return [base + (1 if i >= num_stages - extra else 0) for i in range(num_stages)]


def optimal_partition(costs: Sequence[float], num_stages: int) -> list[int]:
    """Block counts per stage that minimise the largest stage cost (sum of its blocks' costs).

    Exact, by two dynamic programmes over prefixes (O(n^2 p) each): the first finds the smallest achievable
    largest stage cost; the second, among the cuts that achieve it, the one whose largest stage has the fewest
    blocks (the most even in block count), taking the earliest cut on ties, so every rank computes the same answer.
    """
    n = len(costs)
    _check_sizes(n, num_stages)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    # Imported here: lightning_pipe.tuning imports the schedules and the simulator, which this module need not.
    from lightning_pipe.tuning.partition import min_max_partition

    return min_max_partition(n, num_stages, lambda _stage, j, i: prefix[i] - prefix[j]).counts
