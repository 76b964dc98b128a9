"""Schedules of one's own, registered by name (``lightning_pipe.schedules.register_schedule``): built, checked,
placed and simulated like the built-in ones, and accepted by the strategy. (``test_strategy_transparency`` trains
with one through Lightning, against one device.)"""

from __future__ import annotations

from typing import Iterator

import pytest

from lightning_pipe.errors import ScheduleError
from lightning_pipe.schedules import (
    DEFAULT_VIRTUAL_STAGES, SCHEDULES, B, F, Schedule, build_schedule, one_f_one_b, register_schedule, stage_to_rank,
    validate_schedule,
)
from lightning_pipe.schedules import generators
from lightning_pipe.simulate import Costs, simulate
from tests._schedules import eager_1f1b


@pytest.fixture
def registry() -> Iterator[None]:
    """Registrations made by a test are undone after it."""
    saved = dict(SCHEDULES), dict(DEFAULT_VIRTUAL_STAGES), set(generators._REGISTERED)
    yield
    for live, old in zip((SCHEDULES, DEFAULT_VIRTUAL_STAGES, generators._REGISTERED), saved):
        live.clear()
        live.update(old)  # type: ignore[attr-defined]


def test_a_registered_schedule_is_built_placed_and_simulated_by_name(registry: None) -> None:
    register_schedule("Eager", eager_1f1b)
    for p in range(1, 6):
        for m in range(1, 12):
            schedule = build_schedule("eager", num_ranks=p, num_microbatches=m)
            assert schedule == eager_1f1b(p, m)
            validate_schedule(schedule)
    assert stage_to_rank("EAGER", num_ranks=3) == (0, 1, 2)
    # One more warm-up forward than 1F1B: never longer, and one more activation held on the first stages.
    eager = simulate(build_schedule("eager", num_ranks=4, num_microbatches=8), Costs(forward=1, backward=2))
    plain = simulate(one_f_one_b(4, 8), Costs(forward=1, backward=2))
    assert eager.step_time <= plain.step_time
    assert eager.peak_activations == (5, 4, 3, 1) and plain.peak_activations == (4, 3, 2, 1)
    # Early input gradients apply to it as to the built-in schedules.
    early = build_schedule("eager", num_ranks=2, num_microbatches=3, early_input_grads=True)
    assert [str(a) for a in early.actions[0]][3:5] == ["B0@s0", "W0@s0"]


def test_a_registered_schedule_with_virtual_stages_places_its_stages(registry: None) -> None:
    def looped(num_ranks: int, num_microbatches: int, virtual_stages: int = 2) -> Schedule:
        """GPipe over p*v stages placed round-robin (stage s on rank s % p): all forwards, then all backwards."""
        p, v, m = num_ranks, virtual_stages, num_microbatches
        n = p * v
        actions = [[] for _ in range(p)]
        for s in range(n):
            actions[s % p] += [F(i, s) for i in range(m)]
        for s in reversed(range(n)):
            actions[s % p] += [B(i, s) for i in range(m)]
        return Schedule("looped", n, m, tuple(s % p for s in range(n)), tuple(tuple(a) for a in actions))

    register_schedule("looped", looped, virtual_stages=2)
    assert DEFAULT_VIRTUAL_STAGES["looped"] == 2
    assert stage_to_rank("looped", num_ranks=2) == (0, 1, 0, 1)
    assert stage_to_rank("looped", num_ranks=2, virtual_stages=3) == (0, 1, 0, 1, 0, 1)
    assert build_schedule("looped", num_ranks=3, num_microbatches=4).num_stages == 6


def test_a_wrong_generator_or_name_fails_clearly(registry: None) -> None:
    with pytest.raises(ScheduleError, match="'1F1B' is a built-in schedule; register yours under another name"):
        register_schedule("1F1B", eager_1f1b)
    with pytest.raises(ScheduleError, match="must be a function"):
        register_schedule("x", "eager")  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="virtual_stages=0 must be a positive integer"):
        register_schedule("x", eager_1f1b, virtual_stages=0)
    with pytest.raises(ScheduleError, match="non-empty string"):
        register_schedule("", eager_1f1b)

    register_schedule("fixed_m", lambda p, m, v=1: eager_1f1b(p, 4))  # ignores the micro-batches asked for
    with pytest.raises(ScheduleError, match=r"schedule 'fixed_m'\(num_ranks=2, num_microbatches=3, virtual_stages=1\)"
                                            r" returned a schedule of 2 ranks, 4 micro-batches and 2 stages; "
                                            r"expected 2, 3 and 2"):
        build_schedule("fixed_m", num_ranks=2, num_microbatches=3)

    def backwards_first(p: int, m: int, v: int = 1) -> Schedule:  # a backward before its forward: deadlock
        return Schedule("bad", p, m, tuple(range(p)),
                        tuple(tuple([B(i, s) for i in range(m)] + [F(i, s) for i in range(m)]) for s in range(p)))

    register_schedule("backwards_first", backwards_first)
    with pytest.raises(ScheduleError, match=r"schedule 'backwards_first'\(num_ranks=2, .*\) is not valid"):
        build_schedule("backwards_first", num_ranks=2, num_microbatches=2)
    register_schedule("not_a_schedule", lambda p, m, v=1: [])
    with pytest.raises(ScheduleError, match="returned list, not a Schedule"):
        build_schedule("not_a_schedule", num_ranks=2, num_microbatches=2)
    # Registering again replaces one's own schedule.
    register_schedule("fixed_m", eager_1f1b)
    assert build_schedule("fixed_m", num_ranks=2, num_microbatches=3) == eager_1f1b(2, 3)


def test_the_strategy_takes_a_registered_schedule_by_name(registry: None) -> None:
    from lightning_pipe import PipelineError, PipelineStrategy

    with pytest.raises(PipelineError, match="unknown schedule='eager'"):
        PipelineStrategy(schedule="eager")
    register_schedule("eager", eager_1f1b)
    strategy = PipelineStrategy(schedule="eager", num_microbatches=3)
    assert strategy.schedule_name == "eager" and strategy.virtual_stages == 1
    assert strategy.schedule_for(3) == eager_1f1b(1, 3)  # one rank until the processes are known
