"""Our executor against ``torch.distributed.pipelining`` on the same workloads, in the same processes.

For every schedule with a counterpart in PyTorch (GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble,
ZBVZeroBubble), p in {2, 4} and several m, both run the same stages one after the other in the same processes,
step by step in turn (so the machine's noise hits both alike), and the table gives the step time of each (the
slowest rank's, median over steps), the ratio of the medians ours/torch, and the paired ratio: the median over steps
of ours/torch for the two steps timed one after the other (the first runner alternates), which the machine's
slower drifts do not move.

Workloads:

* ``sleep``: each chunk's forward sleeps ``tf / v``; its backward sleeps ``2 tf / v``, half in the part that
  computes the input gradient (B) and half in the part that computes the weight gradient (W), so the split
  schedules can move W. The figures do not depend on the CPU count; the ideal step (simulator) is shown. Sleeps
  are shortened by ``time.sleep``'s measured mean overshoot (as in ``schedule_efficiency.py``).
* ``transformer``: each chunk is transformer blocks (attention + MLP of ``nn.Linear``; 1 thread per process).

The 1F1B rows are followed by one of our 1F1B with ``early_input_grads`` (each input gradient sent before the
weight gradients are computed: W right after B), timed in the same loop as the other two and compared with the same
PyTorch 1F1B: an option of ours, not PyTorch's schedule, so it is a row of its own.

Our runners pass values as ``PipelineStrategy`` does by default (``--cpu-transport auto``: shared memory between the
processes of this host); PyTorch's send over the gloo process group, the only transport they have.
``--cpu-transport gloo`` runs ours over gloo too; ``--with-gloo`` adds ours over gloo as a runner of its own in each
row (a column of its own, timed in turn with the others).

A second table compares our schedules with our 1F1B (medians of the first table). Last, the zero-bubble targets:
our 1F1B, ZB-H1 and ZBV on the sleeping workload at p = 4, m = 16 timed in turn in one loop (``--target-steps``
rounds), as ratios to our 1F1B, both of medians and paired.
Run: ``python benchmarks/vs_torch.py [--tf-ms 10] [--steps 21] [--workloads sleep transformer] [--with-gloo]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_pipe.engine import (  # noqa: E402
    PipelineExecutor, StepResult, Transport, active_collector, destroy_process_group, split_microbatches,
)
from lightning_pipe.engine.shm import TRANSPORT_KINDS, make_transport  # noqa: E402
from lightning_pipe.schedules import build_schedule, stage_to_rank  # noqa: E402
from lightning_pipe.simulate import Costs, simulate  # noqa: E402
import schedule_efficiency as se  # noqa: E402  (benchmarks/ is on the path: this script's folder)

# (our schedule, chunks per rank, torch's class name)
PAIRS = [
    ("gpipe", 1, "ScheduleGPipe"),
    ("1f1b", 1, "Schedule1F1B"),
    ("interleaved_1f1b", 2, "ScheduleInterleaved1F1B"),
    ("zero_bubble", 2, "ScheduleInterleavedZeroBubble"),
    ("zbv", 2, "ScheduleZBVZeroBubble"),
]
OURS_ONLY = [("zero_bubble", 1)]  # ZB-H1: no one-chunk counterpart in torch
EARLY = {"1f1b"}  # also timed with early_input_grads, beside the textbook schedule and torch's
TARGETS = [("1f1b", 1), ("zero_bubble", 1), ("zbv", 2)]  # issue 5's targets: sleeping, p=4, m=16, against 1F1B
_CPU_TRANSPORT = ["auto"]  # --cpu-transport, as PipelineStrategy(cpu_transport=...): what our runners send through
_OPEN: list[Transport] = []  # transports of this row's runners, closed when the row is done


# -- the sleeping workload ----------------------------------------------------------------------------------------
class _SleepWeight(torch.autograd.Function):
    """Returns the weight; its gradient (W) sleeps ``tw``. Under our split schedules the work is deferred to the
    W action through :func:`active_collector`; torch's zero-bubble schedules run it in their own W step."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, tw: float) -> torch.Tensor:
        ctx.tw, ctx.collector = tw, active_collector()
        ctx.save_for_backward(w)
        return w.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if ctx.collector is None:
            se.sleep_exactly(ctx.tw)
            return grad, None
        (w,) = ctx.saved_tensors

        def weight_grad() -> None:
            se.sleep_exactly(ctx.tw)
            w.grad = grad.clone() if w.grad is None else w.grad + grad

        ctx.collector.defer(weight_grad)
        return None, None


class SleepChunk(nn.Module):
    def __init__(self, tf: float, tb_input: float, tw: float) -> None:
        super().__init__()
        self.tf, self.tb, self.tw = tf, tb_input, tw
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            # The first stage: its micro-batch needs no gradient, so autograd would skip the input path's backward
            # and B would cost nothing there (the ideal step of 1F1B at p=4, m=16 would be 560 ms, not 570). A real
            # first stage still backpropagates through its layers: B sleeps tb there too.
            x = x.detach().requires_grad_()
        # The input path (B): identity whose forward sleeps tf and backward tb; the weight path (W) apart.
        return se._Sleep.apply(x, self.tf, self.tb) + _SleepWeight.apply(self.w, self.tw)


# -- the transformer workload -------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm causal transformer block (attention and MLP of nn.Linear)."""

    def __init__(self, d: int, heads: int, seq: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("mask", torch.ones(seq, seq, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


def make_chunks(workload: str, stages: list[int], v: int, args: argparse.Namespace) -> dict[int, nn.Module]:
    chunks: dict[int, nn.Module] = {}
    for s in stages:
        torch.manual_seed(s)
        if workload == "sleep":
            tf = args.tf_ms / 1000 / v
            chunks[s] = SleepChunk(tf, tf, tf)
        else:
            chunks[s] = nn.Sequential(*[Block(args.d, 4, args.seq) for _ in range(max(1, args.blocks // v))])
    return chunks


def make_batch(workload: str, m: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if workload == "sleep":
        x = torch.randn(4 * m, 64, generator=g)  # 1 KiB per micro-batch: per-message cost dominates
    else:
        x = torch.randn(args.mbs * m, args.seq, args.d, generator=g)
    return x, torch.zeros_like(x)


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean()


# -- the two runners ------------------------------------------------------------------------------------------------
def ours(rank: int, world: int, name: str, v: int, m: int, chunks: dict[int, nn.Module],
         batch: tuple[torch.Tensor, torch.Tensor], *, transport: Transport | None = None,
         results: list[StepResult] | None = None, early: bool = False) -> Callable[[], None]:
    """A step of our executor (``transport``: one of the caller's; ``results``: where each step's result goes;
    ``early``: the schedule with early input gradients)."""
    schedule = build_schedule(name, num_ranks=world, num_microbatches=m, virtual_stages=v, early_input_grads=early)
    if transport is None:
        transport = make_transport(kind=_CPU_TRANSPORT[0], timeout=120)
        _OPEN.append(transport)
    executor = PipelineExecutor(schedule, rank=rank, timeout=120, transport=transport)
    last = schedule.num_stages - 1
    micro_x, micro_y = split_microbatches(batch[0], m), split_microbatches(batch[1], m)

    def forward_fn(stage: int, microbatch: int, inputs: Any) -> Any:
        out = chunks[stage](micro_x[microbatch] if stage == 0 else inputs)
        return loss_fn(out, micro_y[microbatch]) if stage == last else out

    if results is not None:
        return lambda: results.append(executor.run(forward_fn))
    return lambda: executor.run(forward_fn) and None


def theirs(rank: int, world: int, cls_name: str, name: str, v: int, m: int, chunks: dict[int, nn.Module],
           batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    import torch.distributed.pipelining as pipelining

    num_stages = world * v
    stages = [pipelining.PipelineStage(chunks[s], s, num_stages, torch.device("cpu")) for s in sorted(chunks)]
    cls = getattr(pipelining, cls_name)
    schedule = cls(stages[0] if v == 1 else stages, m, loss_fn=loss_fn)
    holds_first = 0 in chunks
    holds_last = num_stages - 1 in chunks

    def step() -> None:
        args = (batch[0],) if holds_first else ()
        schedule.step(*args, target=batch[1] if holds_last else None)

    return step


def timed(step: Callable[[], None], n: int) -> list[float]:
    """Per-step time of the slowest rank, for ``n`` steps."""
    times = []
    for _ in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    return times


def _held(name: str, v: int, world: int, rank: int) -> list[int]:
    """The stages ``rank`` holds under schedule ``name`` with ``v`` chunks per rank."""
    return [s for s, r in enumerate(stage_to_rank(name, num_ranks=world, virtual_stages=v)) if r == rank]


def in_turn(runners: dict[str, Callable[[], None] | None], steps: int) -> dict[str, list[float]]:
    """Step times of each runner over ``steps`` rounds, one step of each per round, so that the machine's noise hits
    all alike; the runner that goes first rotates from round to round. Warm-up rounds first (torch infers shapes in
    its first step), until the processes' memory stops growing (``schedule_efficiency.warm_up``)."""
    times: dict[str, list[float]] = {k: [] for k, run in runners.items() if run is not None}
    turn = [(k, run) for k, run in runners.items() if run is not None]
    se.warm_up(lambda: [timed(run, 1) for _, run in turn], minimum=1)
    for step in range(steps):
        shift = step % len(turn)
        for key, run in turn[shift:] + turn[:shift]:
            times[key] += timed(run, 1)
    return times


def _paired(mine: list[float], other: list[float]) -> float:
    """Median over rounds of the ratio of two runners' steps taken in the same round (nan without the other)."""
    return statistics.median(a / b for a, b in zip(mine, other)) if other else float("nan")


def _close_open() -> None:
    dist.barrier()  # every rank is done with the row's transfers
    while _OPEN:
        _OPEN.pop().close()


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    se.start_worker(rank, world, port)  # also for torch's runner: the same processes
    _CPU_TRANSPORT[0] = args.cpu_transport
    rows = []
    for workload in args.workloads:
        for m in args.ms:
            batch = make_batch(workload, m, args)
            for name, v, cls_name in PAIRS + [(n, v, None) for n, v in OURS_ONLY]:
                if args.schedules and name not in args.schedules:
                    continue
                if args.no_torch:
                    cls_name = None
                held = _held(name, v, world, rank)
                runners: dict[str, Callable[[], None]] = {
                    "ours": ours(rank, world, name, v, m, make_chunks(workload, held, v, args), batch)}
                if args.with_gloo and _CPU_TRANSPORT[0] != "gloo":
                    runners["gloo"] = ours(rank, world, name, v, m, make_chunks(workload, held, v, args), batch,
                                           transport=Transport(timeout=120))
                if name in EARLY and v == 1:
                    runners["early"] = ours(rank, world, name, v, m, make_chunks(workload, held, v, args), batch,
                                            early=True)
                if cls_name is not None:
                    try:
                        runners["torch"] = theirs(rank, world, cls_name, name, v, m,
                                                  make_chunks(workload, held, v, args), batch)
                    except Exception as err:  # noqa: BLE001 - a combination torch does not support: say so
                        runners["torch"] = None  # type: ignore[assignment]
                        if rank == 0:
                            print(f"torch {cls_name} p={world} m={m}: {type(err).__name__}: {err}", flush=True)
                times = in_turn(runners, args.steps)
                _close_open()
                medians = {k: statistics.median(t) if t else float("nan") for k, t in times.items()}
                rows.append((workload, world, m, name, v, False, medians, _paired(times["ours"],
                                                                                   times.get("torch", []))))
                if "early" in times:
                    rows.append((workload, world, m, name, v, True, {**medians, "ours": medians["early"]},
                                 _paired(times["early"], times.get("torch", []))))
    targets: dict[str, tuple[float, float]] = {}
    if "sleep" in args.workloads and world == 4 and args.target_steps > 0 and not args.schedules:
        # The zero-bubble targets (p=4, m=16, against our 1F1B), timed in turn in one loop: the ratio is then paired
        # step by step, rather than between medians taken minutes apart.
        m = 16
        batch = make_batch("sleep", m, args)
        runners = {}
        for name, v in TARGETS:
            held = _held(name, v, world, rank)
            runners[name] = ours(rank, world, name, v, m, make_chunks("sleep", held, v, args), batch)
        times = in_turn(runners, args.target_steps)
        _close_open()
        targets = {name: (statistics.median(times[name]) / statistics.median(times["1f1b"]),
                          _paired(times[name], times["1f1b"])) for name in runners}
    if rank == 0:
        queue.put((rows, targets))
    destroy_process_group()  # and frees what refers to the groups: see its docstring


def ideal_ms(name: str, v: int, p: int, m: int, tf_ms: float, early: bool = False) -> float:
    schedule = build_schedule(name, num_ranks=p, num_microbatches=m, virtual_stages=v, early_input_grads=early)
    c = tf_ms / v
    return simulate(schedule, Costs(c, 2 * c, c if schedule.split_backward else 0.0)).step_time


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the two workloads (sleeping stages, transformer blocks), for every script that runs them."""
    parser.add_argument("--tf-ms", type=float, default=10.0, help="sleeping workload: forward of a whole stage")
    parser.add_argument("--d", type=int, default=128, help="transformer width")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--mbs", type=int, default=2, help="transformer samples per micro-batch")
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks per rank")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_arguments(parser)
    parser.add_argument("--steps", type=int, default=21,
                        help="rounds per row (more rounds steady the medians; a row at par, 1F1B, still lands above "
                             "1.0 at times)")
    parser.add_argument("--ps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--ms", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--workloads", nargs="+", default=["sleep", "transformer"])
    parser.add_argument("--schedules", nargs="*", default=[], help="only these of ours (default: all)")
    parser.add_argument("--no-torch", action="store_true", help="time ours only")
    parser.add_argument("--cpu-transport", choices=TRANSPORT_KINDS, default="auto",
                        help="how our runners pass values (PipelineStrategy(cpu_transport=...)): 'auto' (shared "
                             "memory between the processes of this host, the strategy's default) or 'gloo' (the "
                             "process group's send/recv, which torch's runners use)")
    parser.add_argument("--with-gloo", action="store_true",
                        help="also time ours over gloo in each row (a column of its own), in turn with the others")
    parser.add_argument("--target-steps", type=int, default=15,
                        help="rounds of the in-turn timing of our 1f1b, zero_bubble and zbv (sleeping, p=4, m=16)")
    args = parser.parse_args()
    rows, targets = [], {}
    for p in args.ps:
        got_rows, got_targets = se.run_workers(_worker, p, args)
        rows += got_rows
        targets.update(got_targets)
    print(f"\nstep time in ms (slowest rank, median of {args.steps} steps); sleeping stages tf={args.tf_ms:g} ms, "
          f"tb=2tf split evenly into B and W; transformer d={args.d}, seq={args.seq}, "
          f"{args.mbs} samples per micro-batch, {args.blocks} blocks per rank; 'paired': median over the steps of "
          "ours/torch, each pair timed one after the other")
    gloo = args.with_gloo and args.cpu_transport != "gloo"
    print(f"{'workload':11s} {'p':>2s} {'m':>3s} {'schedule':20s} {'ideal':>7s} {'ours':>8s} {'torch':>8s} "
          f"{'ours/torch':>10s} {'paired':>7s}" + (f" {'ours gloo':>9s} {'/torch':>7s}" if gloo else ""))
    ours_1f1b: dict[tuple[str, int, int], float] = {}
    for workload, p, m, name, v, early, t, paired in rows:
        label = f"{name}" + (f" (v={v})" if v > 1 or name == "zero_bubble" else "") + (" early" if early else "")
        ideal = f"{ideal_ms(name, v, p, m, args.tf_ms, early):7.1f}" if workload == "sleep" else f"{'':7s}"
        mine, other = 1e3 * t["ours"], 1e3 * t.get("torch", float("nan"))
        ratio = mine / other if other == other else float("nan")
        extra = ""
        if gloo and not early:
            extra = f" {1e3 * t['gloo']:9.1f} {1e3 * t['gloo'] / other:7.3f}"
        print(f"{workload:11s} {p:2d} {m:3d} {label:20s} {ideal} {mine:8.1f} {other:8.1f} {ratio:10.3f} "
              f"{paired:7.3f}{extra}")
        if name == "1f1b" and not early:
            ours_1f1b[(workload, p, m)] = mine
    print("\nours against our 1F1B (same workload, p, m; medians from the table above, timed minutes apart)")
    print(f"{'workload':11s} {'p':>2s} {'m':>3s} {'schedule':20s} {'ours':>8s} {'/ 1f1b':>8s} {'ideal ratio':>11s}")
    for workload, p, m, name, v, early, t, _ in rows:
        base = ours_1f1b.get((workload, p, m), float("nan"))
        ideal = ""
        if workload == "sleep":
            ideal = f"{ideal_ms(name, v, p, m, args.tf_ms, early) / ideal_ms('1f1b', 1, p, m, args.tf_ms):11.3f}"
        label = name + f" (v={v})" + (" early" if early else "")
        print(f"{workload:11s} {p:2d} {m:3d} {label:20s} {1e3 * t['ours']:8.1f} "
              f"{1e3 * t['ours'] / base:8.3f} {ideal}")
    if targets:
        print(f"\nzero-bubble targets: sleeping, p=4, m=16, our schedules timed in turn over {args.target_steps} "
              "rounds, against our 1f1b")
        print(f"{'schedule':20s} {'median ratio':>12s} {'paired':>7s} {'ideal':>7s} {'target':>7s}")
        for (name, v), goal in zip(TARGETS, ("", "0.92", "0.90")):
            median_ratio, paired = targets[name]
            ideal_ratio = ideal_ms(name, v, 4, 16, args.tf_ms) / ideal_ms("1f1b", 1, 4, 16, args.tf_ms)
            print(f"{name + f' (v={v})':20s} {median_ratio:12.3f} {paired:7.3f} {ideal_ratio:7.3f} {goal:>7s}")

if __name__ == "__main__":
    main()
