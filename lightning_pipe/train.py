"""``lightning-pipe-train`` / ``python -m lightning_pipe.train``: run a Hydra-configured experiment.

    lightning-pipe-train                                                  # the default experiment (configs/)
    lightning-pipe-train strategy.schedule=gpipe strategy.num_microbatches=8 trainer.devices=4
    lightning-pipe-train -m strategy.num_microbatches=1,2,4,8,16          # a sweep, with a summary table + PNG
    torchrun --nproc_per_node 2 -m lightning_pipe.train trainer.devices=2

The config tree is ``configs/`` at the root of the repository (``--config-dir``/``--config-name`` choose another;
``LIGHTNING_PIPE_CONFIG_DIR`` moves the default). The objects are built with ``hydra.utils.instantiate``.

Processes and directories:

- **Lightning's launcher** (``devices=N`` started as one command): the main process runs Hydra, creates the output
  directory, then Lightning re-runs this command for ranks 1..N-1 with ``hydra.run.dir`` set to that directory and
  ``hydra.output_subdir=null`` (Lightning's own Hydra handling); the run directory is pinned to the resolved output
  directory first, so every rank lands in the same one.
- **torchrun / SLURM**: every process runs Hydra. Rank 0 owns the output directory; ranks above 0 get a private
  scratch directory with Hydra's files and logging turned off, and receive the checkpoint and log paths from rank 0.
- **Sweeps** (``-m`` or ``hydra.mode=MULTIRUN``): each job runs in a fresh process (``hydra.mode=RUN`` in the job's
  directory), so every setting starts its own process group and its own ranks; after the last job
  :class:`lightning_pipe.conf.sweep.SweepSummary` writes ``summary.{csv,md,png}`` in the sweep directory.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "run", "build_data", "build_model", "build_strategy", "build_trainer", "CONFIG_DIR"]

CONFIG_DIR = os.environ.get("LIGHTNING_PIPE_CONFIG_DIR") or str(Path(__file__).resolve().parent.parent / "configs")
"""The config tree: ``configs/`` next to the package in a source checkout (``pip install -e .``)."""

RESULT_FILE = "result.json"
SWEEP_UNDER_LAUNCHER = ("lightning-pipe-train: a sweep (-m, or a preset with hydra.mode: MULTIRUN) under "
                        "torchrun/SLURM is not supported; start one torchrun/srun per setting, or run the sweep with "
                        "Lightning's launcher (trainer.devices=N)")
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


# --------------------------------------------------------------------------------------------------- processes


def _external_rank() -> int | None:
    """This process's global rank when a launcher outside Lightning started it (torchrun, SLURM), else None."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    return None


def _is_multirun(argv: Sequence[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("hydra.mode=MULTIRUN") for a in argv)


def _prepare_argv(argv: list[str]) -> list[str]:
    """Arguments for Hydra: on ranks above 0 started by torchrun or SLURM, a private scratch run directory with
    Hydra's files and logging off (rank 0 owns the output directory)."""
    rank = _external_rank()
    if rank is not None and _is_multirun(argv):  # a preset's hydra.mode: MULTIRUN is caught when the sweep starts
        raise SystemExit(SWEEP_UNDER_LAUNCHER)
    if rank:
        scratch = Path(tempfile.gettempdir()) / "lightning_pipe_hydra" / f"rank{rank}-{os.getpid()}"
        atexit.register(_remove_empty, scratch)  # Hydra makes it; nothing is written there
        argv = [*argv, f'hydra.run.dir="{scratch}"', "hydra.output_subdir=null", "hydra/job_logging=disabled",
                "hydra/hydra_logging=disabled"]
    return argv


def _remove_empty(path: Path) -> None:
    """Remove ``path`` and then its parent if they are empty directories."""
    for folder in (path, path.parent):
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            return


def _config_flags(argv: Sequence[str]) -> list[str]:
    """The ``--config-dir``/``--config-name``/``--config-path`` flags of a command line, with their values."""
    flags, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in _CONFIG_FLAGS and i + 1 < len(argv):
            flags += [arg, argv[i + 1]]
            i += 1
        elif arg.split("=", 1)[0] in _CONFIG_FLAGS and "=" in arg:
            flags.append(arg)
        i += 1
    return flags


def _run_sweep_job() -> dict[str, Any]:
    """One job of a multirun, in a fresh process (its own process group and ranks) writing into the job's
    directory; its output is echoed and kept in ``run.log``."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    cmd = [sys.executable, "-m", "lightning_pipe.train", *_config_flags(sys.argv[1:]), *hc.overrides.task,
           "hydra.mode=RUN", f'hydra.run.dir="{out}"', "hydra.output_subdir=null", "hydra.job.name=train_rank0"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    print(f"[sweep job {hc.job.num}] {' '.join(hc.overrides.task)} -> {out}", flush=True)
    tail: list[str] = []
    with (out / "run.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=hc.runtime.cwd)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail = (tail + [line])[-30:]
        proc.wait()
    result_path = out / RESULT_FILE
    if proc.returncode == 0 and result_path.is_file():
        return json.loads(result_path.read_text())
    print(f"[sweep job {hc.job.num}] failed (exit code {proc.returncode}); see {out / 'run.log'}", flush=True)
    return _failed_sweep_job({"returncode": proc.returncode, "error": "".join(tail)[-3000:]})


def _failed_sweep_job(details: dict[str, Any]) -> dict[str, Any]:
    """Write the current sweep job's ``result.json`` as failed (``details``: why), for its row in the summary."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    result = {"status": "failed", **details, "overrides": list(hc.overrides.task), "output_dir": str(out)}
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


def _consolidate_on_rank_zero(trainer: Any, ckpt_path: str) -> None:
    """``<final checkpoint>.consolidated.ckpt``, written by rank 0 (replacing one a run in the same output directory
    left: it belongs to the checkpoint just replaced); a failure there raises on every rank."""
    from lightning_pipe import consolidate
    from lightning_pipe.errors import on_every_rank

    trainer.strategy.barrier()
    on_every_rank(
        (lambda: consolidate(ckpt_path, f"{ckpt_path}.consolidated.ckpt", overwrite=True))
        if trainer.is_global_zero else None,
        any_rank=lambda failed: trainer.strategy.reduce_boolean_decision(failed, all=False),
        elsewhere=f"rank 0 failed to consolidate {ckpt_path} (checkpoint.consolidate=true; see its error)")


# ---------------------------------------------------------------------------------------------------- builders


def build_data(cfg: Any) -> Any:
    """The LightningDataModule of ``cfg.data``."""
    from hydra.utils import instantiate

    return instantiate(cfg.data)


def build_model(cfg: Any, data: Any = None) -> Any:
    """The LightningModule of ``cfg.model``; ``vocab_size: null`` takes ``data.vocab_size``."""
    from hydra.utils import instantiate

    extra = {}
    needed = getattr(data, "vocab_size", None)
    given = cfg.model.get("vocab_size", 0)
    if given is None and needed is not None:
        extra["vocab_size"] = needed
    elif given and needed is not None and given < needed:  # else an IndexError in the first step's embedding
        raise ValueError(f"model.vocab_size={given} is smaller than the data's {needed} tokens: raise it, or set "
                         "model.vocab_size=null to take the data's")
    return instantiate(cfg.model, **extra)


def build_strategy(cfg: Any, output_dir: str | Path | None = None) -> Any:
    """The ``PipelineStrategy`` of ``cfg.strategy``; a ``null`` (or empty list) argument is left out: the
    strategy's default. Timelines go to ``<output_dir>/timelines`` unless ``timeline_dir`` says otherwise."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.strategy, resolve=True).items() if v not in (None, [])}
    if kwargs.get("timeline_steps") and "timeline_dir" not in kwargs and output_dir is not None:
        kwargs["timeline_dir"] = str(Path(output_dir) / "timelines")
    # _convert_="all": lists (balance=[2, 2], timeline_steps) reach the strategy as lists, not OmegaConf ListConfigs
    # (which it refuses as a balance).
    return instantiate(kwargs, _convert_="all")


def build_trainer(cfg: Any, strategy: Any = None, **extra: Any) -> Any:
    """The Lightning Trainer of ``cfg.trainer`` with ``strategy`` and ``extra`` (logger, callbacks)."""
    from hydra.utils import instantiate

    if strategy is not None:
        extra["strategy"] = strategy
    return instantiate(cfg.trainer, **extra)


# -------------------------------------------------------------------------------------------------------- run


def _output_dir(cfg: Any) -> Path:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    if not HydraConfig.initialized():
        return Path(cfg.trainer.default_root_dir or ".").resolve()
    hc = HydraConfig.get()
    # Lightning's launcher re-runs this command for ranks 1..N-1 with hydra.run.dir=<hydra.run.dir>: pin it to the
    # resolved directory so that an interpolation (${now:...}) cannot give a child a directory of its own.
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir
    return Path(hc.runtime.output_dir)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run(cfg: Any) -> dict[str, Any]:
    """Train the experiment ``cfg`` in this process (one rank); rank 0 prints the loss curve and writes
    ``result.json`` in the output directory. Returns the result (on every rank)."""
    import torch
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_pipe.conf.progress import PrintProgress, StepClock, mean_column, read_metrics_csv, schedule_bubble

    started = time.perf_counter()
    output_dir = _output_dir(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    seed_everything(cfg.seed, workers=True, verbose=False)
    data = build_data(cfg)
    model = build_model(cfg, data)
    strategy = build_strategy(cfg, output_dir)
    clock = StepClock(cfg.warmup_steps)
    progress = PrintProgress(clock, cfg.print_every)
    callbacks: list[Any] = [clock, progress]
    ckpt_dir = output_dir / "checkpoints"
    periodic = bool(cfg.checkpoint.enabled and cfg.checkpoint.every_n_train_steps)
    if periodic:
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=cfg.checkpoint.every_n_train_steps,
                                         save_top_k=-1))
    logger = CSVLogger(save_dir=str(output_dir), name="logs", version="")
    # Lightning's implicit end-of-epoch checkpoint is replaced by checkpoints/<final_name> (and the periodic ones).
    trainer = build_trainer(cfg, strategy, logger=logger, callbacks=callbacks, enable_checkpointing=periodic)

    pp = getattr(strategy, "num_stages", None) or cfg.strategy.pipeline_parallel_size or trainer.world_size
    m = cfg.strategy.num_microbatches if isinstance(cfg.strategy.num_microbatches, int) else None
    m = m or (2 * pp if cfg.strategy.num_microbatches is None else None)
    batch_size = getattr(data, "batch_size", None)
    asked = m
    if m and isinstance(batch_size, int) and 0 < batch_size < m:
        m = batch_size  # the strategy runs a batch smaller than m with one micro-batch per sample
    ideal = schedule_bubble(cfg.strategy.schedule, pp, m, cfg.strategy.virtual_stages) if m else None
    baseline = data.unigram_loss() if hasattr(data, "unigram_loss") else None
    if trainer.is_global_zero:
        params = sum(p.numel() for p in model.parameters())
        print(f"{type(model).__name__} ({params / 1e6:.2f}M parameters) on {trainer.world_size} processes: "
              f"{pp} pipeline ranks x {trainer.world_size // pp} replica(s), schedule {cfg.strategy.schedule}"
              + (f" ({cfg.strategy.virtual_stages} chunks per rank)" if cfg.strategy.virtual_stages else "") + ", "
              f"{m or cfg.strategy.num_microbatches} micro-batches"
              + (f" (of {asked} asked: one per sample of the batch of {m}; data.batch_size sets it)"
                 if asked != m else "")
              + (f"; schedule's bubble (simulated, backward = 2 x forward) {ideal:.3f}" if ideal is not None else "")
              + (f"; unigram baseline {baseline:.3f}" if baseline is not None else ""), flush=True)
        print(f"output directory: {output_dir}", flush=True)

    fit_start = time.perf_counter()
    trainer.fit(model, datamodule=data, ckpt_path=cfg.ckpt_path)
    fit_time = time.perf_counter() - fit_start
    val_loss = progress.val_history[-1][1] if progress.val_history else None
    if cfg.validate_at_end and (not progress.val_history or progress.val_history[-1][0] != trainer.global_step):
        metrics = trainer.validate(model, datamodule=data, verbose=False)  # PrintProgress prints its loss
        if metrics and "val_loss" in metrics[0]:
            val_loss = float(metrics[0]["val_loss"])

    ckpt_path = None
    if cfg.checkpoint.enabled:
        ckpt_path = trainer.strategy.broadcast(str(ckpt_dir / cfg.checkpoint.final_name))
        trainer.save_checkpoint(ckpt_path)
        if cfg.checkpoint.consolidate:
            _consolidate_on_rank_zero(trainer, ckpt_path)

    strategy = trainer.strategy
    if m is None and isinstance(getattr(strategy, "num_microbatches", None), int):  # "auto": chosen during fit
        m = strategy.num_microbatches
        ideal = schedule_bubble(cfg.strategy.schedule, pp, m, cfg.strategy.virtual_stages)
    result: dict[str, Any] = {
        "status": "ok",
        "overrides": _task_overrides(),
        "output_dir": str(output_dir),
        "schedule": str(cfg.strategy.schedule),
        "pipeline_parallel_size": int(getattr(strategy, "pipeline_parallel_size", None) or pp),
        "data_parallel_size": int(getattr(strategy, "data_parallel_size", None) or trainer.world_size // pp),
        "num_microbatches": m,
        "steps": int(trainer.global_step),
        "fit_time_s": round(fit_time, 3),
        "train_time_s": round(clock.train_time, 3),
        "step_time_s": clock.step_time(),
        "samples_per_sec": clock.samples_per_sec(),
        "tokens_per_sec": (clock.samples_per_sec() or 0.0) * clock.tokens_per_sample or None,
        "val_loss": val_loss,
        "val_history": progress.val_history,
        "unigram_loss": baseline,
        "bubble_schedule": ideal,
        "checkpoint": ckpt_path,
        "metrics_csv": str(Path(logger.log_dir) / "metrics.csv"),
    }
    if trainer.is_global_zero:
        rows = read_metrics_csv(result["metrics_csv"])
        skip = cfg.warmup_steps
        result["bubble_measured"] = mean_column(rows, "pipeline/bubble_fraction", skip)
        result["bubble_measured_max"] = mean_column(rows, "pipeline/bubble_fraction_max", skip)
        result["samples_per_sec_logged"] = mean_column(rows, "pipeline/samples_per_sec", skip)
        result["step_time_logged_s"] = mean_column(rows, "pipeline/step_time", skip)
        result["wall_time_s"] = round(time.perf_counter() - started, 3)
        (output_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
        line = f"done in {result['wall_time_s']:.0f}s ({result['steps']} steps"
        if result["samples_per_sec"]:
            line += f", {result['samples_per_sec']:.1f} samples/s"
        if result["bubble_measured"] is not None:
            line += f", measured bubble {result['bubble_measured']:.3f}"
        line += ")"
        if val_loss is not None:
            line += f"; final val_loss {val_loss:.3f}"
            if baseline is not None:
                line += f" (unigram baseline {baseline:.3f})"
        print(line, flush=True)
        print(f"logs: {result['metrics_csv']}" + (f"; checkpoint: {ckpt_path}" if ckpt_path else ""), flush=True)
    return result


# ------------------------------------------------------------------------------------------------ entry point


def _hydra_task(cfg: Any) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lightning_pipe.conf import validate_config

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # A job whose settings are invalid is a failed row of the summary: raised here, it would end the sweep
        # before the summary is written (Hydra re-raises a job's error after the last job).
        try:
            validate_config(cfg)
        except Exception as err:  # noqa: BLE001 - any invalid setting: reported in its row
            print(f"[sweep job {HydraConfig.get().job.num}] invalid settings: {err}", flush=True)
            return _failed_sweep_job({"error": f"{type(err).__name__}: {err}"})
        return _run_sweep_job()
    validate_config(cfg)
    return run(cfg)


def main() -> None:
    """Console entry point (``lightning-pipe-train``)."""
    import hydra

    import lightning_pipe  # noqa: F401 - registers the strategy names
    from lightning_pipe.conf import register_configs

    register_configs()
    sys.argv = [sys.argv[0], *_prepare_argv(sys.argv[1:])]
    hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(_hydra_task)()


if __name__ == "__main__":
    main()
