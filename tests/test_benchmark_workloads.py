"""The sleeping workload of ``benchmarks/vs_torch.py`` costs what its ideal assumes, on every stage.

The zero-bubble targets compare measured step times with ideals computed for a forward of ``tf`` and a backward of
``tb + tw`` on every stage; a stage whose backward skipped a sleep (the first stage, whose micro-batch needs no
gradient, once did) moves the measured ratios away from those ideals without failing anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pytest
import torch

from lightning_pipe.engine import WeightGradCollector, deferring
from tests import _benchmark_workers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import schedule_efficiency  # noqa: E402
import vs_torch  # noqa: E402

TF, TB, TW = 1.0, 2.0, 3.0  # distinct, so each sleep says which part of the chunk it belongs to


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The durations the workload asks to sleep, in order (recorded instead of slept)."""
    asked: list[float] = []
    monkeypatch.setattr(schedule_efficiency, "sleep_exactly", asked.append)
    return asked


@pytest.mark.parametrize("first_stage", [True, False], ids=["first stage", "later stage"])
def test_sleep_chunk_backward_sleeps_b_and_w(sleeps: list[float], first_stage: bool) -> None:
    chunk = vs_torch.SleepChunk(TF, TB, TW)
    x = torch.randn(4, 8, requires_grad=not first_stage)
    out = chunk(x)
    assert sleeps == [TF]
    sleeps.clear()
    out.sum().backward()
    assert sorted(sleeps) == [TB, TW]
    assert chunk.w.grad is not None
    if first_stage:
        assert x.grad is None  # the micro-batch itself gets no gradient
    else:
        torch.testing.assert_close(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("first_stage", [True, False], ids=["first stage", "later stage"])
def test_sleep_chunk_defers_w_under_split(sleeps: list[float], first_stage: bool) -> None:
    chunk = vs_torch.SleepChunk(TF, TB, TW)
    x = torch.randn(4, 8, requires_grad=not first_stage)
    collector = WeightGradCollector()
    with deferring(collector):
        out = chunk(x)
    sleeps.clear()
    out.sum().backward()
    assert sleeps == [TB]  # B: the input path only
    assert chunk.w.grad is None and len(collector) == 1
    sleeps.clear()
    collector.run()
    assert sleeps == [TW]  # W
    torch.testing.assert_close(chunk.w.grad, torch.full_like(chunk.w, 32.0))


@pytest.mark.timeout(120)
def test_collect_from_workers_reads_while_they_run() -> None:
    """Each worker puts more than a pipe holds; a runner that joined before reading would wait forever."""
    got = schedule_efficiency.collect_from_workers(_benchmark_workers.put_many, 2, argparse.Namespace())
    expected = [(rank, i) for rank in range(2) for i in range(_benchmark_workers.ITEMS)]
    assert sorted((rank, i) for rank, i, _ in got) == expected
    assert all(len(blob) == _benchmark_workers.ITEM_BYTES for _, _, blob in got)


@pytest.mark.timeout(120)
def test_collect_from_workers_stops_the_others_when_one_dies() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"\(1, 3\)"):
        schedule_efficiency.collect_from_workers(_benchmark_workers.rank1_dies, 2, argparse.Namespace())
    assert time.monotonic() - start < 60  # rank 0 would sleep 600 s: it was stopped
