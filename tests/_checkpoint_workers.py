"""Jobs for the checkpoint tests: train, save, resume in a new process, under various layouts."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler

import lightning_pipe
from lightning_pipe import PipelineStrategy
from lightning_pipe.strategy.checkpoint import optimizer_state_by_name
from tests._models import TinyGPT, token_data

BATCH = 8


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.batches: dict[int, tuple[int, int]] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train_loss"])
        self.batches[trainer.global_step] = (trainer.current_epoch, int(batch[0][0, 0]))


class ResumableLoader(DataLoader):
    """A DataLoader whose position within the epoch is saved in checkpoints, so that a run resumed from a checkpoint
    taken mid-epoch continues with the next batch (Lightning restores loaders that have ``state_dict``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._yielded += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["yielded"]


class _ReplicaBatches(Sampler):
    """Replica r of R takes its 1/R of each sequential batch of BATCH samples: together the replicas see exactly
    the batches of a run without replicas."""

    def __init__(self, n: int, replica: int, replicas: int) -> None:
        local = BATCH // replicas
        self.batches = [list(range(k + replica * local, k + (replica + 1) * local)) for k in range(0, n, BATCH)]

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def job(rank: int, world_size: int, *, pp: int | None, steps: int = -1, epochs: int | None = None,
        ckpt_in: str | None = None,
        ckpt_out: str | None = None, optimizer: str = "adamw", body: str = "modulelist",
        corrupt: str | None = None, weights_only: bool | None = None, checkpoint_dir: str | None = None,
        tie_blocks: bool = False) -> dict[str, Any]:
    """Fit to ``steps`` (resuming from ``ckpt_in``), save to ``ckpt_out``; ``pp=None`` trains without a pipeline."""
    seed_everything(0, workers=True)
    model = TinyGPT(body=body, optimizer=optimizer, d=24 if corrupt == "shape" else 16,
                    n_layer=6 if corrupt in ("deeper", "deeper_file") else 4, tie_blocks=tie_blocks)
    replicas = world_size // pp if pp else 1
    data = token_data(48)
    if replicas > 1:
        loader = ResumableLoader(data, batch_sampler=_ReplicaBatches(len(data), rank // pp, replicas))
    else:
        loader = ResumableLoader(data, batch_size=BATCH, shuffle=False)
    strategy: Any = PipelineStrategy(pipeline_parallel_size=pp, num_microbatches=4, timeout=60) if pp else "auto"
    losses = _Losses()
    callbacks: list[Callback] = [losses]
    if checkpoint_dir:  # ModelCheckpoint writes a checkpoint every 3 steps, mid-epoch too
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1, every_n_train_steps=3))
    trainer = Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_steps=steps, max_epochs=epochs,
                      logger=False, enable_checkpointing=bool(checkpoint_dir), enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, callbacks=callbacks)
    trainer.fit(model, loader, ckpt_path=ckpt_in, weights_only=weights_only)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "optimizer": optimizer_state_by_name(trainer.optimizers[0], names),
        "lrs": {names[id(p)]: g["lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]},
        "losses": losses.losses,
        "batches": losses.batches,
        "files": sorted(os.listdir(ckpt_out)) if ckpt_out and os.path.isdir(ckpt_out) else None,
    }


def interrupted_save(rank: int, world_size: int, *, path: str) -> str:
    """Save a checkpoint, then save again to the same path with rank 1 killed in the middle of writing."""
    import torch.distributed.checkpoint as dcp

    seed_everything(0, workers=True)
    trainer = Trainer(accelerator="cpu", devices=world_size, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      strategy=PipelineStrategy(num_microbatches=2, timeout=20))
    model = TinyGPT()
    trainer.fit(model, DataLoader(token_data(48), batch_size=BATCH))
    trainer.save_checkpoint(path)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(saved, f"{path}.rank{rank}.expected")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the second save would write different weights
    if rank == 1:
        real_save = dcp.save

        def dying_save(*args: Any, **kwargs: Any) -> Any:
            os._exit(7)  # killed while writing its shard

        dcp.save = dying_save
        try:
            trainer.save_checkpoint(path)
        finally:
            dcp.save = real_save
    trainer.save_checkpoint(path)  # rank 0: fails once rank 1 is gone
    return "second save finished"


def consolidate_on_rank_zero(rank: int, world_size: int, *, path: str) -> str | None:
    return str(lightning_pipe.consolidate(path)) if rank == 0 else None


def meta_fails(rank: int, world_size: int, *, path: str) -> tuple[str, str]:
    """Save a checkpoint, then save again to the same path with something rank 0 cannot pickle into meta.pt."""

    class Unpicklable(Callback):
        armed = False

        def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
            if self.armed:
                checkpoint["not_picklable"] = lambda: None

    seed_everything(0, workers=True)
    unpicklable = Unpicklable()
    trainer = Trainer(accelerator="cpu", devices=world_size, max_steps=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      strategy=PipelineStrategy(num_microbatches=2, timeout=20), callbacks=[unpicklable])
    model = TinyGPT()
    trainer.fit(model, DataLoader(token_data(48), batch_size=BATCH))
    trainer.save_checkpoint(path)
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{path}.rank{rank}.expected")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the second save would write different weights
    unpicklable.armed = True
    try:
        trainer.save_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - reported to the test
        return type(err).__name__, str(err)
    return "no error", ""


def _unseen_on_rank_1(rank: int, path: str | None) -> Any:
    """On rank 1, ``path`` looks absent (a node that does not see the others' storage); elsewhere, or with no
    ``path``, nothing changes."""
    from contextlib import ExitStack
    from pathlib import Path
    from unittest import mock

    stack = ExitStack()
    if rank == 1 and path is not None:
        for method in ("is_dir", "is_file"):
            real = getattr(Path, method)
            stack.enter_context(mock.patch.object(
                Path, method, lambda self, *a, _real=real, **k: False if str(self) == path else _real(self, *a, **k)))
    return stack


def damaged(rank: int, world_size: int, *, cases: dict[str, str], save_base: str) -> dict[str, tuple[str, str]]:
    """Resume from each damaged checkpoint in ``cases`` (name -> path); return each error's type and message.
    ``meta_missing_on_rank_1``: rank 1 looks for ``unseen.pt`` instead of ``meta.pt``; ``unseen_on_rank_1``: rank
    1 sees nothing at the path. Last, ``save_unshared``: a sharded save to a path that names another directory on
    each rank (``save_base``/rank<r>/), as on nodes that do not share their storage."""
    from pathlib import Path
    from unittest import mock

    import torch.distributed as dist

    from lightning_pipe.strategy import checkpoint

    out = {}
    for case, path in cases.items():
        meta = "unseen.pt" if case == "meta_missing_on_rank_1" and rank == 1 else checkpoint.META_FILE
        try:
            with mock.patch.object(checkpoint, "META_FILE", meta), \
                    _unseen_on_rank_1(rank, path if case == "unseen_on_rank_1" else None):
                job(rank, world_size, pp=world_size, steps=12, ckpt_in=path, corrupt=case)
            out[case] = ("no error", "")
        except Exception as err:  # noqa: BLE001 - reported to the test
            out[case] = (type(err).__name__, str(err))

    def any_rank(flag: bool) -> bool:
        total = torch.tensor([int(flag)])
        dist.all_reduce(total)
        return bool(total.item())

    target = Path(save_base) / f"rank{rank}" / "last.ckpt"
    target.parent.mkdir(parents=True)
    try:
        checkpoint.save_sharded(target, state={"state_dict": {f"w{rank}": torch.zeros(2)}}, meta={"step": 1},
                                is_rank_zero=rank == 0, barrier=dist.barrier, any_rank=any_rank)
        out["save_unshared"] = ("no error", "")
    except Exception as err:  # noqa: BLE001 - reported to the test
        out["save_unshared"] = (type(err).__name__, str(err))
    out["save_unshared_left"] = ("files", str(sorted(p.name for p in target.parent.iterdir())))
    return out
