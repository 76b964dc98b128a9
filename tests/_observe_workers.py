"""A LightningModule whose blocks sleep for known times (``fixed + per_sample * batch`` ms, backward twice the
forward), for the profiling, partition, micro-batch choice and timeline tests."""

from __future__ import annotations

import glob
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Per block: (fixed ms, ms per sample) of the forward; backward sleeps twice as long.
SLEEPS = [(2.0, 0.25), (2.0, 0.25), (2.0, 0.25), (6.0, 0.75)]
BATCH = 32


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        time.sleep(seconds)
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(2 * ctx.seconds)
        return grad, None


class SleepBlock(nn.Module):
    def __init__(self, fixed_ms: float, per_sample_ms: float) -> None:
        super().__init__()
        self.fixed, self.per_sample = fixed_ms / 1e3, per_sample_ms / 1e3
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x * self.scale, self.fixed + self.per_sample * x.shape[0])


class SleepNet(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Sequential(*[SleepBlock(f, k) for f, k in SLEEPS])
        self.head = nn.Linear(8, 16)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, target = batch
        logits = self.head(self.body(self.embed(tokens).mean(1)))
        loss = F.cross_entropy(logits, target)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (3 * BATCH, 4), generator=g)  # integer (batch, seq): the batch has tokens
    return DataLoader(TensorDataset(tokens, tokens[:, 0]), batch_size=BATCH)


class _RandomStateAtStart(Callback):
    """Torch's random state when training starts: the same on every rank (seeded alike, the same draws), unless the
    profile, on rank 0 only, left it changed."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.state = torch.get_rng_state()


def observe_job(rank: int, world_size: int, *, out: str) -> dict[str, Any]:
    from lightning_pipe import PipelineStrategy

    seed_everything(0)
    strategy = PipelineStrategy(balance="time", num_microbatches="auto", timeline_steps=[1],
                                timeline_dir=os.path.join(out, "timelines"))
    at_start = _RandomStateAtStart()
    trainer = Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_steps=3, log_every_n_steps=1,
                      logger=CSVLogger(out), enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, use_distributed_sampler=False, callbacks=[at_start])
    trainer.fit(SleepNet(), loader())
    plan = strategy.layout_plan
    result: dict[str, Any] = {
        "counts": plan.counts, "microbatches": strategy.num_microbatches, "report": plan.report,
        "overhead": plan.tune.overhead if plan.tune else None,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "metrics_seconds": strategy.pipeline_metrics.seconds_spent,
        "random_state_at_start": at_start.state.tolist(),
    }
    if rank == 0:
        trainer.logger.finalize("success")
        result["csv"] = open(glob.glob(os.path.join(out, "**", "metrics.csv"), recursive=True)[0]).read()
        result["files"] = sorted(os.listdir(os.path.join(out, "timelines")))
    return result
