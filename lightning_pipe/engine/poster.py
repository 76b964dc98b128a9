"""A thread of the transport's own that makes its gloo calls, and when it pays to use one.

Each send (copying the value into its message, then gloo's send call) and each receive posted ahead (its buffer,
gloo's receive call, the value prepared from views of the buffer) costs 0.1-0.3 ms when made right after the caller
slept or waited for a value: the code is cold then (10-20 us warm). Made on :class:`Poster`'s thread, that time
overlaps the caller's next action instead of lengthening the action that sent or posted.

The thread is not free: it needs a core and the GIL while it runs. With every core busy (CPU-bound stages, a
process on each core) it took them from the compute and made steps up to 11% slower here (transformer blocks, p=2,
2 cores); with stages that leave the cores idle (sleeping stand-ins for a device) it made ZBV 1.4-2.3% faster and
1F1B no slower (``README.md``, the poster thread). So by default the transport uses it only while
:class:`IdleMeter` finds that the last step left the caller's thread and the machine mostly idle
(:func:`wants_poster`).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
import weakref
from typing import Callable

__all__ = ["Poster", "IdleMeter", "wants_poster", "cpu_quota_capped"]

_Job = Callable[[], None]


class Poster:
    """Runs submitted jobs one after the other, in submission order, on a daemon thread.

    Jobs catch their own errors (the caller's thread raises them). The thread ends with :meth:`close` or when the
    poster is garbage collected."""

    def __init__(self, name: str = "pipeline_poster") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, args=(self._jobs,), name=name, daemon=True)
        self._thread.start()
        # The loop holds the queue, not the poster, so that dropping the poster ends the thread.
        self._stop = weakref.finalize(self, self._jobs.put, None)

    @staticmethod
    def _loop(jobs: queue.SimpleQueue[_Job | None]) -> None:
        while (job := jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job that let an error out (a bug): report it, and keep serving the others
                traceback.print_exc()

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def sync(self, timeout: float) -> bool:
        """Wait until every job submitted so far has run; ``False`` if that took longer than ``timeout`` seconds."""
        done = threading.Event()
        self._jobs.put(done.set)
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Run what was submitted, then end the thread (waits at most ``timeout`` seconds for it)."""
        self._stop()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def _machine_times(cpus: frozenset[int] | None = None) -> tuple[int, int] | None:
    """(idle, total) CPU time so far of the CPUs this process may run on (all of them when ``cpus`` is ``None`` or
    cannot be matched), in clock ticks; ``None`` where ``/proc/stat`` is absent."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    rows = [fields for fields in lines if cpus is not None and fields[0][3:].isdigit() and int(fields[0][3:]) in cpus]
    if not rows:
        rows = [fields for fields in lines if fields[0] == "cpu"]
    idle = total = 0
    for fields in rows:
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        idle, total = idle + ticks[3] + ticks[4], total + sum(ticks)
    return (idle, total) if rows else None


def cpu_quota_capped(*, cgroups: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> bool:
    """Whether a cgroup caps this process's CPU time (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), as in a
    container started with a CPU limit: ``/proc/stat`` then counts cores that the process may not use. The process's
    own cgroup and each one above it are read (a quota set on a parent, as systemd slices and Kubernetes pods do,
    caps every cgroup below it)."""
    try:
        with open(cgroups) as f:
            entries = [line.strip().split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return False
    for _, controllers, path in entries:
        if controllers == "":  # cgroup v2: "max" when uncapped
            mounts, leaf, uncapped = [root], "cpu.max", "max"
        elif "cpu" in controllers.split(","):  # cgroup v1: -1 when uncapped
            mounts, leaf, uncapped = [f"{root}/{controllers}", f"{root}/cpu"], "cpu.cfs_quota_us", "-1"
        else:
            continue
        for mount in mounts:
            for cgroup in _self_and_ancestors(path):
                try:
                    with open(f"{mount}{cgroup}/{leaf}") as f:
                        value = f.read().split()
                except OSError:
                    continue
                if value and value[0] != uncapped:
                    return True
    return False


def _self_and_ancestors(path: str) -> list[str]:
    """``/a/b`` -> ``["/a/b", "/a", ""]`` (the mount point itself last)."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:n]) if n else "" for n in range(len(parts), -1, -1)]


_MIN_WALL = 0.25
"""Seconds that an :class:`IdleMeter` sample spans at least. Reading ``/proc/stat`` took 30-60 us here (more with
the caches cold after a wait), at the end of a step, on every rank: once per quarter second it costs well under 0.1%
of the time, where every step of a 150 ms pipeline paid it."""

_MIN_TICKS = 20
"""Clock ticks (usually 10 ms of one core each) that an :class:`IdleMeter` sample spans at least, so that the idle
share of a step shorter than a few ticks is not read as all or nothing."""


class IdleMeter:
    """How busy the calling thread and the machine were between two calls of :meth:`sample`."""

    def __init__(self) -> None:
        # The machine's share is read over the CPUs this process may run on; under a CPU quota it is not known.
        self._cpus = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self._capped = cpu_quota_capped()
        self._last = self._now()

    def _now(self) -> tuple[float, float, tuple[int, int] | None]:
        return time.perf_counter(), time.thread_time(), None if self._capped else _machine_times(self._cpus)

    def sample(self) -> tuple[float, float | None] | None:
        """(share of the wall time the calling thread spent on a CPU, share of the CPU time of the cores this process
        may use that was idle, or ``None`` where it cannot be told), since the last sample or construction; ``None``
        until ``_MIN_WALL`` seconds have passed and the cores' clock has advanced ``_MIN_TICKS`` since then (short
        steps are pooled until they have)."""
        (wall0, cpu0, machine0) = self._last
        if time.perf_counter() - wall0 < _MIN_WALL:  # decided without reading /proc/stat (tens of us, each step)
            return None
        now = self._now()
        wall1, cpu1, machine1 = now
        if machine0 is not None and machine1 is not None and machine1[1] - machine0[1] < _MIN_TICKS:
            return None
        self._last = now
        busy = (cpu1 - cpu0) / (wall1 - wall0) if wall1 > wall0 else 1.0
        if machine0 is None or machine1 is None or machine1[1] <= machine0[1]:
            return busy, None
        return busy, (machine1[0] - machine0[0]) / (machine1[1] - machine0[1])


def wants_poster(busy: float, idle: float | None, *, using: bool) -> bool:
    """Whether the next step should make its gloo calls on a poster thread, from the last step's :class:`IdleMeter`
    sample and whether it used one. The thread pays only while the caller mostly waits and cores sit idle (measured
    here: thread busy 3-10% and machine idle 80-92% with sleeping stages; busy 38-95% and idle 4-18% with CPU-bound
    ones); the thresholds to leave are looser than those to enter, so that one noisy step does not flip it."""
    if idle is None:
        return False
    if using:
        return busy < 0.4 and idle >= 0.35
    return busy < 0.25 and idle >= 0.5
