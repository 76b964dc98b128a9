"""Structural checks of a schedule: every action once, on the right rank, in a workable order."""

from __future__ import annotations

from collections import Counter

from lightning_pipe.errors import ScheduleError
from lightning_pipe.schedules.actions import Action, ActionKind, Schedule

__all__ = ["validate_schedule"]


def validate_schedule(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless each (micro-batch, stage) has exactly one F and one B (and one W for
    split backwards, or none at all) on the rank that holds the stage, with F before B before W on that rank,
    and unless the schedule runs to the end without deadlock (checked by simulating it with unit costs).
    """
    counts: Counter[Action] = Counter()
    for rank, acts in enumerate(schedule.actions):
        position: dict[Action, int] = {}
        for i, action in enumerate(acts):
            if not (0 <= action.stage < schedule.num_stages and 0 <= action.microbatch < schedule.num_microbatches):
                raise ScheduleError(f"{schedule.name}: rank {rank} has {action}, outside {schedule.num_stages} "
                                    f"stages x {schedule.num_microbatches} micro-batches")
            if schedule.stage_to_rank[action.stage] != rank:
                raise ScheduleError(f"{schedule.name}: {action} is on rank {rank}, but stage {action.stage} is "
                                    f"held by rank {schedule.stage_to_rank[action.stage]}")
            counts[action] += 1
            position[action] = i
        for action, i in position.items():
            before = {ActionKind.BACKWARD: ActionKind.FORWARD, ActionKind.WEIGHT: ActionKind.BACKWARD}.get(action.kind)
            if before is not None and position.get(Action(before, action.microbatch, action.stage), len(acts)) > i:
                raise ScheduleError(f"{schedule.name}: rank {rank} runs {action} before "
                                    f"{Action(before, action.microbatch, action.stage)}")
    split = schedule.split_backward
    for s in range(schedule.num_stages):
        for mb in range(schedule.num_microbatches):
            for kind in ActionKind:
                n = counts[Action(kind, mb, s)]
                expected = 1 if (kind is not ActionKind.WEIGHT or split) else 0
                if n != expected:
                    raise ScheduleError(f"{schedule.name}: {Action(kind, mb, s)} appears {n} times, "
                                        f"expected {expected}")
    # Imported here: simulate imports this package.
    from lightning_pipe.simulate import Costs, simulate

    simulate(schedule, Costs())
