"""The Lightning layer: ``PipelineStrategy`` and what adapts Lightning's hooks to the engine."""

from lightning_pipe.strategy.pipeline import PipelineStrategy
from lightning_pipe.strategy.register import register_strategies

__all__ = ["PipelineStrategy", "register_strategies"]
