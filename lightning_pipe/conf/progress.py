"""Callbacks of the Hydra entry point: a step clock for throughput, the printed loss curve, and the figures a run
reports (``result.json``, read back by the sweep summary)."""

from __future__ import annotations

import csv
import math
import statistics
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning_pipe.strategy.metrics import tokens_in

__all__ = ["StepClock", "PrintProgress", "schedule_bubble", "read_metrics_csv", "mean_column"]

BUBBLE_KEYS = ("pipeline/bubble_fraction", "pipeline/bubble_fraction_max")


def schedule_bubble(schedule: str, num_ranks: int, num_microbatches: int, virtual_stages: int | None = None,
                    forward: float = 1.0, backward: float = 2.0) -> float | None:
    """Idle share of the idlest rank for ``schedule`` with backward = 2 x forward per stage (half of it weight
    gradient, which split schedules run as W), from the simulator (``None`` where the schedule cannot be built)."""
    try:
        from lightning_pipe.schedules import build_schedule
        from lightning_pipe.simulate import Costs, simulate

        built = build_schedule(schedule, num_ranks=num_ranks, num_microbatches=num_microbatches,
                               virtual_stages=virtual_stages)
        v = built.num_stages // num_ranks  # the per-rank costs are shared among a rank's chunks
        costs = Costs(forward / v, backward / v, backward / (2 * v) if built.split_backward else 0.0)
        return float(max(simulate(built, costs).bubble_fraction))
    except Exception:  # noqa: BLE001 - a figure for the printout only
        return None


class StepClock(Callback):
    """Wall time of each training batch (``on_train_batch_start`` to ``on_train_batch_end``: the whole pipelined
    step with its optimizer step, validation excluded) and the samples and tokens it held on all replicas."""

    def __init__(self, warmup_steps: int = 5) -> None:
        self.warmup_steps = warmup_steps
        self.durations: list[float] = []
        self.samples_per_batch = 0
        self.tokens_per_sample = 0
        self.train_time = 0.0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        shape = getattr(first, "shape", None)
        if shape is not None and len(shape) >= 1:
            replicas = trainer.strategy.distributed_sampler_kwargs.get("num_replicas", 1) \
                if hasattr(trainer.strategy, "distributed_sampler_kwargs") else 1
            self.samples_per_batch = int(shape[0]) * int(replicas or 1)
            # The same rule as the strategy's pipeline/tokens_per_sec (labels (batch, 1) are not tokens).
            self.tokens_per_sample = (tokens_in(batch) or 0) // max(1, int(shape[0]))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._t0
        self.durations.append(elapsed)
        self.train_time += elapsed

    def step_time(self, last: int | None = None) -> float | None:
        """Median batch time after the warm-up (over the ``last`` batches if given)."""
        times = self.durations[self.warmup_steps:] or self.durations
        if last:
            times = times[-last:]
        return statistics.median(times) if times else None

    def samples_per_sec(self, last: int | None = None) -> float | None:
        t = self.step_time(last)
        return self.samples_per_batch / t if t else None


class PrintProgress(Callback):
    """Prints the loss curve on rank 0 (every rank holds the same values): training loss, throughput and the
    measured bubble every ``every`` steps, validation loss after each validation."""

    def __init__(self, clock: StepClock, every: int = 100) -> None:
        self.clock, self.every = clock, max(1, every)
        self.start = time.monotonic()
        self.val_history: list[tuple[int, float]] = []
        self._printed = 0  # the last step printed: batches that accumulate gradients share their step

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every or step == self._printed:
            return
        self._printed = step
        metrics = trainer.callback_metrics
        parts = [f"step {step:5d}"]
        if "train_loss" in metrics:
            parts.append(f"train_loss {float(metrics['train_loss']):.3f}")
        sps = self.clock.samples_per_sec(last=self.every)
        if sps:
            parts.append(f"{sps:7.1f} samples/s")
        for key in BUBBLE_KEYS[:1]:
            if key in metrics:
                parts.append(f"bubble {float(metrics[key]):.3f}")
        parts.append(f"({time.monotonic() - self.start:.0f}s)")
        print("  ".join(parts), flush=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        val = float(trainer.callback_metrics["val_loss"])
        self.val_history.append((trainer.global_step, val))
        if trainer.is_global_zero:
            print(f"step {trainer.global_step:5d}  val_loss {val:.3f}", flush=True)


def read_metrics_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a Lightning ``CSVLogger`` ``metrics.csv`` (an empty list if there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def mean_column(rows: list[dict[str, str]], key: str, skip_steps: int = 0) -> float | None:
    """Mean of the non-empty values of column ``key`` in rows whose ``step`` is at least ``skip_steps``."""
    values = []
    for row in rows:
        raw = row.get(key)
        if raw in (None, ""):
            continue
        try:
            step = int(float(row.get("step") or 0))
            value = float(raw)
        except ValueError:
            continue
        if step >= skip_steps and math.isfinite(value):
            values.append(value)
    if not values and skip_steps:
        return mean_column(rows, key)
    return sum(values) / len(values) if values else None
