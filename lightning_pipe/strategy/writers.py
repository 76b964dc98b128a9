"""Prediction writers under the pipeline: one write per replica.

``trainer.predict`` gives every stage of a pipeline the last stage's predictions, so a ``BasePredictionWriter``
would write each replica's predictions once per stage (two identical ``predictions_<rank>.pt`` for two stages, which
a script joining the files would count twice). Under DDP each process writes its own shard; here the first stage of
each replica writes (the strategy's ``writes_predictions``), and the others skip the write.
"""

from __future__ import annotations

from types import MethodType
from typing import Any, Callable, Iterable

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

__all__ = ["write_once_per_replica"]


def write_once_per_replica(callbacks: Iterable[Callback]) -> None:
    """Make each ``BasePredictionWriter`` in ``callbacks`` write only where its trainer's strategy says
    ``writes_predictions`` (every process under a strategy without it)."""
    for callback in callbacks:
        if isinstance(callback, BasePredictionWriter):
            for name in ("write_on_batch_end", "write_on_epoch_end"):
                setattr(callback, name, MethodType(_gated(getattr(type(callback), name)), callback))


def _gated(write: Callable[..., None]) -> Callable[..., None]:
    def gated(self: BasePredictionWriter, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if getattr(trainer.strategy, "writes_predictions", True):
            write(self, trainer, *args, **kwargs)

    return gated
