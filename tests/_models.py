"""Small LightningModules and data shared by the strategy tests (imported by spawned workers too)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import SpearmanCorrCoef

VOCAB, SEQ = 16, 8
LOW_TARGETS = 5  # with ignore_low_targets, targets below this are ignored (ignore_index=-100)


class Block(nn.Module):
    """Pre-norm transformer block; builds a causal mask itself unless one is given."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # No qkv bias: the key bias has an exactly-zero gradient, which Adam would turn from rounding noise into
        # full-size steps and so make the comparison with one device meaningless.
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        if mask is None:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(LightningModule):
    """GPT-style: token and position embeddings and a tied head outside the chain of blocks.

    ``body="sequential"`` puts the blocks in an ``nn.Sequential``; ``"modulelist"`` walks an ``nn.ModuleList`` in a
    loop with a mask computed before the chain.
    """

    def __init__(self, body: str = "sequential", n_layer: int = 4, d: int = 16, lr: float = 1e-2,
                 weight_decay: float = 0.1, sync_dist: bool = False, tie_blocks: bool = False,
                 scheduler: bool = False, optimizer: str = "adamw", reads_counter: bool = False,
                 ignore_low_targets: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = body
        self.sync_dist = sync_dist
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(SEQ, d)
        blocks = [Block(d) for _ in range(n_layer)]
        if body == "sequential":
            self.blocks = nn.Sequential(*blocks)
        else:
            self.layers = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied
        if tie_blocks:  # a weight shared by the first and the last block (different stages)
            blocks[-1].fc2.weight = blocks[0].fc2.weight
        self.scheduler = scheduler
        self.optimizer_name = optimizer
        self.val_acc = MulticlassAccuracy(num_classes=VOCAB, average="micro")
        self.train_acc = MulticlassAccuracy(num_classes=VOCAB, average="micro")
        self.val_rho = SpearmanCorrCoef()  # list ("cat") states: relayed entry by entry to every stage
        # Counted after the chain, so on the last stage only: a checkpoint must hold that copy.
        self.register_buffer("seen_tokens", torch.zeros((), dtype=torch.int64))
        # Counted before the chain, so on every stage; under virtual stages a rank runs that code once per stage it
        # holds, and must still count each micro-batch once.
        self.register_buffer("seen_inputs", torch.zeros((), dtype=torch.int64))
        self.input_sum = SumMetric()
        self.lr, self.weight_decay = lr, weight_decay
        self.reads_counter = reads_counter
        self.ignore_low_targets = ignore_low_targets

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        if self.reads_counter:
            # Reads the counter that training_step bumps before the chain, so depends on the micro-batches (one
            # device differs); under virtual stages the stage computing this must read it as under 1F1B.
            x = x * (1.0 + 0.01 * (self.seen_inputs % 5).to(x.dtype))
        if self.body == "sequential":
            x = self.blocks(x)
        else:
            mask = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
            for block in self.layers:
                x = block(x, mask)
        return self.head(self.ln_f(x))

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx, target = batch
        logits = self(idx)
        if self.ignore_low_targets:  # a mean over the tokens left, whose count differs from sample to sample
            target = target.masked_fill(target < LOW_TARGETS, -100)
        return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)), logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen_inputs += batch[0].numel()
        self.input_sum.update(batch[0].sum())
        self.log("input_sum", self.input_sum, on_step=False, on_epoch=True)
        loss, logits = self._loss(batch)
        self.seen_tokens += batch[1].numel()
        self.log("train_loss", loss, prog_bar=True, sync_dist=self.sync_dist)
        # A Metric object logged on step (Lightning's default in training_step): the batch's value, every rank.
        self.train_acc(logits.argmax(-1).reshape(-1), batch[1].reshape(-1))
        self.log("train_acc", self.train_acc)
        # Logged twice in one step, valid on one device: the last call shows on step, both count in the epoch mean.
        self.log("train_twice", loss.detach(), on_epoch=True)
        self.log("train_twice", 2 * loss.detach(), on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.val_acc(logits.argmax(-1).reshape(-1), batch[1].reshape(-1))
        self.val_rho.update(logits.max(-1).values.reshape(-1), batch[1].reshape(-1).float())
        self.log("val_loss", loss, prog_bar=True, sync_dist=self.sync_dist)
        self.log("val_acc", self.val_acc)
        self.log("val_rho", self.val_rho)
        # A value that stands for 10 * (batch_idx + 1) items, a constant that is no micro-batch's sample count:
        # the epoch mean must weigh it so (not by samples). (A count equal to each micro-batch's samples, as with
        # batch_size=x.size(0), is that micro-batch's: tests/test_logs.py.)
        self.log("val_weighted", float(batch_idx), batch_size=10 * (batch_idx + 1))

    def on_validation_epoch_end(self) -> None:
        # Computed by hand on every rank (the last stage updated it): the same value everywhere.
        self.val_rho_by_hand = float(self.val_rho.compute())
        # Gathered over data-parallel replicas only: one entry per replica, none per stage.
        self.gathered = self.all_gather(torch.tensor(1.0, device=self.device)).cpu()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, _ = self._loss(batch)
        self.log("test_loss", loss)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        elif self.optimizer_name == "groups":  # decay for matrices, none (and half the lr) for the rest
            matrices = [p for p in self.parameters() if p.dim() >= 2]
            others = [p for p in self.parameters() if p.dim() < 2]
            # The group of the model's first parameter (tok.weight, a matrix) comes second, so that a consolidated
            # file listing the groups by where their parameters first appear would not resume.
            optimizer = torch.optim.AdamW([{"params": others, "weight_decay": 0.0, "lr": self.lr / 2},
                                           {"params": matrices, "weight_decay": self.weight_decay}], lr=self.lr)
        elif self.optimizer_name == "layerwise":  # a learning rate per layer, and a schedule that uses them
            return self._layerwise()
        elif self.optimizer_name == "fused_adamw":  # unscales inside its step (a GradScaler does not call unscale_)
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=True)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if not self.scheduler:
            return optimizer
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _layerwise(self) -> Any:
        """One group per block's matrices (lr 1.25x, 1.5x, ... by depth), one for the other matrices, one without
        decay for the rest, made in the order their parameters first appear (so a stage holds only its blocks'
        groups); LambdaLR scales each group's own base_lr."""
        groups: dict[str, dict[str, Any]] = {}
        for name, p in self.named_parameters():
            parts = name.split(".")
            if p.dim() < 2:
                key, hp = "rest", {"lr": self.lr / 2, "weight_decay": 0.0}
            elif parts[0] in ("blocks", "layers"):
                key, hp = f"block{parts[1]}", {"lr": self.lr * (1 + (int(parts[1]) + 1) / 4),
                                                "weight_decay": self.weight_decay}
            else:
                key, hp = "matrices", {"lr": self.lr, "weight_decay": self.weight_decay}
            groups.setdefault(key, {**hp, "params": []})["params"].append(p)
        optimizer = torch.optim.AdamW(list(groups.values()), lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.2 * step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def token_data(n: int = 48, seed: int = 0) -> TensorDataset:
    """Sequences of a noisy affine rule x[t+1] = (3 x[t] + 1) mod VOCAB: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, SEQ + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(SEQ):
        x[:, t + 1] = (3 * x[:, t] + 1) % VOCAB
    noise = torch.rand(n, SEQ + 1, generator=g) < 0.1
    x[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=g)
    return TensorDataset(x[:, :-1], x[:, 1:])


def loader(batch_size: int = 8, n: int = 48, seed: int = 0) -> DataLoader:
    return DataLoader(token_data(n, seed), batch_size=batch_size, shuffle=False)
