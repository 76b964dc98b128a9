"""Interleaved 1F1B, ZB-H1 and ZBV as data: every action once on its rank, no deadlock, published bubbles."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_pipe.errors import ScheduleError
from lightning_pipe.schedules import (
    DEFAULT_VIRTUAL_STAGES,
    BUILTIN_SCHEDULES,
    SCHEDULES,
    Action,
    B,
    F,
    Schedule,
    W,
    build_schedule,
    interleaved_1f1b,
    one_f_one_b,
    stage_to_rank,
    validate_schedule,
    zbv,
    zero_bubble,
)
from lightning_pipe.simulate import Costs, simulate

from tests._helpers import PROPERTY, microbatches, stages
from tests.test_schedules import dependencies, topological_order

NEW = ["interleaved_1f1b", "zero_bubble", "zbv"]
virtual = st.integers(min_value=1, max_value=4)


def make(name: str, p: int, m: int, v: int) -> Schedule:
    return build_schedule(name, num_ranks=p, num_microbatches=m, virtual_stages=2 if name == "zbv" else v)


def uniform(schedule: Schedule, p: int) -> Costs:
    """tF = tB(input) = tW = 1 per whole stage, divided among a rank's chunks (the papers' cost model)."""
    v = schedule.num_stages // p
    return Costs(forward=1 / v, backward=2 / v, weight=1 / v if schedule.split_backward else 0.0)


@PROPERTY
@given(name=st.sampled_from(NEW), p=stages, m=microbatches, v=virtual)
def test_each_action_once_on_its_rank_in_dependency_order(name: str, p: int, m: int, v: int) -> None:
    schedule = make(name, p, m, v)
    v = schedule.num_stages // p
    assert schedule.num_ranks == p and schedule.num_microbatches == m
    assert schedule.stage_to_rank == stage_to_rank(name, num_ranks=p, virtual_stages=v)
    counts: Counter[Action] = Counter()
    for rank, acts in enumerate(schedule.actions):
        for action in acts:
            assert schedule.stage_to_rank[action.stage] == rank
            counts[action] += 1
    split = name != "interleaved_1f1b"
    kinds = (F, B, W) if split else (F, B)
    assert dict(counts) == {k(mb, s): 1 for s in range(p * v) for mb in range(m) for k in kinds}
    assert schedule.split_backward is split
    validate_schedule(schedule)  # includes a simulation: no deadlock
    order = topological_order(schedule)
    assert len(order) == sum(counts.values())
    position = {a: i for i, a in enumerate(order)}
    for action in order:
        for dep in dependencies(action, p * v):
            assert position[dep] < position[action]
    # Every value sent once and received once (per pair the orders may differ: the exact protocol copes).
    sent = sorted((t.key, t.src_rank, t.dst_rank) for r in range(p) for _, t in schedule.sends(r))
    received = sorted((t.key, t.src_rank, t.dst_rank) for r in range(p) for _, t in schedule.receives(r))
    assert sent == received and len(set(sent)) == len(sent)


@pytest.mark.parametrize("name", NEW)
def test_every_size_runs_without_deadlock(name: str) -> None:
    """The whole grid the issue names, not a sample: p in 1..8, m in 1..32, v in 1..4."""
    for p in range(1, 9):
        for v in ([2] if name == "zbv" else range(1, 5)):
            for m in range(1, 33):
                simulate(make(name, p, m, v), Costs())


def published_step(name: str, p: int, m: int, v: int) -> float:
    """Step time of each schedule's paper under tF = tB = tW = 1 per stage (B of a 1F1B = tB + tW = 2)."""
    if name == "interleaved_1f1b":  # Narayanan et al. 2021: bubble (p - 1) / v of (tF + tB + tW)
        return 3 * (m + (p - 1) / v)
    if name == "zero_bubble":  # Qi et al. 2024, ZB-H1: bubble (p - 1)(tF + tB - tW), v-fold less interleaved
        return 3 * m + (p - 1) / v
    return 3 * m + (p - 1) / 2  # ZBV: only the first forward's way down the V (half-stage chunks) is idle


@PROPERTY
@given(name=st.sampled_from(NEW), p=stages, m=microbatches, v=virtual)
def test_bubble_matches_the_published_formula(name: str, p: int, m: int, v: int) -> None:
    schedule = make(name, p, m, v)
    v = schedule.num_stages // p
    result = simulate(schedule, uniform(schedule, p))
    full = m >= (2 * p if name == "zbv" else p)  # the formulas assume a full pipeline
    expected = published_step(name, p, m, v)
    if full:
        assert result.step_time == pytest.approx(expected)
        bubble = 1 - 3 * m / expected
        assert result.bubble_fraction == pytest.approx((bubble,) * p)
    else:
        # Fewer micro-batches than the pipeline is deep: a longer step than the formula, never shorter, and still
        # never longer than 1F1B's.
        assert result.step_time >= expected - 1e-9
        assert result.step_time <= simulate(one_f_one_b(p, m), Costs(1, 2)).step_time + 1e-9


@PROPERTY
@given(p=stages, m=microbatches, v=virtual)
def test_peak_activations(p: int, m: int, v: int) -> None:
    # ZB-H1 holds what 1F1B holds at its peak (p micro-batches, on rank 0), though each W comes later.
    zb = simulate(zero_bubble(p, m), uniform(zero_bubble(p, m), p)).peak_activations
    assert max(zb) == min(p, m) and all(x <= p for x in zb)
    # ZBV: at most 2p half-stage chunks on any rank, the same memory as 1F1B's p whole stages.
    assert max(simulate(zbv(p, m), Costs()).peak_activations) <= 2 * p
    # Interleaved: warm-up of a round of the earlier chunks plus twice the depth below, then one more.
    schedule = interleaved_1f1b(p, m, v)
    rounds = max(1, m // p)
    round_size = -(-m // rounds)
    peak = simulate(schedule, Costs()).peak_activations
    for r in range(p):
        bound = min((v - 1) * round_size + (2 if v > 1 else 1) * (p - 1 - r) + 1, m * v)
        assert peak[r] <= bound


def test_the_issue_figures() -> None:
    """p = 4, m = 16, tF = 10 ms, tB = 20 ms split evenly into B and W: 1F1B 570, ZB-H1 510, ZBV 495 ms."""
    times = {}
    for name in ["1f1b", "interleaved_1f1b", "zero_bubble", "zbv"]:
        schedule = build_schedule(name, num_ranks=4, num_microbatches=16)
        v = schedule.num_stages // 4
        times[name] = simulate(schedule, Costs(10 / v, 20 / v, 10 / v)).step_time
    assert times == pytest.approx({"1f1b": 570, "interleaved_1f1b": 525, "zero_bubble": 510, "zbv": 495})


def test_layouts() -> None:
    assert zbv(2, 3).stage_to_rank == (0, 1, 1, 0)
    assert interleaved_1f1b(2, 4, 3).stage_to_rank == (0, 1, 0, 1, 0, 1)
    # ZB-H1: rank 0 runs each W right after its B; rank r lets its Ws lag r slots (they fill its cool-down).
    assert zero_bubble(3, 4).actions[0][:5] == (F(0, 0), F(1, 0), F(2, 0), B(0, 0), W(0, 0))
    assert zero_bubble(3, 4).actions[2][:7] == (F(0, 2), B(0, 2), F(1, 2), B(1, 2), F(2, 2), B(2, 2), W(0, 2))
    # v = 1 interleaving is plain 1F1B.
    assert interleaved_1f1b(3, 5, 1).actions == one_f_one_b(3, 5).actions
    # Megatron's order: a round of p micro-batches on chunk 0, then on chunk 1.
    assert [str(a) for a in interleaved_1f1b(2, 2, 2).actions[0][:4]] == ["F0@s0", "F1@s0", "F0@s2", "F1@s2"]


def test_registry_and_errors() -> None:
    # Built in (other tests register schedules of their own beside them: test_register_schedule.py).
    assert BUILTIN_SCHEDULES == {"gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv"} <= set(SCHEDULES)
    assert {k: DEFAULT_VIRTUAL_STAGES[k] for k in BUILTIN_SCHEDULES} == {
        "gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zero_bubble": 1, "zbv": 2}
    assert build_schedule("ZBV", num_ranks=2, num_microbatches=3) == zbv(2, 3)
    assert build_schedule("interleaved_1f1b", num_ranks=2, num_microbatches=3).num_stages == 4
    with pytest.raises(ScheduleError, match="virtual_stages=2.*interleaved_1f1b"):
        build_schedule("1f1b", num_ranks=2, num_microbatches=3, virtual_stages=2)
    with pytest.raises(ScheduleError, match="virtual_stages=3: leave it unset or set it to 2"):
        build_schedule("zbv", num_ranks=2, num_microbatches=3, virtual_stages=3)
    with pytest.raises(ScheduleError, match="virtual_stages=0"):
        stage_to_rank("zero_bubble", num_ranks=2, virtual_stages=0)
    with pytest.raises(ScheduleError, match="unknown schedule='zb'"):
        stage_to_rank("zb", num_ranks=2)
