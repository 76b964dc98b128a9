"""Timelines, traces and pictures; optimal partitions by time and memory; chain profiling; micro-batch choice."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from PIL import Image

from lightning_pipe.errors import PipelineError
from lightning_pipe.observe import Timeline, plot_timelines, summarize_records, write_chrome_trace
from lightning_pipe.partition import optimal_partition
from lightning_pipe.schedules import build_schedule
from lightning_pipe.simulate import Costs, simulate
from lightning_pipe.tuning import (
    LinearCost, StageCostModel, choose_microbatches, greedy_partition, memory_partition, min_max_partition,
    profile_chain, time_partition,
)
from tests._helpers import assert_usage_error
from tests._observe_workers import SLEEPS, SleepBlock


def _brute_force(costs: list[float], p: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), p - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize(("costs", "p", "expected", "greedy"), [
    ([1, 1, 1, 1, 4], 2, [4, 1], [4, 1]),
    ([4, 1, 1, 1, 1, 1, 5], 3, [2, 4, 1], [1, 4, 2]),     # greedy's last stage costs 6, the optimum 5
    ([3, 3, 2, 2, 2, 6], 3, [2, 3, 1], None),
])
def test_optimal_partition_on_known_costs(costs: list[float], p: int, expected: list[int],
                                          greedy: list[int] | None) -> None:
    result = min_max_partition(len(costs), p, lambda s, j, i: sum(costs[j:i]))
    assert result.counts == expected == optimal_partition(costs, p)
    assert result.bottleneck == _brute_force(costs, p)
    if greedy is not None:
        assert greedy_partition(costs, p) == greedy
        bounds = [0, *itertools.accumulate(greedy)]
        greedy_cost = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        assert greedy_cost >= result.bottleneck
    if costs == [4, 1, 1, 1, 1, 1, 5]:
        assert greedy_cost == 6 and result.bottleneck == 5


def test_optimal_partition_matches_brute_force_on_random_costs() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 9)
        p = rng.randint(1, n)
        costs = [rng.choice([rng.random(), float(rng.randint(1, 9))]) for _ in range(n)]
        result = min_max_partition(n, p, lambda s, j, i: sum(costs[j:i]))
        assert abs(result.bottleneck - _brute_force(costs, p)) < 1e-9
        assert result.counts == min_max_partition(n, p, lambda s, j, i: sum(costs[j:i])).counts  # deterministic


def test_time_partition_counts_work_outside_the_chain() -> None:
    fwd, bwd = [1.0] * 8, [2.0] * 8
    assert time_partition(fwd, bwd, 2).counts == [4, 4]
    # A head and loss costing two blocks' worth on the last stage push blocks to the first stage.
    assert time_partition(fwd, bwd, 2, last_extra=6.0).counts == [5, 3]
    assert time_partition(fwd, bwd, 4, first_extra=3.0, last_extra=6.0).counts == [2, 2, 3, 1]


def test_memory_partition_uses_held_activations_and_budget() -> None:
    params, acts = [10.0] * 6, [100.0] * 6
    # 1F1B on 3 stages holds 3, 2, 1 micro-batches: later stages take more blocks.
    result = memory_partition(params, acts, [3, 2, 1], state_factor=3.0)
    assert result.counts == [1, 2, 3]
    assert result.bottleneck == _brute_force_stages(params, acts, [3, 2, 1])
    with pytest.raises(PipelineError, match="over the budget"):
        memory_partition(params, acts, [3, 2, 1], memory_budget=result.bottleneck - 1)
    # Time under a memory budget: the even cut by time does not fit, the best one that fits is chosen.
    mem = lambda s, j, i: sum(params[j:i]) * 4 + sum(acts[j:i]) * [3, 2, 1][s]  # noqa: E731
    assert time_partition([1.0] * 6, [2.0] * 6, 3, memory=mem, memory_budget=500).counts == [1, 2, 3]
    # No cut fits: the error names the knob and the least budget that would do (the memory-optimal cut's 480).
    with pytest.raises(PipelineError, match="fits memory_budget=479 bytes: the cut with the least memory needs 480"):
        time_partition([1.0] * 6, [2.0] * 6, 3, memory=mem, memory_budget=479)
    # A device holding two stages gives each half of its budget.
    assert time_partition([1.0] * 6, [2.0] * 6, 3, memory=mem, memory_budget=1000, stages_per_device=2).counts \
        == [1, 2, 3]
    with pytest.raises(PipelineError, match="each device holds 2 stages: each stage may use 1/2 of the budget"):
        time_partition([1.0] * 6, [2.0] * 6, 3, memory=mem, memory_budget=959, stages_per_device=2)
    memory_partition(params, acts, [3, 2, 1], memory_budget=2 * result.bottleneck, stages_per_device=2)
    with pytest.raises(PipelineError, match="each device holds 2 stages"):
        memory_partition(params, acts, [3, 2, 1], memory_budget=2 * result.bottleneck - 1, stages_per_device=2)


def test_partition_is_exact_for_tiny_costs() -> None:
    """The tie-break tolerance is relative: costs in any unit (here 1e-12) give the optimal cut."""
    costs = [c * 1e-12 for c in (0, 0, 4, 5, 0, 5, 3, 0)]
    result = min_max_partition(8, 4, lambda s, j, i: sum(costs[j:i]))
    assert abs(result.bottleneck - 5e-12) < 1e-24


def _brute_force_stages(params: list[float], acts: list[float], held: list[int]) -> float:
    n, p = len(params), len(held)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), p - 1):
        b = (0, *cuts, n)
        best = min(best, max(sum(params[b[s]:b[s + 1]]) * 4 + sum(acts[b[s]:b[s + 1]]) * held[s] for s in range(p)))
    return best


@pytest.mark.timeout(60)
def test_profile_of_sleeping_layers_gives_the_expected_time_cut() -> None:
    blocks = torch.nn.Sequential(*[SleepBlock(f, k) for f, k in SLEEPS])
    x = torch.randn(8, 8, requires_grad=True)
    prof = profile_chain(lambda: blocks(x * 1.0).sum(), list(blocks), iterations=2, samples=8)
    for (fixed, per_sample), f, b in zip(SLEEPS, prof.forward, prof.backward):
        expected = (fixed + per_sample * 8) / 1e3
        assert expected <= f <= expected + 3e-3, (f, expected)
        assert 2 * expected <= b <= 2 * expected + 4e-3, (b, expected)
    assert prof.param_bytes == [32] * 4
    assert time_partition(prof.forward, prof.backward, 2).counts == [3, 1]


@pytest.mark.timeout(60)
def test_frozen_first_blocks_have_no_backward_and_the_first_trainable_block_its_own() -> None:
    """Fine-tuning with the input and the first blocks frozen: no gradient reaches their outputs. Block 0 was
    charged the whole backward and block 2 (the first trainable one) none, so the time cut put too much on the
    stage of the trainable blocks."""
    blocks = torch.nn.Sequential(*[SleepBlock(f, k) for f, k in SLEEPS])
    for block in blocks[:2]:
        block.requires_grad_(False)
    x = torch.randn(8, 8)
    prof = profile_chain(lambda: blocks(x * 1.0).sum(), list(blocks), iterations=2, samples=8)
    assert prof.backward[:2] == [0.0, 0.0]
    for (fixed, per_sample), b in zip(SLEEPS[2:], prof.backward[2:]):
        expected = 2 * (fixed + per_sample * 8) / 1e3
        assert expected <= b <= expected + 4e-3, (prof.backward, expected)
    assert prof.pre_backward == 0.0


def test_auto_microbatches_picks_the_cost_model_optimum() -> None:
    # Stages sleeping c + k*b per forward (2x backward): 1F1B's step is about 3 (m+p-1)(c + kB/m), smallest at
    # m = sqrt(kB(p-1)/c). With p = 4, c = 2 ms, k*B = 24 ms: m* = 6 -> among powers of two, 8 (not 4 or 16).
    f, b = LinearCost(0.002, 0.024 / 64), LinearCost(0.004, 0.048 / 64)
    model = StageCostModel((f,) * 4, (b,) * 4)
    result = choose_microbatches(model, 64, num_ranks=4, schedules=["1f1b", "gpipe"], candidates=[1, 2, 4, 8, 16, 32])
    assert (result.chosen.schedule, result.chosen.microbatches) == ("1f1b", 8)
    formula = {m: 3 * (m + 3) * (2 + 24 / m) for m in (1, 2, 4, 8, 16, 32)}
    for c in result.candidates:
        assert abs(c.step_time * 1e3 - formula[c.microbatches]) < 1e-6
    assert min(formula, key=formula.get) == 8
    # Bubble falls as m grows; GPipe holds m micro-batches, 1F1B at most p.
    bubbles = [c.bubble for c in result.candidates if c.schedule == "1f1b"]
    assert bubbles == sorted(bubbles, reverse=True)
    assert max(c.peak_activations for c in result.candidates if c.schedule == "1f1b") == 4
    table = result.table()
    assert "chosen: schedule='1f1b', num_microbatches=8" in table
    # A per-action overhead pushes the choice to fewer micro-batches.
    assert choose_microbatches(model, 64, num_ranks=4, overhead=0.01).chosen.microbatches < 8


def test_timeline_trace_and_png(tmp_path) -> None:
    result = simulate(build_schedule("1f1b", num_ranks=4, num_microbatches=8), Costs(1e-3, 2e-3, transfer=1e-4))
    planned = Timeline.from_simulation(result)
    assert planned.bubble_fraction == pytest.approx(result.bubble_fraction)
    assert planned.step_time == pytest.approx(result.step_time)
    summary = summarize_records([(min(s), max(e), sum(b - a for a, b in zip(s, e)))
                                 for s, e in zip(result.start, result.end)])
    assert summary.bubble_fraction == pytest.approx(result.bubble_fraction)
    trace = json.loads(write_chrome_trace(planned, tmp_path / "t.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == 4 * 2 * 8 and {e["tid"] for e in spans} == {0, 1, 2, 3}
    png = plot_timelines([planned, planned], tmp_path / "t.png")
    image = Image.open(png)
    assert image.format == "PNG" and image.text["lightning_pipe.rows"] == "4,4"


def test_tuning_cli_prints_candidates(capsys) -> None:
    from lightning_pipe.tune import main  # the public name; the work lives in lightning_pipe.tuning

    assert main(["--stages", "2", "--batch-size", "16", "--schedules", "gpipe", "1f1b"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 12 and "chosen:" in out
    # With early input gradients the predictions change: W leaves the previous stage's wait, but is an action of
    # its own, charged the per-action overhead once more.
    assert main(["--stages", "2", "--batch-size", "16", "--schedules", "gpipe", "1f1b", "--early-input-grads"]) == 0
    early = capsys.readouterr().out
    assert early != out and "chosen:" in early


def test_auto_microbatches_across_schedules_with_virtual_stages() -> None:
    """Per-rank costs are spread over the chunks of interleaved and V schedules; split schedules charge half of each
    backward to W. With sleeping stages (tF = 10 ms, backward 20 ms) at p = 4, m = 16, the predictions are the
    simulator's ideals: 1F1B 570 ms, interleaved 525, ZB-H1 510, ZBV 495; ZBV is chosen."""
    f, b = LinearCost(0.010, 0.0), LinearCost(0.020, 0.0)
    model = StageCostModel((f,) * 4, (b,) * 4)
    result = choose_microbatches(model, 64, num_ranks=4, schedules=["1f1b", "interleaved_1f1b", "zero_bubble", "zbv"],
                                 candidates=[16])
    steps = {c.schedule: round(c.step_time * 1e3, 6) for c in result.candidates}
    assert steps == {"1f1b": 570, "interleaved_1f1b": 525, "zero_bubble": 510, "zbv": 495}
    assert result.chosen.schedule == "zbv"
    # early_input_grads: the same schedules with W right after each B (the zero-bubble ones split already), so
    # 1F1B is 570 - (p-1) tW = 540 and interleaved 525 - (p-1) tW/v = 510.
    early = choose_microbatches(model, 64, num_ranks=4, schedules=["1f1b", "interleaved_1f1b", "zero_bubble", "zbv"],
                                candidates=[16], early_input_grads=True)
    assert {c.schedule: round(c.step_time * 1e3, 6) for c in early.candidates} == {
        "1f1b": 540, "interleaved_1f1b": 510, "zero_bubble": 510, "zbv": 495}
    with pytest.raises(ValueError, match="do not divide"):
        StageCostModel((f,) * 3, (b,) * 3).spread(8)


def test_per_rank_costs_go_to_the_stages_each_rank_holds() -> None:
    """Uneven ranks (rank 0 ten times rank 1): under interleaving and zbv a rank's chunks are not adjacent stages,
    so each stage takes its rank's cost. Rank 0's busy time is its whole work (120 at m = 4), as under 1F1B."""
    from lightning_pipe.schedules import build_schedule
    from lightning_pipe.simulate import simulate

    model = StageCostModel.constant([10.0, 1.0], [20.0, 2.0])
    for name in ("1f1b", "interleaved_1f1b", "zbv"):
        schedule = build_schedule(name, num_ranks=2, num_microbatches=4)
        costs = model.spread(schedule.num_stages, schedule.stage_to_rank).costs(1)
        busy = simulate(schedule, costs).busy
        assert [round(b, 9) for b in busy] == [120.0, 12.0], (name, busy)


def test_auto_microbatches_on_ranks_sharing_cores() -> None:
    """4 ranks on 1 core: the core is never idle, so the step is the total work plus the per-action overhead, and the
    best m is the fewest actions, not the smallest bubble; with a core per rank the usual optimum (8) stands."""
    f, b = LinearCost(0.002, 0.024 / 64), LinearCost(0.004, 0.048 / 64)
    model = StageCostModel((f,) * 4, (b,) * 4)
    alone = choose_microbatches(model, 64, num_ranks=4, candidates=[1, 2, 4, 8, 16], cores=4)
    shared = choose_microbatches(model, 64, num_ranks=4, candidates=[1, 2, 4, 8, 16], cores=1)
    assert alone.chosen.microbatches == 8 and shared.chosen.microbatches == 1
    for c in shared.candidates:  # total work: 4 ranks x m x (F + B) of 64/m samples each
        m = c.microbatches
        assert c.step_time == pytest.approx(4 * m * 3 * (0.002 + 0.024 / m))
    from lightning_pipe.tune import main

    assert main(["--stages", "4", "--batch-size", "16", "--cores", "2", "--microbatches", "2", "4"]) == 0


def test_strategy_models_shared_cores_only_on_an_oversubscribed_cpu_host(monkeypatch) -> None:
    import os
    import types

    from lightning_pipe.strategy.profiling import _shared_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cpu = torch.device("cpu")
    strategy = types.SimpleNamespace

    assert _shared_cores(strategy(num_processes=2, num_stages=2), cpu) is None  # a core per rank
    assert _shared_cores(strategy(num_processes=4, num_stages=4), cpu) == 2.0
    assert _shared_cores(strategy(num_processes=8, num_stages=4), cpu) == 1.0  # two pipelines share the 2 cores
    assert _shared_cores(strategy(num_processes=4, num_stages=4), torch.device("meta")) is None  # not a CPU


def test_split_schedules_pay_the_overhead_for_b_and_for_w() -> None:
    """With no compute at all, a step costs the overhead of the actions on the critical path: a split schedule
    runs 3 actions per micro-batch on a rank where 1F1B runs 2, so it must not be predicted faster."""
    zero = LinearCost(0.0, 0.0)
    model = StageCostModel((zero,) * 2, (zero,) * 2)
    result = choose_microbatches(model, 8, num_ranks=2, schedules=["1f1b", "zero_bubble"], candidates=[4],
                                 overhead=1e-3)
    steps = {c.schedule: c.step_time for c in result.candidates}
    assert steps["zero_bubble"] >= 12e-3 - 1e-12  # 4 x (F + B + W) on one rank at least
    assert steps["zero_bubble"] > steps["1f1b"] and result.chosen.schedule == "1f1b"


def test_tuning_and_simulate_command_lines_refuse_what_they_cannot_do(capsys) -> None:
    from lightning_pipe.simulate import main as simulate_main
    from lightning_pipe.tune import main

    for argv, words in ((["--schedules", "1f1b", "zerobubble"], "unknown schedule(s) ['zerobubble']"),
                        (["--batch-size", "8", "--microbatches", "16", "3", "0"], "--microbatches [16, 0]"),
                        (["--stages", "0"], "--stages (0)")):
        with pytest.raises(SystemExit):
            main(argv)
        assert words in capsys.readouterr().err
    assert main(["--batch-size", "8", "--microbatches", "4", "4"]) == 0  # duplicates: one row
    assert capsys.readouterr().out.count("* ") == 1
    for argv, words in ((["--schedule", "zero_bubble", "--backward", "2", "--weight", "3"], "cannot exceed"),
                        (["--forward", "-1"], "--forward must be non-negative")):
        with pytest.raises(SystemExit):
            simulate_main(argv)
        assert words in capsys.readouterr().err


def test_measured_timeline_starts_at_the_first_wait() -> None:
    """A rank may wait for its input before any rank computes: the trace's times stay non-negative."""
    from lightning_pipe.observe.trace import chrome_trace

    packed = [[("F", 0, 0, 1.0, 1.0, 2.0, 0.0)], [("F", 0, 1, 0.5, 2.1, 3.0, 0.0)]]  # rank 1 ready at 0.5
    timeline = Timeline.from_packed(packed)
    events = [e for e in chrome_trace(timeline)["traceEvents"] if e["ph"] == "X"]
    assert min(e["ts"] for e in events) == 0.0 and all(e["dur"] >= 0 for e in events)
    assert timeline.step_time == pytest.approx(2.0)


@pytest.mark.parametrize(("args", "message"), [
    (["--cores", "0"], "--cores=0.0 must be a positive number of cores"),
    (["--microbatches"], "--microbatches needs at least one value"),
    (["--overhead-ms", "-1"], "--overhead-ms=-1.0 must be a finite number >= 0"),
    (["--forward-fixed-ms", "nan"], "--forward-fixed-ms=nan must be a finite number >= 0"),
])
def test_tune_command_line_bad_values_are_usage_errors(args: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_pipe.tune import main

    assert_usage_error(main, args, message, capsys)


def test_peak_activations_count_micro_batches_whatever_the_chunks() -> None:
    """zbv holds 2p half-stage chunks at its peak: p micro-batches' activations, as 1F1B. A cap of p keeps it."""
    model = StageCostModel.constant([0.01, 0.01], [0.02, 0.02])
    result = choose_microbatches(model, 16, num_ranks=2, schedules=["1f1b", "zbv", "interleaved_1f1b"],
                                 candidates=[4], max_activations=2)
    peaks = {c.schedule: c.peak_activations for c in result.candidates}
    assert peaks == {"1f1b": 2, "zbv": 2, "interleaved_1f1b": 2.5}
    assert result.chosen.schedule in ("1f1b", "zbv")  # interleaved is over the cap
    assert "interleaved_1f1b" not in {c.schedule for c in result.candidates if c.peak_activations <= 2}


def test_tokens_are_integer_sequences_not_labels() -> None:
    from lightning_pipe.strategy.metrics import tokens_in

    ids, labels = torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long)
    assert tokens_in((torch.randn(4, 3, 8, 8), labels)) is None  # images with (batch, 1) labels: no tokens
    assert tokens_in((labels, ids)) == 64  # the labels are skipped for the token ids after them
    assert tokens_in({"input_ids": ids}) == 64
    assert tokens_in((torch.zeros(4, 16, dtype=torch.bool), torch.randn(4, 16))) is None  # a mask, floats
