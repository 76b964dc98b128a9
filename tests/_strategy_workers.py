"""Training jobs for the strategy tests: the same code runs with the pipeline (in launched workers, torchrun
style) and on one device (in the test process) for the reference."""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import glob
import logging
import os
import sys
import tempfile
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import (
    BasePredictionWriter, EarlyStopping, ModelCheckpoint, ModelSummary, StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger

import lightning_pipe
from lightning_pipe import PipelineStrategy
import tests._schedules  # noqa: F401 - registers "eager_1f1b" in every launched process
from tests._models import SEQ, VOCAB, TinyGPT, loader


class _SeeFrozen(Callback):
    """Records, per training batch, how many objects are frozen out of Python's garbage collections, and after it
    whether the pipeline's transport made its calls on its poster thread and guarded gloo's I/O threads, and
    whether the step's schedule had W actions."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.transport: list[tuple[bool, bool, str]] = []
        self.split: list[bool] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.counts.append(gc.get_freeze_count())

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        transport = getattr(trainer.strategy, "_transport", None)
        if transport is not None:
            self.transport.append((transport.posting_in_background, transport.io_guard.active,
                                   type(transport).__name__))
            self.split.append(any(e.schedule.split_backward for e in trainer.strategy._executors.values()))


class _SeeOutputs(Callback):
    """Records what training_step handed to on_train_batch_end."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append({k: v.detach().cpu().clone() for k, v in outputs.items()})


def _with_extras(step: Any) -> Any:
    """training_step returning a dict with more than the loss (the first token of each sample)."""

    def training_step(batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        return {"loss": step(batch, batch_idx), "first_tokens": batch[0][:, 0]}

    return training_step


def _with_prints(model: TinyGPT, step: Any) -> Any:
    """training_step printing after the chain (on the last stage), to stdout and to stderr."""

    def training_step(batch: Any, batch_idx: int) -> Any:
        out = step(batch, batch_idx)
        model.print(f"after step {batch_idx}:", out["loss"] if isinstance(out, dict) else out, sep=" ")
        model.print(f"to stderr {batch_idx}", file=sys.stderr)
        return out

    return training_step


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _read_csv(log_dir: str) -> list[dict[str, str]]:
    files = glob.glob(os.path.join(log_dir, "**", "metrics.csv"), recursive=True)
    if not files:
        return []
    with open(files[0]) as f:
        return list(csv.DictReader(f))


def train(config: dict[str, Any], *, devices: int, strategy: Any) -> dict[str, Any]:
    """Fit TinyGPT per ``config``; return parameters held here, callback metrics and rank 0's CSV rows."""
    with tempfile.TemporaryDirectory() as log_dir:
        return _train(config, devices=devices, strategy=strategy, log_dir=log_dir if config.get("csv") else None)


def _train(config: dict[str, Any], *, devices: int, strategy: Any, log_dir: str | None) -> dict[str, Any]:
    seed_everything(0, workers=True)
    model = TinyGPT(body=config["body"], n_layer=config.get("n_layer", 4), sync_dist=config.get("sync_dist", False),
                    tie_blocks=config.get("tie_blocks", False), scheduler=config.get("scheduler", False),
                    optimizer=config.get("optimizer", "adamw"), reads_counter=config.get("reads_counter", False),
                    ignore_low_targets=config.get("ignore_low_targets", False))
    frozen = _SeeFrozen()
    callbacks: list[Any] = [frozen]
    extras = _SeeOutputs()
    if config.get("extras"):
        model.training_step = _with_extras(model.training_step)  # type: ignore[method-assign]
        callbacks.append(extras)
    if config.get("grad_norm"):
        # The whole model's gradient norms on every rank, the head tied to the embedding under its first name.
        # And of a submodule holding the chain (the blocks' own names), as Lightning's docs call it on submodules.
        model.on_before_optimizer_step = (  # type: ignore[method-assign]
            lambda optimizer: model.log_dict({**lightning_pipe.grad_norm(model, 2), **{
                f"chain_{k}": v for k, v in lightning_pipe.grad_norm(model.layers, 1).items()}}))
    if config.get("prints"):
        model.training_step = _with_prints(model, model.training_step)  # type: ignore[method-assign]
    summary = _Lines()
    if config.get("summary"):
        # Every layer with its sizes and FLOPs, from a forward of the example (pipelined: the blocks are spread).
        model.example_input_array = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
        callbacks.append(ModelSummary(max_depth=-1))
        logging.getLogger("lightning.pytorch.callbacks.model_summary").addHandler(summary)
    if config.get("callbacks"):
        ckpt_dir = os.path.join(log_dir or tempfile.mkdtemp(), "checkpoints")
        callbacks += [ModelCheckpoint(dirpath=ckpt_dir, monitor="val_loss", save_top_k=1),
                      EarlyStopping(monitor="val_loss", patience=100)]
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=config.get("steps", 4),
        accumulate_grad_batches=config.get("accumulate", 1),
        gradient_clip_val=config.get("clip"), gradient_clip_algorithm=config.get("clip_algorithm", "norm"),
        precision=config.get("precision", "32-true"),
        logger=CSVLogger(log_dir) if log_dir else False, log_every_n_steps=1,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=config.get("val_batches", 0), val_check_interval=config.get("val_every"),
        num_sanity_val_steps=config.get("sanity", 0),
        # Lightning's injected DistributedSampler always shuffles training data; with a single replica every
        # stage reads the whole data set, so the plain loader keeps the reference's order.
        use_distributed_sampler=False,
    )
    out, err = io.StringIO(), io.StringIO()
    printing = config.get("prints")  # only then: the output of other runs stays visible when a test fails
    with warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(out) if printing else contextlib.nullcontext(), \
            contextlib.redirect_stderr(err) if printing else contextlib.nullcontext():
        warnings.simplefilter("always")
        trainer.fit(model, loader(config.get("batch_size", 8), config.get("n", 48)),
                    loader(8, 16, seed=1) if config.get("val_batches") else None)
    logging.getLogger("lightning.pytorch.callbacks.model_summary").removeHandler(summary)
    result: dict[str, Any] = {
        "summary": summary.lines,
        "printed": [line for line in out.getvalue().splitlines() if line.startswith("after step")],
        "printed_stderr": [line for line in err.getvalue().splitlines() if line.startswith("to stderr")],
        "warnings": [str(w.message) for w in caught],
        "params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "logged": {k: float(v) for k, v in trainer.logged_metrics.items()},
        "progress_bar": {k: float(v) for k, v in trainer.progress_bar_metrics.items()},
    }
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    if checkpoints:
        best = checkpoints[0]
        result["best_model_score"] = float(best.best_model_score)
        if trainer.global_rank == 0:
            # A pipeline writes a sharded directory; consolidated, it is one file that loads on one device.
            path = best.best_model_path
            if os.path.isdir(path):
                path = str(lightning_pipe.consolidate(path))
            loaded = TinyGPT.load_from_checkpoint(path, map_location="cpu")
            result["checkpoint_params"] = {n: p.detach().clone()
                                           for n, p in loaded.named_parameters(remove_duplicate=False)}
            result["checkpoint_buffers"] = {n: b.detach().clone() for n, b in loaded.named_buffers()}
    if config.get("predict"):
        result["predictions"] = torch.cat(trainer.predict(model, loader(8, 16, seed=1)))
        # A predict_step that runs the model but returns nothing gives None per batch, as on one device.
        model.predict_step = lambda batch, batch_idx: (model(batch[0]), None)[1]  # type: ignore[method-assign]
        result["predict_none"] = trainer.predict(model, loader(8, 16, seed=1))
    if config.get("extras"):
        result["extras"] = extras.seen
    if hasattr(model, "val_rho_by_hand"):
        result["val_rho_by_hand"], result["gathered"] = model.val_rho_by_hand, model.gathered
    if config.get("validate"):
        result["validate"] = trainer.validate(model, loader(8, 16, seed=1), verbose=False)
        result["test"] = trainer.test(model, loader(8, 16, seed=1), verbose=False)
    # PipelineStrategy(freeze_gc=...): frozen during training, thawed once the Trainer is done.
    result["frozen_during"], result["frozen_after"] = frozen.counts, gc.get_freeze_count()
    result["transport"], result["split"] = frozen.transport, frozen.split
    if log_dir and trainer.global_rank == 0:
        trainer.logger.finalize("success")
        result["csv"] = _read_csv(log_dir)
    return result


def _tokens_left(microbatch: Any) -> torch.Tensor:
    """What TinyGPT(ignore_low_targets=True)'s loss is a mean over."""
    from tests._models import LOW_TARGETS

    return (microbatch[1] >= LOW_TARGETS).sum()


def pipeline_jobs(rank: int, world_size: int, *, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for config in configs:
        strategy = PipelineStrategy(pipeline_parallel_size=config.get("pp", world_size),
                                    schedule=config.get("schedule", "1f1b"),
                                    num_microbatches=config.get("microbatches"),
                                    balance=config.get("balance", "parameters"),
                                    virtual_stages=config.get("virtual_stages"),
                                    early_input_grads=config.get("early_input_grads", False),
                                    freeze_gc=config.get("freeze_gc", True),
                                    comm_thread=config.get("comm_thread"),
                                    guard_io_threads=config.get("guard_io_threads"),
                                    cpu_transport=config.get("cpu_transport", "auto"),
                                    microbatch_weight=_tokens_left if config.get("token_weights") else None)
        results.append(train(config, devices=world_size, strategy=strategy))
    return results


def reference(config: dict[str, Any]) -> dict[str, Any]:
    return train(config, devices=1, strategy="auto")


class _NoChain(TinyGPT):
    """A module whose body is not in an nn.Sequential or nn.ModuleList."""

    def __init__(self) -> None:
        super().__init__(n_layer=2)
        self.block_a, self.block_b = self.blocks[0], self.blocks[1]
        del self.blocks
        del self.val_acc

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln_f(self.block_b(self.block_a(x))))


class _Manual(TinyGPT):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class _LineSearch(TinyGPT):
    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)


class _TwoClosureSGD(torch.optim.SGD):
    """Calls the closure twice per step, as sharpness-aware minimisation does."""

    def step(self, closure: Any = None) -> Any:
        closure()
        return super().step(closure)


class _TwoClosures(TinyGPT):
    def configure_optimizers(self) -> Any:
        return _TwoClosureSGD(self.parameters(), lr=0.1)


class _BadReduce(TinyGPT):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("odd", loss, reduce_fx="median")  # fails on the last stage, after the pipeline ran
        return loss


class _TrainsLastBlockOnly(TinyGPT):
    """Fine-tuning the last block: the optimizer gets the trainable parameters only, none of them on stage 0."""

    def configure_optimizers(self) -> Any:
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("blocks.3."))
        return torch.optim.AdamW(filter(lambda p: p.requires_grad, self.parameters()), lr=0.01)


class _UnpicklableExtras(TinyGPT):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        class Local:  # a class defined inside the step cannot be pickled
            pass

        loss, _ = self._loss(batch)
        return {"loss": loss, "note": Local()}


class _FailsInValidation(TinyGPT):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._loss(batch)
        raise ValueError("validation failed after the chain")  # the last stage only: the others stop at its end


class _RaisesInEvaluation(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            raise ValueError("validation failed in the first block")
        return self.inner(x)


class _FirstBlockFailsInValidation(TinyGPT):
    """Fails in a forward-only step on the first stage alone (its block lives there only)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks[0] = _RaisesInEvaluation(self.blocks[0])


class _BlockTwice(TinyGPT):
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        x = self.blocks[0](x)
        x = self.blocks[0](x)  # the same block twice: not a chain
        for i in range(1, len(self.blocks)):
            x = self.blocks[i](x)
        return self.head(self.ln_f(x))


class _PairBlock(torch.nn.Module):
    """A block that returns ``(hidden, aux)``, as Hugging Face's layers return a tuple."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.block(x)
        return out, out.mean()


class _BlocksReturnPairs(TinyGPT):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(*[_PairBlock(b) for b in self.blocks])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)[0]  # the loop takes the hidden state out of each block's tuple
        return self.head(self.ln_f(x))


def bad_inputs(rank: int, world_size: int, *, cases: list[str]) -> dict[str, tuple[str, str]]:
    """Run each bad set-up; return, per case, the type and message of the error this rank raised."""
    setups: dict[str, tuple[Any, dict[str, Any]]] = {
        "no_chain": (_NoChain, {}),
        "more_stages_than_blocks": (lambda: TinyGPT(n_layer=1), {}),
        "virtual_stages_too_many": (TinyGPT, {"schedule": "interleaved_1f1b", "virtual_stages": 4}),
        "pipeline_size_does_not_divide": (TinyGPT, {"pipeline_parallel_size": 3}),
        "balance_list_wrong_sum": (TinyGPT, {"balance": [1, 2]}),
        "blocks_path_unknown": (TinyGPT, {"blocks": "body.layers"}),
        "manual_optimization": (_Manual, {}),
        "line_search_optimizer": (_LineSearch, {}),
        "closure_called_twice": (_TwoClosures, {}),
        "block_called_twice": (_BlockTwice, {}),
        "blocks_return_pairs": (_BlocksReturnPairs, {}),
        "last_stage_fails_after_the_step": (_BadReduce, {}),
        "empty_optimizer_on_a_stage": (_TrainsLastBlockOnly, {}),
        "unpicklable_step_output": (_UnpicklableExtras, {}),
        "second_trainer": (TinyGPT, {}),
        "last_stage_fails_in_validation": (_FailsInValidation, {}),
        "first_stage_fails_in_validation": (_FirstBlockFailsInValidation, {}),
        "stages_see_different_batches": (TinyGPT, {}),
        "stochastic_weight_averaging": (TinyGPT, {}),
        "memory_budget_too_small": (TinyGPT, {"schedule": "interleaved_1f1b", "virtual_stages": 2, "balance": "memory",
                                              "memory_budget": 1000.0}),
    }
    out: dict[str, tuple[str, str]] = {}
    for case in cases:
        make_model, kwargs = setups[case]
        seed_everything(0)
        callbacks = [StochasticWeightAveraging(swa_lrs=0.01)] if case == "stochastic_weight_averaging" else []
        trainer = Trainer(accelerator="cpu", devices=world_size, strategy=PipelineStrategy(timeout=60, **kwargs),
                          callbacks=callbacks, max_steps=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
        try:
            model = make_model()
            if case in ("last_stage_fails_in_validation", "first_stage_fails_in_validation"):  # no backward
                trainer.validate(model, loader(), verbose=False)
            elif case == "stages_see_different_batches":  # a dataset that depends on the rank
                trainer.fit(model, loader(seed=rank))
            else:
                trainer.fit(model, loader())
            if case == "second_trainer":  # the fitted (cut) model, given to another pipeline Trainer
                again = Trainer(accelerator="cpu", devices=world_size, strategy=PipelineStrategy(timeout=60),
                                logger=False, enable_progress_bar=False, enable_model_summary=False)
                again.test(model, loader(), verbose=False)
            out[case] = ("no error", "")
        except Exception as err:  # noqa: BLE001 - reported to the test
            out[case] = (type(err).__name__, str(err))
    return out


def scaler_agreement(rank: int, world_size: int, *, agree: bool,
                     frozen_first: bool = False) -> tuple[list[float], float]:
    """One GradScaler step where only the last rank's gradient overflows; ``frozen_first``: rank 0's parameter
    gets no gradient (a frozen stage)."""
    from lightning_pipe.strategy.grads import make_scaler_agree

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    if agree:
        make_scaler_agree(scaler, None)
    if not (frozen_first and rank == 0):
        scaler.scale(param.sum()).backward()
    if rank == world_size - 1:
        param.grad[0] = float("inf")
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    return param.detach().tolist(), scaler.get_scale()


class _SeeScale(Callback):
    """The GradScaler's scale after every step."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler, self.scales = scaler, []  # type: list[float]

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.scales.append(self.scaler.get_scale())


class _SeesAutocast(torch.autograd.Function):
    """Identity that records whether autocast is on in its backward (on one device Lightning runs backward outside
    it; a custom backward computing in float32 relies on that)."""

    seen: list[bool] = []

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        _SeesAutocast.seen.append(torch.is_autocast_enabled("cpu"))
        return grad


def fp16_fit(config: dict[str, Any], *, devices: int, strategy: Any) -> dict[str, Any]:
    """Fit TinyGPT under 16-mixed with a real GradScaler (on the CPU, through Lightning's MixedPrecision plugin):
    its parameters held here, the scale after each step, and the names of the trainable parameters held here.
    ``config["frozen"]``: the embeddings (tied with the head), the final norm (held by every stage) and that many
    leading blocks are frozen."""
    from lightning.pytorch.plugins import MixedPrecision

    seed_everything(0, workers=True)
    model = TinyGPT(body="modulelist", n_layer=config.get("n_layer", 4), optimizer=config.get("optimizer", "sgd"))
    frozen = config.get("frozen", 0)
    if frozen:
        for module in (model.tok, model.pos, model.ln_f, *model.layers[:frozen]):
            module.requires_grad_(False)
    # init_scale 2**20 overflows float16 in the first steps: those are skipped and the scale halves until it fits
    # (where, differs from one device: a weight gradient's float16 sum runs over a micro-batch, not the batch).
    scaler = torch.amp.GradScaler("cpu", init_scale=config.get("init_scale", 2.0**8), growth_interval=3)
    for block in model.layers:
        block.register_forward_hook(lambda module, args, out: _SeesAutocast.apply(out))
    _SeesAutocast.seen.clear()
    seen = _SeeScale(scaler)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=config.get("steps", 8),
                      plugins=[MixedPrecision("16-mixed", "cpu", scaler)], gradient_clip_val=config.get("clip"),
                      callbacks=[seen], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(model, loader(8, 64))
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
            "scales": seen.scales, "loss": float(trainer.callback_metrics["train_loss"]),
            "autocast_in_backward": list(_SeesAutocast.seen),
            "trainable_here": [n for n, p in model.named_parameters() if p.requires_grad]}


def fp16_jobs(rank: int, world_size: int, *, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [fp16_fit(config, devices=world_size,
                     strategy=PipelineStrategy(schedule=config.get("schedule", "1f1b"), timeout=60))
            for config in configs]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """The global batches of ``replicas`` data-parallel replicas under Lightning's DistributedSampler (shuffled with
    seed 0): batch k is the union of every replica's k-th local batch, for the single-device reference."""

    def __init__(self, n: int, replicas: int, local_batch: int, seed: int = 0, epochs: int = 1) -> None:
        self.batches = []
        for epoch in range(epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            shards = [order[r::replicas] for r in range(replicas)]
            for k in range(0, len(shards[0]), local_batch):
                self.batches.append([i for shard in shards for i in shard[k : k + local_batch]])

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# SGD with momentum, not AdamW: a handful of weights here have gradients that are pure cancellation noise
# (|g| ~ 1e-7 from terms ~ 1e-3), whose rounding depends on how the batch is summed (over replicas and
# micro-batches here, in one piece on one device). AdamW divides by |g| and turns that rounding into a visible step
# (2.6e-5 after one step, for 1 weight of 3,000); SGD keeps the difference at rounding size.
HYBRID_OPTIMIZER = "sgd"


class _NoBatchIdx(TinyGPT):
    def training_step(self, batch: Any) -> torch.Tensor:  # Lightning then passes no batch_idx
        return super().training_step(batch, 0)


def hybrid_jobs(rank: int, world_size: int, *, configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fits with data-parallel replicas; Lightning's DistributedSampler shards the data over the replicas."""
    from tests._models import token_data

    results = []
    for config in configs:
        seed_everything(0, workers=True)
        cls = _NoBatchIdx if config.get("no_batch_idx") else TinyGPT
        model = cls(body=config["body"], optimizer=HYBRID_OPTIMIZER, sync_dist=config.get("sync_dist", False))
        if config.get("ddp"):
            strategy: Any = "ddp"
        else:
            strategy = PipelineStrategy(pipeline_parallel_size=config["pp"], schedule=config.get("schedule", "1f1b"),
                                        data_parallel_size=world_size // config["pp"])
        trainer = Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_steps=config.get("steps", 3),
                          gradient_clip_val=config.get("clip"), accumulate_grad_batches=config.get("accumulate", 1),
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, torch.utils.data.DataLoader(token_data(48), batch_size=config.get("batch_size", 4),
                                                           shuffle=True))
        result = {"params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
                  "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                  "warnings": [str(w.message) for w in caught]}
        if not config.get("ddp"):
            mesh = trainer.strategy.device_mesh
            result["mesh"] = (mesh.mesh_dim_names, tuple(mesh.shape), model.device_mesh is mesh)
            result["sampler"] = trainer.strategy.distributed_sampler_kwargs
            result["async_dp_averages"] = trainer.strategy.async_dp_averages
            result["optimizer_steps"] = trainer.global_step
        results.append(result)
    return results


def hybrid_reference(config: dict[str, Any], replicas: int) -> dict[str, Any]:
    """One device, on the replicas' global batches."""
    from tests._models import token_data

    seed_everything(0, workers=True)
    model = TinyGPT(body=config["body"], optimizer=HYBRID_OPTIMIZER)
    batch = config.get("batch_size", 4)
    # Spanning epochs: the replicas' sampler reshuffles each epoch (seed + epoch); one long reference epoch
    # reproduces that order (the replicas' epochs hold an even number of batches, so accumulation windows agree).
    sampler = GlobalBatchSampler(48, replicas, batch, epochs=3)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=config.get("steps", 3),
                      gradient_clip_val=config.get("clip"), accumulate_grad_batches=config.get("accumulate", 1),
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(model, torch.utils.data.DataLoader(token_data(48), batch_sampler=sampler))
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}


class _RandomTokens(torch.utils.data.Dataset):
    """Each item drawn at random when it is read (an augmentation, a random window): from the worker's seed."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from tests._models import SEQ, VOCAB

        tokens = torch.randint(0, VOCAB, (SEQ + 1,))
        return tokens[:-1], tokens[1:]


class _FirstBatches(Callback):
    """The first batch of every training epoch."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen.append(batch[0].clone())


class _Reloaded(TinyGPT):
    """Makes its shuffled DataLoader anew at every reload (``reload_dataloaders_every_n_epochs``)."""

    def train_dataloader(self) -> Any:
        from tests._models import token_data

        return torch.utils.data.DataLoader(token_data(32), batch_size=8, shuffle=True)


def random_data(rank: int, world_size: int, *, check_batches: bool = True) -> tuple[int, list[torch.Tensor]]:
    """Two epochs over a dataset drawn at random in a DataLoader worker, shuffled by a RandomSampler (Lightning's
    sampler replacement off); each process's global generator advanced differently after the model is made, as
    different stages' models do. The stages of the pipeline must still read the same batches. Then three epochs
    over a shuffled DataLoader made anew each epoch: the first batch of each (their order must change)."""
    seed_everything(0, workers=True)
    model = TinyGPT()
    torch.rand(rank + 1)  # each stage's own use of the global generator
    data = torch.utils.data.DataLoader(_RandomTokens(), batch_size=8, shuffle=True, num_workers=1)
    trainer = Trainer(accelerator="cpu", devices=world_size, strategy=PipelineStrategy(timeout=60,
                                                                                       check_batches=check_batches),
                      max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(model, data)
    first = _FirstBatches()
    reloading = Trainer(accelerator="cpu", devices=world_size, strategy=PipelineStrategy(timeout=60),
                        max_epochs=3, limit_train_batches=1, reload_dataloaders_every_n_epochs=1, callbacks=[first],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    reloading.fit(_Reloaded())
    return trainer.global_step, first.seen


class _MiddleBlockFailsInValidation(TinyGPT):
    def __init__(self) -> None:
        super().__init__()
        self.blocks[1] = _RaisesInEvaluation(self.blocks[1])


def middle_stage_fails_in_validation(rank: int, world_size: int) -> tuple[str, str, float]:
    """3 stages (blocks 1, 1, 2): stage 1 fails in validate. Stage 0 finishes its forwards and waits for the
    payload; stage 2 gets the failure notice. Every rank raises, and the group stays usable: the processes go on
    with a collective afterwards, as a program that catches the error would."""
    seed_everything(0)
    trainer = Trainer(accelerator="cpu", devices=world_size, strategy=PipelineStrategy(timeout=60, balance=[1, 1, 2]),
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False)
    try:
        trainer.validate(_MiddleBlockFailsInValidation(), loader(), verbose=False)
        kind, message = "no error", ""
    except Exception as err:  # noqa: BLE001 - reported to the test
        kind, message = type(err).__name__, str(err)
    import torch.distributed as dist

    after = torch.tensor([float(rank)])
    dist.all_reduce(after)
    return kind, message, float(after)


class _Batches(torch.utils.data.Sampler):
    """Fixed batches of indices (a sampler that does not shard by replica)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Stream(torch.utils.data.Sampler):
    """Fixed batches of indices, without a length (as a stream's): the number of batches is known only at the end."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)


class _NoBatchIdx(TinyGPT):
    def validation_step(self, batch: Any) -> None:  # type: ignore[override]  # Lightning passes no batch_idx then
        super().validation_step(batch, 0)


def uneven_replicas(rank: int, world_size: int) -> dict[str, tuple[str, str]]:
    """Two data-parallel replicas (pp=1) whose own samplers give replica 0 one batch more than replica 1: for
    training, then (equal training data) for validation; with samplers that have a length, then without (``...
    stream``, also for test), and without where the loop stops at replica 1's last batch anyway (``..., limit``,
    ``..., max_steps``: no error). Each case: the error type and message on this rank."""
    from tests._models import token_data

    out = {}
    cases = ("training", "validation", "training stream", "validation stream", "test stream",
             "training stream, limit", "training stream, max_steps", "validation stream, limit",
             "validation stream, limit, no batch_idx")
    for case in cases:
        kind = _Stream if "stream" in case else _Batches
        uneven = kind([[i, i + 1] for i in range(0, 2 * (3 - rank), 2)])  # 3 batches on rank 0, 2 on rank 1
        even = kind([[0, 1], [2, 3]])
        train = torch.utils.data.DataLoader(token_data(8), batch_sampler=uneven if case.startswith("training")
                                            else even)
        if case.startswith("validation stream, limit"):
            train = torch.utils.data.DataLoader(token_data(8), batch_sampler=_Batches([[0, 1], [2, 3]]))
        val = torch.utils.data.DataLoader(token_data(8), batch_sampler=uneven)
        seed_everything(0)
        # Where the loop itself stops at replica 1's last batch (the second), no replica is left waiting.
        limits = {"training stream, limit": {"limit_train_batches": 2, "limit_val_batches": 0},
                  "training stream, max_steps": {"max_steps": 2, "limit_val_batches": 0},
                  "validation stream, limit": {"limit_val_batches": 2},
                  "validation stream, limit, no batch_idx": {"limit_val_batches": 2}}.get(case, {})
        trainer = Trainer(accelerator="cpu", devices=world_size, max_epochs=1, num_sanity_val_steps=0, **limits,
                          strategy=PipelineStrategy(pipeline_parallel_size=1, data_parallel_size=world_size,
                                                    timeout=60),
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, use_distributed_sampler=False)
        try:
            if case.startswith("test"):
                trainer.test(TinyGPT(), val)
            else:
                trainer.fit(_NoBatchIdx() if case.endswith("no batch_idx") else TinyGPT(), train, val)
            out[case] = ("no error", "")
        except Exception as err:  # noqa: BLE001 - reported to the test
            out[case] = (type(err).__name__, str(err))
    return out


class _StopsAfterTheChain(TinyGPT):
    """Sets ``trainer.should_stop`` in ``training_step`` after the loss (code that runs on the last stage only)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if batch_idx == 2:
            self.trainer.should_stop = True
        return loss


def stop_in_step(rank: int, world_size: int) -> tuple[int, bool]:
    """Fit until ``training_step`` asks to stop: this rank's global step and ``should_stop``."""
    seed_everything(0)
    trainer = Trainer(accelerator="cpu", devices=world_size, max_steps=10, strategy=PipelineStrategy(timeout=30),
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(_StopsAfterTheChain(), loader())
    return trainer.global_step, trainer.should_stop


class _ForwardLeavesTheChainOut(TinyGPT):
    """forward gives the embeddings only (what example_input_array runs for the model summary); the steps run the
    blocks and the head themselves."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx, target = batch
        logits = self.head(self.ln_f(self.blocks(self(idx))))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)), logits


class _PrintsThenFails(TinyGPT):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.print(f"DEBUG step {batch_idx}")
        with open(self.path, "a") as f:  # a file of this process: written where the step's code ran
            self.print(f"to file {batch_idx}", file=f)
        if batch_idx == 1:
            raise ValueError("failed after printing")
        return loss


class _Writer(BasePredictionWriter):
    def __init__(self, path: str) -> None:
        super().__init__("batch_and_epoch")
        self.path = path

    def write_on_batch_end(self, trainer: Trainer, pl_module: Any, prediction: Any, batch_indices: Any, batch: Any,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        with open(self.path, "a") as f:
            f.write(f"batch {batch_idx}: {len(prediction)}\n")

    def write_on_epoch_end(self, trainer: Trainer, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        with open(self.path, "a") as f:
            f.write(f"epoch: {len(predictions)} batches\n")


def summary_and_prints(rank: int, world_size: int, *, files: list[str]) -> dict[str, Any]:
    """The model summary of a forward that leaves the chain out (it trains), a prediction writer, then a step that
    prints and fails: what rank 0 printed, and what each file holds. With ``world_size`` 1, one device's."""
    out: dict[str, Any] = {}
    seed_everything(0)
    trainer = Trainer(accelerator="cpu", devices=world_size, logger=False, enable_progress_bar=False,
                      strategy=PipelineStrategy(timeout=30) if world_size > 1 else "auto",
                      callbacks=[_Writer(files[rank] + ".pred")], use_distributed_sampler=False)
    trainer.predict(TinyGPT(), loader(8, 16), return_predictions=False)
    strategy: Any = PipelineStrategy(timeout=30) if world_size > 1 else "auto"
    for case in ("summary", "prints"):
        seed_everything(0)
        lines = _Lines()
        logging.getLogger("lightning.pytorch.callbacks.model_summary").addHandler(lines)
        trainer = Trainer(accelerator="cpu", devices=world_size, max_steps=3, strategy=strategy, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
                          callbacks=[ModelSummary(max_depth=1)] if case == "summary" else [],
                          enable_model_summary=case == "summary", limit_val_batches=0)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                if case == "summary":
                    model: TinyGPT = _ForwardLeavesTheChainOut()
                    model.example_input_array = torch.randint(0, VOCAB, (2, SEQ))
                    trainer.fit(model, loader())
                    out["steps"] = trainer.global_step
                else:
                    trainer.fit(_PrintsThenFails(files[rank]), loader())
        except Exception as err:  # noqa: BLE001 - reported to the test
            out[f"{case}_error"] = f"{type(err).__name__}: {err}"
        finally:
            logging.getLogger("lightning.pytorch.callbacks.model_summary").removeHandler(lines)
        out[case] = lines.lines if case == "summary" else printed.getvalue().splitlines()
        strategy = PipelineStrategy(timeout=30) if world_size > 1 else "auto"
    for key, path in (("file", files[rank]), ("predictions", files[rank] + ".pred")):
        out[key] = open(path).read().splitlines() if os.path.exists(path) else None
    return out
