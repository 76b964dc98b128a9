"""The simulator: step time, bubbles, held activations, transfers and deadlocks."""

from __future__ import annotations


import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_pipe.errors import ScheduleDeadlockError
from lightning_pipe.schedules import Action, ActionKind, B, F, Schedule, W, gpipe, one_f_one_b
from lightning_pipe.simulate import Costs, SimulationResult, ideal_step_time, simulate

from tests._helpers import PROPERTY, Generator, generators, microbatches, stages
# Multiples of 1/4 keep every sum exact in binary floating point.
quarters = st.integers(min_value=1, max_value=40).map(lambda n: n / 4)


def two_stage(rank0: list[Action], rank1: list[Action], m: int) -> Schedule:
    """A hand-made 2-stage, 2-rank schedule."""
    return Schedule("hand", 2, m, (0, 1), (tuple(rank0), tuple(rank1)))


# --------------------------------------------------------------------------------------------------------------
# Uniform costs: the textbook numbers.


@PROPERTY
@given(gen=generators, p=stages, m=microbatches)
def test_uniform_step_time_and_bubble(gen: Generator, p: int, m: int) -> None:
    result = simulate(gen(p, m), Costs(forward=1.0, backward=2.0, transfer=0.0))
    assert result.step_time == pytest.approx((m + p - 1) * 3)
    assert result.step_time == pytest.approx(ideal_step_time(p, m, 1.0, 2.0))
    assert result.busy == pytest.approx([3 * m] * p)
    assert result.bubble_fraction == pytest.approx([(p - 1) / (m + p - 1)] * p)
    assert result.max_bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


@PROPERTY
@given(gen=generators, p=stages, m=microbatches, tf=quarters, tb=quarters)
def test_uniform_step_time_any_ratio(gen: Generator, p: int, m: int, tf: float, tb: float) -> None:
    result = simulate(gen(p, m), Costs(forward=tf, backward=tb))
    assert result.step_time == pytest.approx(ideal_step_time(p, m, tf, tb))


@PROPERTY
@given(p=stages, m=microbatches)
def test_peak_activations(p: int, m: int) -> None:
    costs = Costs()
    assert simulate(one_f_one_b(p, m), costs).peak_activations == tuple(min(p - s, m) for s in range(p))
    assert simulate(gpipe(p, m), costs).peak_activations == (m,) * p


@PROPERTY
@given(p=stages, m=microbatches, v=st.integers(min_value=1, max_value=4),
       name=st.sampled_from(["1f1b", "gpipe", "interleaved_1f1b", "zero_bubble", "zbv"]))
def test_stage_peaks_bound_their_rank_peak(p: int, m: int, v: int, name: str) -> None:
    """Each stage's peak is at most its rank's, and the rank's stages' peaks add up to at least the rank's (the
    memory plan's bound); with one stage per rank they are the rank's."""
    from lightning_pipe.schedules import build_schedule

    if name == "zbv":
        v = 2
    elif name in ("1f1b", "gpipe"):
        v = 1
    try:
        schedule = build_schedule(name, num_ranks=p, num_microbatches=m, virtual_stages=v)
    except ValueError:  # a shape this schedule does not take (its message is tested with the schedules)
        return
    result = simulate(schedule, Costs())
    for r, peak in enumerate(result.peak_activations):
        mine = [result.stage_peak_activations[s] for s in range(schedule.num_stages) if schedule.stage_to_rank[s] == r]
        assert max(mine) <= peak <= sum(mine)
        if v == 1:
            assert mine == [peak]


def test_stage_peaks_of_interleaved_1f1b() -> None:
    """p=4, m=8, v=2: rank 0 holds at most 11 chunks at once, 8 of stage 0 and 4 of stage 4 at their own peaks."""
    from lightning_pipe.schedules import build_schedule

    result = simulate(build_schedule("interleaved_1f1b", num_ranks=4, num_microbatches=8, virtual_stages=2), Costs())
    assert result.peak_activations == (11, 9, 7, 5)
    assert result.stage_peak_activations == (8, 8, 7, 5, 4, 4, 3, 1)


# --------------------------------------------------------------------------------------------------------------
# The timeline is as-soon-as-possible, checked against the schedule directly.


def check_asap(result: SimulationResult, costs: Costs) -> None:
    """Each action starts exactly when its rank is free and its inputs (plus any transfer) have arrived."""
    schedule = result.schedule
    p = schedule.num_stages
    tf, tb, _ = costs.per_stage(p)
    end_of: dict[Action, float] = {}
    for rank, acts in enumerate(schedule.actions):
        for i, action in enumerate(acts):
            end_of[action] = result.end[rank][i]
    for rank, acts in enumerate(schedule.actions):
        free = 0.0
        for i, action in enumerate(acts):
            s, mb = action.stage, action.microbatch
            deps = [F(mb, s - 1)] if action.kind is ActionKind.FORWARD and s > 0 else []
            if action.kind is ActionKind.BACKWARD:
                deps = [F(mb, s)] + ([B(mb, s + 1)] if s < p - 1 else [])
            ready = [end_of[d] + (costs.transfer if schedule.stage_to_rank[d.stage] != rank else 0.0) for d in deps]
            assert result.start[rank][i] == pytest.approx(max([free, *ready]))
            cost = tf[s] if action.kind is ActionKind.FORWARD else tb[s]
            assert result.end[rank][i] == pytest.approx(result.start[rank][i] + cost)
            free = result.end[rank][i]


@PROPERTY
@given(data=st.data(), gen=generators, p=stages, m=microbatches, transfer=st.sampled_from([0.0, 0.25, 1.5]))
def test_timeline_is_asap(data: st.DataObject, gen: Generator, p: int, m: int, transfer: float) -> None:
    tf = data.draw(st.lists(quarters, min_size=p, max_size=p))
    tb = data.draw(st.lists(quarters, min_size=p, max_size=p))
    costs = Costs(forward=tf, backward=tb, transfer=transfer)
    result = simulate(gen(p, m), costs)
    check_asap(result, costs)
    assert result.step_time == pytest.approx(max(e[-1] for e in result.end) - min(s[0] for s in result.start))


# --------------------------------------------------------------------------------------------------------------
# Non-uniform costs.


@PROPERTY
@given(data=st.data(), gen=generators, p=stages, m=microbatches)
def test_slowest_stage_bounds_step_time(data: st.DataObject, gen: Generator, p: int, m: int) -> None:
    tf = data.draw(st.lists(quarters, min_size=p, max_size=p))
    tb = data.draw(st.lists(quarters, min_size=p, max_size=p))
    result = simulate(gen(p, m), Costs(forward=tf, backward=tb))
    # The slowest stage alone needs m * (tf + tb); every stage at the slowest cost gives the uniform formula,
    # which bounds the step from above because finish times only grow with costs.
    assert result.step_time >= max(m * (f + b) for f, b in zip(tf, tb)) - 1e-9
    assert result.step_time <= ideal_step_time(p, m, max(tf), max(tb)) + 1e-9
    assert result.busy == pytest.approx([m * (f + b) for f, b in zip(tf, tb)])


@PROPERTY
@given(p=st.integers(2, 8), m=microbatches, slow=st.integers(0, 7), factor=st.integers(2, 10))
def test_gpipe_one_slow_stage(p: int, m: int, slow: int, factor: int) -> None:
    """One stage ``factor`` times slower than the rest (tf=1, tb=2): the step is m * its cost plus a fill of
    one forward and one backward per other stage, ``m * factor * 3 + (p - 1) * 3``."""
    slow %= p
    tf = [1.0 * (factor if s == slow else 1) for s in range(p)]
    tb = [2.0 * (factor if s == slow else 1) for s in range(p)]
    result = simulate(gpipe(p, m), Costs(forward=tf, backward=tb))
    assert result.step_time == pytest.approx(m * factor * 3 + (p - 1) * 3)
    assert result.bubble_fraction[slow] == pytest.approx(min(result.bubble_fraction))


def test_hand_computed_gpipe() -> None:
    """p=2, m=2, GPipe, tf=[1, 2], tb=[2, 4], transfer=0.5.

    rank 0: F0@s0 [0, 1]    F1@s0 [1, 2]
    rank 1: F0@s1 [1.5, 3.5] (arrives 1 + 0.5)   F1@s1 [3.5, 5.5] (arrived 2.5, rank busy until 3.5)
    rank 1: B0@s1 [5.5, 9.5]   B1@s1 [9.5, 13.5]
    rank 0: B0@s0 [10, 12] (B0@s1 ends 9.5, arrives 10)   B1@s0 [14, 16] (B1@s1 ends 13.5, arrives 14)
    step 16; busy rank 0 = 1 + 1 + 2 + 2 = 6, rank 1 = 2 + 2 + 4 + 4 = 12; bubbles 1 - 6/16, 1 - 12/16.
    """
    result = simulate(gpipe(2, 2), Costs(forward=[1, 2], backward=[2, 4], transfer=0.5))
    assert result.start == ((0, 1, 10, 14), (1.5, 3.5, 5.5, 9.5))
    assert result.end == ((1, 2, 12, 16), (3.5, 5.5, 9.5, 13.5))
    assert result.step_time == 16
    assert result.busy == (6, 12)
    assert result.bubble_fraction == pytest.approx((0.625, 0.25))
    assert result.peak_activations == (2, 2)


def test_split_backward_costs() -> None:
    """With W actions, B costs ``backward - weight`` and W costs ``weight``; activations live until W."""
    schedule = Schedule("zb1", 1, 2, (0,), ((F(0, 0), B(0, 0), F(1, 0), W(0, 0), B(1, 0), W(1, 0)),))
    result = simulate(schedule, Costs(forward=1.0, backward=3.0, weight=1.0))
    assert result.start == ((0, 1, 3, 4, 5, 7),)
    assert result.end == ((1, 3, 4, 5, 7, 8),)
    assert result.peak_activations == (2,)


# --------------------------------------------------------------------------------------------------------------
# Transfers.


@PROPERTY
@given(gen=generators, p=stages, m=microbatches, transfer=quarters)
def test_transfer_on_critical_path(gen: Generator, p: int, m: int, transfer: float) -> None:
    """F0 crosses p - 1 links to reach the last rank, which then works 3m, and the last B crosses p - 1 links
    back: ``3 (m + p - 1) + 2 (p - 1) transfer`` bounds the step from below, and GPipe reaches it."""
    base = simulate(gen(p, m), Costs(transfer=0.0)).step_time
    slow = simulate(gen(p, m), Costs(transfer=transfer)).step_time
    bound = 3 * (m + p - 1) + 2 * (p - 1) * transfer
    assert slow >= bound - 1e-9
    if gen is gpipe:
        assert slow == pytest.approx(bound)
    if p == 1:
        assert slow == base
    else:
        assert slow > base


# --------------------------------------------------------------------------------------------------------------
# Errors.


def test_deadlock_names_rank_and_awaited_action() -> None:
    # Rank 0 waits for the gradient of mb 0 before it sends mb 1; rank 1 wants mb 1 first.
    schedule = two_stage([F(0, 0), B(0, 0), F(1, 0), B(1, 0)], [F(1, 1), B(1, 1), F(0, 1), B(0, 1)], m=2)
    with pytest.raises(ScheduleDeadlockError) as info:
        simulate(schedule, Costs())
    message = str(info.value)
    assert "'hand'" in message
    assert "rank 0 at B0@s0 waits for B0@s1" in message
    assert "rank 1 at F1@s1 waits for F1@s0" in message


def test_deadlock_on_own_later_action() -> None:
    schedule = two_stage([F(0, 0), B(0, 0)], [B(0, 1), F(0, 1)], m=1)
    with pytest.raises(ScheduleDeadlockError, match=r"rank 1 at B0@s1 waits for F0@s1") as info:
        simulate(schedule, Costs())
    assert "rank 0 at B0@s0 waits for B0@s1" in str(info.value)


@pytest.mark.parametrize("field", ["forward", "backward", "weight"])
def test_costs_wrong_length(field: str) -> None:
    costs = Costs(**{field: [1.0, 2.0]})
    with pytest.raises(ValueError, match=rf"Costs\.{field} has 2 entries for 3 stages"):
        simulate(gpipe(3, 2), costs)
    assert costs.per_stage(2)[["forward", "backward", "weight"].index(field)] == [1.0, 2.0]


# --------------------------------------------------------------------------------------------------------------
# Ranks sharing fewer cores than there are ranks (several ranks on one CPU host).


def test_shared_cores_hand_computed() -> None:
    # GPipe, p=2, m=2, forward 1, backward 2, one core. Rank 0 runs F0 alone (0-1); then F1@s0 and F0@s1 share the
    # core (1-3, half speed each); F1@s1 alone (3-4); B0@s1 alone (4-6); then B1@s1 and B0@s0 share it (6-10).
    # B1@s0 alone (10-12). The core never idles: the step is the total work, 12.
    result = simulate(gpipe(2, 2), Costs(1.0, 2.0), cores=1)
    assert result.start == ((0.0, 1.0, 6.0, 10.0), (1.0, 3.0, 4.0, 6.0))
    assert result.end == ((1.0, 3.0, 10.0, 12.0), (3.0, 4.0, 6.0, 10.0))
    assert result.step_time == 12.0


@PROPERTY
@given(gen=generators, p=stages, m=microbatches, cores=st.integers(min_value=1, max_value=8),
       tf=quarters, tb=quarters)
def test_shared_cores_bounds(gen: Generator, p: int, m: int, cores: int, tf: float, tb: float) -> None:
    """Sharing never helps; it costs at most the factor ranks/cores; the cores cannot do more than their share."""
    schedule = gen(p, m)
    alone = simulate(schedule, Costs(tf, tb)).step_time
    shared = simulate(schedule, Costs(tf, tb), cores=cores).step_time
    work = p * m * (tf + tb)
    assert shared >= alone - 1e-9
    assert shared >= work / min(cores, p) - 1e-9
    assert shared <= alone * max(1.0, p / cores) + 1e-9
    if cores >= p:
        assert shared == alone
    if cores == 1:
        assert shared == pytest.approx(work)  # one core never idles while some rank has work it can do


def test_fewer_cores_are_never_faster() -> None:
    schedule = one_f_one_b(4, 8)
    times = [simulate(schedule, Costs(1.0, 2.0, transfer=0.25), cores=c).step_time for c in (1, 2, 3, 4)]
    assert times == sorted(times, reverse=True) and times[0] > times[-1]


def test_shared_cores_still_find_deadlocks_and_check_the_count() -> None:
    schedule = two_stage([F(0, 0), B(0, 0)], [B(0, 1), F(0, 1)], m=1)
    with pytest.raises(ScheduleDeadlockError, match="rank 1 at B0@s1 waits for F0@s1"):
        simulate(schedule, Costs(), cores=1)
    with pytest.raises(ValueError, match="cores must be positive"):
        simulate(one_f_one_b(2, 2), Costs(), cores=0)


def test_fractional_cores() -> None:
    # GPipe p=2 m=1 runs one action at a time: half a core makes every action twice as long.
    assert simulate(gpipe(2, 1), Costs(1.0, 2.0), cores=0.5).step_time == 12.0
    # 1.5 cores for 2 ranks lie between one core and two.
    times = [simulate(gpipe(2, 4), Costs(1.0, 2.0), cores=c).step_time for c in (1, 1.5, 2)]
    assert times[0] > times[1] > times[2]
