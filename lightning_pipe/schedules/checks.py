"""Argument checks shared by the schedule generators."""

from __future__ import annotations

from lightning_pipe.errors import ScheduleError

__all__ = ["check_sizes"]


def check_sizes(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> None:
    if not isinstance(num_ranks, int) or num_ranks < 1:
        raise ScheduleError(f"the pipeline needs at least one stage, got pipeline_parallel_size={num_ranks}")
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ScheduleError(f"the pipeline needs at least one micro-batch, got num_microbatches={num_microbatches}")
    if not isinstance(virtual_stages, int) or virtual_stages < 1:
        raise ScheduleError(f"virtual_stages={virtual_stages} must be a positive integer")
