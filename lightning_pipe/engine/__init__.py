"""The pipeline engine: executor, point-to-point transport and micro-batching. Knows torch, never Lightning."""

from lightning_pipe.engine.executor import ActionRecord, ForwardFn, PipelineExecutor, StepResult
from lightning_pipe.engine.heap import HeapFreeze
from lightning_pipe.engine.microbatch import batch_size_of, merge_microbatches, microbatch_weights, split_microbatches
from lightning_pipe.engine.shm import ShmTransport, make_transport
from lightning_pipe.engine.shutdown import destroy_process_group
from lightning_pipe.engine.stage import ModuleStages, split_sequential
from lightning_pipe.engine.transport import PendingRecv, Transport
from lightning_pipe.engine.weightgrad import WeightGradCollector, active_collector, deferring

__all__ = [
    "ActionRecord", "ForwardFn", "PipelineExecutor", "StepResult", "HeapFreeze",
    "batch_size_of", "merge_microbatches", "microbatch_weights", "split_microbatches",
    "ModuleStages", "split_sequential", "PendingRecv", "Transport", "ShmTransport", "make_transport",
    "WeightGradCollector", "active_collector", "deferring", "destroy_process_group",
]
