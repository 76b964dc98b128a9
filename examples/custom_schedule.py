"""A schedule of your own and a partition of your own, checked, simulated, and run on 2 CPU processes.

    python examples/custom_schedule.py                    # eager 1F1B, 4 micro-batches, blocks cut 9 + 6
    python examples/custom_schedule.py --extra 0          # plain 1F1B, for comparison
    python examples/custom_schedule.py --balance 5,10

A schedule is plain data (``lightning_pipe.schedules``): for every rank, the ordered list of its actions,
``F(microbatch, stage)`` and ``B(microbatch, stage)``. This one, "eager 1F1B", lets every stage but the last run
``extra`` more forwards before its first backward than 1F1B does: it holds more activations, and in exchange a
stage is less often left waiting for a gradient when the next stage runs late. The script

1. builds the schedule, checks it (``validate_schedule``: every action once, on the right rank, no deadlock) and
   simulates it next to 1F1B (step time, bubble, activations held per rank);
2. runs it with the engine (``PipelineExecutor``) on 2 processes over an MLP cut where ``--balance`` says, and
   checks that each stage's gradients equal those of the whole model run on one process.

To train with such a schedule through Lightning, register it by name in every process (at import of the module
that defines it): ``register_schedule("eager_1f1b", lambda p, m, v=1: eager_1f1b(p, m))``, then
``PipelineStrategy(schedule="eager_1f1b")`` (``lightning_pipe.schedules.register_schedule``; see the README).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_pipe.engine import (  # noqa: E402
    ModuleStages, PipelineExecutor, destroy_process_group, microbatch_weights, split_microbatches, split_sequential,
)
from lightning_pipe.schedules import B, F, Schedule, build_schedule, validate_schedule  # noqa: E402
from lightning_pipe.simulate import Costs, format_timeline, simulate  # noqa: E402


def eager_1f1b(num_stages: int, num_microbatches: int, extra: int = 1) -> Schedule:
    """1F1B whose stages (all but the last) run ``extra`` more warm-up forwards. One stage per rank."""
    p, m = num_stages, num_microbatches
    actions = []
    for s in range(p):
        warmup = min(p - s - 1 + (extra if s < p - 1 else 0), m)
        acts = [F(i, s) for i in range(warmup)]
        for i in range(m - warmup):
            acts += [F(warmup + i, s), B(i, s)]
        acts += [B(i, s) for i in range(m - warmup, m)]
        actions.append(tuple(acts))
    return Schedule(f"eager_1f1b+{extra}", p, m, tuple(range(p)), tuple(actions))


def make_model() -> nn.Sequential:
    torch.manual_seed(0)  # every process builds the same model, then keeps only its stage
    dims = [8] + [32] * 7 + [1]
    layers: list[nn.Module] = []
    for i in range(8):
        layers += [nn.Linear(dims[i], dims[i + 1])] + ([nn.GELU()] if i < 7 else [])
    return nn.Sequential(*layers)  # 15 modules: 8 Linear + 7 GELU


def make_batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    balance = [int(b) for b in args.balance.split(",")]
    model = make_model()
    stage = split_sequential(model, balance)[rank]
    schedule = eager_1f1b(world, args.microbatches, args.extra)
    x, y = make_batch()
    micro_x, micro_y = split_microbatches(x, args.microbatches), split_microbatches(y, args.microbatches)
    executor = PipelineExecutor(schedule, rank=rank, timeout=60)
    executor.run(ModuleStages({rank: stage}, num_stages=world, microbatches=micro_x, targets=micro_y,
                              loss_fn=nn.MSELoss()), loss_weights=microbatch_weights(micro_x))

    reference = make_model()  # the whole model on the whole batch, in this process
    nn.MSELoss()(reference(x), y).backward()
    first = sum(balance[:rank])
    ref_params = [p for module in list(reference)[first:first + balance[rank]] for p in module.parameters()]
    diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(stage.parameters(), ref_params))
    print(f"rank {rank}: modules {first}..{first + balance[rank] - 1}, "
          f"{sum(p.numel() for p in stage.parameters())} parameters, "
          f"largest gradient difference to one process {diff:.1e}", flush=True)
    assert diff < 1e-5, diff
    destroy_process_group()  # and frees what refers to the groups: see its docstring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--extra", type=int, default=1, help="extra warm-up forwards per stage (0: plain 1F1B)")
    parser.add_argument("--balance", default="9,6", help="modules per stage, of the MLP's 15")
    args = parser.parse_args()
    world = 2

    schedule = eager_1f1b(world, args.microbatches, args.extra)
    validate_schedule(schedule)
    print(f"{schedule.name}, rank by rank:\n{schedule.format()}\n")
    costs = Costs(forward=1.0, backward=2.0, transfer=0.1)
    for candidate in (schedule, build_schedule("1f1b", num_ranks=world, num_microbatches=args.microbatches)):
        result = simulate(candidate, costs)
        print(f"{candidate.name}: step time {result.step_time:g}, bubble per rank "
              f"{[round(b, 3) for b in result.bubble_fraction]}, peak activations held {list(result.peak_activations)}")
        print(format_timeline(result, width=72) + "\n")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, args), nprocs=world, join=True)
    print("the custom schedule and partition computed the same gradients as one process")


if __name__ == "__main__":
    main()
