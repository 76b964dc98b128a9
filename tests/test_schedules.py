"""Schedules as data: generators, validation, and the transfers a schedule implies."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from hypothesis import given

from lightning_pipe.errors import ScheduleDeadlockError, ScheduleError
from lightning_pipe.schedules import (
    SCHEDULES,
    Action,
    ActionKind,
    B,
    F,
    Schedule,
    Transfer,
    build_schedule,
    gpipe,
    one_f_one_b,
    validate_schedule,
)
from lightning_pipe.simulate import Costs, simulate

from tests._helpers import GENERATORS, PROPERTY, Generator, generators, microbatches, stages


# --------------------------------------------------------------------------------------------------------------
# Helpers, independent of the simulator.


def dependencies(action: Action, num_stages: int) -> list[Action]:
    """The actions whose outputs ``action`` consumes."""
    mb, s = action.microbatch, action.stage
    if action.kind is ActionKind.FORWARD:
        return [F(mb, s - 1)] if s > 0 else []
    if action.kind is ActionKind.BACKWARD:
        return [F(mb, s)] + ([B(mb, s + 1)] if s < num_stages - 1 else [])
    return [B(mb, s)]


def topological_order(schedule: Schedule) -> list[Action]:
    """Run the ranks' queues in any order that respects data dependencies; stop when no rank can move."""
    done: set[Action] = set()
    order: list[Action] = []
    ptr = [0] * schedule.num_ranks
    progress = True
    while progress:
        progress = False
        for rank, acts in enumerate(schedule.actions):
            while ptr[rank] < len(acts):
                action = acts[ptr[rank]]
                if not all(dep in done for dep in dependencies(action, schedule.num_stages)):
                    break
                done.add(action)
                order.append(action)
                ptr[rank] += 1
                progress = True
    return order


def leading_forwards(acts: tuple[Action, ...]) -> int:
    """How many forwards a rank runs before its first backward."""
    n = 0
    for action in acts:
        if action.kind is not ActionKind.FORWARD:
            break
        n += 1
    return n


def v_schedule(num_microbatches: int) -> Schedule:
    """A GPipe-like V: 4 stages on 2 ranks, rank 0 holds stages 0 and 3, rank 1 holds stages 1 and 2."""
    m = range(num_microbatches)
    rank0 = [F(i, 0) for i in m] + [F(i, 3) for i in m] + [B(i, 3) for i in m] + [B(i, 0) for i in m]
    rank1 = [F(i, 1) for i in m] + [F(i, 2) for i in m] + [B(i, 2) for i in m] + [B(i, 1) for i in m]
    return Schedule("v-gpipe", 4, num_microbatches, (0, 1, 1, 0), (tuple(rank0), tuple(rank1)))


def two_stage(rank0: list[Action], rank1: list[Action], m: int = 1) -> Schedule:
    """A hand-made 2-stage, 2-rank schedule."""
    return Schedule("hand", 2, m, (0, 1), (tuple(rank0), tuple(rank1)))


# --------------------------------------------------------------------------------------------------------------
# Properties of the generators.


@PROPERTY
@given(gen=generators, p=stages, m=microbatches)
def test_each_action_exactly_once_on_its_rank(gen: Generator, p: int, m: int) -> None:
    schedule = gen(p, m)
    assert schedule.num_stages == p and schedule.num_microbatches == m and schedule.num_ranks == p
    counts: Counter[Action] = Counter()
    for rank, acts in enumerate(schedule.actions):
        for action in acts:
            assert schedule.stage_to_rank[action.stage] == rank, f"{action} on rank {rank}"
            assert action.kind is not ActionKind.WEIGHT
            counts[action] += 1
    expected = {a: 1 for s in range(p) for mb in range(m) for a in (F(mb, s), B(mb, s))}
    assert dict(counts) == expected
    assert not schedule.split_backward


@PROPERTY
@given(gen=generators, p=stages, m=microbatches)
def test_inputs_are_produced_before_use(gen: Generator, p: int, m: int) -> None:
    schedule = gen(p, m)
    order = topological_order(schedule)
    assert len(order) == sum(len(acts) for acts in schedule.actions), schedule.format()
    position = {action: i for i, action in enumerate(order)}
    for action in order:
        for dep in dependencies(action, p):
            assert position[dep] < position[action]


@PROPERTY
@given(gen=generators, p=stages, m=microbatches)
def test_validates_and_simulates(gen: Generator, p: int, m: int) -> None:
    schedule = gen(p, m)
    validate_schedule(schedule)
    result = simulate(schedule, Costs(forward=1.0, backward=2.0, transfer=0.25))
    assert [len(s) for s in result.start] == [len(acts) for acts in schedule.actions]


@PROPERTY
@given(p=stages, m=microbatches)
def test_one_f_one_b_warmup(p: int, m: int) -> None:
    schedule = one_f_one_b(p, m)
    for s, acts in enumerate(schedule.actions):
        warmup = min(p - s - 1, m)
        assert all(a == F(i, s) for i, a in enumerate(acts[:warmup]))
        # One more forward starts the steady phase whenever micro-batches remain after warm-up.
        assert leading_forwards(acts) == min(p - s, m)
        # Never more than min(p - s, m) micro-batches in flight on stage s.
        held = peak = 0
        for action in acts:
            held += 1 if action.kind is ActionKind.FORWARD else -1
            peak = max(peak, held)
        assert peak == min(p - s, m)
        # Backwards run in micro-batch order, as do forwards.
        assert [a.microbatch for a in acts if a.kind is ActionKind.BACKWARD] == list(range(m))
        assert [a.microbatch for a in acts if a.kind is ActionKind.FORWARD] == list(range(m))


@pytest.mark.parametrize("p,m", [(8, 1), (8, 3), (4, 2), (2, 1)])
def test_one_f_one_b_fewer_microbatches_than_stages(p: int, m: int) -> None:
    schedule = one_f_one_b(p, m)
    validate_schedule(schedule)
    assert leading_forwards(schedule.actions[0]) == m


def test_gpipe_layout() -> None:
    schedule = gpipe(3, 2)
    assert schedule.name == "gpipe"
    assert schedule.stage_to_rank == (0, 1, 2)
    assert schedule.actions[1] == (F(0, 1), F(1, 1), B(0, 1), B(1, 1))


def test_one_f_one_b_layout() -> None:
    schedule = one_f_one_b(3, 4)
    assert schedule.name == "1f1b"
    assert schedule.actions[0] == (F(0, 0), F(1, 0), F(2, 0), B(0, 0), F(3, 0), B(1, 0), B(2, 0), B(3, 0))
    assert schedule.actions[2] == (F(0, 2), B(0, 2), F(1, 2), B(1, 2), F(2, 2), B(2, 2), F(3, 2), B(3, 2))


# --------------------------------------------------------------------------------------------------------------
# Transfers.


def check_transfers_match(schedule: Schedule) -> None:
    """Every send has exactly one receive, and each (src, dst) pair sees its transfers in the same order."""
    sent: dict[tuple[int, int], list[Transfer]] = defaultdict(list)
    received: dict[tuple[int, int], list[Transfer]] = defaultdict(list)
    for rank in range(schedule.num_ranks):
        for i, transfer in schedule.sends(rank):
            assert transfer.src_rank == rank != transfer.dst_rank
            assert schedule.actions[rank][i].stage == transfer.src_stage
            sent[(rank, transfer.dst_rank)].append(transfer)
        for i, transfer in schedule.receives(rank):
            assert transfer.dst_rank == rank != transfer.src_rank
            assert schedule.actions[rank][i].stage == transfer.dst_stage
            received[(transfer.src_rank, rank)].append(transfer)
    assert sent.keys() == received.keys()
    for pair, transfers in sent.items():
        # Same order on both ends: point-to-point backends (NCCL) match transfers by order per pair.
        assert transfers == received[pair], pair
        assert len({t.key for t in transfers}) == len(transfers), f"duplicate transfer on {pair}"


@PROPERTY
@given(gen=generators, p=stages, m=microbatches)
def test_sends_match_receives(gen: Generator, p: int, m: int) -> None:
    schedule = gen(p, m)
    check_transfers_match(schedule)
    num_transfers = sum(1 for r in range(p) for _ in schedule.sends(r))
    assert num_transfers == 2 * m * (p - 1)


def test_transfer_fields() -> None:
    schedule = gpipe(3, 2)
    assert schedule.outgoing(F(1, 0)) == Transfer(False, 1, 0, 1, 0, 1)
    assert schedule.incoming(F(1, 1)) == Transfer(False, 1, 0, 1, 0, 1)
    assert schedule.outgoing(B(0, 2)) == Transfer(True, 0, 2, 1, 2, 1)
    assert schedule.incoming(B(0, 1)) == Transfer(True, 0, 2, 1, 2, 1)
    assert schedule.incoming(F(0, 0)) is None and schedule.outgoing(F(0, 2)) is None
    assert schedule.incoming(B(0, 2)) is None and schedule.outgoing(B(0, 0)) is None
    assert Transfer(True, 0, 2, 1, 2, 1).key == (True, 0, 2)


# --------------------------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("gen", GENERATORS)
@pytest.mark.parametrize("p", [0, -1])
def test_no_stage_raises(gen: Generator, p: int) -> None:
    with pytest.raises(ScheduleError, match="pipeline_parallel_size"):
        gen(p, 4)


@pytest.mark.parametrize("gen", GENERATORS)
@pytest.mark.parametrize("m", [0, -3])
def test_no_microbatch_raises(gen: Generator, m: int) -> None:
    with pytest.raises(ScheduleError, match="num_microbatches"):
        gen(4, m)


def test_sizes_of_any_integer_type_and_no_other() -> None:
    """numpy integers (a config read with numpy, a sweep) are integers; floats and bools are not."""
    import numpy as np

    assert build_schedule("1f1b", num_ranks=np.int64(2), num_microbatches=np.int32(3)) == one_f_one_b(2, 3)
    for kwargs, knob in (({"num_ranks": 2, "num_microbatches": 3.0}, "num_microbatches=3.0"),
                         ({"num_ranks": True, "num_microbatches": 3}, "pipeline_parallel_size=True")):
        with pytest.raises(ScheduleError, match=knob):
            build_schedule("1f1b", **kwargs)


def test_build_schedule() -> None:
    assert {"gpipe", "1f1b"} <= set(SCHEDULES)
    assert build_schedule("GPipe", num_ranks=2, num_microbatches=3) == gpipe(2, 3)
    assert build_schedule("1f1b", num_ranks=2, num_microbatches=3) == one_f_one_b(2, 3)
    with pytest.raises(ScheduleError, match="schedule='zb'"):
        build_schedule("zb", num_ranks=2, num_microbatches=3)
    with pytest.raises(ScheduleError, match="pipeline_parallel_size"):
        build_schedule("1f1b", num_ranks=0, num_microbatches=3)


def test_schedule_rejects_bad_stage_to_rank() -> None:
    with pytest.raises(ValueError, match="stage_to_rank"):
        Schedule("bad", 3, 1, (0, 1), ((F(0, 0), B(0, 0)), (F(0, 1), B(0, 1))))
    with pytest.raises(ValueError, match="rank 2"):
        Schedule("bad", 2, 1, (0, 2), ((F(0, 0), B(0, 0)), (F(0, 1), B(0, 1))))


def test_validate_accepts_hand_made() -> None:
    validate_schedule(two_stage([F(0, 0), B(0, 0)], [F(0, 1), B(0, 1)]))


@pytest.mark.parametrize(
    "rank0,rank1,message",
    [
        ([F(0, 0)], [F(0, 1), B(0, 1)], r"B0@s0 appears 0 times, expected 1"),
        ([F(0, 0), F(0, 0), B(0, 0)], [F(0, 1), B(0, 1)], r"F0@s0 appears 2 times, expected 1"),
        ([F(0, 0), F(0, 1), B(0, 0)], [B(0, 1)], r"F0@s1 is on rank 0, but stage 1 is held by rank 1"),
        ([B(0, 0), F(0, 0)], [F(0, 1), B(0, 1)], r"rank 0 runs B0@s0 before F0@s0"),
        ([F(0, 0), B(0, 0)], [F(0, 1), B(0, 1), F(1, 1)], r"outside 2 stages x 1 micro-batches"),
    ],
    ids=["missing-B", "duplicate-F", "wrong-rank", "B-before-F", "out-of-range"],
)
def test_validate_rejects(rank0: list[Action], rank1: list[Action], message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        validate_schedule(two_stage(rank0, rank1))


def test_validate_rejects_deadlock() -> None:
    # Backwards in a different order on the two ranks: rank 0 waits a while for B1@s1, but the step finishes.
    schedule = two_stage([F(0, 0), F(1, 0), B(1, 0), B(0, 0)],
                         [F(0, 1), F(1, 1), B(0, 1), B(1, 1)], m=2)
    validate_schedule(schedule)
    # Rank 0 waits for B0@s1 before sending F1; rank 1 waits for F1 before running mb 0: a cycle.
    schedule = two_stage([F(0, 0), B(0, 0), F(1, 0), B(1, 0)],
                         [F(1, 1), B(1, 1), F(0, 1), B(0, 1)], m=2)
    with pytest.raises(ScheduleDeadlockError, match="deadlocks"):
        validate_schedule(schedule)


# --------------------------------------------------------------------------------------------------------------
# A rank holding two stages.


@pytest.mark.parametrize("m", [1, 2, 5])
def test_v_schedule(m: int) -> None:
    schedule = v_schedule(m)
    assert schedule.stages_of(0) == (0, 3) and schedule.stages_of(1) == (1, 2)
    validate_schedule(schedule)
    assert len(topological_order(schedule)) == 8 * m
    check_transfers_match(schedule)
    # Same-rank hand-offs go through memory, not through a transfer.
    for i in range(m):
        assert schedule.outgoing(F(i, 1)) is None and schedule.incoming(F(i, 2)) is None
        assert schedule.outgoing(B(i, 2)) is None and schedule.incoming(B(i, 1)) is None
        assert schedule.outgoing(F(i, 2)) == Transfer(False, i, 2, 3, 1, 0)
        assert schedule.incoming(B(i, 2)) == Transfer(True, i, 3, 2, 0, 1)
    result = simulate(schedule, Costs(forward=1.0, backward=2.0, transfer=0.5))
    assert result.peak_activations == (2 * m, 2 * m)
    # F0@s2 starts the moment the last F@s1 ends on the same rank: no transfer latency is paid for it.
    last_f1, first_f2 = m - 1, m
    assert result.start[1][first_f2] == result.end[1][last_f1]
    # F0@s3 on rank 0 waits for F0@s2 plus one transfer: 1 (F@s0) + 0.5 + m (F@s1) + 1 (F0@s2) + 0.5.
    assert result.start[0][m] == pytest.approx(max(m, 1 + 0.5 + m + 1 + 0.5))
