"""Train an 8-layer MLP split over 2 CPU processes with the 1F1B engine, and print its loss curve.

Plain PyTorch (no Lightning): the engine on its own. Run: ``python examples/train_pipelined_mlp.py``.
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
    HeapFreeze, ModuleStages, PipelineExecutor, destroy_process_group, microbatch_weights, split_microbatches,
    split_sequential,
)
from lightning_pipe.schedules import build_schedule  # noqa: E402


def make_data(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth 8-D regression target the MLP can learn."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.5 * x[:, 4:5] * x[:, 5:6]
    return x, y


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # every rank builds the same model, then keeps only its stage
    dims = [8] + [64] * 7 + [1]
    layers: list[nn.Module] = []
    for i in range(8):
        layers += [nn.Linear(dims[i], dims[i + 1])] + ([nn.GELU()] if i < 7 else [])
    model = nn.Sequential(*layers)
    stage = split_sequential(model, [8, 7])[rank]
    optimizer = torch.optim.Adam(stage.parameters(), lr=3e-3)
    schedule = build_schedule(args.schedule, num_ranks=world, num_microbatches=args.microbatches)
    executor = PipelineExecutor(schedule, rank=rank, timeout=60)
    x, y = make_data()
    heap = HeapFreeze()
    heap.freeze()  # a full garbage collection (200 ms with torch imported) would stall one rank mid-step
    for epoch in range(args.epochs):
        total = 0.0
        for i in range(0, len(x), args.batch_size):
            batch_len = len(x[i : i + args.batch_size])
            micro_x = split_microbatches(x[i : i + args.batch_size], args.microbatches)
            micro_y = split_microbatches(y[i : i + args.batch_size], args.microbatches)
            if len(micro_x) != executor.schedule.num_microbatches:  # a short last batch: fewer micro-batches
                executor = PipelineExecutor(build_schedule(args.schedule, num_ranks=world,
                                                           num_microbatches=len(micro_x)), rank=rank, timeout=60)
            optimizer.zero_grad()
            weights = microbatch_weights(micro_x)
            result = executor.run(ModuleStages({rank: stage}, num_stages=world, microbatches=micro_x,
                                               targets=micro_y, loss_fn=nn.MSELoss()), loss_weights=weights)
            optimizer.step()
            if rank == world - 1:
                batch_loss = sum(w * result.losses[j].item() for j, w in enumerate(weights))
                total += batch_loss * batch_len
        if rank == world - 1:
            print(f"epoch {epoch + 1:3d}  loss {total / len(x):.4f}", flush=True)
    heap.thaw()
    destroy_process_group()  # and frees what refers to the groups: see its docstring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(2, port, args), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
