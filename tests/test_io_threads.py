"""The guard of gloo's I/O threads (``lightning_pipe/engine/io_threads.py``), on stand-in threads of this process
named as gloo names its own. With real gloo threads: ``test_engine_distributed.py`` (the message sequence)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator

import pytest

from lightning_pipe.engine import io_threads
from lightning_pipe.engine.io_threads import IoThreadGuard, gloo_io_threads

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread policies through /proc: Linux")


class _Thread:
    """A thread that waits until closed, named ``name`` in the kernel (as gloo names its I/O thread)."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait()
        with open(f"/proc/self/task/{self.tid}/comm", "w") as f:
            f.write(name)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        self._ready.set()
        self._stop.wait()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def io_thread() -> Iterator[_Thread]:
    thread = _Thread("gloo_tcp_loop")
    yield thread
    thread.close()


def _policy(tid: int) -> int:
    return os.sched_getscheduler(tid)


def _refuse(monkeypatch: pytest.MonkeyPatch, tid: int, error: OSError, *, policy: int | None = None) -> None:
    """Make the guard's ``sched_setscheduler`` raise ``error`` for ``tid`` (for ``policy`` only, if given)."""
    real = os.sched_setscheduler

    def setscheduler(target: int, wanted: int, param: os.sched_param) -> None:
        if target == tid and policy in (None, wanted):
            raise error
        real(target, wanted, param)

    monkeypatch.setattr(io_threads.os, "sched_setscheduler", setscheduler)


def test_the_io_threads_are_found_by_name_and_policy(io_thread: _Thread) -> None:
    other = _Thread("not_gloo")
    idle = _Thread("gloo_tcp_loop")
    try:
        os.sched_setscheduler(idle.tid, os.SCHED_IDLE, os.sched_param(0))  # set by someone else: left alone
        found = gloo_io_threads()
        assert io_thread.tid in found
        assert other.tid not in found and idle.tid not in found
    finally:
        other.close()
        idle.close()


def test_the_guard_holds_the_threads_in_batch_for_the_call_only(io_thread: _Thread) -> None:
    guard = IoThreadGuard()
    assert guard.active and io_thread.tid in guard.threads
    assert _policy(io_thread.tid) == os.SCHED_OTHER
    with guard:
        assert _policy(io_thread.tid) == os.SCHED_BATCH
    assert _policy(io_thread.tid) == os.SCHED_OTHER
    with pytest.raises(RuntimeError, match="inside"):
        with guard:
            raise RuntimeError("inside")
    assert _policy(io_thread.tid) == os.SCHED_OTHER
    assert guard.disabled is None


def test_an_empty_guard_does_nothing(io_thread: _Thread) -> None:
    guard = IoThreadGuard([])
    assert not guard.active
    with guard:
        assert _policy(io_thread.tid) == os.SCHED_OTHER


def test_a_thread_that_ended_before_the_guard_is_dropped_at_construction(io_thread: _Thread) -> None:
    # A thread id is system-wide and may be taken again at once by another process's thread, which the guard must
    # not touch: the test of whether the id is still a thread of this process is made at construction.
    ended = _Thread("gloo_tcp_loop")
    ended.close()
    guard = IoThreadGuard([ended.tid, io_thread.tid, 1])  # 1: init, a thread of another process
    assert guard.threads == [io_thread.tid]
    with guard:
        assert _policy(io_thread.tid) == os.SCHED_BATCH
    assert guard.threads == [io_thread.tid] and guard.disabled is None
    assert _policy(io_thread.tid) == os.SCHED_OTHER


def test_a_thread_that_ends_while_guarded_is_dropped_at_its_next_call(
        io_thread: _Thread, monkeypatch: pytest.MonkeyPatch) -> None:
    later = _Thread("gloo_tcp_loop")
    guard = IoThreadGuard([later.tid, io_thread.tid])
    assert guard.threads == [later.tid, io_thread.tid]
    later.close()
    # What the kernel answers for an id that no thread has (not reused meanwhile).
    _refuse(monkeypatch, later.tid, ProcessLookupError(3, "No such process"))
    with guard:
        assert _policy(io_thread.tid) == os.SCHED_BATCH
    assert guard.threads == [io_thread.tid] and guard.disabled is None
    assert _policy(io_thread.tid) == os.SCHED_OTHER


def test_a_policy_change_that_is_refused_disables_the_guard_and_restores_the_rest(
        io_thread: _Thread, monkeypatch: pytest.MonkeyPatch) -> None:
    second = _Thread("gloo_tcp_loop")
    _refuse(monkeypatch, second.tid, PermissionError(1, "Operation not permitted"), policy=os.SCHED_BATCH)
    try:
        guard = IoThreadGuard([io_thread.tid, second.tid])
        with guard:  # the first was moved to batch before the second refused: moved back
            assert _policy(io_thread.tid) == os.SCHED_OTHER
        assert not guard.active and guard.disabled is not None and "PermissionError" in guard.disabled
        with guard:
            pass
        assert _policy(io_thread.tid) == os.SCHED_OTHER and _policy(second.tid) == os.SCHED_OTHER
    finally:
        second.close()
