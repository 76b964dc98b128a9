"""Timeline of a schedule from per-stage costs: step time, bubbles and held activations, without processes.

Each rank runs its actions in order, each as soon as its rank is free and its inputs exist; a value crossing
ranks arrives ``transfer`` after it was produced (sends overlap compute). This as-soon-as-possible timeline is
what the executor does, so the simulator predicts the executor's step time.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from lightning_pipe.errors import ScheduleDeadlockError
from lightning_pipe.schedules.actions import Action, ActionKind, Schedule

__all__ = ["Costs", "SimulationResult", "simulate", "ideal_step_time", "format_timeline", "main"]

_F, _B, _W = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.WEIGHT


@dataclass(frozen=True)
class Costs:
    """Time of each action, per stage (a number applies to every stage). Units are the caller's (ms, s...)."""

    forward: float | Sequence[float] = 1.0
    """Forward of one micro-batch on a stage."""
    backward: float | Sequence[float] = 2.0
    """Whole backward of one micro-batch on a stage: input gradient plus weight gradient."""
    weight: float | Sequence[float] = 0.0
    """The part of ``backward`` that is weight gradient; a schedule with W actions charges it to W, else to B."""
    transfer: float = 0.0
    """Latency of one value crossing from one rank to another."""

    def per_stage(self, num_stages: int) -> tuple[list[float], list[float], list[float]]:
        """(forward, backward, weight) costs as one list each, ``num_stages`` long."""

        def expand(value: float | Sequence[float], what: str) -> list[float]:
            if isinstance(value, numbers.Real) or getattr(value, "ndim", None) == 0:
                return [float(value)] * num_stages  # also numpy scalars and 0-d tensors
            values = [float(v) for v in value]
            if len(values) != num_stages:
                raise ValueError(f"Costs.{what} has {len(values)} entries for {num_stages} stages")
            return values

        tf, tb, tw = expand(self.forward, "forward"), expand(self.backward, "backward"), expand(self.weight, "weight")
        for what, values in (("forward", tf), ("backward", tb), ("weight", tw), ("transfer", [self.transfer])):
            if any(not (math.isfinite(v) and v >= 0) for v in values):  # also NaN and inf
                raise ValueError(f"Costs.{what} must be non-negative and finite, got {values}")
        for s, (b, w) in enumerate(zip(tb, tw)):
            if w > b * (1 + 1e-9):
                raise ValueError(f"Costs.weight ({w:g}) is the part of backward ({b:g}) that is weight gradient: "
                                 f"it cannot exceed it (stage {s})")
        return tf, tb, tw


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate` computes. ``start[r][i]``/``end[r][i]`` belong to ``schedule.actions[r][i]``."""

    schedule: Schedule
    start: tuple[tuple[float, ...], ...]
    end: tuple[tuple[float, ...], ...]
    step_time: float
    """From the first action's start to the last action's end."""
    busy: tuple[float, ...]
    """Per rank, the time spent computing."""
    bubble_fraction: tuple[float, ...]
    """Per rank, the idle share of the step: ``1 - busy / step_time``."""
    peak_activations: tuple[int, ...]
    """Per rank, the most micro-batches whose activations are held at once (from F until B, or W if split)."""
    stage_peak_activations: tuple[int, ...] = ()
    """Per stage, the most of its micro-batches held at once. A rank's stages may peak at different times, so the
    sum over a rank's stages bounds that rank's peak from above (under 1F1B, v = 1, the two are equal)."""

    @property
    def max_bubble_fraction(self) -> float:
        return max(self.bubble_fraction)


def ideal_step_time(num_stages: int, num_microbatches: int, forward: float, backward: float) -> float:
    """The textbook step time of GPipe and 1F1B with uniform costs: ``(m + p - 1) * (tf + tb)``."""
    return (num_microbatches + num_stages - 1) * (forward + backward)


def simulate(schedule: Schedule, costs: Costs, *, cores: float | None = None) -> SimulationResult:
    """Simulate ``schedule`` under ``costs``; raise :class:`ScheduleDeadlockError` if it can never finish.

    ``cores``: the ranks share this many processors (several ranks on one CPU host). Costs are then each rank's
    times when it runs alone, and while more ranks compute at once than there are cores, each computes at
    ``cores / running`` of its speed. A fractional value stands for cores that deliver less than their count when
    shared (switching, caches): measured as ranks x (time alone) / (time with every rank busy). ``None`` (or at least
    as many cores as ranks): every rank has its own device.
    """
    if cores is not None and cores < schedule.num_ranks:
        if not cores > 0:
            raise ValueError(f"cores must be positive, got {cores}")
        starts, ends = _run_shared(schedule, costs, cores)
        return _result(schedule, starts, ends)
    p, m = schedule.num_stages, schedule.num_microbatches
    tf, tb, tw = costs.per_stage(p)
    split = schedule.split_backward
    rank_of = schedule.stage_to_rank
    transfer = float(costs.transfer)
    n = p * m
    # Finish time of each action, indexed [stage * m + microbatch]; None while it has not run.
    done: dict[ActionKind, list[float | None]] = {_F: [None] * n, _B: [None] * n, _W: [None] * n}
    waiting: dict[tuple[ActionKind, int], list[int]] = {}
    num_ranks = schedule.num_ranks
    ptr = [0] * num_ranks
    free = [0.0] * num_ranks
    starts: list[list[float]] = [[] for _ in range(num_ranks)]
    ends: list[list[float]] = [[] for _ in range(num_ranks)]
    blocked_on: dict[int, tuple[Action, ActionKind, int]] = {}
    ready = deque(range(num_ranks))
    while ready:
        rank = ready.popleft()
        acts = schedule.actions[rank]
        i, t = ptr[rank], free[rank]
        while i < len(acts):
            action = acts[i]
            kind, mb, s = action.kind, action.microbatch, action.stage
            idx = s * m + mb
            deps, cost = _deps_and_cost(kind, s, p, tf, tb, tw, split)
            begin = t
            blocked = False
            for dep_kind, dep_stage in deps:
                key = dep_stage * m + mb
                finished = done[dep_kind][key]
                if finished is None:
                    waiting.setdefault((dep_kind, key), []).append(rank)
                    blocked_on[rank] = (action, dep_kind, dep_stage)
                    blocked = True
                    break
                if rank_of[dep_stage] != rank:
                    finished += transfer
                if finished > begin:
                    begin = finished
            if blocked:
                break
            blocked_on.pop(rank, None)
            t = begin + cost
            starts[rank].append(begin)
            ends[rank].append(t)
            done[kind][idx] = t
            woken = waiting.pop((kind, idx), None)
            if woken:
                ready.extend(woken)
            i += 1
        ptr[rank], free[rank] = i, t
    _raise_if_stuck(schedule, ptr, blocked_on)
    return _result(schedule, starts, ends)


def _raise_if_stuck(schedule: Schedule, ptr: list[int], blocked_on: dict[int, tuple[Action, ActionKind, int]]) -> None:
    """Raise :class:`ScheduleDeadlockError` naming what each unfinished rank waits for, if any rank is unfinished."""
    if any(ptr[r] < len(schedule.actions[r]) for r in range(schedule.num_ranks)):
        stuck = [
            f"rank {r} at {schedule.actions[r][ptr[r]]} waits for {_describe(blocked_on[r])}"
            for r in range(schedule.num_ranks)
            if ptr[r] < len(schedule.actions[r])
        ]
        raise ScheduleDeadlockError(f"schedule {schedule.name!r} deadlocks: " + "; ".join(stuck))


def _result(schedule: Schedule, starts: list[list[float]], ends: list[list[float]]) -> SimulationResult:
    num_ranks, split = schedule.num_ranks, schedule.split_backward
    first = min((s[0] for s in starts if s), default=0.0)
    last = max((e[-1] for e in ends if e), default=0.0)
    step = last - first
    busy = tuple(sum(e - s for s, e in zip(starts[r], ends[r])) for r in range(num_ranks))
    bubble = tuple((1.0 - b / step) if step > 0 else 0.0 for b in busy)
    return SimulationResult(
        schedule=schedule,
        start=tuple(map(tuple, starts)),
        end=tuple(map(tuple, ends)),
        step_time=step,
        busy=busy,
        bubble_fraction=bubble,
        peak_activations=tuple(_peak_activations(acts, split) for acts in schedule.actions),
        stage_peak_activations=tuple(
            _peak_activations([a for a in schedule.actions[schedule.stage_to_rank[s]] if a.stage == s], split)
            for s in range(schedule.num_stages)),
    )


def _deps_and_cost(kind: ActionKind, s: int, p: int, tf: list[float], tb: list[float], tw: list[float],
                   split: bool) -> tuple[tuple[tuple[ActionKind, int], ...], float]:
    """The action's dependencies, as (kind, stage) of the producing action for the same micro-batch, and its cost."""
    if kind is _F:
        return (((_F, s - 1),) if s > 0 else ()), tf[s]
    if kind is _B:
        return (((_F, s), (_B, s + 1)) if s < p - 1 else ((_F, s),)), (tb[s] - tw[s] if split else tb[s])
    return ((_B, s),), tw[s]


def _run_shared(schedule: Schedule, costs: Costs, cores: float) -> tuple[list[list[float]], list[list[float]]]:
    """Event by event: the ranks computing at one time share ``cores`` processors equally."""
    p, m = schedule.num_stages, schedule.num_microbatches
    tf, tb, tw = costs.per_stage(p)
    split, rank_of, transfer = schedule.split_backward, schedule.stage_to_rank, float(costs.transfer)
    done: dict[ActionKind, list[float | None]] = {_F: [None] * (p * m), _B: [None] * (p * m), _W: [None] * (p * m)}
    num_ranks = schedule.num_ranks
    ptr = [0] * num_ranks
    left: list[float | None] = [None] * num_ranks  # work left of the action each rank is computing
    blocked_on: dict[int, tuple[Action, ActionKind, int]] = {}
    starts: list[list[float]] = [[] for _ in range(num_ranks)]
    ends: list[list[float]] = [[] for _ in range(num_ranks)]
    now = 0.0
    while True:
        wake = math.inf  # the next time a rank's inputs arrive (transfer latency)
        for rank in range(num_ranks):
            acts = schedule.actions[rank]
            if left[rank] is not None or ptr[rank] == len(acts):
                continue
            action = acts[ptr[rank]]
            kind, mb, s = action.kind, action.microbatch, action.stage
            deps, cost = _deps_and_cost(kind, s, p, tf, tb, tw, split)
            ready = 0.0
            for dep_kind, dep_stage in deps:
                finished = done[dep_kind][dep_stage * m + mb]
                if finished is None:
                    blocked_on[rank] = (action, dep_kind, dep_stage)
                    ready = math.inf
                    break
                ready = max(ready, finished + (transfer if rank_of[dep_stage] != rank else 0.0))
            if ready <= now:
                left[rank] = cost
                starts[rank].append(now)
            elif ready < math.inf:
                wake = min(wake, ready)
        running = [r for r in range(num_ranks) if left[r] is not None]
        if not running:
            if wake == math.inf:
                break
            now = wake
            continue
        speed = min(1.0, cores / len(running))
        step = min(min(left[r] for r in running) / speed, wake - now)  # type: ignore[type-var]
        now += step
        for r in running:
            left[r] -= step * speed  # type: ignore[operator]
            if left[r] <= 1e-12 * max(1.0, now):  # type: ignore[operator]
                action = schedule.actions[r][ptr[r]]
                done[action.kind][action.stage * m + action.microbatch] = now
                ends[r].append(now)
                left[r], ptr[r] = None, ptr[r] + 1
    _raise_if_stuck(schedule, ptr, blocked_on)
    return starts, ends


def _describe(blocked: tuple[Action, ActionKind, int]) -> str:
    action, dep_kind, dep_stage = blocked
    return f"{dep_kind.value}{action.microbatch}@s{dep_stage}"


def _peak_activations(actions: Sequence[Action], split: bool) -> int:
    release = _W if split else _B
    held = peak = 0
    for action in actions:
        if action.kind is _F:
            held += 1
            peak = max(peak, held)
        elif action.kind is release:
            held -= 1
    return peak


def format_timeline(result: SimulationResult, *, width: int = 100) -> str:
    """One text row per rank: each action as its kind letter and micro-batch, idle time as dots."""
    scale = width / result.step_time if result.step_time > 0 else 1.0
    rows = []
    for rank, actions in enumerate(result.schedule.actions):
        row = ["."] * width
        for action, start, end in zip(actions, result.start[rank], result.end[rank]):
            a, b = int(round(start * scale)), max(int(round(end * scale)), int(round(start * scale)) + 1)
            label = f"{action.kind.value}{action.microbatch}"
            for i in range(a, min(b, width)):
                row[i] = label[i - a] if i - a < len(label) else "-"
        rows.append(f"rank {rank:2d} |{''.join(row)}| bubble {result.bubble_fraction[rank]:.3f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-pipe-simulate``: simulate a schedule and print its timeline, bubble and held activations."""
    import argparse

    from lightning_pipe.schedules import SCHEDULES, build_schedule

    parser = argparse.ArgumentParser(description="Simulate a pipeline schedule (no processes needed).")
    parser.add_argument("--schedule", default="1f1b", choices=sorted(SCHEDULES))
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--virtual-stages", type=int, default=None, help="chunks per rank (interleaved, zbv)")
    parser.add_argument("--forward", type=float, default=1.0, help="time of one forward per stage")
    parser.add_argument("--backward", type=float, default=2.0, help="time of one backward per stage")
    parser.add_argument("--weight", type=float, default=None,
                        help="the weight-gradient part of --backward (W of split schedules; default: half)")
    parser.add_argument("--transfer", type=float, default=0.0, help="latency of one transfer between ranks")
    parser.add_argument("--early-input-grads", action="store_true",
                        help="W right after each B, as PipelineStrategy(early_input_grads=True) runs it")
    parser.add_argument("--width", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        schedule = build_schedule(args.schedule, num_ranks=args.stages, num_microbatches=args.microbatches,
                                  virtual_stages=args.virtual_stages, early_input_grads=args.early_input_grads)
    except ValueError as err:  # ScheduleError: names the setting
        parser.error(str(err).replace("pipeline_parallel_size", "--stages").replace("num_microbatches",
                                                                                   "--microbatches")
                     .replace("virtual_stages", "--virtual-stages"))
    chunks = schedule.num_stages // args.stages  # the per-stage costs are shared among a rank's chunks
    weight = args.backward / 2 if args.weight is None else args.weight
    costs = Costs(args.forward / chunks, args.backward / chunks, weight / chunks if schedule.split_backward else 0.0,
                  transfer=args.transfer)
    try:
        result = simulate(schedule, costs)
    except ValueError as err:
        parser.error(str(err).replace("Costs.", "--"))
    print(format_timeline(result, width=args.width))
    print(f"step time {result.step_time:g}; ideal (m+p-1)(tf+tb) = "
          f"{ideal_step_time(args.stages, args.microbatches, args.forward, args.backward):g}; "
          f"peak held activations per rank {list(result.peak_activations)}")
    return 0
