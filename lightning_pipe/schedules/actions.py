"""The vocabulary of schedules: actions, the schedule of every rank, and the transfers they imply.

A schedule is plain data. Nothing here imports torch.distributed or Lightning, so schedules can be generated,
checked, simulated and drawn in a unit test without any process.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["ActionKind", "Action", "Transfer", "Schedule", "F", "B", "W"]


class ActionKind(enum.Enum):
    """What an action computes for one micro-batch on one stage."""

    FORWARD = "F"
    """Forward of the stage; keeps what backward needs."""
    BACKWARD = "B"
    """Backward of the stage. With a separate W for the same micro-batch, only the gradient of the stage input."""
    WEIGHT = "W"
    """Deferred gradient of the stage's weights (zero-bubble schedules; right after B with ``early_input_grads``)."""


@dataclass(frozen=True, slots=True)
class Action:
    """One unit of work: ``kind`` for ``microbatch`` on ``stage``."""

    kind: ActionKind
    microbatch: int
    stage: int

    def __str__(self) -> str:
        return f"{self.kind.value}{self.microbatch}@s{self.stage}"

    __repr__ = __str__


def F(microbatch: int, stage: int) -> Action:
    """Forward of ``microbatch`` on ``stage``."""
    return Action(ActionKind.FORWARD, microbatch, stage)


def B(microbatch: int, stage: int) -> Action:
    """Backward (input gradient, and weight gradient unless a W follows) of ``microbatch`` on ``stage``."""
    return Action(ActionKind.BACKWARD, microbatch, stage)


def W(microbatch: int, stage: int) -> Action:
    """Deferred weight gradient of ``microbatch`` on ``stage``."""
    return Action(ActionKind.WEIGHT, microbatch, stage)


@dataclass(frozen=True, slots=True)
class Transfer:
    """A value that crosses from one rank to another: an activation going forward or a gradient going back."""

    is_gradient: bool
    microbatch: int
    src_stage: int
    dst_stage: int
    src_rank: int
    dst_rank: int

    @property
    def key(self) -> tuple[bool, int, int]:
        """Identifies the value: (is_gradient, microbatch, producing stage)."""
        return (self.is_gradient, self.microbatch, self.src_stage)


@dataclass(frozen=True)
class Schedule:
    """The ordered actions of every rank of one pipeline, for one training step.

    ``stage_to_rank[s]`` is the rank that holds stage ``s``; a rank may hold several stages (interleaved and
    V-shaped schedules). ``actions[r]`` is the order in which rank ``r`` runs its actions.
    """

    name: str
    num_stages: int
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]
    _stages_of: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.stage_to_rank) != self.num_stages:
            raise ValueError(f"stage_to_rank has {len(self.stage_to_rank)} entries for {self.num_stages} stages")
        stages_of: list[list[int]] = [[] for _ in self.actions]
        for stage, rank in enumerate(self.stage_to_rank):
            if not 0 <= rank < len(self.actions):
                raise ValueError(f"stage {stage} is mapped to rank {rank}, but the schedule has "
                                 f"{len(self.actions)} ranks")
            stages_of[rank].append(stage)
        object.__setattr__(self, "_stages_of", tuple(tuple(s) for s in stages_of))

    @property
    def num_ranks(self) -> int:
        return len(self.actions)

    @property
    def last_stage(self) -> int:
        return self.num_stages - 1

    @property
    def split_backward(self) -> bool:
        """True when some backward is split into B (input gradient) and a deferred W (weight gradient)."""
        return any(a.kind is ActionKind.WEIGHT for acts in self.actions for a in acts)

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages held by ``rank``, in increasing order."""
        return self._stages_of[rank]

    def incoming(self, action: Action) -> Transfer | None:
        """The cross-rank value ``action`` must receive before it runs, if any."""
        if action.kind is ActionKind.FORWARD and action.stage > 0:
            src = action.stage - 1
        elif action.kind is ActionKind.BACKWARD and action.stage < self.last_stage:
            src = action.stage + 1
        else:
            return None
        return self._transfer(action.kind is ActionKind.BACKWARD, action.microbatch, src, action.stage)

    def outgoing(self, action: Action) -> Transfer | None:
        """The cross-rank value ``action`` sends when it ends, if any."""
        if action.kind is ActionKind.FORWARD and action.stage < self.last_stage:
            dst = action.stage + 1
        elif action.kind is ActionKind.BACKWARD and action.stage > 0:
            dst = action.stage - 1
        else:
            return None
        return self._transfer(action.kind is ActionKind.BACKWARD, action.microbatch, action.stage, dst)

    def _transfer(self, is_gradient: bool, microbatch: int, src: int, dst: int) -> Transfer | None:
        src_rank, dst_rank = self.stage_to_rank[src], self.stage_to_rank[dst]
        if src_rank == dst_rank:
            return None  # handed over in memory on the same rank
        return Transfer(is_gradient, microbatch, src, dst, src_rank, dst_rank)

    def receives(self, rank: int) -> Iterator[tuple[int, Transfer]]:
        """(index of the action that needs it, transfer) for every value ``rank`` receives, in action order."""
        for i, action in enumerate(self.actions[rank]):
            transfer = self.incoming(action)
            if transfer is not None:
                yield i, transfer

    def sends(self, rank: int) -> Iterator[tuple[int, Transfer]]:
        """(index of the action that produces it, transfer) for every value ``rank`` sends, in action order."""
        for i, action in enumerate(self.actions[rank]):
            transfer = self.outgoing(action)
            if transfer is not None:
                yield i, transfer

    def format(self) -> str:
        """One line per rank, for error messages and debugging."""
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.actions))
