"""The transport's poster thread and the idle measure that decides whether to use it (no processes)."""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any, Callable

import pytest

from lightning_pipe.engine import poster as poster_module
from lightning_pipe.engine.poster import IdleMeter, Poster, cpu_quota_capped, wants_poster


def test_jobs_run_in_order_on_one_other_thread() -> None:
    poster = Poster()
    seen: list[tuple[int, str]] = []
    for i in range(50):
        poster.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    assert poster.sync(5.0)
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"pipeline_poster"}
    poster.close()
    assert not poster.alive


def test_a_job_that_raises_is_reported_and_the_next_ones_still_run(capsys: pytest.CaptureFixture[str]) -> None:
    poster = Poster()
    ran: list[int] = []

    def broken() -> None:
        raise RuntimeError("a job with a bug")

    poster.submit(broken)
    poster.submit(lambda: ran.append(1))
    assert poster.sync(5.0) and ran == [1]
    assert "a job with a bug" in capsys.readouterr().err
    poster.close()


def test_sync_reports_a_job_that_outlasts_the_timeout() -> None:
    poster = Poster()
    gate = threading.Event()
    poster.submit(lambda: gate.wait(5.0) and None)
    assert not poster.sync(0.05)
    gate.set()
    assert poster.sync(5.0)
    poster.close()


def test_close_runs_what_was_submitted_first() -> None:
    poster = Poster()
    done: list[int] = []
    poster.submit(lambda: (time.sleep(0.05), done.append(1)) and None)
    poster.close()
    assert done == [1] and not poster.alive


def test_a_dropped_poster_ends_its_thread() -> None:
    poster = Poster(name="dropped_poster")
    thread = poster._thread
    del poster
    gc.collect()
    thread.join(5.0)
    assert not thread.is_alive()


def _sample_after(meter: IdleMeter, work: Callable[[], None]) -> tuple[float, float | None]:
    """``work()`` until the meter has a sample (a sample spans at least ``_MIN_TICKS`` of the cores' clock)."""
    for _ in range(50):
        work()
        sample = meter.sample()
        if sample is not None:
            return sample
    raise AssertionError("no sample after 50 rounds")


def _spin() -> None:
    end = time.perf_counter() + 0.1
    while time.perf_counter() < end:
        pass


def test_idle_meter_tells_a_sleeping_thread_from_a_spinning_one() -> None:
    meter = IdleMeter()
    busy, idle = _sample_after(meter, lambda: time.sleep(0.1))
    assert busy < 0.2
    assert idle is None or 0.0 <= idle <= 1.0
    busy, _ = _sample_after(meter, _spin)
    assert busy > 0.5  # a core shared with others still gives a spinning thread most of its time here


@pytest.mark.skipif(not os.path.exists("/proc/stat") or cpu_quota_capped(), reason="needs the cores' idle time")
def test_idle_meter_pools_steps_too_short_to_tell() -> None:
    meter = IdleMeter()
    meter.sample()  # whatever came before
    _sample_after(meter, lambda: time.sleep(0.05))
    assert meter.sample() is None  # no time at all since: not a sample of 0 or 100% idle


@pytest.mark.parametrize(("busy", "idle", "using", "expected"), [
    (0.05, 0.9, False, True),    # sleeping stages: thread busy 3-10%, machine 80-92% idle
    (0.4, 0.15, False, False),   # CPU-bound stages, more processes than cores
    (0.9, 0.08, False, False),   # CPU-bound, a core each
    (0.3, 0.9, False, False),    # too busy to start...
    (0.3, 0.9, True, True),      # ...but not to stop: one noisy step does not flip it
    (0.05, 0.4, False, False),   # the machine's other work keeps the cores busy
    (0.05, 0.4, True, True),
    (0.05, 0.3, True, False),
    (0.5, 0.9, True, False),
    (0.05, None, False, False),  # no /proc/stat: never
    (0.05, None, True, False),
])
def test_wants_poster_only_while_the_caller_waits_and_cores_sit_idle(busy: float, idle: float | None, using: bool,
                                                                     expected: bool) -> None:
    assert wants_poster(busy, idle, using=using) is expected


@pytest.mark.parametrize(("cgroups", "files", "capped"), [
    ("0::/job\n", {"job/cpu.max": "max 100000\n"}, False),                  # cgroup v2, no limit
    ("0::/job\n", {"job/cpu.max": "200000 100000\n"}, True),                # v2, two cores' worth
    ("0::/\n", {"cpu.max": "50000 100000\n"}, True),                        # v2 inside a cgroup namespace
    ("3:cpu,cpuacct:/job\n1:memory:/job\n", {"cpu,cpuacct/job/cpu.cfs_quota_us": "-1\n"}, False),  # cgroup v1
    ("3:cpu,cpuacct:/job\n", {"cpu,cpuacct/job/cpu.cfs_quota_us": "150000\n"}, True),
    ("3:cpu,cpuacct:/\n", {}, False),                                        # nothing to read: not capped
    ("1:memory:/job\n", {"memory/job/cpu.max": "100 100\n"}, False),        # no cpu controller listed
    ("0::/slice/job\n", {"slice/job/cpu.max": "max 100000\n", "slice/cpu.max": "100000 100000\n"}, True),  # parent
    ("0::/slice/job\n", {"slice/job/cpu.max": "max 100000\n", "slice/cpu.max": "max 100000\n",
                          "cpu.max": "max 100000\n"}, False),             # no limit anywhere up the tree
    ("3:cpu,cpuacct:/pod/job\n", {"cpu,cpuacct/pod/job/cpu.cfs_quota_us": "-1\n",
                                   "cpu,cpuacct/pod/cpu.cfs_quota_us": "200000\n"}, True),  # v1, on the parent
])
def test_cpu_quota_capped_reads_cgroup_v1_and_v2(tmp_path: Any, cgroups: str, files: dict[str, str],
                                                 capped: bool) -> None:
    (tmp_path / "cgroup").write_text(cgroups)
    for name, text in files.items():
        path = tmp_path / "fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert cpu_quota_capped(cgroups=str(tmp_path / "cgroup"), root=str(tmp_path / "fs")) is capped


def test_a_capped_process_never_reads_the_machine_as_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(poster_module, "cpu_quota_capped", lambda: True)
    meter = IdleMeter()
    time.sleep(poster_module._MIN_WALL + 0.01)
    assert meter.sample()[1] is None


def test_idle_meter_reads_the_machine_at_most_once_per_min_wall(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[float] = []
    real = poster_module._machine_times
    monkeypatch.setattr(poster_module, "_machine_times", lambda cpus: reads.append(time.perf_counter()) or real(cpus))
    meter = IdleMeter()
    for _ in range(20):  # steps of 10 ms
        time.sleep(0.01)
        assert meter.sample() is None
    assert len(reads) == 1  # at construction only
    time.sleep(poster_module._MIN_WALL)
    meter.sample()
    assert len(reads) == 2


@pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_machine_times_count_the_cpus_this_process_may_use() -> None:
    allowed = frozenset(os.sched_getaffinity(0))
    one = poster_module._machine_times(frozenset([min(allowed)]))
    every = poster_module._machine_times(allowed)
    assert one is not None and every is not None
    assert 0 <= one[0] <= one[1] and 0 <= every[0] <= every[1]
    if len(allowed) > 1:
        assert one[1] < every[1]
    # CPUs that do not exist fall back to the whole machine's line, rather than to nothing.
    assert poster_module._machine_times(frozenset([10_000])) is not None
