"""Schedule generators and their registry. A new schedule is one function plus its tests."""

from __future__ import annotations

import inspect
from typing import Protocol

from lightning_pipe.errors import ScheduleError
from lightning_pipe.schedules.actions import Action, ActionKind, B, F, Schedule, W
from lightning_pipe.schedules.checks import check_sizes
from lightning_pipe.schedules.interleaved import interleaved_1f1b, interleaved_stage_to_rank, zero_bubble
from lightning_pipe.schedules.validate import validate_schedule
from lightning_pipe.schedules.zbv import check_two_chunks, v_stage_to_rank, zbv

__all__ = [
    "gpipe", "one_f_one_b", "Generator", "SCHEDULES", "BUILTIN_SCHEDULES", "DEFAULT_VIRTUAL_STAGES", "build_schedule",
    "stage_to_rank", "with_early_input_grads", "register_schedule",
]


def _one_chunk(name: str, virtual_stages: int) -> None:
    if virtual_stages != 1:
        raise ScheduleError(f"schedule {name!r} holds one chunk per rank, got virtual_stages={virtual_stages}; "
                            "use schedule='interleaved_1f1b', 'zero_bubble' or 'zbv' for virtual stages")


def gpipe(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """GPipe (fill-drain): every forward of the step, then every backward. Holds all m activations per stage."""
    check_sizes(num_ranks, num_microbatches, virtual_stages)
    _one_chunk("gpipe", virtual_stages)
    m = num_microbatches
    actions = tuple(
        tuple([F(i, s) for i in range(m)] + [B(i, s) for i in range(m)]) for s in range(num_ranks)
    )
    return Schedule("gpipe", num_ranks, m, tuple(range(num_ranks)), actions)


def one_f_one_b(num_ranks: int, num_microbatches: int, virtual_stages: int = 1) -> Schedule:
    """1F1B (PipeDream-Flush): warm-up forwards, then one forward one backward, then cool-down backwards.

    Stage ``s`` warms up with ``min(p - s - 1, m)`` forwards, so it never holds more than ``min(p - s, m)``
    micro-batches' activations. With ``m < p`` the warm-up is simply shorter.
    """
    check_sizes(num_ranks, num_microbatches, virtual_stages)
    _one_chunk("1f1b", virtual_stages)
    p, m = num_ranks, num_microbatches
    per_rank: list[tuple[Action, ...]] = []
    for s in range(p):
        warmup = min(p - s - 1, m)
        acts: list[Action] = [F(i, s) for i in range(warmup)]
        for i in range(m - warmup):
            acts.append(F(warmup + i, s))
            acts.append(B(i, s))
        acts.extend(B(i, s) for i in range(m - warmup, m))
        per_rank.append(tuple(acts))
    return Schedule("1f1b", p, m, tuple(range(p)), tuple(per_rank))


class Generator(Protocol):
    def __call__(self, num_ranks: int, num_microbatches: int, virtual_stages: int = ...) -> Schedule: ...


SCHEDULES: dict[str, Generator] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved_1f1b": interleaved_1f1b,
    "zero_bubble": zero_bubble,
    "zbv": zbv,
}
"""Schedule generators by the name users give as ``PipelineStrategy(schedule=...)``."""

BUILTIN_SCHEDULES: frozenset[str] = frozenset(SCHEDULES)
"""The schedules that come with the library (the others are registered: :func:`register_schedule`)."""

DEFAULT_VIRTUAL_STAGES: dict[str, int] = {
    name: inspect.signature(generator).parameters["virtual_stages"].default for name, generator in SCHEDULES.items()
}
"""Chunks per rank when ``virtual_stages`` is not given: each generator's own default."""

_REGISTERED: set[str] = set()  # names given by register_schedule: their schedules are checked when built


def register_schedule(name: str, generator: Generator, *, virtual_stages: int = 1) -> None:
    """Make a schedule of your own usable by ``name`` wherever a built-in one is: ``PipelineStrategy(schedule=name)``
    (also with ``num_microbatches="auto"``, ``balance="time"``, ``early_input_grads=True``), the Hydra entry point's
    ``strategy.schedule=name``, :func:`build_schedule`, :func:`stage_to_rank` and the simulator.

    ``generator(num_ranks, num_microbatches, virtual_stages)`` returns the :class:`Schedule` of ``num_ranks`` ranks
    holding ``virtual_stages`` stages each, for any ``num_microbatches >= 1`` (a batch smaller than
    ``num_microbatches`` runs with fewer); ``virtual_stages``: its default. Every schedule it gives is checked when
    built (:func:`validate_schedule`: each action once, on its rank, no deadlock). Register in every process (at
    import of the module that defines it, so that processes started by the launcher register it too).
    """
    key = name.lower() if isinstance(name, str) else name
    if not isinstance(key, str) or not key:
        raise ScheduleError(f"register_schedule: the name must be a non-empty string, got {name!r}")
    if key in SCHEDULES and key not in _REGISTERED:
        raise ScheduleError(f"register_schedule: {name!r} is a built-in schedule; register yours under another name")
    if not callable(generator):
        raise ScheduleError(f"register_schedule({name!r}): generator={generator!r} must be a function "
                            "(num_ranks, num_microbatches, virtual_stages) -> Schedule")
    if not isinstance(virtual_stages, int) or virtual_stages < 1:
        raise ScheduleError(f"register_schedule({name!r}): virtual_stages={virtual_stages!r} must be a positive "
                            "integer")
    SCHEDULES[key] = generator
    DEFAULT_VIRTUAL_STAGES[key] = virtual_stages
    _REGISTERED.add(key)


def _checked(name: str, schedule: object, num_ranks: int, num_microbatches: int, virtual_stages: int) -> Schedule:
    """A registered generator's schedule, checked: the sizes asked for, and valid."""
    asked = f"(num_ranks={num_ranks}, num_microbatches={num_microbatches}, virtual_stages={virtual_stages})"
    if not isinstance(schedule, Schedule):
        raise ScheduleError(f"schedule {name!r}{asked} returned {type(schedule).__name__}, not a Schedule")
    got = (schedule.num_ranks, schedule.num_microbatches, schedule.num_stages)
    if got != (num_ranks, num_microbatches, num_ranks * virtual_stages):
        raise ScheduleError(f"schedule {name!r}{asked} returned a schedule of {got[0]} ranks, {got[1]} "
                            f"micro-batches and {got[2]} stages; expected {num_ranks}, {num_microbatches} and "
                            f"{num_ranks * virtual_stages}")
    try:
        validate_schedule(schedule)
    except ScheduleError as err:
        raise type(err)(f"schedule {name!r}{asked} is not valid: {err}") from err
    return schedule


def _generator(name: str) -> Generator:
    try:
        return SCHEDULES[name.lower()]
    except (KeyError, AttributeError):
        raise ScheduleError(f"unknown schedule={name!r}; choose one of {sorted(SCHEDULES)}") from None


def build_schedule(name: str, *, num_ranks: int, num_microbatches: int, virtual_stages: int | None = None,
                   early_input_grads: bool = False) -> Schedule:
    """The schedule called ``name`` for ``num_ranks`` pipeline ranks (``pipeline_parallel_size``), each holding
    ``virtual_stages`` chunks (default: :data:`DEFAULT_VIRTUAL_STAGES`), and ``num_microbatches`` micro-batches;
    ``early_input_grads``: through :func:`with_early_input_grads`."""
    generator = _generator(name)
    v = DEFAULT_VIRTUAL_STAGES[name.lower()] if virtual_stages is None else virtual_stages
    schedule = generator(num_ranks, num_microbatches, v)
    if name.lower() in _REGISTERED:
        schedule = _checked(name, schedule, num_ranks, num_microbatches, v)
    return with_early_input_grads(schedule) if early_input_grads else schedule


def with_early_input_grads(schedule: Schedule) -> Schedule:
    """``schedule`` with each backward split into B and a W right after it: the same order of forwards and
    backwards, and the same activations held, but the input gradient leaves for the previous stage before this
    stage computes its weight gradients. The previous stage's backward then waits for B alone, not B + W.

    A schedule that already has W actions (zero-bubble) is returned as it is.
    """
    if schedule.split_backward:
        return schedule
    actions = tuple(
        tuple(a for action in acts
              for a in ((action, W(action.microbatch, action.stage)) if action.kind is ActionKind.BACKWARD
                        else (action,)))
        for acts in schedule.actions
    )
    return Schedule(schedule.name, schedule.num_stages, schedule.num_microbatches, schedule.stage_to_rank, actions)


def stage_to_rank(name: str, *, num_ranks: int, virtual_stages: int | None = None) -> tuple[int, ...]:
    """Which rank holds each stage under schedule ``name`` (the same for every number of micro-batches)."""
    name = name.lower()
    _generator(name)
    v = DEFAULT_VIRTUAL_STAGES[name] if virtual_stages is None else virtual_stages
    check_sizes(num_ranks, 1, v)
    if name == "zbv":
        check_two_chunks(v)
        return v_stage_to_rank(num_ranks)
    if name in ("gpipe", "1f1b"):
        _one_chunk(name, v)
    if name in _REGISTERED:  # as its generator places the stages (one micro-batch per stage: any count would do)
        return build_schedule(name, num_ranks=num_ranks, num_microbatches=num_ranks * v, virtual_stages=v).stage_to_rank
    return interleaved_stage_to_rank(num_ranks, v)
