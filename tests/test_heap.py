"""HeapFreeze: the objects alive when a run starts are frozen out of Python's garbage collections, and thawed."""

from __future__ import annotations

import gc
import weakref
from typing import Any, Iterator

import pytest

from lightning_pipe.engine import HeapFreeze


class _Node:
    def __init__(self) -> None:
        self.other: Any = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def _nothing_frozen() -> Iterator[None]:
    """No freeze before or after; no automatic collection during (it could free a test's cycle before the test
    looks: only the explicit collections count)."""
    assert gc.get_freeze_count() == 0, "another test left objects frozen"
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _full_collections(run: Any) -> int:
    """How many full (generation 2) collections ``run()`` started."""
    seen: list[int] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(callback)
    try:
        run()
    finally:
        gc.callbacks.remove(callback)
    return len(seen)


def test_freeze_collects_first_then_freezes_and_thaw_undoes_it() -> None:
    heap = HeapFreeze()
    garbage = _Node()
    dead = weakref.ref(garbage)
    del garbage
    assert dead() is not None  # a cycle outlives its last name until a collection
    assert _full_collections(heap.freeze) == 1
    assert dead() is None, "garbage frozen with the live objects would never be freed"
    assert heap.frozen and gc.get_freeze_count() > 0
    assert _full_collections(heap.freeze) == 0  # once per run: fit's validation and training hooks both call it
    # Objects made after the freeze are still collected.
    later = _Node()
    dead_later = weakref.ref(later)
    del later
    gc.collect()
    assert dead_later() is None
    heap.thaw()
    assert not heap.frozen and gc.get_freeze_count() == 0
    heap.thaw()  # a second teardown is harmless
    assert gc.get_freeze_count() == 0


def test_a_freeze_made_by_someone_else_is_left_in_place() -> None:
    gc.freeze()
    before = gc.get_freeze_count()
    assert before > 0
    heap = HeapFreeze()
    heap.freeze()
    assert gc.get_freeze_count() >= before
    heap.thaw()
    assert not heap.frozen and gc.get_freeze_count() >= before, "gc.unfreeze would have undone the user's freeze"
