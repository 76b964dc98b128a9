"""Choosing for the user: profiled per-layer costs, optimal partitions by time or memory, micro-batch count.

Plain Python and torch (profiling); no Lightning, no torch.distributed (the strategy shares the decisions).
"""

from lightning_pipe.tuning.partition import (
    PartitionResult, greedy_partition, memory_partition, min_max_partition, time_partition,
)
from lightning_pipe.tuning.profile import ChainProfile, LinearCost, fit_linear, profile_chain
from lightning_pipe.tuning.microbatches import (
    Candidate, StageCostModel, TuneResult, choose_microbatches, candidate_microbatches,
)

__all__ = [
    "PartitionResult", "greedy_partition", "memory_partition", "min_max_partition", "time_partition",
    "ChainProfile", "LinearCost", "fit_linear", "profile_chain",
    "Candidate", "StageCostModel", "TuneResult", "choose_microbatches", "candidate_microbatches",
]
