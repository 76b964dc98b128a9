"""Our executor with and without the guard of gloo's I/O threads (``lightning_pipe/engine/io_threads.py``).

In the same processes, step by step in turn (the first one alternating): our executor on a transport that guards
gloo's I/O threads during each send and receive call (the default), the same on one that does not, and PyTorch's
schedule for reference. Workloads and stages are those of ``vs_torch.py``. Printed per row: the step time of each
(slowest rank, median over steps), the ratio guarded/unguarded (of the medians, and paired: the median over rounds
of the two steps timed in the same round), and per step of each of ours the time spent inside send calls (mean
over ranks and steps) with the number of send calls that took over 1 ms (per step, summed over ranks): the
stalls that the guard removes.
Run: ``python benchmarks/io_guard.py [--steps 15] [--ps 2] [--ms 8 16] [--workloads sleep transformer]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_pipe.engine import StepResult, Transport, destroy_process_group  # noqa: E402
import schedule_efficiency as se  # noqa: E402  (benchmarks/ is on the path: this script's folder)
import vs_torch as vt  # noqa: E402

TORCH_CLASSES = {(name, v): cls_name for name, v, cls_name in vt.PAIRS}  # torch's counterpart of (ours, v)


def _send_figures(results: list[StepResult]) -> tuple[float, float]:
    """Seconds per step inside send calls, and send calls over 1 ms per step, on this rank."""
    per_step = [sum(r.send for r in result.records) for result in results]
    slow = [sum(r.send > 1e-3 for r in result.records) for result in results]
    return statistics.mean(per_step), statistics.mean(slow)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    se.start_worker(rank, world, port)
    # Both make their calls on this thread (background=False), where the send times below are taken; by default
    # the transport may move them to its poster thread on stages that leave the cores idle (engine/poster.py).
    unguarded = Transport(timeout=120, guard_io_threads=False, background=False)
    guarded = Transport(timeout=120, background=False)
    rows = []
    for workload in args.workloads:
        for m in args.ms:
            batch = vt.make_batch(workload, m, args)
            for name in args.schedules:
                v = 2 if name in ("interleaved_1f1b", "zbv") or (name == "zero_bubble" and args.zb_v2) else 1
                held = vt._held(name, v, world, rank)
                kept: dict[str, list[StepResult]] = {"guarded": [], "unguarded": []}
                runners: dict[str, Callable[[], None]] = {
                    key: vt.ours(rank, world, name, v, m, vt.make_chunks(workload, held, v, args), batch,
                                 transport=transport, results=kept[key])
                    for key, transport in (("guarded", guarded), ("unguarded", unguarded))}
                if not args.no_torch and (name, v) in TORCH_CLASSES:
                    runners["torch"] = vt.theirs(rank, world, TORCH_CLASSES[(name, v)], name, v, m,
                                                 vt.make_chunks(workload, held, v, args), batch)
                times = vt.in_turn(runners, args.steps)
                sends = torch.tensor([x for key in ("guarded", "unguarded")
                                      for x in _send_figures(kept[key][-args.steps:])], dtype=torch.float64)
                dist.all_reduce(sends)  # summed over ranks
                rows.append((workload, world, m, name, v, {k: statistics.median(t) for k, t in times.items()},
                             vt._paired(times["guarded"], times["unguarded"]), sends.tolist()))
    if rank == 0:
        queue.put((rows, guarded.io_guard.threads, guarded.io_guard.disabled))
    destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--ps", type=int, nargs="+", default=[2])
    parser.add_argument("--ms", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--workloads", nargs="+", default=["sleep", "transformer"])
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "interleaved_1f1b"])
    parser.add_argument("--zb-v2", action="store_true", help="zero_bubble with 2 chunks per rank (as in torch)")
    parser.add_argument("--no-torch", action="store_true", help="without PyTorch's schedule for reference")
    vt.add_workload_arguments(parser)
    args = parser.parse_args()
    rows = []
    for p in args.ps:
        got, threads, disabled = se.run_workers(_worker, p, args)
        rows += got
        print(f"p={p}: rank 0 guards gloo I/O threads {threads}" + (f" (disabled: {disabled})" if disabled else ""))
    print(f"\nstep time in ms (slowest rank, median of {args.steps} steps, in turn); send: ms per step inside send "
          "calls (mean over ranks); >1ms: send calls over 1 ms per step (all ranks)")
    print(f"{'workload':11s} {'p':>2s} {'m':>3s} {'schedule':22s} {'guarded':>8s} {'unguard.':>8s} {'torch':>8s} "
          f"{'g/u':>6s} {'paired':>6s} {'send g':>7s} {'send u':>7s} {'>1ms g':>7s} {'>1ms u':>7s}")
    for workload, p, m, name, v, t, paired, sends in rows:
        g_send, g_slow, u_send, u_slow = sends
        label = name + (f" (v={v})" if v > 1 else "")
        print(f"{workload:11s} {p:2d} {m:3d} {label:22s} {1e3 * t['guarded']:8.1f} {1e3 * t['unguarded']:8.1f} "
              f"{1e3 * t.get('torch', float('nan')):8.1f} {t['guarded'] / t['unguarded']:6.3f} {paired:6.3f} "
              f"{1e3 * g_send / p:7.2f} {1e3 * u_send / p:7.2f} {g_slow:7.2f} {u_slow:7.2f}")


if __name__ == "__main__":
    main()
