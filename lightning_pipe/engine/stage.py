"""Stages for plain PyTorch: an ``nn.Sequential`` cut into pieces, and the ``forward_fn`` that runs them."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lightning_pipe.errors import PipelineError

__all__ = ["split_sequential", "ModuleStages"]


def split_sequential(module: nn.Sequential, balance: Sequence[int]) -> list[nn.Sequential]:
    """Cut ``module`` into ``len(balance)`` consecutive pieces of ``balance[i]`` layers (the layers are shared,
    not copied)."""
    if sum(balance) != len(module) or any(b < 1 for b in balance):
        raise PipelineError(f"balance={list(balance)} must be positive block counts summing to {len(module)}")
    layers = list(module)
    pieces, start = [], 0
    for count in balance:
        pieces.append(nn.Sequential(*layers[start : start + count]))
        start += count
    return pieces


class ModuleStages:
    """A ``forward_fn`` for :class:`~lightning_pipe.engine.executor.PipelineExecutor` over plain modules.

    The first stage reads ``microbatches[i]``; the last stage returns ``loss_fn(output, targets[i])`` when
    ``targets`` are given (a training step), else its output.
    """

    def __init__(
        self,
        modules: Mapping[int, nn.Module],
        *,
        num_stages: int,
        microbatches: Sequence[Any],
        targets: Sequence[Any] | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> None:
        self.modules = dict(modules)
        self.last = num_stages - 1
        self.microbatches = microbatches
        self.targets = targets
        self.loss_fn = loss_fn

    def __call__(self, stage: int, microbatch: int, inputs: Any) -> Any:
        x = self.microbatches[microbatch] if stage == 0 else inputs
        out = self.modules[stage](x)
        if stage == self.last and self.targets is not None and self.loss_fn is not None:
            return self.loss_fn(out, self.targets[microbatch])
        return out
