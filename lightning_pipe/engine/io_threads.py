"""Keeping gloo's I/O threads from taking the CPU from a thread that is inside a gloo send or receive call.

gloo's TCP transport holds a lock per peer (its "pair") for the whole of a send or receive call made on the
caller's thread. The write inside the call can wake the process's own I/O thread (``gloo_tcp_loop``): on loopback
the kernel delivers the peer's pending bytes to this process's socket during the write. The scheduler may then run
the I/O thread on the caller's CPU in place of the caller, which still holds the lock. The I/O thread only
try-locks the pair, and its socket stays readable, so it polls again and again until its time slice ends: 2-6 ms
(seen with ``perf sched`` on this 2-core machine: the caller preempted while runnable, the I/O thread running for
3-4.5 ms, then the caller finishing its call).

A thread under ``SCHED_BATCH`` never preempts a running thread when it wakes up; in every other respect it is
scheduled as before. So for the length of each call :class:`IoThreadGuard` moves the I/O threads to
``SCHED_BATCH``, and back to ``SCHED_OTHER`` after it: two system calls per thread, about 3 us. Kept there for
good, the I/O thread would also finish a long message's write only when its process next waits, which delays the
receiver (measured: 1F1B on the transformer of ``benchmarks/vs_torch.py``, p=2, m=16: 134-141 ms a step against
110-117 ms with the policy left alone). With the guard around each call against without it, in the same processes:
``benchmarks/io_guard.py``.

Linux only (``/proc/self/task`` and ``os.sched_setscheduler``); elsewhere, or where the policy may not be changed,
the guard does nothing.
"""

from __future__ import annotations

import os
from types import TracebackType

__all__ = ["IoThreadGuard", "gloo_io_threads"]

_IO_THREAD_NAME = "gloo_tcp_loop"  # as gloo names its event-loop thread


def gloo_io_threads() -> list[int]:
    """The thread ids of this process's gloo I/O threads (one per gloo process group) that run under the default
    policy (``SCHED_OTHER``): one that someone set otherwise is left alone. Empty where threads cannot be listed."""
    if not hasattr(os, "sched_setscheduler"):
        return []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    found = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
            if name == _IO_THREAD_NAME and os.sched_getscheduler(int(task)) == os.SCHED_OTHER:
                found.append(int(task))
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(found)


def _ours(tid: int) -> bool:
    """Whether ``tid`` is a thread of this process now."""
    return os.path.isdir(f"/proc/self/task/{tid}")


class IoThreadGuard:
    """``with guard:`` around a gloo send or receive call keeps the I/O threads found at construction from
    preempting the calling thread (see the module docstring).

    Args:
        threads: The thread ids to guard (default: :func:`gloo_io_threads` now; the process groups to be guarded
            must exist already). Ids that are not threads of this process now are dropped: a thread id is
            system-wide and is reused once its thread ends, possibly by another process's thread.

    A guarded thread that ends later (its process group destroyed) is dropped at the next call. The guard of a
    :class:`~lightning_pipe.engine.transport.Transport` is not used after its process groups are destroyed.
    """

    def __init__(self, threads: list[int] | None = None) -> None:
        self.threads = gloo_io_threads() if threads is None else [tid for tid in threads if _ours(tid)]
        self._param = os.sched_param(0) if self.threads else None
        self.disabled: str | None = None
        """Why the guard stopped acting (the policy could not be changed), or ``None``."""

    @property
    def active(self) -> bool:
        return bool(self.threads)

    def _set_all(self, policy: int) -> None:
        for tid in list(self.threads):
            try:
                os.sched_setscheduler(tid, policy, self._param)
            except ProcessLookupError:  # that thread has ended (its process group was destroyed)
                self.threads.remove(tid)
            except OSError as err:  # not permitted here (a sandbox): give up, leaving every thread as it was
                self.disabled = f"{type(err).__name__}: {err}"
                threads, self.threads = self.threads, []
                for other in threads:
                    try:
                        os.sched_setscheduler(other, os.SCHED_OTHER, self._param)
                    except OSError:
                        pass
                return

    def __enter__(self) -> None:
        if self.threads:
            self._set_all(os.SCHED_BATCH)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.threads:
            self._set_all(os.SCHED_OTHER)
