"""Exceptions raised by lightning_pipe (each names the setting or the peer involved), and how a failure on one rank
reaches every rank."""

from __future__ import annotations

from typing import Callable

__all__ = [
    "PipelineError", "ScheduleError", "ScheduleDeadlockError", "PipelineCommError", "CheckpointNotFoundError",
    "peers_reachable", "on_every_rank",
]


class PipelineError(RuntimeError):
    """Base class of every error raised by lightning_pipe."""


class ScheduleError(PipelineError, ValueError):
    """A schedule is malformed: an action is missing, duplicated or placed on the wrong rank."""


class ScheduleDeadlockError(ScheduleError):
    """A schedule can never finish: some rank waits on an action that never runs before it."""


class PipelineCommError(PipelineError):
    """A point-to-point transfer failed or timed out; the message names rank, stage, action and peer."""

    peer_failed: bool = False
    """The peer sent its failure notice in place of the value: it is alive and the connection works (unlike a
    timeout or a closed connection), so it still takes part in what follows a failed step."""


class CheckpointNotFoundError(PipelineError, FileNotFoundError):
    """A checkpoint path holds nothing, or not the same kind of thing on every rank (storage that some nodes do not
    see); raised on every rank. A ``FileNotFoundError``, as Lightning raises for a missing ``ckpt_path``."""


def peers_reachable(error: BaseException) -> bool:
    """Whether the peers can still be talked to after ``error``: anything but a timeout or a broken connection."""
    return not isinstance(error, PipelineCommError) or error.peer_failed


def on_every_rank(work: Callable[[], object] | None, *, any_rank: Callable[[bool], bool], elsewhere: str) -> None:
    """Run ``work`` (``None``: nothing to do on this rank) and raise on every rank if it failed on any: the failed
    rank its own error, the others ``PipelineError(elsewhere)``, instead of their going on to wait for it in the
    next collective. ``any_rank(flag)``: whether any rank passed ``True`` (a collective every rank enters)."""
    error: Exception | None = None
    if work is not None:
        try:
            work()
        except Exception as err:  # noqa: BLE001 - raised below, once every rank knows
            error = err
    if any_rank(error is not None):
        if error is not None:
            raise error
        raise PipelineError(elsewhere)

