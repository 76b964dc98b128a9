"""torchmetrics ``Metric`` objects under a pipeline: one value on every rank, at no cost per step.

The user's step updates a metric where its inputs are: usually after the chain, so on the last stage only; the
copies on the other stages stay empty. A metric is synced when it is computed (``sync_on_compute``, on by default):
Lightning computes the logged ones at epoch end on every rank, and epoch-end hooks run on every rank too. There,
:func:`gather_over_replicas` (each metric's ``dist_sync_fn``) first gives every stage the last stage's state (one
broadcast per state tensor within the pipeline), then gathers over the data-parallel replicas only, so each value is
counted once, whatever the state (sums, or lists such as AUROC's predictions). Inside a step (a ``compute()`` after
the chain, which runs on the last stage only) it gathers over the replicas alone, which are all in that step. A
metric inside a block of the chain lives on one stage: it syncs among that stage's replicas
(:func:`gather_among_replicas`); one made with ``sync_on_compute=False`` only fetches the last stage's state
(:func:`fetch_from_last_stage`).

After each step the last stage relays the update count of each metric it updated (a few integers, with the logged
values), so that the other copies know they were updated. ``compute()`` does not cache its result: the caches of
the copies would differ (each is cleared by its own updates), and a rank returning a cached value would leave the
others waiting in the sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

__all__ = ["MetricStates", "gather_over_replicas", "gather_among_replicas", "fetch_from_last_stage"]


@dataclass
class _Pipeline:
    replicas: dist.ProcessGroup | None
    """This rank's data-parallel group (the same stage on every replica)."""
    stages: dist.ProcessGroup | None
    """This rank's pipeline group."""
    last: int
    """Global rank of the pipeline's last stage."""
    num_stages: int
    device: torch.device = torch.device("cpu")
    """Where the states travel (an NCCL group takes CUDA tensors only; a metric with ``compute_on_cpu`` keeps its
    list states on the CPU)."""
    in_step: bool = False


_PIPELINE: _Pipeline | None = None  # one strategy per process
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
_MAX_DIMS = 8


def gather_over_replicas(result: torch.Tensor, group: Any | None = None) -> list[torch.Tensor]:
    """A metric's ``dist_sync_fn`` under a pipeline (see the module docstring). The default group (``None`` or the
    whole world) is replaced by the data-parallel replicas; another group given to the metric is kept. A module-level
    function, so that metrics still copy and pickle (a process group does neither)."""
    if group is None or group is dist.group.WORLD:
        result = fetch_from_last_stage(result)[0]
    return gather_among_replicas(result, group)


def _from_last_stage(t: torch.Tensor, pipeline: _Pipeline) -> torch.Tensor:
    """The last stage's version of this state tensor, on every stage (shapes and dtypes may differ: an empty list
    state is a 1-d placeholder of the metric's dtype)."""
    mine = dist.get_rank() == pipeline.last
    head = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=pipeline.device)
    if mine:
        if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
            head[0], head[1] = -1, t.dim()  # every stage raises, none waits for the data
        else:
            head[0], head[1] = _DTYPES.index(t.dtype), t.dim()
            head[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.broadcast(head, src=pipeline.last, group=pipeline.stages)
    if int(head[0]) < 0:
        raise ValueError(f"a metric state of {int(head[1])} dimensions or of a dtype other than {_DTYPES} cannot be "
                         f"relayed between pipeline stages (at most {_MAX_DIMS} dimensions)")
    dtype, ndim = _DTYPES[int(head[0])], int(head[1])
    shape = tuple(int(d) for d in head[2:2 + ndim])
    out = t.to(pipeline.device).contiguous() if mine else torch.empty(shape, dtype=dtype, device=pipeline.device)
    dist.broadcast(out, src=pipeline.last, group=pipeline.stages)
    return out.to(t.device)


def gather_among_replicas(result: torch.Tensor, group: Any | None = None) -> list[torch.Tensor]:
    """The ``dist_sync_fn`` of a metric inside a block of the chain: it lives on one stage, whose replicas alone
    hold it."""
    pipeline = _PIPELINE
    if pipeline is not None and (group is None or group is dist.group.WORLD):
        group = pipeline.replicas
    return gather_all_tensors(result, group=group)


def fetch_from_last_stage(result: torch.Tensor, group: Any | None = None) -> list[torch.Tensor]:
    """The ``dist_sync_fn`` of a metric its user made with ``sync_on_compute=False``: no gathering over replicas,
    but every stage still gets the last stage's state."""
    pipeline = _PIPELINE
    if pipeline is not None and pipeline.num_stages > 1 and not pipeline.in_step:
        result = _from_last_stage(result, pipeline)
    return [result]


_Mark = tuple[int, tuple[int, ...]]  # update count, lengths of the list states


class MetricStates:
    """The ``Metric`` submodules of one (already cut) LightningModule, outside its chain of blocks (a metric inside
    a block lives on one stage only and keeps its own sync)."""

    def __init__(self, module: nn.Module, *, chain: str, replicas: dist.ProcessGroup | None,
                 stages: dist.ProcessGroup | None, last: int, num_stages: int,
                 device: torch.device = torch.device("cpu")) -> None:
        global _PIPELINE
        _PIPELINE = _Pipeline(replicas, stages, last, num_stages, torch.device(device))
        self.module = module
        self.prefix = f"{chain}." if chain else None
        self.metrics: dict[str, Metric] = {}
        self.scan()

    def scan(self) -> None:
        """Find the metrics, also those made since the last scan (``MetricTracker.increment`` makes some)."""
        self.metrics = {}
        for name, m in self.module.named_modules():
            if not isinstance(m, Metric):
                continue
            if self.prefix is not None and name.startswith(self.prefix):
                if m.dist_sync_fn is None:
                    m.dist_sync_fn = gather_among_replicas
                continue
            self.metrics[name] = m
        for metric in self.metrics.values():
            if metric.dist_sync_fn is None:
                if metric.sync_on_compute:
                    metric.dist_sync_fn = gather_over_replicas
                else:  # no sync was asked for: still fetch the last stage's state, and compute from it
                    metric.dist_sync_fn = fetch_from_last_stage
                    metric.sync_on_compute = metric._to_sync = True
            # A cached result would let one rank skip the sync that the others enter (a stage's copy is cleared by
            # its own updates only): every compute() syncs, on every rank alike.
            metric.compute_with_cache = False

    @staticmethod
    def release() -> None:
        """After the run: syncs go back to the groups the metrics were given (the world by default)."""
        global _PIPELINE
        _PIPELINE = None

    @staticmethod
    def stepping(active: bool) -> None:
        """Mark a step running (syncs inside it stay among the replicas) or over."""
        if _PIPELINE is not None:
            _PIPELINE.in_step = active

    def counts(self) -> dict[str, _Mark]:
        """On the last stage, before or after a step: each metric's update count and list-state lengths."""
        self.scan()
        return {name: (m._update_count, tuple(len(v) for v in _list_states(m).values()))
                for name, m in self.metrics.items()}

    def changed(self, before: dict[str, _Mark]) -> dict[str, _Mark]:
        """The marks that changed since ``before``."""
        return {name: mark for name, mark in self.counts().items() if before.get(name) != mark}

    def apply(self, marks: dict[str, _Mark]) -> None:
        """On the other stages: the relayed update counts, and list states as long as the last stage's (of empty
        placeholders: a list reduced entry by entry is synced entry by entry, and every stage must sync as many)."""
        for name, (count, lengths) in marks.items():
            metric = self.metrics.get(name)
            if metric is None:
                self.scan()
                metric = self.metrics.get(name)
                if metric is None:
                    continue
            metric._update_count = count
            for (key, value), length in zip(_list_states(metric).items(), lengths):
                del value[length:]
                value.extend(torch.empty(0, device=metric.device) for _ in range(length - len(value)))


def _list_states(metric: Metric) -> dict[str, list[Any]]:
    return {key: getattr(metric, key) for key, default in metric._defaults.items() if isinstance(default, list)}
