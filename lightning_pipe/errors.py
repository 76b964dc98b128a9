"""Exceptions raised by lightning_pipe. Each names the setting or the peer involved."""

from __future__ import annotations

__all__ = ["PipelineError", "ScheduleError", "ScheduleDeadlockError", "PipelineCommError"]


class PipelineError(RuntimeError):
    """Base class of every error raised by lightning_pipe."""


class ScheduleError(PipelineError, ValueError):
    """A schedule is malformed: an action is missing, duplicated or placed on the wrong rank."""


class ScheduleDeadlockError(ScheduleError):
    """A schedule can never finish: some rank waits on an action that never runs before it."""


class PipelineCommError(PipelineError):
    """A point-to-point transfer failed or timed out; the message names rank, stage, action and peer."""
