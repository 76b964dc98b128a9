"""The transport's poster thread and the idle measure that decides whether to use it (no processes)."""

from __future__ import annotations

import gc
import threading
import time

import pytest

from lightning_pipe.engine.poster import IdleMeter, Poster, wants_poster


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


def test_idle_meter_tells_a_sleeping_thread_from_a_spinning_one() -> None:
    meter = IdleMeter()
    time.sleep(0.2)
    busy, idle = meter.sample()
    assert busy < 0.2
    assert idle is None or 0.0 <= idle <= 1.0
    end = time.perf_counter() + 0.2
    while time.perf_counter() < end:
        pass
    busy, _ = meter.sample()
    assert busy > 0.5  # a core shared with others still gives a spinning thread most of its time here


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
