"""The executor's timing on a GPU: CUDA events around each action, placed on the host clock."""

from __future__ import annotations

import pytest
import torch


def test_cuda_timer_places_device_times_on_the_host_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-event path of the executor's timing, with a stand-in for torch.cuda.Event (no GPU here; the real one
    ran on an H200 through benchmarks/gpu_check.py)."""
    from lightning_pipe.engine.executor import ActionRecord, StepResult, _CudaTimer
    from lightning_pipe.schedules import F

    clock = iter(range(100))

    class FakeEvent:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            self.t = -1.0

        def record(self) -> None:
            self.t = float(next(clock))  # "device" milliseconds

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, other: "FakeEvent") -> float:
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    result = StepResult(start=10.0)
    timer = _CudaTimer(result)  # anchor at device time 0
    for i in range(2):
        host_start = timer.begin()  # device time 1, then 3
        result.records.append(ActionRecord(F(i, 0), 0.0, host_start, host_start))
        timer.end()  # device time 2, then 4
    timed = result.timed_records()
    assert [(r.start, r.end) for r in timed] == [(10.001, 10.002), (10.003, 10.004)]
    assert StepResult(records=result.records).timed_records() is result.records  # the CPU: host times as they are
