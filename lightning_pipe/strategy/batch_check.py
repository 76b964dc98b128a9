"""Every stage of a pipeline reads the batch from its own DataLoader: the first stage takes the inputs from its copy
and the last stage the targets from its own. If the copies differ (a sampler or an augmentation drawing from each
process's own random state, a dataset that depends on the rank), training goes wrong without any error.

* :func:`seed_alike` makes the random state a DataLoader draws from the same on every stage of a pipeline (its
  workers' seeds, the base seed it draws per epoch, a ``RandomSampler``'s order), and different between replicas.
* :func:`check_same_batch`: a few numbers summarise each stage's batch; the stages of a pipeline compare them
  before each step, and all raise at once when they differ (randomness the DataLoader does not own: a dataset
  drawing from the process's global generator, which each stage's model consumes differently).
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import apply_to_collection

from lightning_pipe.errors import PipelineError

__all__ = ["batch_fingerprint", "check_same_batch", "gather_rows", "seed_alike"]

_SAMPLE = 4096  # elements read per tensor: a strided sample, so the cost does not grow with the batch


def batch_fingerprint(batch: Any, device: torch.device) -> torch.Tensor:
    """``[byte sum, position-weighted byte sum, elements, tensors, checksum]`` of ``batch`` (int64, on ``device``):
    the sums over the bytes of a strided sample of each tensor (integers: exact, whatever the order of summing, so
    equal batches give equal numbers on any rank), the checksum over its other leaves (numbers, strings). Batches
    that hold other samples, in another order, or augmented otherwise give other numbers, in practice."""
    rows: list[torch.Tensor] = []
    others: list[str] = []
    numel = 0

    def tensor(t: torch.Tensor) -> None:
        nonlocal numel
        if t.layout != torch.strided:  # sparse: described, not sampled
            others.append(f"{t.layout}{tuple(t.shape)}")
            return
        flat = t.detach().reshape(-1)
        numel += flat.numel()
        raw = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].contiguous().view(torch.uint8).to(torch.int64)
        position = _positions(raw.device)[: raw.numel()]
        # Each leaf scaled by its place among the leaves: leaves in another order give other sums.
        rows.append(torch.stack([raw.sum(), (raw * position).sum()]).to(device) * (len(rows) + 1))

    def other(value: Any) -> None:
        others.append(repr(value))

    apply_to_collection(batch, torch.Tensor, tensor)
    apply_to_collection(batch, (int, float, str, bytes), other)
    sums = torch.stack(rows).sum(0) if rows else torch.zeros(2, device=device, dtype=torch.int64)
    checksum = zlib.crc32("\x00".join(others).encode("utf-8", errors="replace"))
    return torch.cat([sums, torch.tensor([numel, len(rows), checksum], device=device, dtype=torch.int64)])


_POSITIONS: dict[torch.device, torch.Tensor] = {}


def _positions(device: torch.device) -> torch.Tensor:
    """``1, 2, ...`` for every byte a sample may have (16 per element at most: complex128), made once per device."""
    table = _POSITIONS.get(device)
    if table is None:
        table = _POSITIONS[device] = torch.arange(1, 16 * _SAMPLE + 1, device=device, dtype=torch.int64)
    return table


# torch 2.13 renamed all_gather_into_tensor (which now warns that it is deprecated) to all_gather_single.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_rows(mine: torch.Tensor, *, group: dist.ProcessGroup | None, size: int) -> list[list[Any]]:
    """Every rank's 1-d ``mine`` (the same length on each of the ``size`` ranks of ``group``), as lists, on every
    rank: so that all of them take the same decision."""
    every = torch.empty(size * mine.numel(), device=mine.device, dtype=mine.dtype)
    _ALL_GATHER_SINGLE(every, mine, group=group)
    return every.view(size, -1).tolist()


def check_same_batch(batch: Any, *, device: torch.device, group: dist.ProcessGroup | None, size: int,
                     where: str) -> None:
    """Raise on every rank of ``group`` (one pipeline) if their batches differ (see the module docstring)."""
    rows = gather_rows(batch_fingerprint(batch, device), group=group, size=size)
    if any(row != rows[0] for row in rows[1:]):
        differ = [i for i, row in enumerate(rows) if row != rows[0]]
        raise PipelineError(
            f"the stages of this pipeline got different batches ({where}; pipeline ranks {differ} differ from rank "
            "0). Each stage reads the batch from its own DataLoader, which must give every stage of a pipeline the "
            "same batches: the same sampler order (use_distributed_sampler=True, or a sampler seeded alike on "
            "every stage) and the same random augmentations (seed them by the data-parallel rank, not the global "
            "rank). PipelineStrategy(check_batches=False) turns this check off"
        )


def seed_alike(dataloader: Any, *, seed: int, replica: int, epoch: int = 0) -> None:
    """Seed ``dataloader``'s own random state from ``seed`` (the same on every rank of the pipeline), the
    data-parallel ``replica`` and the ``epoch`` it is made for, where it would otherwise come from each process's
    state: its base seed per epoch (``generator``), the order of a ``RandomSampler`` without a generator, and, under
    ``seed_everything(workers=True)``, its workers' seeds (Lightning derives them from the global rank, which
    differs between the stages of a pipeline). The epoch makes a loader made anew each epoch
    (``reload_dataloaders_every_n_epochs``), or on resuming, draw a new order, as one device's would from its
    advancing global generator. What the user set is left alone."""
    from lightning.fabric.utilities.seed import pl_worker_init_function
    from torch.utils.data import DataLoader, RandomSampler

    if not isinstance(dataloader, DataLoader):
        return
    own = ((seed * 1_000_003 + replica) * 1_000_033 + epoch) % (1 << 63)
    if dataloader.generator is None:
        dataloader.generator = torch.Generator().manual_seed(own)
    samplers = [dataloader.sampler, getattr(dataloader.batch_sampler, "sampler", None)]
    for sampler in samplers:
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            sampler.generator = torch.Generator().manual_seed(own + 1)
    if int(os.environ.get("PL_SEED_WORKERS", 0)) and dataloader.worker_init_fn is None:
        dataloader.worker_init_fn = functools.partial(pl_worker_init_function, rank=replica)
