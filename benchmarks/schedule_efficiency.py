"""How close the executor comes to the ideal pipeline, on stages that sleep instead of compute.

Each stage's forward sleeps ``tf`` and its backward ``2 * tf``, so the figures do not depend on the CPU count.
For p in {2, 4} and m in {4, 8, 16, 32}, both GPipe and 1F1B, it prints the measured step time (the slowest
rank's, median of several steps), the simulator's prediction, the ideal ``(m + p - 1) * (tf + tb)`` and the
overhead ratio measured / ideal; then the simulator fed with the action times actually measured and a transfer
latency (sim(actual)), whose ratio to the measurement isolates the executor's own scheduling cost.
Run: ``python benchmarks/schedule_efficiency.py [--tf-ms 10]``.
"""

from __future__ import annotations

import argparse
import os
import queue as queue_module
import socket
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    import resource  # POSIX only: peak memory, for the warm-up
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_pipe.engine import HeapFreeze, PipelineExecutor, destroy_process_group  # noqa: E402
from lightning_pipe.schedules import build_schedule  # noqa: E402
from lightning_pipe.simulate import Costs, ideal_step_time, simulate  # noqa: E402


_GRID = (0.001, 0.0025, 0.005, 0.01, 0.02)  # seconds: the sleeps the benchmarks ask for lie in this range


def _calibrate_overshoot() -> list[tuple[float, float]]:
    """Median time ``time.sleep`` oversleeps here for each duration of ``_GRID``, measured once at start-up. It grows
    with the duration (here about 80 us at 2 ms, 160 us at 10 ms, 180 us at 20 ms), so one figure for all would
    leave long sleeps too long."""
    grid = []
    for seconds in _GRID:
        samples = []
        for _ in range(15):
            t0 = time.perf_counter()
            time.sleep(seconds)
            samples.append(time.perf_counter() - t0 - seconds)
        grid.append((seconds, statistics.median(samples)))
    return grid


_OVERSHOOT: list[tuple[float, float]] = [(0.0, 0.0)]


def _overshoot(seconds: float) -> float:
    """The calibrated overshoot at ``seconds``, linear between the grid's points and constant beyond them."""
    points = _OVERSHOOT
    if seconds <= points[0][0]:
        return points[0][1]
    for (d0, o0), (d1, o1) in zip(points, points[1:]):
        if seconds <= d1:
            return o0 + (o1 - o0) * (seconds - d0) / (d1 - d0)
    return points[-1][1]


_CORRECTION: dict[float, float] = {}
"""Per duration asked (to 0.1 ms), the overshoot taken off, kept up to date from the sleeps themselves."""
_FOLLOW = 0.1  # weight of each sleep's error in the correction


def sleep_exactly(seconds: float) -> None:
    """Sleep ``seconds`` on average: the overshoot of ``time.sleep`` for that duration is taken off, so the figures
    measure the pipeline rather than the scheduler. The start-up calibration (``_OVERSHOOT``) is measured in a
    quiet process; in a loaded pipeline the wake-ups come later (sleeps of 5 ms took 0.06-0.09 ms longer on average
    at p=4), so each sleep's error moves the correction for its duration. (Spinning to the deadline would be exact
    but steals the cores that gloo's threads need.)"""
    key = round(seconds, 4)
    correction = _CORRECTION.get(key)
    if correction is None:
        correction = _overshoot(seconds)
    t0 = time.perf_counter()
    time.sleep(max(0.0, seconds - correction))
    _CORRECTION[key] = correction + _FOLLOW * (time.perf_counter() - t0 - seconds)


class _Sleep(torch.autograd.Function):
    """Identity whose forward sleeps ``tf`` and backward sleeps ``tb`` seconds."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tf: float, tb: float) -> torch.Tensor:
        ctx.tb = tb
        sleep_exactly(tf)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        sleep_exactly(ctx.tb)
        return grad, None, None


WARM_GROWTH_KB = 4096  # peak-memory growth of a step (any rank) that still counts as calm
CALM_STEPS = 3  # calm steps in a row that end the warm-up
MAX_WARMUP = 24


def _peak_memory_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if resource is not None else 0


def warm_up(step: Callable[[], Any], *, minimum: int) -> int:
    """Run ``step`` at least ``minimum`` times, then until ``CALM_STEPS`` runs in a row in which no rank's peak
    resident memory grew by more than ``WARM_GROWTH_KB``, at most ``MAX_WARMUP`` times; returns the runs made. Every
    rank must call it; all make the same number.

    A new micro-batch size grows each process's heap over many steps (glibc's heap fragments as it grows), and every
    page touched for the first time costs kernel time: measured here (transformer, GPipe, p=4, m=4), a fresh
    process's first steps took 890, 640, 480, 440, 490 ms with 21 000, 10 000, 7 000, 5 000, 5 000 page faults per
    rank, and the peak memory still grew now and then up to step 19; 380-440 ms once warm. Ending at the first step
    without growth was too early: in three runs the warm-up ended after 5-10 steps and that row measured 1.16-1.23x
    its prediction, in five that ran 16 steps 0.95-1.10x."""
    calm = 0
    for run in range(1, MAX_WARMUP + 1):
        before = _peak_memory_kb()
        step()
        growth = torch.tensor([_peak_memory_kb() - before], dtype=torch.int64)
        dist.all_reduce(growth, op=dist.ReduceOp.MAX)
        calm = calm + 1 if growth.item() <= WARM_GROWTH_KB else 0
        if run >= minimum and calm >= CALM_STEPS:
            return run
    return MAX_WARMUP


def start_worker(rank: int, world: int, port: int) -> None:
    """What every benchmark process does first: one thread, the gloo group, ``time.sleep``'s overshoot measured
    (sleeps as long as asked on average), and the heap frozen, as ``PipelineStrategy(freeze_gc=True)`` does (a full
    garbage collection, 200 ms, would stall one rank mid-step)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    global _OVERSHOOT
    _OVERSHOOT = _calibrate_overshoot()
    HeapFreeze().freeze()


def collect_from_workers(worker: Callable[..., None], world: int, args: argparse.Namespace) -> list[Any]:
    """Run ``worker(rank, world, port, args, queue)`` in ``world`` new processes; return everything they put in the
    queue, in order, once every process has ended.

    The queue is read while the workers run (a worker blocks in ``put`` once the pipe is full, so reading only after
    ``join`` could wait forever), and a worker that dies stops the others at once and raises here, instead of leaving
    this process waiting for a value that will never come."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    got: list[Any] = []
    try:
        while True:
            try:
                got.append(queue.get(timeout=0.5))
                continue
            except queue_module.Empty:
                pass
            failed = [(rank, proc.exitcode) for rank, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"benchmark worker(s) failed (rank, exit code): {failed}; see their output above")
            if all(proc.exitcode == 0 for proc in procs):
                break
        while True:  # what the last worker put just before it ended
            try:
                got.append(queue.get(timeout=0.5))
            except queue_module.Empty:
                return got
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()


def run_workers(worker: Callable[..., None], world: int, args: argparse.Namespace) -> Any:
    """:func:`collect_from_workers` for workers whose rank 0 puts one value: that value."""
    got = collect_from_workers(worker, world, args)
    if len(got) != 1:
        raise RuntimeError(f"expected one result from the benchmark workers, got {len(got)}")
    return got[0]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    start_worker(rank, world, port)
    tf, tb = args.tf_ms / 1000, 2 * args.tf_ms / 1000
    x0 = torch.randn(4, 64, requires_grad=True)  # 1 KiB activations: per-message cost dominates, as in practice

    def forward_fn(stage: int, microbatch: int, inputs: Any) -> torch.Tensor:
        out = _Sleep.apply(x0 if stage == 0 else inputs, tf, tb)
        return out.sum() if stage == world - 1 else out

    for name in args.schedules:
        for m in args.microbatches:
            executor = PipelineExecutor(build_schedule(name, num_ranks=world, num_microbatches=m), rank=rank)
            times, records = [], []
            for step in range(args.warmup + args.steps):
                dist.barrier()
                t0 = time.perf_counter()
                result = executor.run(forward_fn)
                elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if step >= args.warmup:
                    times.append(elapsed.item())
                    records.extend(result.records)
            # What each action really took here (compute and posting its sends), for the simulator.
            durations = {kind: statistics.mean(r.end - r.start for r in records if r.action.kind.value == kind)
                         for kind in ("F", "B")}
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, durations)
            if rank == 0:
                queue.put((name, world, m, statistics.median(times), gathered))
    dist.barrier()
    destroy_process_group()  # and frees what refers to the groups: see its docstring


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf-ms", type=float, default=10.0, help="forward sleep per stage and micro-batch")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hop-ms", type=float, default=0.35,
                        help="transfer latency given to the simulator's second prediction (measured here: 0.3-0.45)")
    args = parser.parse_args()
    rows = []
    for p in args.stages:
        rows += collect_from_workers(_worker, p, args)
    tf = args.tf_ms
    print(f"sleeping stages: tf={tf:g} ms, tb={2 * tf:g} ms; step times in ms (median of {args.steps})")
    print(f"{'schedule':8} {'p':>2} {'m':>3} {'measured':>9} {'simulated':>9} {'ideal':>8} {'measured/ideal':>14} "
          f"{'sim(actual)':>12} {'meas/sim(act)':>14}")
    worst_1f1b = 0.0
    for name, p, m, measured, durations in rows:
        schedule = build_schedule(name, num_ranks=p, num_microbatches=m)
        sim = simulate(schedule, Costs(tf, 2 * tf)).step_time
        # The simulator again, fed with the action times measured on each rank and a transfer latency of
        # --hop-ms: what remains between it and the measurement is the executor's own scheduling cost.
        costs = Costs([1000 * d["F"] for d in durations], [1000 * d["B"] for d in durations],
                      transfer=args.hop_ms)
        sim_measured = simulate(schedule, costs).step_time
        ideal = ideal_step_time(p, m, tf, 2 * tf)
        ratio = measured * 1000 / ideal
        if name == "1f1b":
            worst_1f1b = max(worst_1f1b, ratio)
        print(f"{name:8} {p:>2} {m:>3} {measured * 1000:>9.1f} {sim:>9.1f} {ideal:>8.1f} {ratio:>14.3f} "
              f"{sim_measured:>12.1f} {measured * 1000 / sim_measured:>14.3f}")
    print(f"worst 1F1B overhead: {100 * (worst_1f1b - 1):.1f}% (target: under 5%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
