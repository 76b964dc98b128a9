"""Lightning behaviour under the pipeline: metrics on every rank, loggers, callbacks, evaluation, prediction,
bad input, registration and launchers."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests._launch import launch
from tests.test_strategy_transparency import TOLERANCE, max_param_diff, reference

METRICS_CONFIG: dict[str, Any] = {
    "body": "modulelist", "schedule": "1f1b", "steps": 4, "val_batches": 2, "val_every": 2, "sanity": 2,
    "csv": True, "predict": True, "validate": True, "callbacks": True, "sync_dist": True, "extras": True,
    "summary": True, "prints": True, "grad_norm": True,
}

# 16-mixed: matmuls in float16 (11 significant bits, relative rounding 2**-11 = 5e-4) whose shapes, hence rounding,
# change with the micro-batches; with SGD (lr 1e-2) over 8 steps the weights differ by about 2e-4 (measured).
FP16_TOLERANCE = 1e-3


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=TOLERANCE)


def _rows_close(rows: list[dict[str, str]], ref_rows: list[dict[str, str]]) -> None:
    assert len(rows) == len(ref_rows) > 0
    assert any(row.get("pipeline/bubble_fraction") for row in rows)  # the strategy's own figures are logged too
    rows = [{k: v for k, v in row.items() if not k.startswith("pipeline/")} for row in rows]
    for row, ref_row in zip(rows, ref_rows):
        assert set(row) == set(ref_row)
        for key, ref_value in ref_row.items():
            if ref_value == "":
                assert row[key] == ""
            else:
                assert _close(float(row[key]), float(ref_value)), (key, row, ref_row)


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])  # zbv: rank 0 holds the last stage and computes the loss
def test_metrics_loggers_callbacks_and_evaluation_match_one_device(schedule: str) -> None:
    config = {**METRICS_CONFIG, "schedule": schedule}
    outcomes = launch("tests._strategy_workers.pipeline_jobs", 2, deadline=240, configs=[config])
    results = [o.unwrap()[0] for o in outcomes]
    ref = reference(config)
    assert {"train_loss", "val_loss", "val_acc", "val_rho", "val_weighted"} <= set(ref["metrics"])
    # lightning_pipe.grad_norm logged in on_before_optimizer_step: every layer's, and their total, as one device
    # gives them (compared below with the other values, on every rank); Lightning's own would give a stage's.
    assert {"grad_2.0_norm/layers.0.fc1.weight", "grad_2.0_norm/layers.3.fc2.bias", "grad_2.0_norm/tok.weight",
            "grad_2.0_norm_total"} <= set(ref["metrics"])
    assert "grad_2.0_norm/head.weight" not in ref["metrics"]  # tied to tok.weight: once, under its first name
    assert {"chain_grad_1.0_norm/0.fc1.weight", "chain_grad_1.0_norm/3.fc2.bias", "chain_grad_1.0_norm_total"} <= set(
        ref["metrics"])
    assert _close(ref["metrics"]["val_weighted"], 2 / 3)  # (0 x 10 + 1 x 20) / (10 + 20): weighted by batch_size
    for rank, result in enumerate(results):
        for what in ("metrics", "logged", "progress_bar"):
            if what != "progress_bar":  # the pipeline's own figures (strategy/metrics.py), on every rank
                assert {"pipeline/bubble_fraction", "pipeline/step_time", "pipeline/tokens_per_sec"} <= set(
                    result[what]), (rank, what)
            result[what] = {k: v for k, v in result[what].items() if not k.startswith("pipeline/")}
            assert set(result[what]) == set(ref[what]), (rank, what)
            for key, value in ref[what].items():
                assert _close(result[what][key], value), (rank, what, key, result[what][key], value)
        # ModelCheckpoint(monitor="val_loss") picked the same score everywhere.
        assert _close(result["best_model_score"], ref["best_model_score"])
        # trainer.predict returns the last stage's predictions on every rank.
        assert torch.equal(result["predictions"], ref["predictions"])
        assert result["predict_none"] == ref["predict_none"] == [None, None]
        # What training_step returned besides the loss reaches on_train_batch_end on every rank, whole.
        assert len(result["extras"]) == len(ref["extras"]) == 4
        for seen, expected in zip(result["extras"], ref["extras"]):
            assert torch.equal(seen["first_tokens"], expected["first_tokens"])
            assert abs(seen["loss"].item() - expected["loss"].item()) <= TOLERANCE
        for what in ("validate", "test"):
            assert result[what][0].keys() == ref[what][0].keys()
            for key, value in ref[what][0].items():
                assert _close(result[what][0][key], value), (rank, what, key)
        assert max_param_diff(result, ref)[0] <= TOLERANCE
        # Every rank logs the same values, as one device: Lightning is not led to ask for sync_dist=True (rank 0
        # warns for the processes; val_weighted and train_twice are logged per epoch without it).
        assert not [w for w in result["warnings"] if "sync_dist=True" in w], result["warnings"]
        # A list-state Metric computed by hand in on_validation_epoch_end on every rank (the last stage relayed
        # its entries), and self.all_gather without replicas returning the value as on one device.
        assert _close(result["val_rho_by_hand"], ref["val_rho_by_hand"]), (rank, result["val_rho_by_hand"])
        assert result["gathered"].shape == ref["gathered"].shape == ()
    # ModelSummary prints the whole model on rank 0, as one device does: every stage's layers and parameters (the
    # head tied to the embedding counted once), and the sizes and FLOPs of the example's pipelined forward.
    assert len(ref["summary"]) == 1 and "Total Flops" in ref["summary"][0] and "In sizes" in ref["summary"][0]
    assert results[0]["summary"] == ref["summary"], "\n".join(results[0]["summary"] + ref["summary"])
    assert results[1]["summary"] == []
    # self.print after the chain (on the last stage) prints on rank 0, once per micro-batch (4 a step), each
    # micro-batch's loss; on one device once a step. Nothing prints elsewhere.
    assert len(ref["printed"]) == len(ref["printed_stderr"]) == 4
    assert [line.split(":")[0] for line in results[0]["printed"]] == [
        line.split(":")[0] for line in ref["printed"] for _ in range(4)]
    assert results[0]["printed_stderr"] == [line for line in ref["printed_stderr"] for _ in range(4)]
    assert results[1]["printed"] == results[1]["printed_stderr"] == []
    # Rank 0's CSV log holds the single-device values, step by step.
    _rows_close(results[0]["csv"], ref["csv"])
    # The best checkpoint is one file with every stage's weights, loadable on one device.
    loaded = results[0]["checkpoint_params"]
    assert set(loaded) == set(ref["checkpoint_params"])
    for name, value in ref["checkpoint_params"].items():
        assert (loaded[name] - value).abs().max().item() <= TOLERANCE, name
    # A buffer updated after the chain (on the last stage only) is saved from that stage, not a stale copy.
    assert results[0]["checkpoint_buffers"]["seen_tokens"] == ref["checkpoint_buffers"]["seen_tokens"] > 0


BAD_INPUTS = {
    "no_chain": "no chain of blocks found",
    "more_stages_than_blocks": "has 1 blocks, too few for pipeline_parallel_size=2 x virtual_stages=1 = 2 stages",
    "virtual_stages_too_many": "has 4 blocks, too few for pipeline_parallel_size=2 x virtual_stages=4 = 8 stages",
    "pipeline_size_does_not_divide": "pipeline_parallel_size=3 does not divide the 2 processes",
    "balance_list_wrong_sum": "balance=[1, 2] must be positive block counts that sum to the chain's 4 blocks",
    "blocks_path_unknown": "blocks='body.layers' names no submodule",
    "manual_optimization": "automatic optimization only",
    "line_search_optimizer": "LBFGS calls the training closure more than once per step",
    "closure_called_twice": "_TwoClosureSGD calls the training closure more than once per step",
    "block_called_twice": "must each be called once per step, in order",
    "blocks_return_pairs": "block 0 of `blocks` takes a hidden state of one structure (a tensor) and returns another "
                           "(a tuple of 2)",
    "last_stage_fails_after_the_step": "reduce_fx='median'",
    # Per rank: rank 0's stage holds none of the parameters the optimizer is given (it hung when caught).
    "empty_optimizer_on_a_stage": ["configure_optimizers gave an optimizer no parameters on pipeline rank 0",
                                   "configure_optimizers failed on another pipeline rank"],
    # What training_step returned besides the loss cannot be pickled for the other stages (it hung when caught).
    "unpicklable_step_output": "cannot be sent to the other stages: AttributeError: Can't pickle local object",
    "second_trainer": "was already cut into pipeline stages by another Trainer's PipelineStrategy",
    "last_stage_fails_in_validation": "ValueError: validation failed after the chain",
    "first_stage_fails_in_validation": "ValueError: validation failed in the first block",
    "stages_see_different_batches": "the stages of this pipeline got different batches (training step, global step 0",
    # Its whole copy of the model failed to average with a stage at the first update ("size of tensor a (64)...").
    "stochastic_weight_averaging": "StochasticWeightAveraging does not support a model cut into pipeline stages",
    "memory_budget_too_small": "MiB per device (each device holds 2 stages: each stage may use 1/2 of the budget)",
}
# The rank where the user's code raised keeps its own error; the others raise a PipelineError that relays it.
OWN_ERRORS = {"last_stage_fails_in_validation": "ValueError", "first_stage_fails_in_validation": "ValueError"}


# Set-up errors leave the process group usable, so one launch checks them all; a failure in the middle of a step
# leaves messages of that step behind, so each of those runs in processes of its own.
STEP_FAILURES = ("block_called_twice", "blocks_return_pairs", "last_stage_fails_after_the_step",
                 "last_stage_fails_in_validation", "first_stage_fails_in_validation")


@pytest.mark.distributed
@pytest.mark.timeout(200)
@pytest.mark.parametrize("cases", [[c for c in BAD_INPUTS if c not in STEP_FAILURES], *[[c] for c in STEP_FAILURES]],
                         ids=["setup", *STEP_FAILURES])
def test_bad_input_fails_clearly_on_every_rank(cases: list[str]) -> None:
    outcomes = launch("tests._strategy_workers.bad_inputs", 2, deadline=150, cases=cases)
    for outcome in outcomes:
        errors = outcome.unwrap()
        for case in cases:
            expected = BAD_INPUTS[case]
            expected = expected[outcome.rank] if isinstance(expected, list) else expected
            kind, message = errors[case]
            if kind == OWN_ERRORS.get(case):
                expected = expected.split(": ", 1)[1]
            else:  # a rank that was waiting for a peer's value gets the peer's error relayed (a PipelineCommError,
                # itself a PipelineError) with the same message
                assert kind in ("PipelineError", "PipelineCommError"), (outcome.rank, case, kind, message)
            assert expected in message, (outcome.rank, case, kind, message)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"schedule": "zigzag"}, "unknown schedule='zigzag'"),
        ({"balance": "flops"}, "unknown balance='flops'"),
        ({"balance": [2, "x"]}, "balance=[2, 'x'] must be"),
        ({"num_microbatches": 0}, "num_microbatches=0 must be a positive integer"),
        ({"num_microbatches": "many"}, "num_microbatches='many' must be a positive integer, \"auto\""),
        ({"pipeline_parallel_size": -1}, "pipeline_parallel_size=-1 must be a positive integer"),
        ({"start_method": "spawn"}, "start_method='spawn'"),
        ({"schedule": "gpipe", "virtual_stages": 2}, "virtual_stages=2; use schedule='interleaved_1f1b'"),
        ({"memory_budget": 1e9}, "memory_budget=1000000000.0 applies to balance='time' or 'memory'"),
        ({"schedule": "zbv", "virtual_stages": 3}, "exactly two chunks on each rank; got virtual_stages=3"),
        ({"schedule": "interleaved_1f1b", "virtual_stages": 0}, "virtual_stages=0 must be a positive integer"),
        ({"freeze_gc": "yes"}, "freeze_gc='yes' must be True or False"),
        ({"early_input_grads": None}, "early_input_grads=None must be True or False"),
        ({"comm_thread": "auto"}, "comm_thread='auto' must be True, False or None (the default)"),
        ({"guard_io_threads": 1}, "guard_io_threads=1 must be True, False or None (the default)"),
        ({"cpu_transport": "tcp"}, "cpu_transport='tcp': choose one of ['auto', 'shm', 'gloo']"),
        ({"cpu_transport": "shm", "comm_thread": True}, "comm_thread=True is for gloo's transport"),
        ({"check_batches": None}, "check_batches=None must be True or False"),
        ({"microbatch_weight": 3}, "microbatch_weight=3 must be a function of a micro-batch"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(kwargs: dict[str, Any], expected: str) -> None:
    from lightning_pipe import PipelineError, PipelineStrategy

    with pytest.raises(PipelineError, match=None) as info:
        PipelineStrategy(**kwargs)
    assert expected in str(info.value)


def test_modules_are_built_on_the_host_not_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.init_module() and configure_model build the whole model in every process: on the host, since only the
    rank's stages go to its device after the cut (Lightning's strategies build on the device)."""
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_pipe import PipelineStrategy

    # A device other than the host, as a GPU would be (meta: no memory).
    monkeypatch.setattr(DDPStrategy, "root_device", property(lambda self: torch.device("meta")))
    with DDPStrategy().tensor_init_context():
        assert torch.nn.Linear(2, 2).weight.device.type == "meta"  # Lightning's: on the rank's device
    strategy = PipelineStrategy()
    assert strategy.root_device.type == "meta"
    for empty_init in (None, False, True):
        with strategy.tensor_init_context(empty_init=empty_init):
            torch.manual_seed(0)
            layer = torch.nn.Linear(64, 64)
        assert layer.weight.device.type == "cpu"
        torch.manual_seed(0)
        # Initialized as usual, or not at all with empty_init=True (the weights to be loaded).
        assert torch.equal(layer.weight, torch.nn.Linear(64, 64).weight) != bool(empty_init)


def test_shared_memory_is_for_cpu_ranks_on_gloo() -> None:
    """cpu_transport='shm' raises at set-up (on every rank: same arguments) where the pipeline runs on GPUs;
    'auto' and 'gloo' are accepted everywhere."""
    from lightning_pipe import PipelineError
    from lightning_pipe.strategy.pipeline import _check_cpu_transport

    for kind in ("auto", "gloo", "shm"):
        _check_cpu_transport(kind, "gloo", "cpu")
    for kind in ("auto", "gloo"):
        _check_cpu_transport(kind, "nccl", "cuda")
    with pytest.raises(PipelineError) as info:
        _check_cpu_transport("shm", "nccl", "cuda")
    assert "cpu_transport='shm' is for CPU ranks on gloo (this run: nccl on cuda); leave it 'auto'" in str(info.value)


def test_comm_thread_needs_gloo_on_the_cpu() -> None:
    """Checked in setup_environment, where every rank knows the backend and the device: all raise alike."""
    from lightning_pipe import PipelineError
    from lightning_pipe.strategy.pipeline import _check_comm_thread

    for comm_thread in (None, False, True):
        _check_comm_thread(comm_thread, "gloo", "cpu")
    for comm_thread in (None, False):
        _check_comm_thread(comm_thread, "nccl", "cuda")
    for backend, device in (("nccl", "cuda"), ("gloo", "cuda")):
        with pytest.raises(PipelineError) as info:
            _check_comm_thread(True, backend, device)
        assert (f"comm_thread=True needs the gloo backend on the CPU (this run: {backend} on {device}); leave "
                "comm_thread unset or set it to False") in str(info.value)


def test_registered_names() -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_pipe

    for name, schedule, v in (("pipeline", "1f1b", 1), ("pipeline_gpipe", "gpipe", 1), ("pipeline_1f1b", "1f1b", 1),
                              ("pipeline_interleaved_1f1b", "interleaved_1f1b", 2),
                              ("pipeline_zero_bubble", "zero_bubble", 1), ("pipeline_zbv", "zbv", 2)):
        assert name in StrategyRegistry
        trainer = Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
        assert isinstance(trainer.strategy, lightning_pipe.PipelineStrategy)
        assert (trainer.strategy.schedule_name, trainer.strategy.virtual_stages) == (schedule, v)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_should_stop_set_after_the_chain_stops_every_stage() -> None:
    """``self.trainer.should_stop = True`` in training_step after the loss runs on the last stage only: relayed,
    every stage stops after that step, as one device does (it hung in a collective of the next step before)."""
    outcomes = launch("tests._strategy_workers.stop_in_step", 2, deadline=90)
    assert [o.unwrap() for o in outcomes] == [(3, True), (3, True)]


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_summary_of_a_forward_without_the_chain_and_prints_of_a_failing_step(tmp_path: Any) -> None:
    """A forward that leaves the chain out (the steps run it) still trains and its summary is one device's ("?" for
    what it does not run; it failed fit on every rank). A step's prints reach rank 0 also when the step fails, and a
    print to a file of the process is written by the last stage's process, as by one device's. A prediction writer
    writes once per replica (it wrote once per stage)."""
    from tests._strategy_workers import summary_and_prints

    files = [str(tmp_path / f"rank{r}.txt") for r in range(2)]
    ours = [o.unwrap() for o in launch("tests._strategy_workers.summary_and_prints", 2, deadline=120, files=files)]
    ref = summary_and_prints(0, 1, files=[str(tmp_path / "one.txt")])
    assert ours[0]["steps"] == ours[1]["steps"] == ref["steps"] == 3
    assert ours[0]["summary"] == ref["summary"] and "?" in ref["summary"][0], ref["summary"]
    # One device: each step's print once, the failing step's too, then the error (4 micro-batches here).
    assert ref["prints"] == ["DEBUG step 0", "DEBUG step 1"] and ref["file"] == ["to file 0", "to file 1"]
    assert ours[0]["prints"] == ["DEBUG step 0"] * 4 + ["DEBUG step 1"] and ours[1]["prints"] == []
    assert ours[1]["file"] == ["to file 0"] * 4 + ["to file 1"] and ours[0]["file"] is None
    # A prediction writer writes once per replica, on its first stage, what one device writes (not once per stage).
    assert ref["predictions"] == ["batch 0: 8", "batch 1: 8", "epoch: 2 batches"]
    assert ours[0]["predictions"] == ref["predictions"] and ours[1]["predictions"] is None
    for result in ours:
        assert "failed after printing" in result["prints_error"]


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("agree", [True, False])
def test_gradient_scaler_inf_check_is_agreed_across_stages(agree: bool) -> None:
    """16-mixed: one stage overflowing must make every stage skip the step (on CPU Lightning runs 16-mixed as
    bf16 without a scaler, so the scaler hook is tested directly). Without the agreement the stages diverge."""
    outcomes = launch("tests._strategy_workers.scaler_agreement", 2, deadline=90, agree=agree)
    (params0, scale0), (params1, scale1) = (o.unwrap() for o in outcomes)
    assert params1 == [1.0, 1.0, 1.0] and scale1 == 8.0  # the overflowing stage skipped and halved its scale
    if agree:
        assert params0 == [1.0, 1.0, 1.0] and scale0 == 8.0
    else:
        assert params0 != [1.0, 1.0, 1.0] and scale0 == 16.0


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_16_mixed_with_a_gradient_scaler_matches_one_device() -> None:
    """16-mixed through Lightning's MixedPrecision plugin with a real GradScaler (on the CPU). Only the stage computing
    the loss calls scaler.scale(); the others must still unscale their gradients by the same factor (in unscale_, or
    inside a fused optimizer's step), also where they hold no trainable parameter (a frozen stage), and every stage
    must skip the same steps."""
    from tests._strategy_workers import fp16_fit

    configs: list[dict[str, Any]] = [
        {},
        # Rank 0's part is frozen under 1F1B (its optimizer sees no gradient); under zbv rank 0 computes the loss
        # and rank 1's part is frozen (blocks 1 and 2 of 4 chunks).
        {"frozen": 3, "clip": 0.05},
        {"frozen": 3, "schedule": "zbv"},
        # Overflows in the first steps: skipped on every stage alike.
        {"init_scale": 2.0**20},
        # An optimizer that unscales inside its own step: the scaler checks the flags in step(), not unscale_().
        {"optimizer": "fused_adamw", "frozen": 3},
        {"optimizer": "fused_adamw", "init_scale": 2.0**20},
    ]
    outcomes = launch("tests._strategy_workers.fp16_jobs", 2, deadline=200, configs=configs)
    results = [o.unwrap() for o in outcomes]
    for i, config in enumerate(configs):
        here = [results[rank][i] for rank in range(2)]
        assert here[0]["scales"] == here[1]["scales"], config
        # Backward runs outside autocast, as on one device (the stages' blocks record it; frozen ones do not run it).
        for rank, result in enumerate(here):
            assert not any(result["autocast_in_backward"]), (config, rank)
        if not config.get("frozen"):
            assert all(r["autocast_in_backward"] for r in here), config  # recorded on every stage
        if config.get("frozen"):
            assert [bool(r["trainable_here"]) for r in here].count(False) == 1, (config, "one stage is all frozen")
        if "init_scale" in config:
            scales = here[0]["scales"]
            assert any(b < a for a, b in zip(scales, scales[1:])) or scales[0] < config["init_scale"], scales
            continue  # where the float16 sums overflow differs from one device (a micro-batch's, not the batch's)
        ref = fp16_fit(config, devices=1, strategy="auto")
        assert here[0]["scales"] == ref["scales"], config
        for rank, result in enumerate(here):
            diff, name = max(((value - ref["params"][n]).abs().max().item(), n)
                             for n, value in result["params"].items())
            assert diff <= FP16_TOLERANCE, f"{config} rank {rank}: {name} differs by {diff:.3g}"
            assert math.isclose(result["loss"], ref["loss"], rel_tol=1e-3), config


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_gradient_scaler_on_a_frozen_stage_skips_and_rescales_with_the_others() -> None:
    """A stage with no gradient (frozen) records no inf check, so torch's GradScaler.step would raise "No inf checks
    were recorded" on that stage alone and the others would wait for it. It must take the agreed flag instead."""
    outcomes = launch("tests._strategy_workers.scaler_agreement", 2, deadline=90, agree=True, frozen_first=True)
    (params0, scale0), (params1, scale1) = (o.unwrap() for o in outcomes)
    assert (params0, scale0) == ([1.0, 1.0, 1.0], 8.0)  # skipped with the overflowing stage, scale halved alike
    assert (params1, scale1) == ([1.0, 1.0, 1.0], 8.0)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_metrics_of_every_kind_match_one_device_and_never_hang() -> None:
    """A retrieval metric (list states synced entry by entry), a metric made with sync_on_compute=False, a metric
    inside a block (computed on its stage alone), a metric syncing on step under balance='time' (whose profile runs
    on rank 0 alone), and a checkpoint of a model whose block is also an attribute outside the chain."""
    from tests._metric_workers import CASES, fit

    outcomes = launch("tests._metric_workers.pipeline_cases", 2, deadline=200, cases=list(CASES))
    results = [o.unwrap() for o in outcomes]
    for case in CASES:
        ref = fit(case, devices=1, strategy="auto")
        for rank, result in enumerate(results):
            got = result[case]
            if ref["m"] is not None:
                assert _close(got["m"], ref["m"]), (case, rank, got["m"], ref["m"])
            if case == "in_block":  # rank 0 holds blocks[0] and its metric; rank 1 holds none
                assert got["seen"] == (pytest.approx(ref["seen"], rel=1e-5) if rank == 0 else []), (rank, got)
            if case == "aliased_buffer":
                assert got["saved"]


@pytest.mark.parametrize(("kwargs", "stages"), [
    ({}, 4),
    ({"data_parallel_size": 2}, 2),  # only the replicas given: 2 pipelines of 2 stages
    ({"data_parallel_size": 4}, 1),
    ({"pipeline_parallel_size": 2, "data_parallel_size": 2}, 2),
    ({"pipeline_parallel_size": 4}, 4),
])
def test_the_number_of_stages_follows_from_what_is_given(kwargs: dict[str, Any], stages: int) -> None:
    from lightning.fabric.plugins.environments import LightningEnvironment

    from lightning_pipe import PipelineStrategy

    environment = LightningEnvironment()
    environment.set_world_size(4)
    strategy = PipelineStrategy(cluster_environment=environment, **kwargs)
    assert strategy.num_stages == stages


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_random_data_is_drawn_alike_on_every_stage() -> None:
    """DataLoader workers seeded by seed_everything(workers=True), a RandomSampler and the epochs' base seeds draw
    from a state the strategy makes the same on every stage of a pipeline, so its batch check passes."""
    outcomes = launch("tests._strategy_workers.random_data", 2, deadline=150)
    results = [o.unwrap() for o in outcomes]
    assert [steps for steps, _ in results] == [4, 4]
    # A shuffled DataLoader made anew each epoch: a new order each epoch (seeded by the epoch too), alike on both
    # stages (the batch check passed).
    firsts = results[0][1]
    assert len(firsts) == 3 and not any(torch.equal(firsts[i], firsts[j]) for i in range(3) for j in range(i))


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_a_middle_stage_failing_in_validation_leaves_the_group_in_step() -> None:
    outcomes = [o.unwrap() for o in launch("tests._strategy_workers.middle_stage_fails_in_validation", 3,
                                           deadline=150)]
    for rank, (kind, message, after) in enumerate(outcomes):
        assert "validation failed in the first block" in message, (rank, kind, message)
        assert after == 0 + 1 + 2, (rank, after)  # the next collective matched on every rank
