"""One-GPU check: every schedule through the Lightning strategy on CUDA, against plain Lightning on the same GPU.

With one GPU the pipeline has one rank (NCCL cannot pair two ranks on one device), but virtual stages still cut
the model into several stages on it, the split backward (zero_bubble, zbv) runs its CUDA kernels, and the NCCL
process groups are created. For each schedule: max |param diff| after a few fp32 steps against
``Trainer(strategy="auto")`` (SGD, so rounding is not amplified), then a bf16-mixed run (its loss, for a look).
Run: ``python benchmarks/gpu_check.py`` (needs a CUDA device).
"""

from __future__ import annotations

import os
import sys
import time

import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_pipe import PipelineStrategy  # noqa: E402
from lightning_pipe.models.gpt import GPT, GPTConfig  # noqa: E402

SCHEDULES = [("gpipe", None), ("1f1b", None), ("interleaved_1f1b", 2), ("zero_bubble", 1), ("zero_bubble", 2),
             ("zbv", 2)]


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 96, (128, 33), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=16, shuffle=False)


ACCELERATOR = "cpu" if "--cpu" in sys.argv else "gpu"  # --cpu: a dry run of this script without a GPU


def fit(strategy: object, precision: str, steps: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    seed_everything(0)
    model = GPT(GPTConfig(n_layer=4, n_embd=128, n_head=4, block_size=32))
    # SGD: AdamW would turn rounding-level differences of near-zero gradients into steps of size lr.
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.5)  # type: ignore[method-assign]
    trainer = Trainer(accelerator=ACCELERATOR, devices=1, strategy=strategy, precision=precision, max_steps=steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=1,
                      # A DDP-style strategy gets Lightning's shuffling DistributedSampler; keep the reference's order.
                      use_distributed_sampler=False)
    trainer.fit(model, data())
    params = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    return params, {k: float(v) for k, v in trainer.callback_metrics.items()}


def main() -> None:
    if ACCELERATOR == "gpu":
        assert torch.cuda.is_available(), "needs a CUDA device (or --cpu for a dry run)"
        print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    reference, ref_metrics = fit("auto", "32-true", 6)
    ref_loss = ref_metrics["train_loss"]
    for name, v in SCHEDULES:
        t0 = time.perf_counter()
        strategy = PipelineStrategy(pipeline_parallel_size=1, schedule=name, virtual_stages=v, num_microbatches=4)
        params, metrics = fit(strategy, "32-true", 6)
        loss = metrics["train_loss"]
        diff = max((params[k] - reference[k]).abs().max().item() for k in reference)
        strategy = PipelineStrategy(pipeline_parallel_size=1, schedule=name, virtual_stages=v, num_microbatches=4)
        _, bf16 = fit(strategy, "bf16-mixed", 6)
        # Timed with CUDA events on a GPU: the step's kernels, not their launches.
        print(f"{name:17s} v={v or 1}: fp32 max |param diff| {diff:.2e} (loss {loss:.4f} vs {ref_loss:.4f}); "
              f"bf16-mixed loss {bf16['train_loss']:.4f}, step {1e3 * bf16['pipeline/step_time']:.2f} ms, "
              f"bubble {bf16['pipeline/bubble_fraction']:.3f}; {time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
