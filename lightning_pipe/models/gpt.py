"""A character-level GPT written the way users write one: embeddings, an ``nn.ModuleList`` of blocks walked in a
loop with a causal mask, a final norm and a head tied to the token embedding. Nothing in it knows about pipelines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

__all__ = ["GPTConfig", "GPT", "Block"]


@dataclass
class GPTConfig:
    """Size and training settings of :class:`GPT`."""

    vocab_size: int = 96
    """Number of distinct tokens (characters)."""
    block_size: int = 64
    """Longest context, in tokens."""
    n_layer: int = 4
    """Transformer blocks: the chain that the pipeline cuts."""
    n_head: int = 4
    """Attention heads per block."""
    n_embd: int = 64
    """Width of the hidden state."""
    lr: float = 3e-3
    """AdamW learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and embeddings)."""


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, each with a residual connection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // self.n_head))
        att = att.masked_fill(~mask[:t, :t], float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(LightningModule):
    """Character-level GPT. ``batch = (tokens, next_tokens)``, both ``(batch, time)`` long tensors."""

    def __init__(self, config: GPTConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__()
        # A dict: the saved hyper-parameters, as GPT.load_from_checkpoint passes them back.
        config = GPTConfig(**config) if isinstance(config, dict) else config or GPTConfig(**overrides)
        self.save_hyperparameters({"config": dict(config.__dict__)})
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos = nn.Embedding(config.block_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
        for block in self.layers:
            x = block(x, mask)
        return self.head(self.ln_f(x))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        idx, target = batch
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        # sync_dist: averaged over the data-parallel replicas, each of which reads its own shard.
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Only this stage's parameters are here: the strategy cut the model before this hook runs.
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and not n.startswith(("tok", "pos"))]
        no_decay = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and not n.startswith(("tok", "pos")))]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.config.lr)
