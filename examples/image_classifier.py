"""An image classifier (a CNN held in an ``nn.Sequential``) cut into 2 pipeline stages on 2 CPU processes, with
torchmetrics accuracy.

    python examples/image_classifier.py                 # ~15 s on 2 cores: val_acc ~0.98 (chance 1/6)
    python examples/image_classifier.py --schedule gpipe --microbatches 8 --epochs 2

The images are generated (no download): 16x16 gratings in one of 6 orientations, with random frequency, phase,
contrast and noise; the class is the orientation. Run as a plain script: Lightning's launcher starts the second
process by re-running this file (``torchrun --nproc_per_node 2 examples/image_classifier.py`` works too).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_pipe import PipelineStrategy  # noqa: E402

NUM_CLASSES = 6


def gratings(n: int, seed: int, size: int = 16) -> TensorDataset:
    """``n`` noisy gratings, class ``k`` oriented at ``k * 180 / NUM_CLASSES`` degrees."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    angle = labels.float() * math.pi / NUM_CLASSES + 0.1 * torch.randn(n, generator=g)
    freq = 0.6 + 0.6 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    contrast = 0.5 + torch.rand(n, generator=g)
    coords = torch.arange(size).float() - size / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = xx[None] * angle.cos()[:, None, None] + yy[None] * angle.sin()[:, None, None]
    images = contrast[:, None, None] * torch.sin(freq[:, None, None] * proj + phase[:, None, None])
    images = images + 0.4 * torch.randn(n, size, size, generator=g)
    return TensorDataset(images.unsqueeze(1), labels)


def conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU(), *([nn.MaxPool2d(2)] if pool else []))


class ImageClassifier(LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        # The chain the pipeline cuts (named with blocks="features"): each block takes and returns the feature map.
        self.features = nn.Sequential(conv_block(1, 16, False), conv_block(16, 32, True),
                                      conv_block(32, 32, False), conv_block(32, 64, True))
        self.head = nn.Linear(64, NUM_CLASSES)  # after the chain: used on the last stage
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)  # a torchmetrics Metric: updated per micro-batch on the last stage
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes share the machine's cores
    seed_everything(0)
    train = DataLoader(gratings(args.train_size, seed=1), batch_size=args.batch_size, shuffle=True, drop_last=True)
    val = DataLoader(gratings(1024, seed=2), batch_size=256)
    trainer = Trainer(
        accelerator="cpu", devices=2, max_epochs=args.epochs,
        strategy=PipelineStrategy(schedule=args.schedule, num_microbatches=args.microbatches, blocks="features"),
        logger=CSVLogger(args.log_dir, name="image_classifier"), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    model = ImageClassifier()
    trainer.fit(model, train, val)
    if trainer.is_global_zero:  # every rank holds the same (relayed) values
        m = trainer.callback_metrics
        print(f"after {args.epochs} epochs: val_loss {m['val_loss'].item():.3f}, val_acc {m['val_acc'].item():.3f} "
              f"(chance {1 / NUM_CLASSES:.3f})", flush=True)


if __name__ == "__main__":
    main()
