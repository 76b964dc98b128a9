"""Schedule generators. A new schedule is one function here plus its tests."""

from __future__ import annotations

from typing import Callable

from lightning_pipe.errors import ScheduleError
from lightning_pipe.schedules.actions import Action, B, F, Schedule

__all__ = ["gpipe", "one_f_one_b", "SCHEDULES", "build_schedule"]


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    if num_stages < 1:
        raise ScheduleError(f"the pipeline needs at least one stage, got pipeline_parallel_size={num_stages}")
    if num_microbatches < 1:
        raise ScheduleError(f"the pipeline needs at least one micro-batch, got num_microbatches={num_microbatches}")


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """GPipe (fill-drain): every forward of the step, then every backward. Holds all m activations per stage."""
    _check_sizes(num_stages, num_microbatches)
    m = num_microbatches
    actions = tuple(
        tuple([F(i, s) for i in range(m)] + [B(i, s) for i in range(m)]) for s in range(num_stages)
    )
    return Schedule("gpipe", num_stages, m, tuple(range(num_stages)), actions)


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """1F1B (PipeDream-Flush): warm-up forwards, then one forward one backward, then cool-down backwards.

    Stage ``s`` warms up with ``min(p - s - 1, m)`` forwards, so it never holds more than ``min(p - s, m)``
    micro-batches' activations. With ``m < p`` the warm-up is simply shorter.
    """
    _check_sizes(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    per_rank: list[tuple[Action, ...]] = []
    for s in range(p):
        warmup = min(p - s - 1, m)
        acts: list[Action] = [F(i, s) for i in range(warmup)]
        for i in range(m - warmup):
            acts.append(F(warmup + i, s))
            acts.append(B(i, s))
        acts.extend(B(i, s) for i in range(m - warmup, m))
        per_rank.append(tuple(acts))
    return Schedule("1f1b", p, m, tuple(range(p)), tuple(per_rank))


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {"gpipe": gpipe, "1f1b": one_f_one_b}
"""Schedule generators by the name users give as ``PipelineStrategy(schedule=...)``."""


def build_schedule(name: str, *, num_stages: int, num_microbatches: int) -> Schedule:
    """The schedule called ``name`` for ``num_stages`` stages and ``num_microbatches`` micro-batches."""
    try:
        generator = SCHEDULES[name.lower()]
    except KeyError:
        raise ScheduleError(f"unknown schedule={name!r}; choose one of {sorted(SCHEDULES)}") from None
    return generator(num_stages, num_microbatches)
