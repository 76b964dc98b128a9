"""Interleaved schedules: each rank holds ``v`` non-adjacent chunks of the model (Megatron's virtual stages).

Chunk ``c`` of rank ``r`` is stage ``c * p + r``, so a micro-batch visits every rank ``v`` times and the warm-up and
cool-down bubbles shrink ``v``-fold. ``interleaved_1f1b`` is Megatron's schedule; ``zero_bubble`` is the same order
with each backward split into B (input gradient) and a W (weight gradient) deferred by ``r`` slots on rank ``r``,
which is ZB-H1 (Qi et al., ICLR 2024) for ``v = 1``.
"""

from __future__ import annotations

from lightning_pipe.schedules.actions import Action, B, F, Schedule, W
from lightning_pipe.schedules.checks import check_sizes

__all__ = ["interleaved_1f1b", "zero_bubble", "interleaved_stage_to_rank"]


def interleaved_stage_to_rank(num_ranks: int, virtual_stages: int) -> tuple[int, ...]:
    """Stage ``s`` lives on rank ``s % p``."""
    return tuple(s % num_ranks for s in range(num_ranks * virtual_stages))


def _groups(num_ranks: int, num_microbatches: int) -> list[range]:
    """Micro-batches in rounds of at least ``p`` (when there are that many), the larger rounds first.

    Megatron needs ``m % p == 0``; spreading the remainder over ``m // p`` rounds instead of leaving a short last
    round keeps every ``m >= 1`` deadlock-free (checked by the property tests for p <= 8, m <= 32, v <= 4).
    """
    rounds = max(1, num_microbatches // num_ranks)
    sizes = [num_microbatches // rounds + (1 if i < num_microbatches % rounds else 0) for i in range(rounds)]
    starts = [sum(sizes[:i]) for i in range(rounds)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def _rank_order(num_ranks: int, num_microbatches: int, virtual_stages: int, rank: int,
                *, split: bool) -> tuple[Action, ...]:
    p, m, v = num_ranks, num_microbatches, virtual_stages
    groups = _groups(p, m)
    forwards: list[Action] = []
    backwards: list[Action] = []
    for group in groups:
        for chunk in range(v):
            forwards.extend(F(mb, chunk * p + rank) for mb in group)
        for chunk in reversed(range(v)):
            backwards.extend(B(mb, chunk * p + rank) for mb in group)
    total = m * v
    # Forwards before the first backward: a whole round of the earlier chunks, plus the pipeline's depth below this
    # rank (twice for 1F1B, whose backward is as long as two forwards; once when W is split off).
    depth = (1 if split else 2) * (p - 1 - rank) if v > 1 or split else p - 1 - rank
    warmup = min((v - 1) * len(groups[0]) + depth, total)
    order: list[Action] = forwards[:warmup]
    deferred: list[Action] = []

    def backward(i: int) -> None:
        order.append(backwards[i])
        if split:
            deferred.append(W(backwards[i].microbatch, backwards[i].stage))
            if i >= rank:  # W lags its B by ``rank`` slots: later ranks' Ws fill the bubbles of the cool-down
                order.append(deferred.pop(0))

    for i in range(total - warmup):
        order.append(forwards[warmup + i])
        backward(i)
    for i in range(total - warmup, total):
        backward(i)
    order.extend(deferred)
    return tuple(order)


def interleaved_1f1b(num_ranks: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
    """Megatron's interleaved 1F1B: bubble ``(p - 1) / (v * m)`` of the ideal step when ``p`` divides ``m``.

    Holds up to ``(v - 1) * g + 2 * (p - 1 - r) + 1`` chunk activations on rank ``r``, where ``g`` is the size of
    a round of micro-batches (``p`` when ``p`` divides ``m``). With ``v = 1`` it is plain 1F1B.
    """
    check_sizes(num_ranks, num_microbatches, virtual_stages)
    p, m, v = num_ranks, num_microbatches, virtual_stages
    actions = tuple(_rank_order(p, m, v, r, split=False) for r in range(p))
    return Schedule("interleaved_1f1b", p * v, m, interleaved_stage_to_rank(p, v), actions)


def zero_bubble(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """ZB-H1: 1F1B with backward split into B and W, W deferred by ``r`` slots on rank ``r``.

    With uniform costs the bubble is ``(p - 1) * (tF + tB - tW) / v`` (the ``tB`` here is the input-gradient part
    only), a third of 1F1B's when ``tF = tB = tW``; every rank holds at most ``p`` micro-batches' activations
    (``v = 1``), the peak of 1F1B. ``virtual_stages > 1`` interleaves chunks as :func:`interleaved_1f1b` does.
    """
    check_sizes(num_ranks, num_microbatches, virtual_stages)
    p, m, v = num_ranks, num_microbatches, virtual_stages
    actions = tuple(_rank_order(p, m, v, r, split=True) for r in range(p))
    return Schedule("zero_bubble", p * v, m, interleaved_stage_to_rank(p, v), actions)
