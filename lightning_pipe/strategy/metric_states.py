"""torchmetrics ``Metric`` states, kept alike on every stage of a pipeline.

The user's step updates a metric where its inputs are: usually after the chain, so on the last stage only. After
each step the last stage relays what the step added to each metric it updated (the new entries of list states such
as AUROC's predictions, the whole of tensor states such as counts, which are small), and the other stages apply it
to their own copies. Every copy then holds the same state, so ``compute()`` (in ``self.log`` at epoch end, or called
in an epoch-end hook) gives the same value on every rank, and each metric syncs over the data-parallel replicas only
(its ``process_group``), not once per stage.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import nn
from torchmetrics import Metric

__all__ = ["MetricStates"]

_Delta = tuple[int, dict[str, Any], Any]  # update count, new or whole states, forward cache


class MetricStates:
    """The ``Metric`` submodules of one (already cut) LightningModule, found once by name."""

    def __init__(self, module: nn.Module) -> None:
        self.metrics = {name: m for name, m in module.named_modules() if isinstance(m, Metric)}

    def use_group(self, group: dist.ProcessGroup) -> None:
        """Sync each metric over ``group`` (the data-parallel replicas), unless the user gave it a group."""
        for metric in self.metrics.values():
            if metric.process_group is None:
                metric.process_group = group

    def mark(self) -> dict[str, tuple[int, dict[str, int]]]:
        """Before a step: each metric's update count and the lengths of its list states."""
        return {name: (m._update_count, {k: len(v) for k, v in _states(m).items() if isinstance(v, list)})
                for name, m in self.metrics.items()}

    def deltas(self, marks: dict[str, tuple[int, dict[str, int]]]) -> dict[str, _Delta]:
        """After a step, on the stage that ran it: what each metric updated since ``marks`` gained, on the CPU."""
        out: dict[str, _Delta] = {}
        for name, metric in self.metrics.items():
            count, lengths = marks[name]
            if metric._update_count == count:
                continue
            states = {}
            for key, value in _states(metric).items():
                if isinstance(value, list):
                    # A reset within the step (rare) leaves the list shorter: then all of it is new.
                    start = lengths.get(key, 0) if len(value) >= lengths.get(key, 0) else 0
                    states[key] = ("extend", start, [v.detach().cpu() for v in value[start:]])
                else:
                    states[key] = ("set", 0, value.detach().cpu())
            cache = apply_to_collection(metric._forward_cache, torch.Tensor, lambda t: t.detach().cpu())
            out[name] = (metric._update_count, states, cache)
        return out

    def apply(self, deltas: dict[str, _Delta], device: torch.device) -> None:
        """On the other stages: bring each metric's copy to the relayed state."""
        for name, (count, states, cache) in deltas.items():
            metric = self.metrics.get(name)
            if metric is None:  # inside a block this rank does not hold
                continue
            for key, (how, start, value) in states.items():
                if how == "extend":
                    current = getattr(metric, key)
                    del current[start:]
                    current.extend(v.to(device) for v in value)
                else:
                    setattr(metric, key, value.to(device))
            metric._update_count = count
            metric._computed = None
            metric._forward_cache = apply_to_collection(cache, torch.Tensor, lambda t: t.to(device))


def _states(metric: Metric) -> dict[str, Any]:
    return {key: getattr(metric, key) for key in metric._defaults}
