"""Splitting a backward into B (gradient of the stage input) and a deferred W (gradient of the weights).

Zero-bubble schedules run B on the critical path and W later, in what would be idle time. Neither does work twice:
during a stage's forward under :func:`deferring`, every ``torch.nn.functional.linear`` whose weight is a leaf that
requires grad (``nn.Linear`` and its subclasses, a head tied to an embedding through ``F.linear``,
``nn.MultiheadAttention``'s packed self-attention input projection and output projection) runs through an
autograd function whose backward computes only the input gradient (``grad_out @ W``) and leaves
``(input, grad_out)`` with the micro-batch's :class:`WeightGradCollector`; W then computes ``grad_out^T @ input``
and the bias sum and adds them to ``.grad``. In a transformer these matmuls hold nearly all the weight-gradient
work. Every other parameter (norms, embeddings, convolutions, a weight that is not a leaf, such as a slice of a
packed projection, a weight with a gradient hook from ``register_hook`` or
``register_post_accumulate_grad_hook``) gets its gradient during B, as in an ordinary backward, so its hooks run
as they would without the split. Calls through a reference to
``F.linear`` taken before the forward (``from torch.nn.functional import linear``) are not deferred.

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
        out = _original_linear(x, weight, bias)  # under autocast this computes in the autocast dtype, as usual
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


_original_linear = F.linear
_install_lock = threading.Lock()
_installed: list[Any] = []  # while a deferral is active anywhere: the F.linear it replaced, once per entry


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` while a deferral is active: with a leaf weight, on the deferring thread, through
    :class:`_DeferredLinear`; otherwise the original function."""
    collector = getattr(_state, "collector", None)
    if (collector is not None and torch.is_grad_enabled() and _deferrable(weight)
            and (bias is None or _deferrable(bias)) and not _saved_tensor_hooks_active()):
        return _DeferredLinear.apply(collector, input, weight, bias)
    return _original_linear(input, weight, bias)


def _install() -> None:
    # ``torch.nn.functional.linear`` is replaced, not intercepted by a TorchFunctionMode: a mode runs Python for
    # every torch call of the forward (about 10% of a small transformer block's forward here), this only for linears.
    # nn.Linear and torch.nn.functional's own code (multi-head attention) look the name up at call time.
    with _install_lock:
        _installed.append(F.linear)
        F.linear = _linear


def _uninstall() -> None:
    with _install_lock:
        previous = _installed.pop()
        if not _installed:
            F.linear = previous


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in force (torch.utils.checkpoint, offloading): the forward may be rerun."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _deferrable(t: Any) -> bool:
    # A parameter with gradient hooks is left to autograd: they must see its gradient when it is made, which W
    # (writing .grad itself) would skip.
    return (isinstance(t, torch.Tensor) and t.is_leaf and t.requires_grad
            and type(t) in (torch.Tensor, torch.nn.Parameter)
            and not t._backward_hooks and not getattr(t, "_post_accumulate_grad_hooks", None))


@contextlib.contextmanager
def deferring(collector: WeightGradCollector) -> Iterator[WeightGradCollector]:
    """Run a stage's forward so that its backward leaves the weight gradients with ``collector``."""
    previous = active_collector()
    _state.collector = collector
    _install()
    try:
        yield collector
    finally:
        _uninstall()
        _state.collector = previous
