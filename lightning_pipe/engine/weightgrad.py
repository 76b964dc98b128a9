"""Splitting a backward into B (gradient of the stage input) and a deferred W (gradient of the weights).

Zero-bubble schedules run B on the critical path and W later, in what would be idle time. Neither does work twice:
during a stage's forward under :func:`deferring`, every ``torch.nn.functional.linear`` whose weight is a leaf that
requires grad (``nn.Linear`` and its subclasses, a head tied to an embedding through
``F.linear``) runs through an autograd function whose backward computes only the input gradient
(``grad_out @ W``) and leaves ``(input, grad_out)`` with the micro-batch's :class:`WeightGradCollector`; W then
computes ``grad_out^T @ input`` and the bias sum and adds them to ``.grad``. In a transformer these matmuls hold
nearly all the weight-gradient work. Every other parameter (norms, embeddings, convolutions,
``nn.MultiheadAttention``'s fused projections, a weight that is not a leaf) gets its gradient during B, as in an
ordinary backward.

Custom layers can take part: a ``torch.autograd.Function`` reads :func:`active_collector` in ``forward`` and, in
``backward``, hands its weight-gradient work to ``collector.defer(fn)`` instead of returning it.

Layers under saved-tensor hooks (activation checkpointing, CPU offloading) are not deferred: checkpointing
recomputes the forward during backward, outside this deferral, and the recomputation must save the same tensors as
the forward did. Their weight gradients are computed in B.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["WeightGradCollector", "deferring", "active_collector"]

_state = threading.local()


class WeightGradCollector:
    """The deferred weight-gradient work of one micro-batch on one stage."""

    def __init__(self) -> None:
        self._work: list[Callable[[], None]] = []

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in :meth:`run` (called from a backward) instead of now."""
        self._work.append(fn)

    def __len__(self) -> int:
        return len(self._work)

    def run(self) -> None:
        """Do the deferred work (the W action), in the order the backward produced it."""
        work, self._work = self._work, []
        with torch.no_grad():
            for fn in work:
                fn()


def active_collector() -> WeightGradCollector | None:
    """The collector of the forward being run under :func:`deferring`, if any."""
    return getattr(_state, "collector", None)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    """What autograd's AccumulateGrad does: set ``.grad`` the first time, add afterwards."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad.contiguous() if grad.layout == torch.strided else grad
    else:
        param.grad += grad


class _DeferredLinear(torch.autograd.Function):
    """``F.linear`` whose backward returns only the input gradient and defers the weight gradient."""

    @staticmethod
    def forward(ctx: Any, collector: WeightGradCollector, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)  # under autocast this computes in the autocast dtype, as usual
        ctx.collector = collector
        ctx.compute_dtype = out.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, weight, bias = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad_in = None
        if ctx.needs_input_grad[1]:
            grad_in = grad_out.to(dtype).matmul(weight.to(dtype)).to(x.dtype)

        def weight_grad() -> None:
            g = grad_out.to(dtype)
            g2 = g.reshape(-1, g.shape[-1])
            _accumulate(weight, g2.t().matmul(x.to(dtype).reshape(-1, x.shape[-1])))
            if bias is not None:
                _accumulate(bias, g2.sum(0))

        ctx.collector.defer(weight_grad)
        return None, grad_in, None, None


class _DeferLinearMode(TorchFunctionMode):
    """Routes ``F.linear`` with a leaf weight through :class:`_DeferredLinear` while a collector is active."""

    def __init__(self, collector: WeightGradCollector) -> None:
        super().__init__()
        self.collector = collector

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled() and not _saved_tensor_hooks_active():
            x, weight, bias = _linear_args(args, kwargs)
            if _deferrable(weight) and (bias is None or _deferrable(bias)):
                return _DeferredLinear.apply(self.collector, x, weight, bias)
        return func(*args, **kwargs)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in force (torch.utils.checkpoint, offloading): the forward may be rerun."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _linear_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    names = ("input", "weight", "bias")
    values = list(args) + [kwargs.get(n) for n in names[len(args):]]
    return values[0], values[1], values[2] if len(values) > 2 else None


def _deferrable(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_leaf and t.requires_grad and type(t) in (torch.Tensor,
                                                                                         torch.nn.Parameter)


@contextlib.contextmanager
def deferring(collector: WeightGradCollector) -> Iterator[WeightGradCollector]:
    """Run a stage's forward so that its backward leaves the weight gradients with ``collector``."""
    previous = active_collector()
    _state.collector = collector
    try:
        with _DeferLinearMode(collector):
            yield collector
    finally:
        _state.collector = previous
