"""lightning_pipe: pipeline parallelism for PyTorch Lightning.

``import lightning_pipe`` registers ``Trainer(strategy="pipeline")`` and one name per schedule
(``"pipeline_gpipe"``, ``"pipeline_1f1b"``, ``"pipeline_interleaved_1f1b"``, ``"pipeline_zero_bubble"``,
``"pipeline_zbv"``). The engine (``lightning_pipe.schedules``, ``lightning_pipe.simulate``,
``lightning_pipe.engine``) does not import Lightning.
"""

from lightning_pipe.errors import (
    CheckpointNotFoundError, PipelineCommError, PipelineError, ScheduleDeadlockError, ScheduleError,
)
from lightning_pipe.strategy import PipelineStrategy, register_strategies
from lightning_pipe.strategy.checkpoint import consolidate
from lightning_pipe.strategy.grad_norm import grad_norm

register_strategies()

__all__ = [
    "PipelineStrategy", "consolidate", "grad_norm",
    "PipelineError", "PipelineCommError", "ScheduleError", "ScheduleDeadlockError", "CheckpointNotFoundError",
]
__version__ = "0.1.0"
