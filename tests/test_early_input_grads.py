"""``with_early_input_grads``: each backward split into B and a W right after it (schedules as data)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_pipe.errors import ScheduleError
from lightning_pipe.schedules import ActionKind, W, build_schedule, validate_schedule, with_early_input_grads
from lightning_pipe.simulate import Costs, simulate

from tests._helpers import PROPERTY, microbatches, stages

# Uniform costs: forward 1, whole backward 3 of which the weight gradient is 1 (B 2, W 1 once split).
COSTS = Costs(forward=1.0, backward=3.0, weight=1.0)


@PROPERTY
@given(name=st.sampled_from(["gpipe", "1f1b", "interleaved_1f1b"]), p=stages, m=microbatches,
       v=st.integers(min_value=1, max_value=4))
def test_each_w_follows_its_b_and_nothing_else_moves(name: str, p: int, m: int, v: int) -> None:
    if name != "interleaved_1f1b":
        v = 1
    try:
        textbook = build_schedule(name, num_ranks=p, num_microbatches=m, virtual_stages=v)
    except ScheduleError:
        return  # a shape this schedule does not take (its own tests cover the message)
    early = with_early_input_grads(textbook)
    validate_schedule(early)  # every F, B and W exactly once, on the stage's rank, in a valid order
    assert early.split_backward and (early.name, early.stage_to_rank) == (textbook.name, textbook.stage_to_rank)
    for before, after in zip(textbook.actions, early.actions):
        assert tuple(a for a in after if a.kind is not ActionKind.WEIGHT) == before
        for i, action in enumerate(after):
            if action.kind is ActionKind.BACKWARD:
                assert after[i + 1] == W(action.microbatch, action.stage)
    plain, split = simulate(textbook, COSTS), simulate(early, COSTS)  # no deadlock
    # W right after B frees the micro-batch's activations where the fused backward did: the same peak.
    assert split.peak_activations == plain.peak_activations
    # Only the previous stage's wait shrinks (by W): never slower.
    assert split.step_time <= plain.step_time + 1e-9
    if name in ("gpipe", "1f1b"):
        # The textbook step (m + p - 1)(tF + tB + tW) less (p - 1) weight-gradient times: the cool-down's chain
        # of backwards from the last stage to the first waits for each stage's B alone.
        assert split.step_time == pytest.approx((m + p - 1) * 4.0 - (p - 1) * 1.0)
        assert plain.step_time == pytest.approx((m + p - 1) * 4.0)


@pytest.mark.parametrize(("name", "v"), [("zero_bubble", 1), ("zero_bubble", 2), ("zbv", 2)])
def test_schedules_that_split_already_are_returned_as_they_are(name: str, v: int) -> None:
    schedule = build_schedule(name, num_ranks=4, num_microbatches=8, virtual_stages=v)
    assert with_early_input_grads(schedule) is schedule
    assert build_schedule(name, num_ranks=4, num_microbatches=8, virtual_stages=v, early_input_grads=True) == schedule


@given(p=stages, m=microbatches)
def test_build_schedule_takes_the_option(p: int, m: int) -> None:
    textbook = build_schedule("1f1b", num_ranks=p, num_microbatches=m)
    assert build_schedule("1f1b", num_ranks=p, num_microbatches=m, early_input_grads=True) == \
        with_early_input_grads(textbook)
    assert build_schedule("1f1b", num_ranks=p, num_microbatches=m, early_input_grads=False) == textbook
