"""``balance="time"``/``"memory"`` and ``num_microbatches="auto"``: profile the LightningModule, decide, share.

Global rank 0 runs the user's ``training_step`` on the whole (not yet cut) model on its device, with a real
micro-batch from the train dataloader, and times every block of the chain (:func:`profile_chain`). It decides the
cut (exact min-max, :mod:`lightning_pipe.tuning.partition`) and, for ``"auto"``, the number of micro-batches
(:func:`choose_microbatches`, from two profiles at two micro-batch sizes, the per-action overhead measured on
the spot by every pipeline with a no-op step of the real executor, and the simulator); then it broadcasts the
decision, so every rank uses the same one. Limitation: the whole model must fit rank 0's device for profiling.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric

from lightning_pipe.engine import PipelineExecutor, Transport, batch_size_of, split_microbatches
from lightning_pipe.errors import PipelineError
from lightning_pipe.schedules.actions import Schedule
from lightning_pipe.simulate import Costs, simulate
from lightning_pipe.strategy.logs import LogRecorder
from lightning_pipe.strategy.side_effects import SavedMetrics, load_metric_states, save_metric_states
from lightning_pipe.tuning.microbatches import StageCostModel, TuneResult, choose_microbatches
from lightning_pipe.tuning.partition import memory_cost, memory_partition, time_partition
from lightning_pipe.tuning.profile import ChainProfile, fit_linear, profile_chain

__all__ = ["LayoutPlan", "plan_layout", "measure_action_overhead"]

log = logging.getLogger(__name__)


@dataclass
class LayoutPlan:
    counts: list[int]
    num_microbatches: int | None
    report: str
    tune: TuneResult | None = None


def measure_action_overhead(schedule: Schedule, rank: int, transport: Transport, device: torch.device | str,
                            *, steps: int = 6, activation: torch.Tensor | None = None) -> float:
    """Seconds each action costs beyond its compute on this pipeline (posting sends and receives, waits, the
    executor's bookkeeping): a no-op step of the real executor over the real group, divided by the simulated
    step of unit-cost actions. ``activation``: a tensor shaped like what crosses stages, so that the transfers are
    of the real size (default: 16 numbers). Every rank of the pipeline must call it at the same time."""
    executor = PipelineExecutor(schedule, rank=rank, transport=transport)
    x0 = (activation.detach().to(device) if activation is not None else torch.zeros(16, device=device))
    x0 = x0.clone().requires_grad_(True)

    def forward_fn(stage: int, microbatch: int, inputs: Any) -> torch.Tensor:
        out = (x0 if inputs is None else inputs) * 1.0
        return out.sum() if stage == schedule.num_stages - 1 else out

    times = []
    for i in range(steps + 2):
        result = executor.run(forward_fn)
        if i >= 2:
            times.append(result.step_time)
    unit = simulate(schedule, Costs(1.0, 1.0)).step_time
    return statistics.median(times) / unit


def _strategy_overhead(strategy: Any) -> float:
    transport = strategy.new_transport()
    schedule = strategy.schedule_for(max(2 * strategy.num_stages, 4))
    try:
        return measure_action_overhead(schedule, strategy.pp_rank, transport, strategy.root_device)
    finally:
        transport.close()  # its poster thread, if its steps started one


def _shared_cores(strategy: Any, device: torch.device) -> float | None:
    """On a CPU host running more processes than it has cores, the cores one pipeline gets (rank 0 profiled alone,
    so the simulator must model the sharing); ``None`` when every rank has its own device or core."""
    if device.type != "cpu":
        return None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(getattr(strategy, "num_processes", 1)))  # this host's processes
    if local <= usable:
        return None
    return usable * min(strategy.num_stages, local) / local


def _first_batch(trainer: Any) -> Any:
    source = trainer.fit_loop._data_source
    if not source.is_defined():
        raise PipelineError("balance='time'/'memory' and num_microbatches='auto' profile the model on a real "
                            "batch: they need a train dataloader (trainer.fit)")
    loader = source.dataloader()
    return next(iter(loader))


def _profile(module: Any, chain: nn.Module, micro: Any, device: torch.device) -> ChainProfile:
    recorder = LogRecorder(module)

    def step_fn() -> torch.Tensor:
        with recorder.capture(0):
            out = module.training_step(micro, 0)
        recorder.calls.clear()
        recorder.prints.clear()
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor):
            raise PipelineError("training_step must return the loss to profile the model")
        return loss

    return profile_chain(step_fn, list(chain), device=device, samples=batch_size_of(micro),
                         params=list(module.parameters()))


def _alone() -> bool:
    return False


def _restore(module: nn.Module, buffers: dict[str, torch.Tensor], metrics: SavedMetrics) -> None:
    with torch.no_grad():
        for name, b in module.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    load_metric_states(metrics)  # as before the profile (not reset: a metric may hold state from before fit)


class _RandomStates:
    """The generators a training step or a DataLoader may draw from (torch's, the device's, Python's, NumPy's),
    saved now and put back by :meth:`restore`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.python = random.getstate()
        self._numpy = _numpy_random()
        self.numpy = self._numpy.get_state() if self._numpy is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        random.setstate(self.python)
        if self._numpy is not None:
            self._numpy.set_state(self.numpy)


def _numpy_random() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch in practice
        return None
    return numpy.random


def plan_layout(strategy: Any, module: Any, chain: nn.Module, fallback: Any) -> LayoutPlan:
    """Decide the cut (and ``num_microbatches`` for ``"auto"``) on global rank 0; every rank returns the same.
    ``fallback()`` gives the block counts for the balances that need no profile."""
    auto = strategy._auto_microbatches
    p = strategy.num_model_stages  # pipeline ranks x virtual stages
    overhead = _strategy_overhead(strategy) if auto else 0.0
    payload: list[Any] = [None]
    if strategy.global_rank == 0:
        try:
            payload = [_decide(strategy, module, chain, fallback, overhead)]
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, not wait in the broadcast
            payload = [f"{type(err).__name__}: {err}"]
            if strategy.world_size == 1:
                raise
    if strategy.world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise PipelineError(f"planning the pipeline layout failed on rank 0: {payload[0]}")
    plan: LayoutPlan = payload[0]
    if len(plan.counts) != p:  # pragma: no cover - defensive
        raise PipelineError(f"planned {plan.counts} for {p} stages")
    return plan


def _decide(strategy: Any, module: Any, chain: nn.Module, fallback: Any, overhead: float) -> LayoutPlan:
    trainer = module.trainer
    p = strategy.num_model_stages  # the cut has one piece per stage: pipeline ranks x virtual stages
    balance = strategy.balance
    profiled = balance in ("time", "memory") or strategy._auto_microbatches
    if not profiled:  # pragma: no cover - plan_layout is only called when something needs a profile
        return LayoutPlan(fallback(), None, "")
    device = strategy.root_device
    # Profiling runs the user's training_step: what it changes (buffers such as BatchNorm's running statistics,
    # torchmetrics states, the random number generators) is put back afterwards, so that training starts as it
    # would have without the profile. The generators are saved before the batch is drawn: making the loader's
    # iterator draws its base seed from torch's generator (on this rank only, which then ran other dropout masks).
    rng = _RandomStates(device)
    batch = _first_batch(trainer)
    size = batch_size_of(batch)
    home = next(module.parameters()).device
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    # This rank profiles alone: a metric that syncs on step would wait for the others.
    metrics = [m for m in module.modules() if isinstance(m, Metric)]
    metric_states = save_metric_states(metrics)
    availability = [m.distributed_available_fn for m in metrics]
    for m in metrics:
        m.distributed_available_fn = _alone
    module.to(device)
    m_default = strategy._num_microbatches or 2 * strategy.num_stages
    lines = []
    try:
        to_device = (lambda b: strategy.batch_to_device(b, device)) if hasattr(strategy, "batch_to_device") \
            else (lambda b: b)
        if strategy._auto_microbatches:
            large = _profile(module, chain, to_device(split_microbatches(batch, min(size, p))[0]), device)
            small = _profile(module, chain, to_device(split_microbatches(batch, min(size, 8 * p))[0]), device)
            main = large
        else:
            main = small = large = _profile(module, chain, to_device(split_microbatches(batch, m_default)[0]),
                                            device)
    finally:
        module.to(home)
        module.zero_grad(set_to_none=True)
        _restore(module, buffers, metric_states)
        rng.restore()
        for m, fn in zip(metrics, availability):
            m.distributed_available_fn = fn
    held_m = m_default
    schedule = strategy.schedule_for(held_m)
    # Each stage's own peak, not its rank's: a rank holding v chunks peaks on all of them together (the sum of its
    # stages' costs bounds it), so each stage is held to 1/v of the budget per device.
    held_per_stage = list(simulate(schedule, Costs()).stage_peak_activations)
    per_device = strategy.virtual_stages
    mem = memory_cost(main.param_bytes, main.activation_bytes, held_per_stage,
                      first_extra=main.pre_activation_bytes * held_per_stage[0],
                      last_extra=main.post_activation_bytes * held_per_stage[-1])
    budget = strategy.memory_budget
    if balance == "time":
        part = time_partition(main.forward, main.backward, p, first_extra=main.pre_backward,
                              last_extra=main.post_forward + main.post_backward, every_extra=main.pre_forward,
                              memory=mem, memory_budget=budget, stages_per_device=per_device)
        counts = part.counts
        lines.append(f"balance='time': blocks per stage {counts}; stage forward+backward "
                     f"{[round(1e3 * c, 2) for c in part.stage_costs]} ms on micro-batches of {main.samples}")
    elif balance == "memory":
        part = memory_partition(main.param_bytes, main.activation_bytes, held_per_stage,
                                first_extra=main.pre_activation_bytes * held_per_stage[0],
                                last_extra=main.post_activation_bytes * held_per_stage[-1], memory_budget=budget,
                                stages_per_device=per_device)
        counts = part.counts
        lines.append(f"balance='memory': blocks per stage {counts}; stage memory "
                     f"{[round(c / 2**20, 2) for c in part.stage_costs]} MiB")
    else:
        counts = fallback()
    tune = None
    chosen = None
    if strategy._auto_microbatches:
        fwd, bwd = fit_linear(small, large, counts)
        cores = _shared_cores(strategy, device)
        tune = choose_microbatches(StageCostModel(tuple(fwd), tuple(bwd)), size, num_ranks=strategy.num_stages,
                                   virtual_stages=strategy.virtual_stages,
                                   schedules=[strategy.schedule_name], overhead=overhead, cores=cores,
                                   early_input_grads=strategy.early_input_grads)
        chosen = tune.chosen.microbatches
        shared = f" (the pipeline's ranks share {cores:g} CPU cores)" if cores is not None else ""
        lines.append(f"num_microbatches='auto'{shared}:\n" + tune.table())
    return LayoutPlan(counts, chosen, "\n".join(lines), tune)


