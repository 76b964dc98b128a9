"""torchmetrics under the pipeline: small fits that run the same code on one device (the reference, in the test
process) and on a 2-stage pipeline (in launched workers)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric, SumMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.retrieval import RetrievalMAP

CASES = ("retrieval", "no_sync", "in_block", "time_sync_on_step", "aliased_buffer")


def _data(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


class _Block(nn.Module):
    def __init__(self, metric: bool, norm: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        # Buffers (only where nothing is compared: micro-batch statistics differ from the batch's).
        self.norm = nn.BatchNorm1d(8) if norm else nn.Identity()
        self.m = SumMetric() if metric else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.m is not None:
            self.m.update(h.detach().abs().sum())
        return torch.tanh(self.norm(self.lin(h)))


class MetricNet(LightningModule):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.Sequential(*[_Block(metric=case == "in_block" and i == 0, norm=case == "aliased_buffer")
                                      for i in range(4)])
        self.head = nn.Linear(8, 3)
        if case == "aliased_buffer":
            self.last_block = self.blocks[-1]  # a handle on a block (and its BatchNorm buffers) outside the chain
        self.rmap = RetrievalMAP()  # list states reduced entry by entry (not concatenated)
        self.total = SumMetric(sync_on_compute=False)
        self.acc = MulticlassAccuracy(num_classes=3, average="micro", dist_sync_on_step=True)
        self.seen: list[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if self.case == "retrieval":
            self.rmap.update(logits.softmax(-1)[:, 0], y == 0, indexes=torch.arange(x.shape[0]) % 2)
            self.log("m", self.rmap, on_step=False, on_epoch=True)
        elif self.case == "no_sync":
            self.total.update(y.float().sum())
            self.log("m", self.total, on_step=False, on_epoch=True)
        elif self.case == "time_sync_on_step":
            self.log("m", self.acc(logits.argmax(-1), y), on_step=False, on_epoch=True)
        return F.cross_entropy(logits, y)

    def on_train_epoch_end(self) -> None:
        # Only the rank holding blocks[0] has its metric: it computes it alone.
        self.seen += [float(m.compute()) for name, m in self.named_modules()
                      if isinstance(m, Metric) and name.startswith("blocks")]

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(case: str, *, devices: int, strategy: Any) -> dict[str, Any]:
    seed_everything(0)
    model = MetricNet(case)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False)
    trainer.fit(model, _data())
    out: dict[str, Any] = {"m": float(trainer.callback_metrics["m"]) if "m" in trainer.callback_metrics else None,
                           "seen": model.seen}
    if case == "aliased_buffer":
        with tempfile.TemporaryDirectory() as tmp:
            path = trainer.strategy.broadcast(os.path.join(tmp, "ckpt"))
            trainer.save_checkpoint(path)  # hung when the stages listed the aliased buffers differently
            out["saved"] = True
            trainer.strategy.barrier()
    return out


def pipeline_cases(rank: int, world_size: int, *, cases: list[str]) -> dict[str, Any]:
    from lightning_pipe import PipelineStrategy

    results = {}
    for case in cases:
        balance = "time" if case == "time_sync_on_step" else "parameters"
        strategy = PipelineStrategy(num_microbatches=2, timeout=60, balance=balance)
        results[case] = fit(case, devices=world_size, strategy=strategy)
    return results
