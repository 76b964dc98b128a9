"""Choosing the number of micro-batches (and the schedule) from profiled costs and the simulator.

Each stage's action time is modelled as a line in the micro-batch size, ``fixed + per_sample * b`` (two profiles
at two sizes give it), plus a per-action ``overhead`` measured on the spot (posting sends and receives, the
executor's bookkeeping) and a ``transfer`` latency per crossing. More micro-batches shrink the bubble
((p-1)/(m+p-1) for GPipe/1F1B) but pay ``fixed + overhead`` more often; the simulator weighs both for every
candidate ``(schedule, m)`` and the fastest predicted step wins (fewer micro-batches on ties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from lightning_pipe.schedules import SCHEDULES, build_schedule
from lightning_pipe.simulate import Costs, simulate
from lightning_pipe.tuning.profile import LinearCost

__all__ = ["StageCostModel", "Candidate", "TuneResult", "candidate_microbatches", "choose_microbatches",
           "main"]


@dataclass(frozen=True)
class StageCostModel:
    """Per stage, forward and backward cost lines (seconds): one entry per stage of the schedule, or one per pipeline
    rank, which a schedule with ``v`` chunks per rank spreads over them (each chunk ``1/v`` of its rank's piece)."""

    forward: tuple[LinearCost, ...]
    backward: tuple[LinearCost, ...]
    weight_share: float = 0.5
    """Share of each backward that is weight gradient, charged to W by the schedules that split backward (the others
    ignore it). 0.5: a linear layer's input and weight gradients are matmuls of the same size."""

    def spread(self, num_stages: int, stage_to_rank: Sequence[int] | None = None) -> "StageCostModel":
        """The same costs over ``num_stages`` stages: each entry cut into ``num_stages / len(self)`` equal chunks.
        With one entry per rank of ``stage_to_rank`` (the schedule's placement), stage ``s`` takes its share of
        the entry of the rank that holds it (under interleaving and zbv a rank's chunks are not adjacent stages);
        otherwise entry ``j`` covers the adjacent stages ``j*k`` to ``j*k+k-1``."""
        if num_stages == len(self.forward):
            return self
        if num_stages % len(self.forward):
            raise ValueError(f"the cost model has {len(self.forward)} stages, which do not divide the schedule's "
                             f"{num_stages}")
        k = num_stages // len(self.forward)
        per_rank = stage_to_rank is not None and len(stage_to_rank) == num_stages and \
            len(set(stage_to_rank)) == len(self.forward)
        owner = list(stage_to_rank) if per_rank else [s // k for s in range(num_stages)]  # type: ignore[arg-type]

        def cut(lines: tuple[LinearCost, ...]) -> tuple[LinearCost, ...]:
            return tuple(LinearCost(lines[owner[s]].fixed / k, lines[owner[s]].per_sample / k)
                         for s in range(num_stages))

        return StageCostModel(cut(self.forward), cut(self.backward), self.weight_share)

    @classmethod
    def constant(cls, forward: Sequence[float], backward: Sequence[float]) -> "StageCostModel":
        """Times that do not depend on the micro-batch size (a sleeping-stage model, tests)."""
        return cls(tuple(LinearCost(f, 0.0) for f in forward), tuple(LinearCost(b, 0.0) for b in backward))

    def costs(self, samples: float, *, overhead: float = 0.0, transfer: float = 0.0, split: bool = False) -> Costs:
        """Action times for micro-batches of ``samples``; ``overhead`` is charged once per action, so twice to a
        backward that a ``split`` schedule runs as two actions (B and W)."""
        fwd = [f(samples) + overhead for f in self.forward]
        work = [b(samples) for b in self.backward]
        if split:
            return Costs(fwd, [w + 2 * overhead for w in work], [self.weight_share * w + overhead for w in work],
                         transfer=transfer)
        return Costs(fwd, [w + overhead for w in work], [self.weight_share * w for w in work], transfer=transfer)


@dataclass(frozen=True)
class Candidate:
    schedule: str
    microbatches: int
    microbatch_size: int
    step_time: float
    """Predicted seconds per step."""
    bubble: float
    """Predicted mean idle share over the ranks."""
    peak_activations: float
    """Most micro-batches' activations held at once on any rank: a chunk of a rank holding ``v`` counts ``1/v`` of
    a micro-batch (its share of the rank's layers), so the schedules compare in one unit."""


@dataclass(frozen=True)
class TuneResult:
    candidates: list[Candidate]
    chosen: Candidate
    batch_size: int
    overhead: float
    transfer: float

    def table(self) -> str:
        lines = [f"batch size {self.batch_size}; per-action overhead {1e3 * self.overhead:.3f} ms, transfer "
                 f"{1e3 * self.transfer:.3f} ms",
                 f"  {'schedule':16} {'m':>4} {'mb size':>7} {'step (ms)':>10} {'bubble':>7} {'peak act':>8} "
                 f"{'samples/s':>10}"]
        for c in self.candidates:
            mark = "*" if c == self.chosen else " "
            lines.append(f"{mark} {c.schedule:16} {c.microbatches:>4} {c.microbatch_size:>7} "
                         f"{1e3 * c.step_time:>10.2f} {100 * c.bubble:>6.1f}% {c.peak_activations:>8g} "
                         f"{self.batch_size / c.step_time if c.step_time > 0 else math.inf:>10.1f}")
        lines.append(f"chosen: schedule={self.chosen.schedule!r}, num_microbatches={self.chosen.microbatches} "
                     f"(predicted step {1e3 * self.chosen.step_time:.2f} ms, bubble {100 * self.chosen.bubble:.1f}%)")
        return "\n".join(lines)


def candidate_microbatches(batch_size: int, *, limit: int = 256) -> list[int]:
    """Powers of two and divisors of ``batch_size`` up to it (and up to ``limit``)."""
    out = {d for d in range(1, batch_size + 1) if batch_size % d == 0}
    out |= {2 ** k for k in range(0, 20) if 2 ** k <= batch_size}
    return sorted(m for m in out if m <= limit)


def choose_microbatches(model: StageCostModel, batch_size: int, *, num_ranks: int,
                        schedules: Sequence[str] = ("1f1b",), candidates: Sequence[int] | None = None,
                        overhead: float = 0.0, transfer: float = 0.0,
                        max_activations: float | None = None, virtual_stages: int | None = None,
                        cores: float | None = None, early_input_grads: bool = False) -> TuneResult:
    """Predict every ``(schedule, m)`` and choose the fastest. ``max_activations`` drops candidates that would
    hold more micro-batches' activations at once on a rank (a memory cap; see :attr:`Candidate.peak_activations`).
    ``cores``: the ranks share this many cores of one host, the costs being each rank's alone (see
    :func:`~lightning_pipe.simulate.simulate`). ``early_input_grads``: the schedules as
    :func:`~lightning_pipe.schedules.with_early_input_grads` makes them."""
    rows: list[Candidate] = []
    failures: list[str] = []
    for name in schedules:
        for m in (candidates if candidates is not None else candidate_microbatches(batch_size)):
            if m > batch_size:
                continue
            try:
                schedule = build_schedule(name, num_ranks=num_ranks, num_microbatches=m,
                                          virtual_stages=virtual_stages, early_input_grads=early_input_grads)
            except Exception as err:  # noqa: BLE001 - a schedule that needs another m (interleaved: a multiple of p)
                failures.append(f"{name} m={m}: {err}")
                continue
            size = math.ceil(batch_size / m)  # the largest micro-batch sets the pace
            costs = model.spread(schedule.num_stages, schedule.stage_to_rank).costs(
                size, overhead=overhead, transfer=transfer, split=schedule.split_backward)
            result = simulate(schedule, costs, cores=cores)
            chunks_per_rank = schedule.num_stages / schedule.num_ranks
            rows.append(Candidate(name, m, size, result.step_time,
                                  sum(result.bubble_fraction) / len(result.bubble_fraction),
                                  max(result.peak_activations) / chunks_per_rank))
    allowed = [r for r in rows if max_activations is None or r.peak_activations <= max_activations]
    if not allowed:
        raise ValueError("no candidate (schedule, num_microbatches) fits: " +
                         ("every one holds more than max_activations" if rows else
                          "none could be built" + (f" (first: {failures[0]})" if failures else "")))
    best = min(r.step_time for r in allowed)
    chosen = min((r for r in allowed if r.step_time <= best * (1 + 1e-9)), key=lambda r: (r.microbatches,
                                                                                          r.schedule))
    return TuneResult(rows, chosen, batch_size, overhead, transfer)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_pipe.tuning``: print predicted step time and bubble for each (schedule, m)."""
    import argparse

    parser = argparse.ArgumentParser(description="Predict step time and bubble per (schedule, num_microbatches) "
                                                 "from per-stage costs, and choose.")
    parser.add_argument("--stages", type=int, default=4, help="pipeline ranks")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    parser.add_argument("--forward-fixed-ms", type=float, default=1.0, help="per-action fixed forward time")
    parser.add_argument("--forward-per-sample-ms", type=float, default=0.1)
    parser.add_argument("--backward-factor", type=float, default=2.0, help="backward = factor x forward")
    parser.add_argument("--overhead-ms", type=float, default=0.3, help="per-action overhead (measured: ~0.3)")
    parser.add_argument("--transfer-ms", type=float, default=0.0)
    parser.add_argument("--microbatches", type=int, nargs="*", default=None)
    parser.add_argument("--cores", type=float, default=None,
                        help="the ranks share this many cores of one CPU host (costs are each rank's alone)")
    parser.add_argument("--early-input-grads", action="store_true",
                        help="W right after each B, as PipelineStrategy(early_input_grads=True) runs it")
    args = parser.parse_args(argv)
    if args.stages < 1 or args.batch_size < 1:
        parser.error(f"--stages ({args.stages}) and --batch-size ({args.batch_size}) must be positive")
    unknown = [name for name in args.schedules if name not in SCHEDULES]
    if unknown:
        parser.error(f"unknown schedule(s) {unknown}; choose from {sorted(SCHEDULES)}")
    if args.microbatches is not None:
        if not args.microbatches:
            parser.error("--microbatches needs at least one value (leave it out to try the default candidates)")
        wrong = [m for m in args.microbatches if not 1 <= m <= args.batch_size]
        if wrong:
            parser.error(f"--microbatches {wrong}: each must be between 1 and --batch-size ({args.batch_size})")
        args.microbatches = sorted(set(args.microbatches))
    for name in ("forward_fixed_ms", "forward_per_sample_ms", "backward_factor", "overhead_ms", "transfer_ms"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name.replace('_', '-')}={value} must be a finite number >= 0")
    if args.cores is not None and not (math.isfinite(args.cores) and args.cores > 0):
        parser.error(f"--cores={args.cores} must be a positive number of cores (leave it out: a core per rank)")
    f = LinearCost(args.forward_fixed_ms / 1e3, args.forward_per_sample_ms / 1e3)
    b = LinearCost(f.fixed * args.backward_factor, f.per_sample * args.backward_factor)
    model = StageCostModel((f,) * args.stages, (b,) * args.stages)  # per rank; spread over virtual stages
    result = choose_microbatches(model, args.batch_size, num_ranks=args.stages, schedules=args.schedules,
                                 candidates=args.microbatches, overhead=args.overhead_ms / 1e3,
                                 transfer=args.transfer_ms / 1e3, cores=args.cores,
                                 early_input_grads=args.early_input_grads)
    print(result.table())
    return 0
