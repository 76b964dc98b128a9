"""Trainer(strategy=PipelineStrategy(...)) against Trainer(devices=1) on the same GPT-style module.

Each launch runs several fits in the same processes (torchrun style); the references run in this process.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from typing import Any

import pytest
import torch

from tests._launch import launch

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-5
# bf16-mixed: matmuls run in bfloat16 (8 significant bits, relative rounding 2**-8 = 0.4%); micro-batches change
# the shapes, hence the rounding, of every matmul, and AdamW (lr 1e-2) turns a gradient's rounding into at most one
# step of size lr in the first steps. After 4 steps the weights may therefore differ by a few lr; 0.05 = 5 lr.
BF16_TOLERANCE = 5e-2
# 64-true: float64 all along, so only rounding at 1e-16 is left (measured 3e-17).
FP64_TOLERANCE = 1e-13


@functools.lru_cache(maxsize=None)
def _reference(config_json: str) -> dict[str, Any]:
    from tests._strategy_workers import reference

    return reference(json.loads(config_json))


def reference(config: dict[str, Any]) -> dict[str, Any]:
    """The single-device run of ``config`` (pipeline-only settings dropped), cached for the session."""
    pipeline_only = ("schedule", "pp", "microbatches", "balance", "virtual_stages", "freeze_gc", "comm_thread",
                     "guard_io_threads", "early_input_grads", "cpu_transport")
    return _reference(json.dumps({k: v for k, v in config.items() if k not in pipeline_only}, sort_keys=True))


def max_param_diff(result: dict[str, Any], ref: dict[str, Any]) -> tuple[float, str]:
    worst = (0.0, "")
    for name, value in result["params"].items():
        diff = (value - ref["params"][name]).abs().max().item()
        worst = max(worst, (diff, name))
    return worst


def _configs(world_size: int) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = []
    for body in ("sequential", "modulelist"):
        for schedule in ("gpipe", "1f1b"):
            configs.append({"body": body, "schedule": schedule})
    configs += [
        {"body": "modulelist", "schedule": "1f1b", "accumulate": 2, "steps": 3},
        # Each input gradient sent before the weight gradients are computed (W right after B).
        {"body": "sequential", "schedule": "gpipe", "accumulate": 2, "steps": 3, "early_input_grads": True},
        {"body": "sequential", "schedule": "1f1b", "clip": 0.05, "early_input_grads": True, "tie_blocks": True},
        {"body": "modulelist", "schedule": "gpipe", "clip": 0.05, "accumulate": 2, "steps": 3},
        {"body": "modulelist", "schedule": "1f1b", "clip": 0.002, "clip_algorithm": "value"},
        # 42 samples in batches of 8: the last batch (2 samples) is smaller than num_microbatches.
        {"body": "sequential", "schedule": "1f1b", "n": 42, "steps": 6, "microbatches": 3},
        {"body": "modulelist", "schedule": "gpipe", "tie_blocks": True, "scheduler": True, "clip": 0.05},
        # Virtual stages and split backwards (8 blocks: up to 4 ranks x 2 chunks). Under zbv the loss is computed
        # on rank 0, under the others on the last rank; every rank must show it.
        {"body": "modulelist", "schedule": "interleaved_1f1b", "n_layer": 8, "tie_blocks": True, "clip": 0.05,
         "optimizer": "sgd"},
        {"body": "sequential", "schedule": "zero_bubble", "clip": 0.05, "tie_blocks": True},
        # A schedule of our own, registered by name (tests/_schedules.py).
        {"body": "modulelist", "schedule": "eager_1f1b", "clip": 0.05, "tie_blocks": True, "microbatches": 5},
        # SGD where there are 8 blocks: with clipping, AdamW turns rounding-level differences of a few near-zero
        # gradients into up to 1.2e-5 under every schedule, 1F1B included (with SGD: 1.5e-8).
        {"body": "modulelist", "schedule": "zero_bubble", "virtual_stages": 2, "n_layer": 8, "clip": 0.05,
         "accumulate": 2, "steps": 3, "optimizer": "sgd"},
        # cpu_transport="gloo": the process group's send/recv instead of shared memory (the default here).
        {"body": "sequential", "schedule": "zbv", "n_layer": 8, "tie_blocks": True, "clip": 0.05, "optimizer": "sgd",
         "cpu_transport": "gloo"},
        {"body": "modulelist", "schedule": "zbv", "n_layer": 8, "n": 42, "steps": 6, "microbatches": 3},
        # A loss that is a mean over the target tokens left after ignore_index (their count differs between
        # micro-batches), the micro-batches weighed by that count.
        {"body": "modulelist", "schedule": "1f1b", "ignore_low_targets": True, "token_weights": True, "clip": 0.05},
        # The garbage collector left alone; the transport's poster thread forced on, gloo's I/O threads unguarded.
        {"body": "sequential", "schedule": "1f1b", "freeze_gc": False, "comm_thread": True,
         "guard_io_threads": False},
    ]
    if world_size == 2:
        configs.append({"body": "modulelist", "schedule": "1f1b", "precision": "bf16-mixed"})
        # float64: the global norm for clipping must be float64 too (in float32 it was 4.7e-10 off).
        configs.append({"body": "modulelist", "schedule": "1f1b", "precision": "64-true", "clip": 0.05,
                        "optimizer": "sgd"})
        # Profiled cuts and the micro-batch choice with virtual stages: decided on rank 0 for p x v pieces.
        configs += [
            {"body": "modulelist", "schedule": "zbv", "n_layer": 8, "balance": "time", "microbatches": "auto",
             "optimizer": "sgd"},
            {"body": "sequential", "schedule": "interleaved_1f1b", "n_layer": 8, "balance": "memory",
             "optimizer": "sgd"},
        ]
    return configs


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world_size", [2, 4])
def test_pipeline_matches_one_device(world_size: int) -> None:
    configs = _configs(world_size)
    outcomes = launch("tests._strategy_workers.pipeline_jobs", world_size, deadline=360, configs=configs)
    results = [o.unwrap() for o in outcomes]
    report = []
    for i, config in enumerate(configs):
        ref = reference(config)
        tolerance = {"bf16-mixed": BF16_TOLERANCE, "64-true": FP64_TOLERANCE}.get(config.get("precision", ""),
                                                                                 TOLERANCE)
        held: set[str] = set()
        for rank in range(world_size):
            result = results[rank][i]
            held |= set(result["params"])
            diff, name = max_param_diff(result, ref)
            report.append((world_size, config, rank, diff))
            assert diff <= tolerance, f"{config} rank {rank}: {name} differs by {diff:.3g}"
            # The loss shown everywhere is the single-device one.
            assert math.isclose(result["metrics"]["train_loss"], ref["metrics"]["train_loss"], rel_tol=1e-5,
                                abs_tol=tolerance)
        assert held == set(ref["params"]), "every parameter lives on some stage, under its full name"
        # A buffer counted after the chain: right on the rank of the last stage (the profiling of balance="time"
        # runs training_step on rank 0, the last stage's rank under zbv, and must leave no trace).
        last = 0 if config["schedule"] == "zbv" else world_size - 1
        assert torch.equal(results[last][i]["buffers"]["seen_tokens"], ref["buffers"]["seen_tokens"]), config
        # Counted before the chain: once per micro-batch on every rank, also on a rank holding several stages (that
        # runs the code before the chain once per stage), and a metric updated there is counted once as well.
        for rank in range(world_size):
            assert results[rank][i]["metrics"]["input_sum"] == ref["metrics"]["input_sum"] > 0, config
            assert torch.equal(results[rank][i]["buffers"]["seen_inputs"], ref["buffers"]["seen_inputs"]), config
        # freeze_gc (default True): the objects of the run are frozen out of garbage collections while it trains,
        # and thawed when the Trainer is done; with freeze_gc=False nothing is frozen.
        for rank in range(world_size):
            during, after = results[rank][i]["frozen_during"], results[rank][i]["frozen_after"]
            assert len(during) == config.get("steps", 4) * config.get("accumulate", 1) and after == 0, (config, after)
            assert all(c > 0 for c in during) if config.get("freeze_gc", True) else not any(during), (config, during)
        # By default (cpu_transport="auto") the ranks of one host pass values through shared memory; gloo's
        # transport with cpu_transport="gloo" or comm_thread=True. Over gloo: comm_thread=True makes every step's
        # sends and receive posts on the poster thread; guard_io_threads=False: no guard. The defaults guard the I/O
        # threads on Linux (the poster is chosen step by step: not checked here).
        gloo = config.get("comm_thread") or config.get("cpu_transport") == "gloo"
        for rank in range(world_size):
            seen = results[rank][i]["transport"]
            assert len(seen) == config.get("steps", 4) * config.get("accumulate", 1), (config, seen)
            assert all(kind == ("Transport" if gloo else "ShmTransport") for _, _, kind in seen), (config, seen)
            if config.get("comm_thread"):
                assert all(background for background, _, _ in seen), (config, seen)
            if gloo:
                guarded = config.get("guard_io_threads", sys.platform.startswith("linux"))
                assert all(active == guarded for _, active, _ in seen), (config, seen)
        # W actions: under the zero-bubble schedules, and under the others with early_input_grads=True.
        split = config["schedule"] in ("zero_bubble", "zbv") or config.get("early_input_grads", False)
        assert all(results[r][i]["split"] == [split] * len(results[r][i]["transport"]) for r in range(world_size))
        # Each rank holds only its own blocks (one contiguous run per stage); together they hold each block once.
        chain = "blocks." if config["body"] == "sequential" else "layers."
        owned = [sorted({int(n[len(chain):].split(".")[0]) for n in results[r][i]["params"] if n.startswith(chain)})
                 for r in range(world_size)]
        flat = [b for blocks in owned for b in blocks]
        assert sorted(flat) == list(range(config.get("n_layer", 4))), owned
        if config["schedule"] in ("gpipe", "1f1b", "eager_1f1b") or (config["schedule"] == "zero_bubble"
                                                        and config.get("virtual_stages", 1) == 1):
            assert flat == sorted(flat), owned
        else:
            assert len(owned[0]) and owned[0][-1] > owned[1][0], f"rank 0 holds no later chunk: {owned}"
    print("\n".join(f"pp={w} {c} rank {r}: max |diff| {d:.2e}" for w, c, r, d in report))


@pytest.mark.timeout(240)
def test_code_before_the_chain_reads_as_under_1f1b_with_virtual_stages() -> None:
    """The model reads a counter that its step bumps before the chain (per micro-batch, so not comparable with one
    device). A rank holding several stages runs that code once per stage; each stage must read and bump its own
    copy, as a rank holding one stage does under 1F1B, and the counter must end once per micro-batch."""
    base = {"body": "modulelist", "n_layer": 8, "optimizer": "sgd", "reads_counter": True, "microbatches": 4}
    configs = [dict(base, schedule=s) for s in ("1f1b", "interleaved_1f1b", "zbv")]
    configs.append(dict(base, schedule="zero_bubble", virtual_stages=2))
    outcomes = launch("tests._strategy_workers.pipeline_jobs", 2, deadline=200, configs=configs)
    results = [o.unwrap() for o in outcomes]
    held = [{n: p for rank in range(2) for n, p in results[rank][i]["params"].items()} for i in range(len(configs))]
    for i, config in enumerate(configs[1:], start=1):
        worst = max((held[i][n] - p).abs().max().item() for n, p in held[0].items())
        assert worst <= TOLERANCE, f"{config['schedule']}: differs from 1f1b by {worst:.3g}"
        for rank in range(2):
            assert torch.equal(results[rank][i]["buffers"]["seen_inputs"], results[0][0]["buffers"]["seen_inputs"])
    # The counter acts: the same run without reading it ends elsewhere.
    unread = reference({k: v for k, v in base.items() if k != "reads_counter"})
    assert max((unread["params"][n] - p).abs().max().item() for n, p in held[0].items()) > 1e-4


@pytest.mark.timeout(200)
def test_clipping_acts_in_the_configs_above() -> None:
    """The clip values used above change training on one device (so the equality above tests clipping)."""
    for config in ({"body": "sequential", "clip": 0.05},
                   {"body": "modulelist", "clip": 0.002, "clip_algorithm": "value"}):
        unclipped = {k: v for k, v in config.items() if not k.startswith("clip")}
        assert max_param_diff(reference(config), reference(unclipped))[0] > 1e-3
