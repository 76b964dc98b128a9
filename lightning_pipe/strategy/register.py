"""Registers ``"pipeline"`` and its named variants in Lightning's strategy registry (on ``import lightning_pipe``)."""

from __future__ import annotations

from typing import Any

from lightning_pipe.schedules import SCHEDULES
from lightning_pipe.strategy.pipeline import PipelineStrategy

__all__ = ["register_strategies"]


def _entries() -> list[tuple[str, str, dict[str, Any]]]:
    entries = [("pipeline", "Pipeline parallelism (1F1B schedule)", {})]
    for name in SCHEDULES:
        entries.append((f"pipeline_{name}", f"Pipeline parallelism with the {name} schedule", {"schedule": name}))
    return entries


def register_strategies() -> None:
    """Register in ``lightning.pytorch``'s registry and, when installed, in ``pytorch_lightning``'s."""
    registries = []
    from lightning.pytorch.strategies import StrategyRegistry

    registries.append(StrategyRegistry)
    try:  # the standalone package keeps a registry of its own
        from pytorch_lightning.strategies import StrategyRegistry as PLRegistry  # type: ignore[import-not-found]

        registries.append(PLRegistry)
    except ImportError:
        pass
    for registry in registries:
        for name, description, params in _entries():
            if name not in registry:
                registry.register(name, PipelineStrategy, description=description, **params)
