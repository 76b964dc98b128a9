"""Schedules as plain data: actions per rank, generators and checks (no torch.distributed, no Lightning)."""

from lightning_pipe.schedules.actions import Action, ActionKind, B, F, Schedule, Transfer, W
from lightning_pipe.schedules.generators import (
    BUILTIN_SCHEDULES,
    DEFAULT_VIRTUAL_STAGES,
    SCHEDULES,
    Generator,
    build_schedule,
    gpipe,
    one_f_one_b,
    register_schedule,
    stage_to_rank,
    with_early_input_grads,
)
from lightning_pipe.schedules.interleaved import interleaved_1f1b, zero_bubble
from lightning_pipe.schedules.validate import validate_schedule
from lightning_pipe.schedules.zbv import zbv

__all__ = [
    "Action", "ActionKind", "B", "F", "W", "Schedule", "Transfer",
    "BUILTIN_SCHEDULES", "DEFAULT_VIRTUAL_STAGES", "SCHEDULES", "Generator", "build_schedule", "stage_to_rank",
    "register_schedule",
    "gpipe", "one_f_one_b", "interleaved_1f1b", "zero_bubble", "zbv", "validate_schedule", "with_early_input_grads",
]
