"""Schedules as plain data: actions per rank, generators and checks (no torch.distributed, no Lightning)."""

from lightning_pipe.schedules.actions import Action, ActionKind, B, F, Schedule, Transfer, W
from lightning_pipe.schedules.generators import SCHEDULES, build_schedule, gpipe, one_f_one_b
from lightning_pipe.schedules.validate import validate_schedule

__all__ = [
    "Action", "ActionKind", "B", "F", "W", "Schedule", "Transfer",
    "SCHEDULES", "build_schedule", "gpipe", "one_f_one_b", "validate_schedule",
]
