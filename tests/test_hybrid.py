"""Pipeline x data parallelism: N processes as N/p replicas of a p-stage pipeline."""

from __future__ import annotations

from typing import Any

import pytest

from tests._launch import launch
from tests.test_strategy_transparency import TOLERANCE, max_param_diff

pytestmark = pytest.mark.distributed

HYBRID_CONFIGS: list[dict[str, Any]] = [
    {"body": "modulelist", "pp": 2, "schedule": "1f1b", "sync_dist": True},
    {"body": "sequential", "pp": 2, "schedule": "gpipe", "clip": 0.05, "accumulate": 2, "steps": 4},
]


@pytest.mark.timeout(300)
def test_pp2_x_dp2_matches_one_device_on_the_global_batches() -> None:
    from tests._strategy_workers import hybrid_reference

    outcomes = launch("tests._strategy_workers.hybrid_jobs", 4, deadline=240, configs=HYBRID_CONFIGS)
    results = [o.unwrap() for o in outcomes]
    for i, config in enumerate(HYBRID_CONFIGS):
        ref = hybrid_reference(config, replicas=2)
        for rank in range(4):
            result = results[rank][i]
            assert result["mesh"] == (("dp", "pp"), (2, 2), True)
            # ranks 0,1 form replica 0 (stages 0,1), ranks 2,3 replica 1: the sampler shards over replicas only.
            assert result["sampler"] == {"num_replicas": 2, "rank": rank // 2}
            # Every optimizer step averaged over the replicas asynchronously, once (not per accumulated batch).
            assert result["async_dp_averages"] == result["optimizer_steps"] == config.get("steps", 3)
            diff, name = max_param_diff(result, ref)
            print(f"pp=2 x dp=2 {config} rank {rank}: max |diff| {diff:.2e}")
            assert diff <= TOLERANCE, (config, rank, name, diff)
            if config.get("sync_dist"):
                # sync_dist averages over the two replicas (not over stages): the global batch's loss, everywhere.
                assert abs(result["metrics"]["train_loss"] - ref["metrics"]["train_loss"]) <= 1e-5
            if rank == 0 and i == 0:
                # The replicas log values of their own halves of the batch: Lightning's advice to sync those stands
                # (train_twice, per epoch; only a pipeline without replicas logs with sync_dist on its own). Lightning
                # gives each message once per process, so the first run has it.
                assert any("self.log('train_twice', ..., sync_dist=True)" in w for w in result["warnings"]), \
                    result["warnings"]


@pytest.mark.timeout(300)
def test_pp1_x_dp2_matches_lightning_ddp() -> None:
    # The second pair: a training_step without batch_idx, with gradient accumulation over 2 batches.
    configs = [{"body": "sequential", "pp": 1}, {"body": "sequential", "ddp": True},
               {"body": "modulelist", "pp": 1, "clip": 0.05, "accumulate": 2, "no_batch_idx": True},
               {"body": "modulelist", "ddp": True, "clip": 0.05, "accumulate": 2, "no_batch_idx": True}]
    outcomes = launch("tests._strategy_workers.hybrid_jobs", 2, deadline=240, configs=configs)
    for outcome in outcomes:
        pipe_a, ddp_a, pipe_b, ddp_b = outcome.unwrap()
        for pipe, ddp in ((pipe_a, ddp_a), (pipe_b, ddp_b)):
            assert pipe["mesh"] == (("dp", "pp"), (2, 1), True)
            diff, name = max_param_diff(pipe, ddp)
            print(f"pp=1 x dp=2 vs ddp rank {outcome.rank}: max |diff| {diff:.2e}")
            assert diff <= TOLERANCE, (name, diff)
            assert abs(pipe["metrics"]["train_loss"] - ddp["metrics"]["train_loss"]) <= 1e-5


@pytest.mark.timeout(150)
def test_replicas_with_different_numbers_of_batches_fail_on_every_rank() -> None:
    """A replica whose data ran out would leave the others waiting in the gradient average or a metric sync: the
    replicas compare their batch counts (each epoch, each validation) and all raise instead; with loaders that have
    no length, they compare at each batch whether it is their last."""
    outcomes = launch("tests._strategy_workers.uneven_replicas", 2, deadline=120)
    for outcome in outcomes:
        errors = outcome.unwrap()
        for what in ("training", "validation"):
            kind, message = errors[what]
            assert kind == "PipelineError", (outcome.rank, what, kind, message)
            assert f"different numbers of {what} batches (per replica: [[3.0], [2.0]])" in message, message
        # Without a length the counts are unknown ahead: the replicas find out at the last batch of the one whose
        # data ends first (its second), before any collective of that step.
        for what in ("training", "validation", "test"):
            kind, message = errors[f"{what} stream"]
            assert kind == "PipelineError", (outcome.rank, what, kind, message)
            assert f"the data-parallel replicas' {what} data ends at different batches" in message, message
            assert "[[1, 0, 0], [1, 0, 1]]" in message, message
        for case in ("training stream, limit", "training stream, max_steps", "validation stream, limit",
                     "validation stream, limit, no batch_idx"):
            assert errors[case] == ("no error", ""), (outcome.rank, case, errors[case])
