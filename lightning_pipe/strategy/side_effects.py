"""Once per micro-batch: what the step leaves in the model outside the chain, on a rank that holds several stages.

Under virtual stages (interleaved, zero-bubble with ``virtual_stages > 1``, zbv) a rank runs the user's step hook once
per stage it holds for each micro-batch, and the code before the chain runs in every one. On one device that code
runs once, so its lasting effects outside the chain must happen once too, and what it reads must be what one device
would read:

* persistent buffers outside the chain (a counter, a BatchNorm's statistics): each held stage runs on its own copy
  of them, which starts the step from the step's starting values; the copy left visible is the one of the rank's
  highest stage (on the rank of the last stage, the last stage, whose code after the chain updates them as well).
  So every stage reads and updates them as on one device, and they are those of one device at the end of the step.
* torchmetrics states outside the chain: what the other stages' runs did to them is undone (only the last stage's
  metrics are relayed and synced).

Non-persistent buffers (masks, rotary caches: usually constant) are left alone, and so are plain Python attributes
the hook changes (``self.outputs.append(...)``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torchmetrics import Metric

__all__ = ["OutsideState", "save_metric_states", "load_metric_states"]

# Bookkeeping of a Metric besides its states that an update or forward changes.
_METRIC_FIELDS = ("_update_count", "_computed", "_forward_cache")

_Buffers = list[tuple[torch.Tensor, torch.Tensor]]  # (the buffer, a copy of its values)
SavedMetrics = list[tuple[Metric, int, dict[str, Any]]]
"""Per metric: the metric, its update count then, and its states and bookkeeping then."""


class OutsideState:
    """The persistent buffers and the metrics of ``module`` outside its chain (see the module docstring).

    Args:
        module: The (cut) LightningModule.
        buffer_names: Names of the buffers outside the chain, every name of a buffer registered under several.
        metrics: The metrics outside the chain (called when needed: metrics may be made during the run).
        keeper: The stage whose buffers stay visible: the highest stage this rank holds.
    """

    def __init__(self, module: nn.Module, buffer_names: Iterable[str], metrics: Callable[[], Iterable[Metric]], *,
                 keeper: int) -> None:
        # Per buffer object (by id): the object, and every (owning module, attribute) that registers it, since the
        # step may rebind either name.
        self._buffers: dict[int, tuple[torch.Tensor, list[tuple[nn.Module, str]]]] = {}
        for name in buffer_names:
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            tensor = owner._buffers.get(leaf)
            if tensor is None or leaf in owner._non_persistent_buffers_set:
                continue
            self._buffers.setdefault(id(tensor), (tensor, []))[1].append((owner, leaf))
        self._metrics = metrics
        self.keeper = keeper
        self._copies: dict[int, _Buffers] = {}  # per stage other than the keeper: its buffers in this step

    def begin_step(self) -> None:
        """Every stage starts the step from the visible values (those every stage ended the last step with)."""
        self._copies.clear()

    @contextmanager
    def running(self, stage: int) -> Iterator[None]:
        """Around the run of ``stage``'s step: on its own buffers, and its metric updates undone afterwards (nothing
        to do for the keeper)."""
        if stage == self.keeper:
            yield
            return
        with torch.inference_mode(False):  # copies of normal tensors stay normal under validate's inference mode
            visible = self._save_buffers()
            metrics = save_metric_states(self._metrics())
            mine = self._copies.get(stage)
            if mine is not None:
                self._load_buffers(mine)
        try:
            yield
        finally:
            with torch.inference_mode(False):
                self._copies[stage] = self._save_buffers()
                self._load_buffers(visible)
                load_metric_states(metrics)

    def _save_buffers(self) -> _Buffers:
        return [(tensor, tensor.detach().clone()) for tensor, _ in self._buffers.values()]

    def _load_buffers(self, saved: _Buffers) -> None:
        for tensor, values in saved:
            for owner, leaf in self._buffers[id(tensor)][1]:
                owner._buffers[leaf] = tensor  # the same object again, under every name (hooks may hold it)
            # Through .data: autograd may have saved this tensor in the graph of a stage's forward, and a write
            # counted by its version would fail that backward.
            tensor.data.copy_(values)



def save_metric_states(metrics: Iterable[Metric]) -> SavedMetrics:
    """What :func:`load_metric_states` needs to put ``metrics`` back as they are now."""
    return [(metric, metric._update_count,
             {**{key: _copy(getattr(metric, key)) for key in metric._defaults},
              **{key: getattr(metric, key) for key in _METRIC_FIELDS if hasattr(metric, key)}})
            for metric in metrics]


def load_metric_states(saved: SavedMetrics) -> None:
    """Put each metric updated since :func:`save_metric_states` back as it was then."""
    for metric, count, values in saved:
        if metric._update_count == count:  # not updated since (every update counts)
            continue
        for key, value in values.items():
            setattr(metric, key, value)


def _copy(value: Any) -> Any:
    """A metric state's copy: tensors are updated in place by many metrics; list states only grow (their entries are
    new tensors), so a shallow copy of the list suffices."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return list(value)
    return value
