"""ZBV: the V-shaped zero-bubble schedule (Qi et al., "Pipeline Parallelism with Controllable Memory", 2024).

Each of the ``p`` ranks holds two chunks placed in a V: rank ``r`` holds stage ``r`` (the way down) and stage
``2p - 1 - r`` (the way back up), so rank 0 holds the first and the last chunk and computes the loss. Backward is
split into B (input gradient) and W (weight gradient). With ``tF = tB = tW`` per whole stage (half of it per chunk)
the step is ``3 m tF + (p - 1) tF / 2`` for ``m >= 2p``: only the first micro-batch's way down the V is idle, and no
rank holds more than ``2p`` chunk activations, the peak of 1F1B (``p`` micro-batches of a whole stage).
"""

from __future__ import annotations

from lightning_pipe.errors import ScheduleError
from lightning_pipe.schedules.actions import Action, ActionKind, Schedule
from lightning_pipe.schedules.checks import check_sizes

__all__ = ["zbv", "v_stage_to_rank", "check_two_chunks"]


def check_two_chunks(virtual_stages: int) -> None:
    if virtual_stages != 2:
        raise ScheduleError(f"schedule 'zbv' places exactly two chunks on each rank; got virtual_stages="
                            f"{virtual_stages}: leave it unset or set it to 2")


def v_stage_to_rank(num_ranks: int) -> tuple[int, ...]:
    """Stage ``s`` lives on rank ``s`` for ``s < p`` and on rank ``2p - 1 - s`` after."""
    return tuple(s if s < num_ranks else 2 * num_ranks - 1 - s for s in range(2 * num_ranks))


class _RankOrder:
    """Appends one rank's actions, numbering the micro-batches of each (kind, chunk) in order."""

    def __init__(self, stages: tuple[int, int], num_microbatches: int) -> None:
        self.stages = stages
        self.m = num_microbatches
        self.count = {(kind, chunk): 0 for kind in ActionKind for chunk in (0, 1)}
        self.actions: list[Action] = []

    def add(self, kind: ActionKind, chunk: int) -> None:
        mb = self.count[(kind, chunk)]
        self.count[(kind, chunk)] = mb + 1
        if mb < self.m:  # the pattern is laid out for at least 2p - 1 micro-batches; the extra ones are dropped
            self.actions.append(Action(kind, mb, self.stages[chunk]))

    def run(self, *steps: tuple[ActionKind, int]) -> None:
        for kind, chunk in steps:
            self.add(kind, chunk)

    def behind(self, kind: ActionKind, chunk: int, than: ActionKind) -> bool:
        """Whether fewer ``kind`` than ``than`` actions of ``chunk`` were laid out so far."""
        return self.count[(kind, chunk)] < self.count[(than, chunk)]


def zbv(num_ranks: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """The V-shaped zero-bubble schedule for ``p`` ranks (``2p`` stages) and any ``m >= 1``."""
    check_sizes(num_ranks, num_microbatches, virtual_stages)
    check_two_chunks(virtual_stages)
    p, m = num_ranks, num_microbatches
    f, b, w = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.WEIGHT
    laid_out = max(m, 2 * p - 1)
    orders = []
    for r in range(p):
        o = _RankOrder((r, 2 * p - 1 - r), m)
        # Fill the way down: the deeper the rank, the sooner its first chunk-1 forward can come back up.
        for _ in range(2 * (p - r) - 1):
            o.run((f, 0))
        for _ in range(r):
            o.run((f, 1), (f, 0))
        # The first micro-batches turn at this rank: chunk 1 forward, then its backward right away.
        for _ in range(p - r):
            o.run((f, 1), (b, 1), (w, 1))
        # Steady state: a forward, backward and weight step on each chunk in turn.
        while o.count[(f, 0)] < laid_out or o.count[(f, 1)] < o.count[(f, 0)]:
            if o.count[(f, 0)] < laid_out:
                o.run((f, 0))
            o.run((b, 0), (w, 0), (f, 1), (b, 1), (w, 1))
        # Drain: backwards first (they feed the ranks below), weights fill the time the backwards leave idle.
        for _ in range(r):
            o.run((b, 0), (b, 1))
        for _ in range(p - r):
            o.run((b, 0), (w, 0))
        while o.behind(w, 1, than=b):
            o.run((w, 1))
        while o.behind(w, 0, than=b):
            o.run((w, 0))
        orders.append(tuple(o.actions))
    return Schedule("zbv", 2 * p, m, v_stage_to_rank(p), tuple(orders))
