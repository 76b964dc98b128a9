"""Splitting backward into B and W must not do the work twice: B + W against one ordinary backward.

For a GPT block (attention and MLP of ``nn.Linear``), an MLP block and ``nn.TransformerEncoderLayer`` (whose
``nn.MultiheadAttention`` projections go through ``torch.nn.functional.linear`` too), it times an ordinary backward
and, on the same forward, B (input gradient, plus the gradients that are not deferred) and W (the deferred weight
gradients), each the median of several runs, interleaved so that noise hits both alike.
Run: ``python benchmarks/weight_split.py [--d 256] [--seq 128] [--batch 8]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_pipe.engine import WeightGradCollector, deferring  # noqa: E402
from lightning_pipe.models.gpt import Block, GPTConfig  # noqa: E402


class GPTBlock(nn.Module):
    def __init__(self, d: int, seq: int) -> None:
        super().__init__()
        self.block = Block(GPTConfig(n_embd=d, n_head=8, block_size=seq))
        self.register_buffer("mask", torch.ones(seq, seq, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.mask)


def layers(d: int, seq: int) -> dict[str, Callable[[], nn.Module]]:
    return {
        "GPT block (Linear attention + MLP)": lambda: GPTBlock(d, seq),
        "MLP block (Linear, GELU, Linear)": lambda: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(),
                                                                  nn.Linear(4 * d, d)),
        "nn.TransformerEncoderLayer": lambda: nn.TransformerEncoderLayer(d, 8, 4 * d, dropout=0.0, batch_first=True),
    }


def measure(model: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float, float, float]:
    """Median seconds of (ordinary backward, B, W) and the share of the weight gradients deferred to W."""
    plain, b_times, w_times = [], [], []
    deferred_share = 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        t0 = time.perf_counter()
        loss.backward()
        plain.append(time.perf_counter() - t0)

        model.zero_grad(set_to_none=True)
        collector = WeightGradCollector()
        with deferring(collector):
            loss = model(x).square().mean()
        t0 = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        in_b = sum(p.numel() for p in params if p.grad is not None)
        collector.run()
        t2 = time.perf_counter()
        b_times.append(t1 - t0)
        w_times.append(t2 - t1)
        deferred_share = 1 - in_b / sum(p.numel() for p in params)
    return statistics.median(plain), statistics.median(b_times), statistics.median(w_times), deferred_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.d, requires_grad=True)
    print(f"d={args.d} seq={args.seq} batch={args.batch}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'layer':36s} {'backward':>9s} {'B':>8s} {'W':>8s} {'(B+W)/bwd':>10s} {'weights in W':>13s}")
    for name, make in layers(args.d, args.seq).items():
        model = make()
        measure(model, x, 2)  # warm-up
        plain, b, w, share = measure(model, x, args.repeats)
        print(f"{name:36s} {1e3 * plain:8.2f}ms {1e3 * b:7.2f}ms {1e3 * w:7.2f}ms {(b + w) / plain:10.3f} "
              f"{share:12.1%}")


if __name__ == "__main__":
    main()
