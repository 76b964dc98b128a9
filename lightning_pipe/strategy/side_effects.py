"""Once per micro-batch: what the step leaves in the model outside the chain, on a rank that holds several stages.

Under virtual stages (interleaved, zero-bubble with ``virtual_stages > 1``, zbv) a rank runs the user's step hook once
per stage it holds for each micro-batch, and the code before the chain runs in every one. On one device that code
runs once, so its lasting effects outside the chain (buffers such as a BatchNorm's statistics or a token counter,
torchmetrics states) must happen once too. They are kept from the rank's highest stage (on the rank of the last stage,
the last stage, whose code after the chain updates them as well) and undone after each of the others.
Plain Python attributes the hook changes (``self.outputs.append(...)``) cannot be undone; they stay per execution.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from torchmetrics import Metric

__all__ = ["OutsideState"]

# Bookkeeping of a Metric besides its states that an update or forward changes.
_METRIC_FIELDS = ("_update_count", "_computed", "_forward_cache")


class OutsideState:
    """The buffers and metrics of ``module`` outside the chain, which :meth:`snapshot` saves and its result restores."""

    def __init__(self, module: nn.Module, buffer_names: Iterable[str],
                 metrics: Callable[[], Iterable[Metric]]) -> None:
        self._buffers: list[tuple[nn.Module, str]] = []
        for name in buffer_names:
            owner, _, leaf = name.rpartition(".")
            self._buffers.append((module.get_submodule(owner), leaf))
        self._metrics = metrics

    def snapshot(self) -> Callable[[], None]:
        """Save the current values; the function returned puts them back."""
        buffers = [(owner, leaf, owner._buffers[leaf]) for owner, leaf in self._buffers]
        saved_buffers = [(owner, leaf, tensor, tensor.detach().clone() if tensor is not None else None)
                         for owner, leaf, tensor in buffers]
        saved_metrics = [(metric, {key: _copy(getattr(metric, key)) for key in metric._defaults},
                          {key: getattr(metric, key) for key in _METRIC_FIELDS if hasattr(metric, key)})
                         for metric in self._metrics()]

        def restore() -> None:
            for owner, leaf, tensor, value in saved_buffers:
                owner._buffers[leaf] = tensor  # the same object (hooks or the user may hold it)
                if tensor is not None and value is not None:
                    # Through .data: autograd may have saved this tensor in the graph of the stage's forward, and
                    # a write counted by its version would fail that backward.
                    tensor.data.copy_(value)
            for metric, states, fields in saved_metrics:
                for key, value in {**states, **fields}.items():
                    setattr(metric, key, value)

        return restore


def _copy(value: Any) -> Any:
    """A state's copy: tensors are updated in place by many metrics; list states only grow (their entries are new
    tensors), so a shallow copy of the list suffices."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return list(value)
    return value
