"""Logging what the executor measured: bubble fraction, step time and throughput, and saving timelines.

Every step the executor records each action's times on its rank (``time.perf_counter``: ready, start, end; on a
GPU also CUDA events around each action's compute, which these figures then use). Only
on the Lightning logging steps (``log_every_n_steps``) does each rank share three numbers with its pipeline (first
start and last end on the wall clock, busy seconds) in one small all-gather; every rank then logs the same figures
(so ``callback_metrics`` agree everywhere and loggers on rank 0 write them):

* ``pipeline/bubble_fraction``: mean over the pipeline's ranks of ``1 - busy / step_time``;
* ``pipeline/bubble_fraction_max``: the idlest rank's share;
* ``pipeline/step_time``: seconds from the first action's start to the last action's end, over the ranks;
* ``pipeline/samples_per_sec``: samples of the batch x replicas / step time;
* ``pipeline/tokens_per_sec``: where the batch has tokens, i.e. an integer tensor of at least two dimensions, the
  second longer than 1 (the first one found, e.g. token ids ``(batch, seq)``; class labels ``(batch, 1)`` are not
  tokens): its element count x replicas / step time.

For the steps named in ``timeline_steps`` (optimizer steps, ``trainer.global_step``), every rank's records are
gathered and global rank 0 writes ``step<N>.trace.json`` (Chrome/Perfetto) and ``step<N>.png`` (the measured
timeline under the plan: the simulator fed with this step's mean action times per stage).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from lightning_pipe.engine.tree import flatten
from lightning_pipe.observe.timeline import Timeline, clock_offset, pack_records, summarize_records
from lightning_pipe.schedules.actions import Schedule

__all__ = ["PipelineMetrics", "tokens_in"]

log = logging.getLogger(__name__)


def tokens_in(batch: Any) -> int | None:
    """Tokens in ``batch``: the element count of its first integer tensor with at least two dimensions, the second
    longer than 1 (token ids ``(batch, seq)``; labels ``(batch, 1)`` are skipped)."""
    try:
        tensors = flatten(batch)[0]
    except Exception:  # noqa: BLE001 - an unusual batch type: no token count
        return None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] > 1 and not t.is_floating_point() \
                and not t.is_complex() and t.dtype is not torch.bool:
            return t.numel()
    return None


class PipelineMetrics:
    """Per strategy: turns each training step's executor records into logged figures and timeline files."""

    def __init__(self, *, timeline_steps: Sequence[int] = (), timeline_dir: str | None = None,
                 enabled: bool = True) -> None:
        self.timeline_steps = {int(s) for s in timeline_steps}
        self.timeline_dir = timeline_dir
        self.enabled = enabled
        self.offset = clock_offset()
        self.saved: list[Path] = []
        self.last: dict[str, float] = {}
        self.seconds_spent = 0.0
        """Time spent here on logging steps (gathering and logging), for the overhead figure."""
        self._done_steps: set[int] = set()

    def after_step(self, *, module: Any, result: Any, batch: Any, schedule: Schedule, group: Any,
                   num_ranks: int, replicas: int, is_global_zero: bool, samples: int,
                   device: torch.device = torch.device("cpu")) -> None:
        if not self.enabled or not result.records:
            return
        trainer = module.trainer
        step = trainer.global_step
        want_timeline = step in self.timeline_steps and step not in self._done_steps
        should_log = trainer._logger_connector.should_update_logs
        if not (should_log or want_timeline):
            return
        t0 = time.perf_counter()
        records = result.timed_records()  # CUDA events on a GPU, the host clock on the CPU
        mine = torch.tensor([records[0].start + self.offset, max(r.end for r in records) + self.offset,
                             sum(r.end - r.start for r in records)], dtype=torch.float64, device=device)
        if num_ranks > 1:
            gathered = [torch.empty_like(mine) for _ in range(num_ranks)]
            dist.all_gather(gathered, mine, group=group)
        else:
            gathered = [mine]
        summary = summarize_records([tuple(g.tolist()) for g in gathered])
        if should_log and summary.step_time > 0:
            values = {
                "pipeline/bubble_fraction": summary.mean_bubble,
                "pipeline/bubble_fraction_max": summary.max_bubble,
                "pipeline/step_time": summary.step_time,
                "pipeline/samples_per_sec": samples * replicas / summary.step_time,
            }
            tokens = tokens_in(batch)
            if tokens is not None:
                values["pipeline/tokens_per_sec"] = tokens * replicas / summary.step_time
            self.last = values
            for name, value in values.items():
                module.log(name, torch.tensor(value, dtype=torch.float32), on_step=True, on_epoch=False,
                           prog_bar=False, batch_size=1, sync_dist=False)
        if want_timeline:
            self._done_steps.add(step)
            packed = pack_records(records, self.offset)
            everyone: list[Any] = [None] * num_ranks
            if num_ranks > 1:
                dist.all_gather_object(everyone, packed, group=group)
            else:
                everyone = [packed]
            if is_global_zero:
                self._write(trainer, step, everyone, schedule)
        self.seconds_spent += time.perf_counter() - t0

    def _write(self, trainer: Any, step: int, everyone: list[Any], schedule: Schedule) -> None:
        from lightning_pipe.observe.plot import plot_timelines
        from lightning_pipe.observe.trace import write_chrome_trace
        from lightning_pipe.simulate import Costs, simulate

        folder = Path(self.timeline_dir or os.path.join(trainer.default_root_dir, "pipeline_timelines"))
        measured = Timeline.from_packed(everyone, title=f"measured {schedule.name}, step {step}")
        means = measured.mean_durations()
        p = schedule.num_stages
        weight = [means.get(("W", s), 0.0) for s in range(p)]  # split backwards: B + W is the whole backward
        costs = Costs([means.get(("F", s), 0.0) for s in range(p)],
                      [means.get(("B", s), 0.0) + w for s, w in zip(range(p), weight)], weight)
        planned = Timeline.from_simulation(simulate(schedule, costs),
                                           title=f"planned {schedule.name} (simulator, measured mean action times)")
        self.saved.append(write_chrome_trace(measured, folder / f"step{step}.trace.json"))
        self.saved.append(plot_timelines([planned, measured], folder / f"step{step}.png"))
        log.info(f"pipeline timeline of step {step} written to {folder}")
