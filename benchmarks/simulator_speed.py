"""How long generating and simulating a large schedule takes (default p=64, m=1024), best of 3.

Exits non-zero if generating plus simulating 1F1B takes 1 s or more: the simulator must stay cheap enough to
run inside a training script (to pick a schedule or a micro-batch count) without anyone noticing.

    python benchmarks/simulator_speed.py [--p 64] [--m 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_pipe.schedules import Schedule, gpipe, one_f_one_b  # noqa: E402
from lightning_pipe.simulate import Costs, SimulationResult, simulate  # noqa: E402

T = TypeVar("T")
LIMIT_S = 1.0
"""Ceiling on 1F1B generate + simulate time."""


def best_of(repeats: int, fn: Callable[[], T]) -> tuple[float, T]:
    """The shortest of ``repeats`` timings of ``fn()`` (seconds), and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result  # type: ignore[return-value]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=64, help="pipeline stages (default 64)")
    parser.add_argument("--m", type=int, default=1024, help="micro-batches (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per measure, best kept (default 3)")
    args = parser.parse_args()

    costs = Costs(forward=1.0, backward=2.0, transfer=0.0)
    generators: dict[str, Callable[[int, int], Schedule]] = {"1f1b": one_f_one_b, "gpipe": gpipe}
    print(f"{'schedule':<9}{'p':>5}{'m':>7}{'generate s':>12}{'simulate s':>12}{'total s':>10}{'bubble':>9}")
    totals: dict[str, float] = {}
    for name, generate in generators.items():
        gen_s, schedule = best_of(args.repeats, lambda: generate(args.p, args.m))
        sim_s, result = best_of(args.repeats, lambda: simulate(schedule, costs))
        assert isinstance(result, SimulationResult)
        totals[name] = gen_s + sim_s
        print(f"{name:<9}{args.p:>5}{args.m:>7}{gen_s:>12.3f}{sim_s:>12.3f}{totals[name]:>10.3f}"
              f"{result.max_bubble_fraction:>9.3f}")
    if totals["1f1b"] >= LIMIT_S:
        print(f"FAIL: 1f1b took {totals['1f1b']:.3f} s, limit {LIMIT_S} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
