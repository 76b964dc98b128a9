"""A schedule of our own, registered by name as a user would (imported by the strategy workers, so that every
launched process registers it)."""

from __future__ import annotations

from lightning_pipe.schedules import B, F, Schedule, register_schedule


def eager_1f1b(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """1F1B whose stages but the last run one more warm-up forward (examples/custom_schedule.py), one stage per rank."""
    p, m = num_ranks, num_microbatches
    actions = []
    for s in range(p):
        warmup = min(p - s - 1 + (1 if s < p - 1 else 0), m)
        acts = [F(i, s) for i in range(warmup)]
        for i in range(m - warmup):
            acts += [F(warmup + i, s), B(i, s)]
        acts += [B(i, s) for i in range(m - warmup, m)]
        actions.append(tuple(acts))
    return Schedule("eager_1f1b", p, m, tuple(range(p)), tuple(actions))


register_schedule("eager_1f1b", eager_1f1b)
