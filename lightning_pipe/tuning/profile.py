"""Profiling a chain of blocks where it really runs: per-block forward and backward time, saved activations and
parameter bytes, and the work done outside the chain (before it: embedding; after it: head and loss).

``profile_chain`` runs the caller's whole step (``step_fn() -> loss``) a few times with hooks on the blocks:
forward times between each block's pre- and post-forward hooks, backward times between the moments the gradient
reaches each block's output (tensor hooks), saved-for-backward bytes with ``saved_tensors_hooks`` (parameters
excluded). On CUDA every timestamp synchronises the device, which is right for profiling (never used in training).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["ChainProfile", "LinearCost", "profile_chain", "fit_linear"]


@dataclass(frozen=True)
class ChainProfile:
    """Seconds and bytes per block for one micro-batch of ``samples`` samples (medians over the iterations)."""

    forward: list[float]
    backward: list[float]
    activation_bytes: list[int]
    param_bytes: list[int]
    pre_forward: float = 0.0
    """The step's code before the first block (runs on every stage)."""
    pre_backward: float = 0.0
    """Backward of what precedes the chain (first stage only)."""
    post_forward: float = 0.0
    """The step's code after the last block: head, loss (last stage only)."""
    post_backward: float = 0.0
    pre_activation_bytes: int = 0
    post_activation_bytes: int = 0
    samples: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.forward)

    def stage_times(self, counts: Sequence[int]) -> tuple[list[float], list[float]]:
        """(forward, backward) seconds of each stage of the cut ``counts``, outside work included."""
        fwd, bwd, i = [], [], 0
        last = len(counts) - 1
        for s, c in enumerate(counts):
            f = sum(self.forward[i:i + c]) + self.pre_forward + (self.post_forward if s == last else 0.0)
            b = sum(self.backward[i:i + c]) + (self.pre_backward if s == 0 else 0.0) + \
                (self.post_backward if s == last else 0.0)
            fwd.append(f)
            bwd.append(b)
            i += c
        return fwd, bwd


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        for v in value.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def profile_chain(step_fn: Callable[[], torch.Tensor], blocks: Sequence[nn.Module], *, iterations: int = 3,
                  warmup: int = 1, samples: int = 1, device: torch.device | str | None = None,
                  params: Sequence[nn.Parameter] = ()) -> ChainProfile:
    """Profile ``blocks`` (called in order by ``step_fn``, which returns the loss of one micro-batch).

    ``params``: parameters to keep out of the activation count (default: those of ``blocks``). Gradients that
    the runs leave on parameters are cleared.
    """
    blocks = list(blocks)
    n = len(blocks)
    device = torch.device(device) if device is not None else None
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)

    def now() -> float:
        sync()
        return time.perf_counter()

    own_params = {id(p) for b in blocks for p in b.parameters()} | {id(p) for p in params}
    param_storages = {p.untyped_storage().data_ptr() for b in blocks for p in b.parameters()}
    param_storages |= {p.untyped_storage().data_ptr() for p in params}
    state: dict[str, Any] = {}

    def reset() -> None:
        state.update(f0=[None] * n, f1=[None] * n, g_out=[None] * n, g_in=None, region=-1,
                     act=[0] * (n + 2), seen=set())

    def pre_hook(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            state["f0"][i] = now()
            state["region"] = i
            if i == 0:
                t = _first_tensor(args)
                if t is not None and t.requires_grad:
                    t.register_hook(lambda g: state.__setitem__("g_in", now()))
        return hook

    def post_hook(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            state["f1"][i] = now()
            state["region"] = n if i == n - 1 else -2  # n: after the chain; -2: between blocks (not counted)
            t = _first_tensor(output)
            if t is not None and t.requires_grad:
                t.register_hook(lambda g: state["g_out"].__setitem__(i, now()))
        return hook

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in own_params:
            try:
                ptr = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
                ptr = None
            if ptr is not None and ptr not in param_storages and ptr not in state["seen"]:
                state["seen"].add(ptr)
                region = state["region"]
                slot = {-1: n, n: n + 1}.get(region, region) if region != -2 else None
                if slot is not None:
                    state["act"][slot] += t.untyped_storage().nbytes()
        return t

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre_hook(i)))
        handles.append(b.register_forward_hook(post_hook(i)))
    runs: list[dict[str, Any]] = []
    try:
        for it in range(warmup + iterations):
            reset()
            t_begin = now()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = step_fn()
            t_fwd = now()
            b0 = now()
            loss.backward()
            b1 = now()
            if it < warmup:
                continue
            f0, f1, g_out, g_in = state["f0"], state["f1"], state["g_out"], state["g_in"]
            if any(v is None for v in f0) or any(v is None for v in f1):
                raise RuntimeError("profile_chain: some blocks were not called by step_fn")
            # Block i's backward runs from the gradient reaching its output to the gradient reaching its input:
            # the output of the nearest earlier block that has one, else the chain's input, else the end of the
            # backward. A block whose output needs no gradient (frozen, as every block before it) has no backward;
            # the first trainable block after frozen ones ends with the backward, not at its start.
            bwd, ended = [], g_in if g_in is not None else b1  # ended: where the next block's backward ends
            for i in range(n):
                bwd.append(ended - g_out[i] if g_out[i] is not None else 0.0)
                if g_out[i] is not None:
                    ended = g_out[i]
            runs.append(dict(
                forward=[f1[i] - f0[i] for i in range(n)], backward=[max(0.0, x) for x in bwd],
                pre_forward=f0[0] - t_begin, post_forward=t_fwd - f1[-1],
                pre_backward=(b1 - g_in) if g_in is not None else 0.0,
                post_backward=max(0.0, (g_out[-1] if g_out[-1] is not None else b1) - b0),
                act=list(state["act"]),
            ))
    finally:
        for h in handles:
            h.remove()
        for b in blocks:
            for p in b.parameters():
                p.grad = None
        for p in params:
            p.grad = None

    def med(key: str) -> Any:
        values = [r[key] for r in runs]
        if isinstance(values[0], list):
            return [statistics.median(v[i] for v in values) for i in range(len(values[0]))]
        return statistics.median(values)

    act = runs[-1]["act"]
    return ChainProfile(
        forward=med("forward"), backward=med("backward"), activation_bytes=act[:n],
        param_bytes=[sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks],
        pre_forward=med("pre_forward"), pre_backward=med("pre_backward"), post_forward=med("post_forward"),
        post_backward=med("post_backward"), pre_activation_bytes=act[n], post_activation_bytes=act[n + 1],
        samples=samples,
    )


@dataclass(frozen=True)
class LinearCost:
    """``fixed + per_sample * samples`` seconds: the time of an action on a micro-batch of ``samples``."""

    fixed: float
    per_sample: float

    def __call__(self, samples: float) -> float:
        return max(0.0, self.fixed + self.per_sample * samples)


def fit_linear(small: ChainProfile, large: ChainProfile, counts: Sequence[int]) -> tuple[list[LinearCost],
                                                                                          list[LinearCost]]:
    """Per stage of the cut ``counts``, (forward, backward) cost lines through two profiles taken at two
    micro-batch sizes (a profile at one size gives a line through the origin)."""
    fs, bs = small.stage_times(counts)
    fl, bl = large.stage_times(counts)
    ds = large.samples - small.samples

    def line(a: float, b: float) -> LinearCost:
        if ds == 0:
            return LinearCost(0.0, b / max(large.samples, 1))
        slope = max(0.0, (b - a) / ds)
        return LinearCost(max(0.0, a - slope * small.samples), slope)

    return [line(a, b) for a, b in zip(fs, fl)], [line(a, b) for a, b in zip(bs, bl)]
