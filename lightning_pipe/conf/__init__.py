"""Structured configs of the Hydra experiments (``lightning-pipe-train``; the YAML tree is in ``configs/``).

Every group of ``configs/`` is merged into :class:`ExperimentConfig`, so a misspelt key or a value of the wrong
type is rejected by Hydra, with the full key in the message, while the config is composed: before any process
starts. The values themselves (a schedule name, a balance) are checked by the objects when they are built.

``register_configs()`` stores the schema in Hydra's ``ConfigStore`` as ``lightning_pipe_schema`` (the first entry of
``configs/config.yaml``'s defaults list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from lightning_pipe.models.gpt import GPTConfig

__all__ = [
    "ModelConfig", "DataConfig", "TrainerConfig", "StrategyConfig", "CheckpointConfig", "ExperimentConfig",
    "register_configs", "validate_config", "SCHEMA_NAME",
]

SCHEMA_NAME = "lightning_pipe_schema"


@dataclass
class ModelConfig(GPTConfig):
    """The LightningModule: the character-level GPT of :mod:`lightning_pipe.models.gpt` by default. Its size and
    optimizer fields are :class:`~lightning_pipe.models.GPTConfig`'s (``block_size``, ``n_layer``, ``n_head``,
    ``n_embd``, ``lr``, ``weight_decay``), passed to ``_target_`` as keyword arguments."""

    _target_: str = "lightning_pipe.models.GPT"
    """Class built with ``hydra.utils.instantiate``; it receives the other fields as keyword arguments."""
    vocab_size: Optional[int] = None  # type: ignore[assignment]
    """Number of distinct tokens; ``null`` takes the data module's ``vocab_size``."""


@dataclass
class DataConfig:
    """The LightningDataModule (character windows of text from the Python installation by default)."""

    _target_: str = "lightning_pipe.models.CharDataModule"
    """Class built with ``hydra.utils.instantiate``; it receives the fields below as keyword arguments."""
    block_size: int = "${model.block_size}"  # type: ignore[assignment]
    """Characters per training window; follows ``model.block_size`` unless set."""
    batch_size: int = 32
    """Samples per batch on each pipeline replica (split into ``strategy.num_microbatches`` micro-batches)."""
    stride: int = 16
    """Characters between the starts of two training windows (smaller: more, overlapping windows)."""
    max_chars: int = 400_000
    """Characters of text read (90% train, 10% validation)."""


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.pytorch.Trainer`` (the strategy, logger and callbacks are added by the entry
    point)."""

    _target_: str = "lightning.pytorch.Trainer"
    """Class built with ``hydra.utils.instantiate``."""
    accelerator: str = "cpu"
    """``"cpu"``, ``"gpu"``/``"cuda"`` or ``"auto"``."""
    devices: Any = 2
    """Processes per node (an int, a list of device ids or ``"auto"``)."""
    num_nodes: int = 1
    """Machines; processes in all = ``devices x num_nodes`` = pipeline stages x data-parallel replicas."""
    precision: Any = "32-true"
    """``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"`` (GPU), ..."""
    max_steps: int = 1500
    """Optimizer steps to train (``-1``: use ``max_epochs``)."""
    max_epochs: Optional[int] = None
    """Epochs to train when ``max_steps`` is ``-1``."""
    val_check_interval: Any = 250
    """Validate every N training steps (an int) or fraction of an epoch (a float)."""
    check_val_every_n_epoch: Optional[int] = None
    """Validate every N epochs; ``null`` lets ``val_check_interval`` count steps across epochs."""
    limit_val_batches: Any = 20
    """Validation batches per validation run (an int) or share of the validation set (a float)."""
    limit_train_batches: Any = None
    """Training batches per epoch (an int) or share of the training set (a float); ``null``: all."""
    num_sanity_val_steps: int = 0
    """Validation batches run before training starts."""
    log_every_n_steps: int = 10
    """Steps between two rows of the CSV log."""
    accumulate_grad_batches: int = 1
    """Batches whose gradients are summed before each optimizer step."""
    gradient_clip_val: Optional[float] = None
    """Clip the global gradient norm (over all stages) to this value; ``null``: no clipping."""
    gradient_clip_algorithm: Optional[str] = None
    """``"norm"`` (default) or ``"value"``."""
    deterministic: Optional[bool] = None
    """Ask torch for deterministic algorithms."""
    enable_progress_bar: bool = False
    """A tqdm bar (off: the entry point prints the loss curve instead, one line per ``print_every`` steps)."""
    enable_model_summary: bool = False
    """Lightning's table of the layers and parameter counts before training (under the pipeline: the whole model,
    gathered from every stage)."""
    default_root_dir: Optional[str] = "${hydra:runtime.output_dir}"
    """Where Lightning writes by default: Hydra's output directory of the job."""


@dataclass
class StrategyConfig:
    """Arguments of :class:`lightning_pipe.PipelineStrategy`. Values are checked by the strategy when it is built
    (an unknown schedule or balance raises ``PipelineError`` naming the choices); ``null`` means the strategy's
    default."""

    _target_: str = "lightning_pipe.PipelineStrategy"
    """Class built with ``hydra.utils.instantiate``."""
    pipeline_parallel_size: Optional[int] = None
    """Pipeline stages; ``null``: processes / ``data_parallel_size``, or every process when that is ``null`` too."""
    data_parallel_size: Optional[int] = None
    """Replicas of the pipeline; ``null``: processes / ``pipeline_parallel_size``."""
    num_microbatches: Any = None
    """Micro-batches per batch: an int, or ``"auto"`` (chosen at start-up from the profiled model and the
    simulator); ``null``: 2 x stages."""
    schedule: str = "1f1b"
    """Pipeline schedule: ``"gpipe"``, ``"1f1b"``, and where available ``"interleaved_1f1b"``, ``"zero_bubble"``,
    ``"zbv"`` (see ``lightning_pipe.schedules.SCHEDULES``)."""
    virtual_stages: Optional[int] = None
    """Stages per rank for interleaved schedules; ``null``: the strategy's default (1)."""
    early_input_grads: bool = False
    """Under gpipe, 1f1b and interleaved_1f1b: send each input gradient before computing the weight gradients
    (the backward split as under zero_bubble, W right after B); ``false``: the textbook schedules."""
    balance: Any = None
    """How blocks are shared between stages: ``"parameters"``, ``"uniform"``, ``"time"`` (profiled at start-up),
    ``"memory"``, or a list of block counts per stage; ``null``: the strategy's default (``"parameters"``)."""
    blocks: Optional[str] = None
    """Attribute path of the chain to cut (``"layers"``); ``null``: the container with the most parameters."""
    timeout: float = 1800.0
    """Longest wait, in seconds, for any transfer or collective before the run fails."""
    memory_budget: Optional[float] = None
    """Bytes a device may hold (parameters, optimizer state, activations, estimated from the profile at the default
    micro-batch count; each of a device's ``virtual_stages`` stages may use its share): with ``balance: time`` only
    cuts that fit are considered, with ``balance: memory`` the cut must fit; ``null``: no limit.
    (``num_microbatches: auto`` chooses by time only.)"""
    timeline_steps: List[int] = field(default_factory=list)
    """Optimizer steps whose measured timeline is saved (``step<N>.trace.json`` for Chrome/Perfetto and
    ``step<N>.png``); empty: none."""
    timeline_dir: Optional[str] = None
    """Where the timelines go; ``null``: ``<output_dir>/timelines``."""
    freeze_gc: bool = True
    """Freeze the objects alive when the run starts out of Python's garbage collections until it ends, so that a
    full collection (about 200 ms) does not stall one rank while the others wait on it mid-step."""
    comm_thread: Optional[bool] = None
    """Make the gloo sends and receive posts on a thread of their own (``true``; gloo on the CPU only) or on the
    training thread (``false``); ``null``: chosen each step from how idle the cores were."""
    guard_io_threads: Optional[bool] = None
    """Keep gloo's I/O threads from preempting the thread inside a gloo call; ``null``: on with gloo on Linux."""
    cpu_transport: str = "auto"
    """How CPU ranks pass activations and gradients: ``auto`` (shared memory where every rank of the pipeline is on
    this host, else gloo), ``shm`` (shared memory or fail) or ``gloo``; GPUs use NCCL."""
    check_batches: bool = True
    """Before each step the stages of a pipeline compare a summary of their batches and all raise if they differ."""
    process_group_backend: Optional[str] = None
    """``"gloo"`` or ``"nccl"``; ``null``: Lightning's choice for the accelerator (NCCL on GPUs)."""


@dataclass
class CheckpointConfig:
    """The checkpoint written under Hydra's output directory (``<output_dir>/checkpoints/``)."""

    enabled: bool = True
    """Write checkpoints at all."""
    every_n_train_steps: Optional[int] = None
    """Also save every N training steps (``ModelCheckpoint``); ``null``: only the final one."""
    final_name: str = "last.ckpt"
    """Name of the checkpoint written after training (a sharded directory: one shard per rank + ``meta.pt``)."""
    consolidate: bool = False
    """After training, also write ``<final_name>.consolidated.ckpt``: one ordinary Lightning checkpoint file."""


@dataclass
class ExperimentConfig:
    """The whole experiment, as composed from ``configs/config.yaml`` and the overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The LightningModule."""
    data: DataConfig = field(default_factory=DataConfig)
    """The LightningDataModule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The Lightning Trainer."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """The pipeline strategy."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints written under the output directory."""
    name: str = "gpt"
    """Name of the experiment: part of the output directory's path (``outputs/<name>/<date_time>``,
    ``multirun/<name>/<date_time>``)."""
    seed: int = 0
    """Seed of every random generator (``seed_everything``), the same on every rank."""
    torch_threads: Optional[int] = 1
    """``torch.set_num_threads`` in every process (processes share the machine's cores); ``null``: torch's
    default."""
    print_every: int = 100
    """Print the training loss, throughput and bubble every N steps (rank 0)."""
    warmup_steps: int = 5
    """Steps left out of the throughput figures (start-up, first allocations)."""
    ckpt_path: Optional[str] = None
    """Resume training from this checkpoint (``trainer.fit(ckpt_path=...)``): a run's sharded
    ``checkpoints/last.ckpt`` directory (in any pipeline layout), a consolidated or plain Lightning ``.ckpt`` file,
    or ``"last"`` (the newest one the periodic ``ModelCheckpoint`` of this output directory wrote); ``null``: start
    afresh. ``trainer.max_steps`` counts the steps already taken."""
    validate_at_end: bool = True
    """Run a full validation after training and report its loss (with the unigram baseline for text data)."""


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=ExperimentConfig)


register_configs()


def validate_config(cfg: Any) -> None:
    """Check a composed config against :class:`ExperimentConfig` again: keys added with ``+key=value`` skip
    Hydra's check while composing. Raises ``omegaconf`` errors naming the full key."""
    from omegaconf import OmegaConf

    OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.to_container(cfg, resolve=False))
    _check_values(cfg)


def _check_values(cfg: Any) -> None:
    """Values of the right type that would still break the run, each named by its key, before any process
    starts (otherwise a shape error deep in the first step)."""
    model, data = cfg.get("model"), cfg.get("data")
    problems = []
    if model is not None:
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if model.get(key) is not None and not model[key] >= 1:
                problems.append(f"model.{key}={model[key]} must be at least 1")
        if not problems and model.get("n_head") and model.get("n_embd") and model.n_embd % model.n_head:
            problems.append(f"model.n_head={model.n_head} must divide model.n_embd={model.n_embd}")
    if data is not None:
        for key in ("batch_size", "stride", "block_size"):
            if data.get(key) is not None and not data[key] >= 1:
                problems.append(f"data.{key}={data[key]} must be at least 1")
        if model is not None and data.get("block_size") and model.get("block_size") \
                and data.block_size > model.block_size:
            problems.append(f"data.block_size={data.block_size} exceeds model.block_size={model.block_size} "
                            "(the model's longest context): lower the one or raise the other")
    if problems:
        raise ValueError("invalid settings: " + "; ".join(problems))
