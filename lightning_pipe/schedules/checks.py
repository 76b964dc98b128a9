"""Argument checks shared by the schedule generators."""

from __future__ import annotations

import numbers

from lightning_pipe.errors import ScheduleError

__all__ = ["check_sizes"]


def check_sizes(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> None:
    if not _is_int(num_ranks) or num_ranks < 1:
        raise ScheduleError(f"the pipeline needs at least one stage, got pipeline_parallel_size={num_ranks!r}")
    if not _is_int(num_microbatches) or num_microbatches < 1:
        raise ScheduleError(f"the pipeline needs at least one micro-batch, got num_microbatches={num_microbatches!r}")
    if not _is_int(virtual_stages) or virtual_stages < 1:
        raise ScheduleError(f"virtual_stages={virtual_stages!r} must be a positive integer")


def _is_int(value: object) -> bool:
    """An integer of any kind (numpy's included), not a float or a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
