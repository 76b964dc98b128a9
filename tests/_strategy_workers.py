"""Training jobs for the strategy tests: the same code runs with the pipeline (in launched workers, torchrun
style) and on one device (in the test process) for the reference."""

from __future__ import annotations

import csv
import glob
import os
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

import lightning_pipe  # noqa: F401 - registers the strategy
from lightning_pipe import PipelineStrategy
from tests._models import TinyGPT, loader


def _read_csv(log_dir: str) -> list[dict[str, str]]:
    files = glob.glob(os.path.join(log_dir, "**", "metrics.csv"), recursive=True)
    if not files:
        return []
    with open(files[0]) as f:
        return list(csv.DictReader(f))


def train(config: dict[str, Any], *, devices: int, strategy: Any, log_dir: str | None) -> dict[str, Any]:
    """Fit TinyGPT per ``config``; return parameters held here, callback metrics and rank 0's CSV rows."""
    seed_everything(0, workers=True)
    model = TinyGPT(body=config["body"], n_layer=config.get("n_layer", 4))
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=config.get("steps", 4),
        accumulate_grad_batches=config.get("accumulate", 1),
        gradient_clip_val=config.get("clip"), gradient_clip_algorithm=config.get("clip_algorithm", "norm"),
        precision=config.get("precision", "32-true"),
        logger=CSVLogger(log_dir) if log_dir else False, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=config.get("val_batches", 0), val_check_interval=config.get("val_every"),
        num_sanity_val_steps=config.get("sanity", 0),
        # Lightning's injected DistributedSampler always shuffles training data; with a single replica every
        # stage reads the whole data set, so the plain loader keeps the reference's order.
        use_distributed_sampler=False,
    )
    trainer.fit(model, loader(config.get("batch_size", 8)), loader(8, 16, seed=1) if config.get("val_batches") else None)
    result: dict[str, Any] = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    if config.get("predict"):
        result["predictions"] = torch.cat(trainer.predict(model, loader(8, 16, seed=1)))
    if config.get("validate"):
        result["validate"] = trainer.validate(model, loader(8, 16, seed=1), verbose=False)
    if log_dir and trainer.global_rank == 0:
        trainer.logger.finalize("success")
        result["csv"] = _read_csv(log_dir)
    return result


def pipeline_jobs(rank: int, world_size: int, *, configs: list[dict[str, Any]], log_root: str) -> list[dict[str, Any]]:
    results = []
    for i, config in enumerate(configs):
        strategy = PipelineStrategy(pipeline_parallel_size=config.get("pp", world_size),
                                    schedule=config.get("schedule", "1f1b"),
                                    num_microbatches=config.get("microbatches"),
                                    balance=config.get("balance", "parameters"))
        results.append(train(config, devices=world_size, strategy=strategy,
                             log_dir=os.path.join(log_root, f"job{i}") if config.get("csv") else None))
    return results


def reference(config: dict[str, Any], log_dir: str | None = None) -> dict[str, Any]:
    return train(config, devices=1, strategy="auto", log_dir=log_dir)
