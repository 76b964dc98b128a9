"""The tuner's public face: ``lightning_pipe.tune.choose_microbatches(...)`` and ``python -m lightning_pipe.tune``.

The work lives in :mod:`lightning_pipe.tuning`; this module names what a user calls to predict the step time and
bubble of each (schedule, number of micro-batches) from per-stage costs and choose the fastest. Under Lightning,
``PipelineStrategy(num_microbatches="auto")`` does the same with costs profiled on the spot.
"""

from lightning_pipe.tuning import Candidate, LinearCost, StageCostModel, TuneResult, choose_microbatches
from lightning_pipe.tuning.microbatches import main

__all__ = ["Candidate", "LinearCost", "StageCostModel", "TuneResult", "choose_microbatches", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
