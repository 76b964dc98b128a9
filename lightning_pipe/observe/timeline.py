"""Per-rank timelines of one step, measured (executor records) or planned (simulator), and their bubble figures.

Times are seconds. Measured records use ``time.perf_counter``, which is not comparable between machines; each
rank adds its own offset to the wall clock (``time.time() - time.perf_counter()``) before records are gathered,
so ranks on one machine line up exactly and ranks on several machines as well as their clocks agree (NTP: ~1 ms).

The bubble of a rank is ``1 - busy / step_time`` where ``busy`` is the time its actions computed (input received
to output sent) and ``step_time`` runs from the first action's start to the last action's end over all ranks:
the simulator's definition, so plan and measurement compare directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from lightning_pipe.schedules.actions import Action, ActionKind

__all__ = ["Span", "Timeline", "StepSummary", "pack_records", "summarize_records", "clock_offset"]


def clock_offset() -> float:
    """What to add to a ``time.perf_counter`` reading of this process to get wall-clock seconds."""
    return time.time() - time.perf_counter()


@dataclass(frozen=True, slots=True)
class Span:
    """One action on one rank: ``ready`` its turn came, ``start`` its input was there, ``end`` it was done; its
    last ``send`` seconds were spent packing and posting its output to another rank."""

    action: Action
    ready: float
    start: float
    end: float
    send: float = 0.0

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def wait(self) -> float:
        """Time spent waiting for the action's input (receive wait)."""
        return self.start - self.ready


def pack_records(records: Sequence[Any],
                 offset: float = 0.0) -> list[tuple[str, int, int, float, float, float, float]]:
    """Executor records (anything with ``action``, ``ready``, ``start``, ``end`` and optionally ``send``) as small
    picklable tuples ``(kind, microbatch, stage, ready, start, end, send)``, times shifted by ``offset`` seconds."""
    return [(r.action.kind.value, r.action.microbatch, r.action.stage, r.ready + offset, r.start + offset,
             r.end + offset, getattr(r, "send", 0.0)) for r in records]


@dataclass(frozen=True)
class StepSummary:
    """The figures of one step over all ranks, from ``(first start, last end, busy)`` per rank."""

    step_time: float
    bubble_fraction: tuple[float, ...]

    @property
    def mean_bubble(self) -> float:
        return sum(self.bubble_fraction) / len(self.bubble_fraction) if self.bubble_fraction else 0.0

    @property
    def max_bubble(self) -> float:
        return max(self.bubble_fraction, default=0.0)


def summarize_records(per_rank: Sequence[tuple[float, float, float]]) -> StepSummary:
    """``per_rank[r] = (first start, last end, busy seconds)`` (times on a common clock) -> step summary.
    A rank with no action (``busy == 0`` and ``end <= start``) counts as fully idle."""
    active = [(s, e) for s, e, b in per_rank if e > s]
    if not active:
        return StepSummary(0.0, tuple(0.0 for _ in per_rank))
    step = max(e for _, e in active) - min(s for s, _ in active)
    return StepSummary(step, tuple((1.0 - b / step) if step > 0 else 0.0 for _, _, b in per_rank))


@dataclass(frozen=True)
class Timeline:
    """The spans of every rank for one step, with times relative to the step's first moment (``0``: the first
    action's start, or a rank's earlier wait for its input)."""

    spans: tuple[tuple[Span, ...], ...]
    title: str = ""

    @classmethod
    def from_packed(cls, per_rank: Sequence[Sequence[tuple[Any, ...]]], title: str = "") -> "Timeline":
        """From :func:`pack_records` output of every rank (on a common clock)."""
        # The earliest moment of the step: a rank may be waiting (ready) before any rank starts computing, and a
        # trace viewer drops events with negative times.
        starts = [min(rec[3], rec[4]) for recs in per_rank for rec in recs]
        t0 = min(starts) if starts else 0.0
        spans = tuple(
            tuple(Span(Action(ActionKind(rec[0]), rec[1], rec[2]), rec[3] - t0, rec[4] - t0, rec[5] - t0,
                       rec[6] if len(rec) > 6 else 0.0)
                  for rec in recs)
            for recs in per_rank
        )
        return cls(spans, title)

    @classmethod
    def from_records(cls, per_rank: Sequence[Sequence[Any]], title: str = "") -> "Timeline":
        """From executor records of every rank, all read on the same clock (one machine)."""
        return cls.from_packed([pack_records(recs) for recs in per_rank], title)

    @classmethod
    def from_simulation(cls, result: Any, title: str = "") -> "Timeline":
        """The planned timeline of a :class:`~lightning_pipe.simulate.SimulationResult` (``ready = start``)."""
        spans = tuple(
            tuple(Span(a, s, s, e) for a, s, e in zip(acts, result.start[r], result.end[r]))
            for r, acts in enumerate(result.schedule.actions)
        )
        return cls(spans, title or f"planned {result.schedule.name}")

    @property
    def num_ranks(self) -> int:
        return len(self.spans)

    @property
    def step_time(self) -> float:
        ends = [sp.end for row in self.spans for sp in row]
        starts = [sp.start for row in self.spans for sp in row]
        return (max(ends) - min(starts)) if ends else 0.0

    @property
    def busy(self) -> tuple[float, ...]:
        return tuple(sum(sp.duration for sp in row) for row in self.spans)

    @property
    def wait(self) -> tuple[float, ...]:
        """Per rank, time spent waiting for inputs (a part of its bubble)."""
        return tuple(sum(sp.wait for sp in row) for row in self.spans)

    @property
    def bubble_fraction(self) -> tuple[float, ...]:
        step = self.step_time
        return tuple((1.0 - b / step) if step > 0 else 0.0 for b in self.busy)

    def summary(self) -> StepSummary:
        return summarize_records([
            (min((sp.start for sp in row), default=0.0), max((sp.end for sp in row), default=0.0),
             sum(sp.duration for sp in row))
            for row in self.spans
        ])

    def mean_durations(self) -> dict[tuple[str, int], float]:
        """Mean duration of each action kind per stage, ``{("F", stage): seconds, ...}`` (to feed the simulator)."""
        sums: dict[tuple[str, int], list[float]] = {}
        for row in self.spans:
            for sp in row:
                sums.setdefault((sp.action.kind.value, sp.action.stage), []).append(sp.duration)
        return {k: sum(v) / len(v) for k, v in sums.items()}
