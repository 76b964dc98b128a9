"""Train a character-level GPT cut into 2 pipeline stages on 2 CPU processes.

    python examples/gpt.py                  # 1F1B, 2 stages, a few minutes on 2 cores
    python examples/gpt.py --schedule gpipe --max-steps 100

Run as a plain script: Lightning's launcher starts the second process by re-running this file. ``torchrun
--nproc_per_node 2 examples/gpt.py`` works too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_pipe import PipelineStrategy  # noqa: E402
from lightning_pipe.models import GPT, CharDataModule, GPTConfig  # noqa: E402


class PrintLoss(Callback):
    """Prints the loss curve (rank 0 prints; every rank holds the same values)."""

    def __init__(self, every: int) -> None:
        self.every, self.start = every, time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step % self.every == 0:
            loss = trainer.callback_metrics["train_loss"].item()
            print(f"step {step:5d}  train_loss {loss:.3f}  ({time.monotonic() - self.start:.0f}s)", flush=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            print(f"step {trainer.global_step:5d}  val_loss {trainer.callback_metrics['val_loss'].item():.3f}",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes share the machine's cores
    seed_everything(0)
    data = CharDataModule(batch_size=args.batch_size)
    model = GPT(GPTConfig(vocab_size=data.vocab_size))
    trainer = Trainer(
        accelerator="cpu", devices=args.devices, max_steps=args.max_steps,
        strategy=PipelineStrategy(schedule=args.schedule, num_microbatches=args.microbatches),
        logger=CSVLogger(args.log_dir, name="gpt"), val_check_interval=min(100, args.max_steps),
        limit_val_batches=20, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[PrintLoss(every=max(1, args.max_steps // 15))],
    )
    trainer.fit(model, data)
    log_dir = trainer.log_dir  # a collective: every rank asks
    if trainer.is_global_zero:
        val = trainer.callback_metrics["val_loss"].item()
        print(f"final val_loss {val:.3f} (unigram baseline {data.unigram_loss():.3f}); "
              f"checkpoint and logs in {log_dir}")


if __name__ == "__main__":
    main()
