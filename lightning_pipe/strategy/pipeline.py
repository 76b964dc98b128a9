"""``PipelineStrategy``: the Lightning face of the engine.

It subclasses ``DDPStrategy`` for what Lightning ties to it (the subprocess launcher, process-group set-up,
distributed-sampler injection, ``sync_dist``), but never wraps the model in DDP: it cuts the LightningModule's
chain of blocks into stages, runs each step hook per micro-batch through the executor, and hands Lightning one
loss, one set of logged values and the stage's gradients per step.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import pickle
import warnings
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
import torch.distributed as dist
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.fabric.utilities.data import sized_len
from lightning.fabric.utilities.init import _EmptyInit
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.optim import Optimizer
from typing_extensions import override

from lightning_pipe.engine import (
    HeapFreeze,
    PipelineExecutor,
    batch_size_of,
    Transport,
    destroy_process_group,
    merge_microbatches,
    microbatch_weights,
    split_microbatches,
)
from lightning_pipe.engine.shm import TRANSPORT_KINDS, make_transport
from lightning_pipe.errors import PipelineError, on_every_rank, peers_reachable
from lightning_pipe.schedules import (
    BUILTIN_SCHEDULES, DEFAULT_VIRTUAL_STAGES, SCHEDULES, Schedule, build_schedule, stage_to_rank,
)
from lightning_pipe.strategy.batch_check import check_same_batch, gather_rows, seed_alike
from lightning_pipe.strategy.chain import ChainRuntime, StageExit, find_chain, is_cut, split_chain
from lightning_pipe.strategy.checkpoint import (
    checkpoint_kind,
    load_optimizer_state_by_name,
    load_scheduler_state_by_name,
    load_sharded,
    optimizer_state_by_name,
    plain_optimizer_state_by_name,
    remove_checkpoint_path,
    scheduler_state_by_name,
    save_sharded,
)
from lightning_pipe.strategy.grads import (
    AsyncGradAverage, GradStash, ReplicatedParams, clip_by_global_norm, make_scaler_agree,
)
from lightning_pipe.strategy.grad_norm import gather_grad_norms, note_cut
from lightning_pipe.strategy.logs import LogRecord, LogRecorder, combine_records, replay, replay_prints
from lightning_pipe.strategy.metric_states import MetricStates
from lightning_pipe.strategy.metrics import PipelineMetrics
from lightning_pipe.strategy.placement import block_counts, plan_placement
from lightning_pipe.strategy.profiling import LayoutPlan, plan_layout
from lightning_pipe.strategy.side_effects import OutsideState
from lightning_pipe.strategy.summary import (
    LocalSummary, PipelineSummary, local_summary, merge_summaries, record_example, route_model_summaries,
    summary_rows,
)
from lightning_pipe.strategy.writers import write_once_per_replica

__all__ = ["PipelineStrategy"]

log = logging.getLogger(__name__)

_BALANCES = ("uniform", "parameters", "time", "memory")
_LOADED_IN_PLACE = "_lightning_pipe_loaded_in_place"


@functools.cache
def _destroy_process_group_at_exit() -> None:
    """Tear the process group down before the interpreter does: gloo's threads otherwise sometimes abort the
    process at exit ("terminate called without an active exception") after a successful run."""

    atexit.register(destroy_process_group)  # then frees what still refers to the groups (works, meshes)


def _step_error(error: BaseException, prints: Sequence[Any] = ()) -> tuple[str, str, list[Any]]:
    """The payload of a failed step: the error, and the ``self.print`` calls made before it (printed on rank 0)."""
    return "error", f"{type(error).__name__}: {error}", list(prints)


def _to_device(value: Any, device: torch.device) -> Any:
    return apply_to_collection(value, torch.Tensor, lambda t: t.to(device))


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise PipelineError(f"{name}={value!r} must be a positive integer or None")


def _check_comm_thread(comm_thread: bool | None, backend: str, device_type: str) -> None:
    if comm_thread and not (backend == "gloo" and device_type == "cpu"):
        raise PipelineError(f"comm_thread=True needs the gloo backend on the CPU (this run: {backend} on "
                            f"{device_type}); leave comm_thread unset or set it to False")


def _check_cpu_transport(kind: str, backend: str, device_type: str) -> None:
    if kind == "shm" and not (backend == "gloo" and device_type == "cpu"):
        raise PipelineError(f"cpu_transport='shm' is for CPU ranks on gloo (this run: {backend} on {device_type}); "
                            "leave it 'auto'")


class PipelineStrategy(DDPStrategy):
    """Pipeline parallelism: the LightningModule's chain of blocks is cut into stages, one per process.

    Args:
        pipeline_parallel_size: Number of stages. Default: processes / ``data_parallel_size`` (every process of the
            run when that is not given either).
        num_microbatches: Micro-batches per batch. Default: twice the number of stages. A batch with fewer
            samples runs with one micro-batch per sample.
        schedule: ``"1f1b"`` (default), ``"gpipe"``, ``"interleaved_1f1b"``, ``"zero_bubble"`` (ZB-H1) or ``"zbv"``.
        balance: ``"parameters"`` (the cut that evens out parameter counts, exactly), ``"uniform"`` (block counts),
            or a list with the number of blocks of each stage.
        blocks: Attribute path of the ``nn.Sequential``/``nn.ModuleList`` to cut (``"model.layers"``). Default: the
            one holding the most parameters.
        data_parallel_size: Replicas of the pipeline. Default: processes / ``pipeline_parallel_size``.
        timeout: Longest wait for any collective or point-to-point transfer (also the process-group timeout).
        virtual_stages: Chunks of the model per rank (``v``): the chain is cut into ``pipeline_parallel_size * v``
            stages, stage ``s`` on rank ``s % p`` (``"zbv"``: in a V, rank 0 holding the first and the last).
            Default: 2 for ``"interleaved_1f1b"`` and ``"zbv"``, else 1.
        early_input_grads: Under ``"gpipe"``, ``"1f1b"`` and ``"interleaved_1f1b"``, split each backward into
            the input gradient (sent at once to the previous stage) and the weight gradients, computed right after
            it (``lightning_pipe.schedules.with_early_input_grads``; the layers split as under ``"zero_bubble"``).
            Same order of work and activations held; the previous stage waits for the input gradient only, which
            takes ``p - 1`` weight-gradient times of a stage off the ideal step of ``"gpipe"`` and ``"1f1b"`` (of a
            chunk for ``"interleaved_1f1b"``). ``False`` (default): the textbook schedules.
            The zero-bubble schedules split their backwards anyway.
        memory_budget: Bytes a device may hold, for ``balance="time"`` or ``"memory"`` (``None``: no limit); each
            of a device's ``virtual_stages`` stages may use its share.
        timeline_steps: Optimizer steps whose measured timeline is saved (Perfetto trace and PNG).
        timeline_dir: Where those timelines go (``None``: ``<default_root_dir>/pipeline_timelines``).
        freeze_gc: When a run starts (fit, validate, test, predict), collect garbage once and freeze the objects
            alive then out of Python's garbage collections (``gc.freeze``) until teardown. A full collection walks
            every object of torch and Lightning (about 200 ms on a CPU core) and starts on each rank at its own
            moment, stalling the other ranks mid-step; frozen, it skips them. ``False`` leaves the collector alone.
        comm_thread: Make the pipeline's gloo sends (the copy into the message included) and receive posts on a
            thread of their own, so that they overlap the next action (``lightning_pipe/engine/poster.py``).
            ``None`` (default): chosen each step, on while this process's thread was mostly waiting and the cores
            it may use mostly idle (off under a cgroup CPU quota, where that cannot be told). ``True``: always (gloo
            on the CPU only). ``False``: never.
        guard_io_threads: Keep gloo's I/O threads from preempting the thread inside a gloo send or receive call
            (``lightning_pipe/engine/io_threads.py``). ``None`` (default): on with gloo where Linux allows it.
        cpu_transport: How the stages of CPU ranks pass activations and gradients. ``"auto"`` (default): through
            shared memory where every rank of the pipeline runs on this host (Linux, x86-64), as NCCL does between
            the GPUs of a node (``lightning_pipe/engine/shm.py``), else with gloo's send/recv; ``"shm"``: shared
            memory, or fail at start-up where it cannot be used; ``"gloo"``: gloo's send/recv. ``comm_thread=True``
            takes gloo's. On GPUs the pipeline uses NCCL whatever this says (``"shm"`` raises there).
        check_batches: Before each step, the stages of a pipeline compare a summary of their batches (each stage
            reads its own copy from its DataLoader) and all raise if they differ (``strategy/batch_check.py``: one
            small all-gather, tens of microseconds of summing). ``False`` skips it.
        microbatch_weight: A function of a micro-batch giving its weight in the batch's loss: what its loss is a
            mean over, when that varies between micro-batches (``lambda mb: (mb[1] != -100).sum()`` for a mean over
            the target tokens left after ``ignore_index``). ``None`` (default): its number of samples. The loss
            and its gradient are then the whole batch's, as on one device; values logged per micro-batch are
            combined with the same weights.
        **ddp_kwargs: Passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``process_group_backend``,
            ``cluster_environment``, ...).
    """

    strategy_name = "pipeline"

    def __init__(
        self,
        pipeline_parallel_size: int | None = None,
        num_microbatches: int | Literal["auto"] | None = None,
        schedule: str = "1f1b",
        balance: Literal["uniform", "parameters", "time", "memory"] | list[int] = "parameters",
        blocks: str | None = None,
        *,
        data_parallel_size: int | None = None,
        timeout: timedelta | float = timedelta(minutes=30),
        virtual_stages: int | None = None,
        early_input_grads: bool = False,
        memory_budget: float | None = None,
        timeline_steps: Sequence[int] = (),
        timeline_dir: str | None = None,
        freeze_gc: bool = True,
        comm_thread: bool | None = None,
        guard_io_threads: bool | None = None,
        cpu_transport: Literal["auto", "shm", "gloo"] = "auto",
        check_batches: bool = True,
        microbatch_weight: Callable[[Any], Any] | None = None,
        **ddp_kwargs: Any,
    ) -> None:
        start_method = ddp_kwargs.pop("start_method", "popen")
        if start_method != "popen":
            raise PipelineError(
                f"PipelineStrategy(start_method={start_method!r}) is not supported: spawn/fork launchers hand only "
                "rank 0's weights (one stage) back to the main process. Use the default launcher (run your script "
                "with `python train.py`), torchrun or SLURM"
            )
        _positive("pipeline_parallel_size", pipeline_parallel_size)
        auto_microbatches = num_microbatches == "auto"  # chosen in setup (strategy/profiling.py)
        if isinstance(num_microbatches, str) and not auto_microbatches:
            raise PipelineError(f"num_microbatches={num_microbatches!r} must be a positive integer, \"auto\" (chosen "
                                "by profiling) or None (2 x the pipeline ranks)")
        _positive("num_microbatches", None if auto_microbatches else num_microbatches)
        _positive("data_parallel_size", data_parallel_size)
        if not isinstance(schedule, str) or schedule.lower() not in SCHEDULES:
            raise PipelineError(f"unknown schedule={schedule!r}; choose one of {sorted(SCHEDULES)}")
        _positive("virtual_stages", virtual_stages)
        if schedule.lower() in BUILTIN_SCHEDULES:  # e.g. gpipe with virtual_stages=2 (a registered one: at set-up)
            stage_to_rank(schedule, num_ranks=1, virtual_stages=virtual_stages)
        if isinstance(balance, str):
            if balance not in _BALANCES:
                raise PipelineError(f"unknown balance={balance!r}; choose one of {list(_BALANCES)} or a list of "
                                    "block counts per stage")
        elif not (isinstance(balance, Sequence) and all(isinstance(b, int) for b in balance)):  # an OmegaConf list too
            raise PipelineError(f"balance={balance!r} must be one of {list(_BALANCES)} or a list of block counts")
        if memory_budget is not None and balance not in ("time", "memory"):
            raise PipelineError(f"memory_budget={memory_budget!r} applies to balance='time' or 'memory' (got "
                                f"balance={balance!r}): set one of them, or leave memory_budget unset")
        for name, flag in (("early_input_grads", early_input_grads), ("freeze_gc", freeze_gc),
                           ("check_batches", check_batches)):
            if not isinstance(flag, bool):
                raise PipelineError(f"{name}={flag!r} must be True or False")
        for name, flag in (("comm_thread", comm_thread), ("guard_io_threads", guard_io_threads)):
            if flag is not None and not isinstance(flag, bool):
                raise PipelineError(f"{name}={flag!r} must be True, False or None (the default)")
        if cpu_transport not in TRANSPORT_KINDS:
            raise PipelineError(f"cpu_transport={cpu_transport!r}: choose one of {list(TRANSPORT_KINDS)}")
        if cpu_transport == "shm" and comm_thread:
            raise PipelineError("cpu_transport='shm' sends on the training thread; comm_thread=True is for gloo's "
                                "transport: leave one of them unset")
        if microbatch_weight is not None and not callable(microbatch_weight):
            raise PipelineError(f"microbatch_weight={microbatch_weight!r} must be a function of a micro-batch (or "
                                "None: weigh micro-batches by their samples)")
        if not isinstance(timeout, timedelta):
            timeout = timedelta(seconds=float(timeout))
        super().__init__(timeout=timeout, start_method="popen", **ddp_kwargs)
        self.pipeline_parallel_size = pipeline_parallel_size
        self.data_parallel_size = data_parallel_size
        self.schedule_name = schedule.lower()
        self.virtual_stages = virtual_stages or DEFAULT_VIRTUAL_STAGES[self.schedule_name]
        self.early_input_grads = early_input_grads
        self.check_batches = check_batches
        self.microbatch_weight = microbatch_weight
        self._shared_seed: int | None = None  # see _data_seed
        self._layout: tuple[int, ...] = tuple(range(self.virtual_stages))  # stage -> pipeline rank, set up later
        self.balance = list(balance) if not isinstance(balance, str) else balance
        self.blocks = blocks
        self._auto_microbatches = auto_microbatches
        self._num_microbatches = None if auto_microbatches else num_microbatches
        self.memory_budget = memory_budget
        self.layout_plan: LayoutPlan | None = None  # what balance='time'/'memory' or 'auto' decided (and why)
        self.pipeline_metrics = PipelineMetrics(timeline_steps=timeline_steps, timeline_dir=timeline_dir)
        self._mesh: DeviceMesh | None = None
        self._pp_group: dist.ProcessGroup | None = None
        self._dp_group: dist.ProcessGroup | None = None
        self.pp_rank = 0
        self.dp_rank = 0
        self._pp_ranks: list[int] = [0]
        self._outside_buffers: list[str] = []
        self._chain_path = ""
        self._metric_states: MetricStates | None = None
        self._outside_state: OutsideState | None = None  # a rank holding several stages: see side_effects.py
        self._reverse_group: dist.ProcessGroup | None = None
        self._counted_epoch: int | None = None  # the last epoch whose batch counts the replicas agreed on
        # Whether the replicas compare, at each training (evaluation) batch, whether it is their last: where a
        # loader has no length, so the counts cannot be compared ahead.
        self._each_train_batch = self._each_eval_batch = False
        self._eval_batches: dict[int, int] = {}  # per dataloader, the evaluation batches begun (the batch index)
        self._runtime: ChainRuntime | None = None
        self._replicated: ReplicatedParams | None = None
        self._counted: set[int] = set()
        self._stash = GradStash()
        self._dp_average = AsyncGradAverage()
        self._dp_averaged = False
        self.async_dp_averages = 0  # optimizer steps whose replica average ran overlapped (tests, diagnostics)
        self._transport: Transport | None = None
        self._executors: dict[int, PipelineExecutor] = {}
        self._warned_short_batch = False
        self._param_order: list[str] = []
        self._module_order: list[str] = []  # the whole model's module names, before the cut (model summary)
        self._module_children: list[str] = []  # and the root's children
        self._chain_type = ""  # the chain's class name before the cut
        # Every name of each parameter that has several (a weight tied across blocks): stages that hold it under
        # different names, and checkpoints written in another layout, find its state under any of them.
        self._aliases: dict[str, list[str]] = {}
        self.freeze_gc = freeze_gc
        self.comm_thread = comm_thread
        self.guard_io_threads = guard_io_threads
        self.cpu_transport = cpu_transport
        self._heap = HeapFreeze()

    # -- layout -----------------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        if self.pipeline_parallel_size:
            return self.pipeline_parallel_size
        if self.data_parallel_size:  # only the replicas given: every replica's processes make one pipeline
            return max(1, self.world_size // self.data_parallel_size)
        return self.world_size

    @property
    def num_microbatches(self) -> int:
        return self._num_microbatches or 2 * self.num_stages

    @property
    def num_model_stages(self) -> int:
        """Pieces the chain is cut into: ``pipeline_parallel_size * virtual_stages``."""
        return self.num_stages * self.virtual_stages

    @property
    def stage_to_rank(self) -> tuple[int, ...]:
        """The pipeline rank that holds each stage."""
        return self._layout

    @property
    def loss_rank(self) -> int:
        """The pipeline rank that holds the last stage, where the loss is computed (rank 0 under ``"zbv"``)."""
        return self._layout[-1]

    @property
    def writes_predictions(self) -> bool:
        """Whether a ``BasePredictionWriter`` writes on this process: on the first stage of each replica, as each DDP
        process writes its shard (every stage gets the same predictions)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank holds the last stage (computes the loss)."""
        return self.pp_rank == self.loss_rank

    @property
    def device_mesh(self) -> DeviceMesh | None:
        """The ``("dp", "pp")`` mesh of the run (also published as the LightningModule's ``device_mesh``)."""
        return self._mesh

    @override
    def setup_environment(self) -> None:
        super().setup_environment()  # process group
        _destroy_process_group_at_exit()
        world = self.world_size
        if self.pipeline_parallel_size is None and self.data_parallel_size and world % self.data_parallel_size:
            raise PipelineError(f"data_parallel_size={self.data_parallel_size} does not divide the {world} processes "
                                "of the run; choose a divisor, or change devices/num_nodes")
        pp = self.num_stages
        if world % pp != 0:
            raise PipelineError(f"pipeline_parallel_size={pp} does not divide the {world} processes of the run; "
                                "choose a divisor, or change devices/num_nodes")
        dp = world // pp
        if self.data_parallel_size is not None and self.data_parallel_size != dp:
            raise PipelineError(f"data_parallel_size={self.data_parallel_size} x pipeline_parallel_size={pp} must "
                                f"equal the {world} processes of the run")
        self.data_parallel_size = dp
        self.pipeline_parallel_size = pp
        device_type = self.root_device.type
        self._mesh = init_device_mesh(device_type, (dp, pp), mesh_dim_names=("dp", "pp"))
        self._pp_group = self._mesh.get_group("pp")
        self._dp_group = self._mesh.get_group("dp")
        self.pp_rank = self._mesh.get_local_rank("pp")
        self._layout = stage_to_rank(self.schedule_name, num_ranks=pp, virtual_stages=self.virtual_stages)
        self.dp_rank = self._mesh.get_local_rank("dp")
        self._pp_ranks = dist.get_process_group_ranks(self._pp_group)
        self._reverse_group = None
        backend = dist.get_backend(self._pp_group)
        _check_comm_thread(self.comm_thread, backend, device_type)  # the same on every rank: all raise, none waits
        _check_cpu_transport(self.cpu_transport, backend, device_type)
        if backend != "gloo":
            # Messages to lower ranks get communicators of their own (see Transport): every rank creates every
            # replica's group.
            for ranks in self._mesh.mesh.tolist():
                group = dist.new_group(ranks)
                if self.global_rank in ranks:
                    self._reverse_group = group
        if self.lightning_module is not None:
            self.lightning_module._device_mesh = self._mesh

    @override
    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)
        if self.num_stages > 1:  # every stage of a pipeline must read the same batches: see batch_check.py
            trainer = getattr(self.lightning_module, "_trainer", None)
            seed_alike(dataloader, seed=self._data_seed(), replica=self.dp_rank,
                       epoch=trainer.current_epoch if trainer is not None else 0)
        return dataloader

    def _data_seed(self) -> int:
        """Pipeline rank 0's initial seed, the same on every stage (one broadcast, at the first DataLoader)."""
        if self._shared_seed is None:
            seed = torch.tensor([torch.initial_seed() % (1 << 62)], dtype=torch.int64, device=self.root_device)
            dist.broadcast(seed, src=self._pp_ranks[0], group=self._pp_group)
            self._shared_seed = int(seed.item())
        return self._shared_seed

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every stage of a pipeline reads the same batches; replicas read their own shards.
        return {"num_replicas": self.data_parallel_size or 1, "rank": self.dp_rank}

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the model is cut in setup(); checkpoints are loaded into the cut model

    def schedule_for(self, num_microbatches: int) -> Schedule:
        """The strategy's schedule (name, ``virtual_stages``, ``early_input_grads``) for ``num_microbatches``."""
        return build_schedule(self.schedule_name, num_ranks=self.num_stages, num_microbatches=num_microbatches,
                              virtual_stages=self.virtual_stages, early_input_grads=self.early_input_grads)

    def new_transport(self) -> Transport:
        """A transport over this rank's pipeline group, with the strategy's timeout, ``cpu_transport``,
        ``comm_thread`` and ``guard_io_threads`` (the caller closes it). A collective on the pipeline group where
        shared memory may be used: every rank of it calls this at the same point."""
        return make_transport(kind=self.cpu_transport, group=self._pp_group, device=self.root_device,
                              timeout=self._timeout.total_seconds() if self._timeout else 1800.0,
                              reverse_group=self._reverse_group, guard_io_threads=self.guard_io_threads,
                              background=self.comm_thread)

    # -- model surgery ----------------------------------------------------------------------------------------
    @override
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """Where ``trainer.init_module()`` and ``configure_model`` build the model: on the host, not on this rank's
        device as Lightning's strategies do, since the whole model is built in every process and only this rank's
        stages go to the device once cut (a model too large for one GPU would not fit there whole).
        ``empty_init=True`` skips the initialization of the weights (to be loaded from a checkpoint)."""
        with _EmptyInit(enabled=bool(empty_init)), torch.device("cpu"), self.precision_plugin.tensor_init_context():
            yield

    @override
    def setup(self, trainer: Trainer) -> None:
        module = self.lightning_module
        assert module is not None and self.accelerator is not None and self.model is not None
        if not module.automatic_optimization:
            raise PipelineError("PipelineStrategy supports automatic optimization only; remove "
                                "`self.automatic_optimization = False` from the LightningModule")
        for callback in trainer.callbacks:  # the same callbacks on every rank: every rank raises
            if isinstance(callback, StochasticWeightAveraging):
                # Its copy of the model is taken before the cut (every stage), averaged parameter by parameter with
                # this rank's stage, and saved from rank 0 alone: it would fail at its first update, or later.
                raise PipelineError(
                    "StochasticWeightAveraging does not support a model cut into pipeline stages (as Lightning's "
                    "does not support sharded models): it keeps a whole copy of the model on every process and "
                    "averages it with this process's stage. Remove the callback from Trainer(callbacks=...)")
        self.accelerator.setup(trainer)
        first_time = self._runtime is None
        if first_time:
            self._split(module)
        # Every setup (fit, then validate...): teardown releases the metrics' pipeline groups.
        self._metric_states = MetricStates(module, chain=self._chain_path, replicas=self._dp_group,
                                           stages=self._pp_group, last=self._pp_ranks[self.loss_rank],
                                           num_stages=self.num_stages, device=self.root_device)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if first_time:
            self._sync_initial_params()
        if self._transport is None:  # here, where every rank is: setting up shared memory is a collective
            self._transport = self.new_transport()
        if trainer.state.fn == TrainerFn.FITTING:
            # configure_optimizers runs on every rank over that rank's stages: what fails on one (an optimizer
            # left without parameters there) raises on all, rather than the others waiting for it.
            on_every_rank(lambda: self._setup_optimizers(trainer), any_rank=self._any_rank,
                          elsewhere="configure_optimizers failed on another pipeline rank (see its error)")
            for optimizer in self.optimizers:  # the same classes on every rank: every rank raises
                if isinstance(optimizer, torch.optim.LBFGS):
                    raise PipelineError(_closure_calls_message(optimizer))
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        self._install_precision_hooks()
        if trainer.state.fn == TrainerFn.FITTING:
            route_model_summaries(trainer.callbacks)  # they call pipeline_summary at fit start
        if trainer.state.fn == TrainerFn.PREDICTING:
            write_once_per_replica(trainer.callbacks)  # on the first stage of each replica only
        if self.freeze_gc:
            # After the cut, so that the blocks of other stages are freed (the collection before the freeze takes
            # those in reference cycles); thawed in teardown. engine/heap.py says why.
            self._heap.freeze()

    def _setup_optimizers(self, trainer: Trainer) -> None:
        try:
            self.setup_optimizers(trainer)
        except ValueError as err:
            if "empty parameter list" not in str(err):
                raise
            raise PipelineError(
                f"configure_optimizers gave an optimizer no parameters on pipeline rank {self.pp_rank}: none of the "
                "parameters it selects (e.g. filter(lambda p: p.requires_grad, self.parameters()) over frozen "
                "layers) is on this rank's stages, and torch refuses an optimizer without parameters. Give the "
                "optimizer every parameter (a frozen one gets no gradient and is skipped, as on one device), or "
                "move the cut (PipelineStrategy(balance=[...])) so that every stage holds some it trains"
            ) from err

    def _split(self, module: LightningModule) -> None:
        if any(is_cut(m) for m in module.modules()):
            raise PipelineError(
                f"this {type(module).__name__} was already cut into pipeline stages by another Trainer's "
                "PipelineStrategy (each process keeps only its stages' blocks). Run validate/test/predict with the "
                "Trainer that fitted it, or build a new LightningModule and load the checkpoint into it "
                "(ckpt_path=...)"
            )
        path, chain = find_chain(module, self.blocks)
        # Decided on the whole model, so the same on every rank: the buffers none of whose names is in the chain
        # (a block that is also an attribute outside it counts as in it).
        every_buffer = list(module.named_buffers(remove_duplicate=False))
        inside = {id(b) for name, b in every_buffer if not path or name.startswith(f"{path}.")}
        outside = [(name, b) for name, b in every_buffer if id(b) not in inside]  # every name of each
        first_names: dict[int, str] = {}
        for name, b in outside:
            first_names.setdefault(id(b), name)
        self._outside_buffers = list(first_names.values())  # as named_buffers() names them
        self._chain_path = path
        if len(chain) < self.num_model_stages:
            raise PipelineError(
                f"`{path}` has {len(chain)} blocks, too few for pipeline_parallel_size={self.num_stages} x "
                f"virtual_stages={self.virtual_stages} = {self.num_model_stages} stages of at least one block; "
                "lower pipeline_parallel_size or virtual_stages"
            )
        self._param_order = [name for name, _ in module.named_parameters()]  # the whole model's, before the cut
        self._module_order = [name for name, _ in module.named_modules()]
        self._module_children = [name for name, _ in module.named_children()]
        self._chain_type = type(chain).__name__
        if self.balance in ("time", "memory") or self._auto_microbatches:
            self.layout_plan = plan_layout(self, module, chain,
                                           lambda: block_counts(chain, self.balance, self.num_model_stages))
            counts = self.layout_plan.counts
            if self.layout_plan.num_microbatches is not None:
                self._num_microbatches = self.layout_plan.num_microbatches
            if self.global_rank == 0:
                log.warning(self.layout_plan.report)
        else:
            counts = block_counts(chain, self.balance, self.num_model_stages)
        placement = plan_placement(module, path, counts, self._layout)
        held = [s for s, r in enumerate(self._layout) if r == self.pp_rank]
        self._runtime = split_chain(module, path, chain, counts=counts, stages=held)
        note_cut(chain, self)  # where lightning_pipe.grad_norm of a submodule holding the chain finds the strategy
        if len(held) > 1:
            self._outside_state = OutsideState(
                module, [name for name, _ in outside],
                lambda: self._metric_states.metrics.values() if self._metric_states is not None else (),
                keeper=max(held))
        self._replicated = ReplicatedParams(placement.replicated_names, placement.replicated_shapes,
                                            placement.replicated_owners, self.pp_rank, module)
        self._aliases = {name: aliases for aliases in placement.replicated_names for name in aliases}
        replicated_ids = {id(p) for p in self._replicated.params if p is not None}
        counted_ids = {id(p) for p, c in zip(self._replicated.params, self._replicated.count_here)
                       if p is not None and c}
        self._counted = {id(p) for p in module.parameters() if id(p) not in replicated_ids} | counted_ids
        log.info(f"pipeline rank {self.pp_rank}: {self._runtime.describe_blocks()} of "
                 f"`{path}` (block counts per stage: {counts})")

    def _sync_initial_params(self) -> None:
        """Start all copies alike: each replicated parameter from its lowest stage, then every parameter and buffer
        of a stage from replica 0 (what DDP does when it wraps a model)."""
        assert self._replicated is not None
        module = self.lightning_module
        self._replicated.agree_dtypes(self._pp_group, self.root_device)
        with torch.no_grad():
            for param, shape, owners, dtype in zip(self._replicated.params, self._replicated.shapes,
                                                   self._replicated.owners, self._replicated.dtypes):
                buffer = param.data if param is not None else torch.empty(shape, device=self.root_device,
                                                                          dtype=dtype)
                dist.broadcast(buffer, src=self._pp_ranks[owners[0]], group=self._pp_group)
            if (self.data_parallel_size or 1) > 1:
                # One broadcast per dtype rather than one per tensor: this runs at start-up on every replica.
                src = dist.get_global_rank(self._dp_group, 0)
                by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
                for tensor in [*module.parameters(), *module.buffers()]:
                    by_dtype.setdefault(tensor.dtype, []).append(tensor.data)
                for _, tensors in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
                    flat = torch.cat([t.reshape(-1) for t in tensors])
                    dist.broadcast(flat, src=src, group=self._dp_group)
                    offset = 0
                    for t in tensors:
                        t.copy_(flat[offset : offset + t.numel()].view_as(t))
                        offset += t.numel()

    # -- one step -----------------------------------------------------------------------------------------------
    def _executor(self, num_microbatches: int) -> PipelineExecutor:
        executor = self._executors.get(num_microbatches)
        if executor is None:
            if self._transport is None:
                self._transport = self.new_transport()
            executor = PipelineExecutor(self.schedule_for(num_microbatches), rank=self.pp_rank,
                                        transport=self._transport)
            self._executors[num_microbatches] = executor
        return executor

    def _split_batch(self, batch: Any, num_microbatches: int | None = None) -> list[Any]:
        num_microbatches = num_microbatches or self.num_microbatches
        micro = split_microbatches(batch, num_microbatches)
        if len(micro) < num_microbatches and not self._warned_short_batch:
            self._warned_short_batch = True
            warnings.warn(f"a batch of {len(micro)} samples is smaller than num_microbatches="
                          f"{num_microbatches}; it runs with {len(micro)} micro-batches (shown once)")
        return micro

    def _run_step(self, hook: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *, train: bool,
                  after_run: Callable[[], None] | None = None,
                  forward_context: Callable[[], Any] = nullcontext, num_microbatches: int | None = None,
                  check_batches: bool = True, chain_optional: bool = False) -> tuple[torch.Tensor | None, Any]:
        """Run ``hook`` over the micro-batches of ``args[0]``; relay the loss, the logged values and the outputs
        (merged over micro-batches) from the last stage to every stage. ``forward_context``: entered around each
        run of the hook (the precision plugin's autocast), not around the backwards, as on one device.
        ``num_microbatches``: instead of the strategy's; ``check_batches``: compare the stages' batches first
        (with the strategy's ``check_batches``); ``chain_optional``: the hook may leave the chain out (a forward-only
        step: a stage passes on a placeholder, which no later stage reads)."""
        module = self.lightning_module
        runtime = self._runtime
        assert module is not None and runtime is not None
        outside = self._outside_state  # None unless this rank holds several stages
        if check_batches and self.check_batches and self.num_stages > 1:
            check_same_batch(args[0], device=self.root_device, group=self._pp_group, size=self.num_stages,
                             where=f"{'training' if train else 'evaluation'} step, global step "
                                   f"{self.lightning_module.trainer.global_step}")
        micro = self._split_batch(args[0], num_microbatches)
        sizes = [batch_size_of(mb) for mb in micro]
        weights = microbatch_weights(micro, self.microbatch_weight, sizes=sizes)
        recorder = LogRecorder(module, local_files=self.dp_rank == 0)
        outputs: dict[int, Any] = {}

        def forward_fn(stage: int, microbatch: int, inputs: Any) -> Any:
            runtime.begin(inputs, stage)
            # Only the last stage's logs are relayed; what the hook logs before the chain on the other stages (a
            # rank may hold several) is recorded and dropped, so nothing is logged twice. Likewise their updates
            # of metrics outside the chain are undone, and each stage runs on its own copy of the buffers there
            # (side_effects.py).
            logs = recorder if stage == runtime.last_stage else LogRecorder(module)
            try:
                with logs.capture(microbatch), outside.running(stage) if outside is not None else nullcontext(), \
                        forward_context():
                    out = hook(micro[microbatch], *args[1:], **kwargs)
            except StageExit as done:
                return done.output
            except Exception as err:
                runtime.note_failure(err)
                raise
            finally:
                runtime.end()
            left_out = chain_optional and runtime.next_index == 0  # the hook did not run the chain at all
            if not runtime.is_last_stage:
                if left_out:
                    return torch.zeros(1, device=self.root_device)
                raise PipelineError(f"the step hook returned before block {runtime.stop - 1} of `{runtime.path}` "
                                    f"ran on pipeline stage {stage}; the chain must run in full in every step")
            if not left_out:
                runtime.check_finished()
            if not train:
                return out
            loss = out.get("loss") if isinstance(out, Mapping) else out
            if not isinstance(loss, torch.Tensor):
                raise PipelineError("training_step must return the loss (a tensor, or a dict with 'loss') under "
                                    "PipelineStrategy; skipping a step by returning None is not supported")
            outputs[microbatch] = out
            return loss

        executor = self._executor(len(micro))
        if outside is not None:
            outside.begin_step()
        metrics = self._metric_states
        counts = metrics.counts() if (metrics is not None and self.is_last_stage and self.num_stages > 1) else None
        scale = self._loss_scale() if train else None
        MetricStates.stepping(True)  # a metric synced inside the step syncs among the replicas only
        try:
            result = executor.run(forward_fn, loss_weights=weights, train=train, scale_loss=scale)
        except Exception as err:
            # A failure notice reaches only the ranks still waiting for a value; the others (the earlier stages of a
            # forward-only step, or any rank whose last value had gone) finished and wait in the payload broadcast
            # below. So a failed rank joins it too, the last stage sending its error there, and every rank raises.
            # Not after a timeout or a broken connection: a peer is gone or stuck, and would not join.
            if self.num_stages > 1 and peers_reachable(err):
                self._join_payload_broadcast(err, recorder.prints)
            else:
                replay_prints(module, recorder.prints)  # what the step printed before it failed, as on one device
            raise
        finally:
            MetricStates.stepping(False)
        if after_run is not None:
            after_run()
        payload: list[Any] = [None]
        if self.is_last_stage:
            try:
                payload = [self._step_payload(result, recorder, weights, outputs if train else result.outputs,
                                              train=train, sizes=sizes)
                           + (metrics.changed(counts) if metrics is not None and counts is not None else {},
                              # Set by the step's code after the chain (a loss threshold), which runs only here.
                              bool(module.trainer.should_stop))]
            except Exception as err:  # noqa: BLE001 - every stage must learn of it, not wait in the broadcast
                payload = [_step_error(err, recorder.prints)]
                if self.num_stages == 1:
                    raise
        if self.num_stages > 1:
            self._broadcast_payload(payload)
        if payload[0][0] == "error":
            replay_prints(module, payload[0][2])
            raise PipelineError(f"the last pipeline stage ({self.num_model_stages - 1}, on pipeline rank "
                                f"{self.loss_rank}) failed after the step: {payload[0][1]}")
        _, loss, records, merged, prints, metric_counts, stop = payload[0]
        if stop and not module.trainer.should_stop:  # the stages stop together, or the others wait for it
            module.trainer.should_stop = True
        if metric_counts and not self.is_last_stage and metrics is not None:
            metrics.apply(metric_counts)
        replay(module, records, self.root_device, same_everywhere=(self.data_parallel_size or 1) == 1)
        replay_prints(module, prints)
        if train:
            self.pipeline_metrics.after_step(module=module, result=result, batch=args[0], schedule=executor.schedule,
                                             group=self._pp_group, num_ranks=self.num_stages,
                                             replicas=self.data_parallel_size or 1, is_global_zero=self.is_global_zero,
                                             samples=sum(sizes), device=self.root_device)
        merged = _to_device(merged, self.root_device)
        if not train:
            return None, merged
        return loss.to(device=self.root_device, dtype=torch.float32), merged

    def _broadcast_payload(self, payload: list[Any]) -> None:
        """``payload[0]`` from the last stage to every stage of the pipeline, in place. Pickled here first, so that
        a value that cannot be pickled (a class defined inside the step) is sent as the step's error instead: a
        failure inside the broadcast would leave the other stages waiting in it."""
        box: list[Any] = [None]
        if self.is_last_stage:
            try:
                box[0] = pickle.dumps(payload[0])
            except Exception as err:  # noqa: BLE001 - pickling can fail with any error type
                payload[0] = _step_error(PipelineError(
                    f"what the step returned or logged cannot be sent to the other stages: {type(err).__name__}: "
                    f"{err}. Return and log tensors, numbers and standard containers of them (a class defined "
                    "inside the step cannot be pickled)"), payload[0][4] if payload[0][0] == "ok" else ())
                box[0] = pickle.dumps(payload[0])
        dist.broadcast_object_list(box, src=self._pp_ranks[self.loss_rank], group=self._pp_group)
        if not self.is_last_stage:
            payload[0] = pickle.loads(box[0])

    def _join_payload_broadcast(self, error: BaseException, prints: Sequence[Any]) -> None:
        """The payload broadcast of :meth:`_run_step` on a rank whose step failed: the last stage sends ``error``
        and ``prints`` (its step's ``self.print`` calls), the others take part and print those (best effort: a peer
        may be gone)."""
        box = [pickle.dumps(_step_error(error, prints))] if self.is_last_stage else [None]
        try:  # pickled as _broadcast_payload sends it: the stages that did not fail are in that one
            dist.broadcast_object_list(box, src=self._pp_ranks[self.loss_rank], group=self._pp_group)
            replay_prints(self.lightning_module, pickle.loads(box[0])[2])
        except Exception:  # noqa: BLE001 - the original error is what this rank raises
            log.debug("the payload broadcast after a failed step failed too", exc_info=True)

    @staticmethod
    def _step_payload(result: Any, recorder: LogRecorder, weights: list[float], outputs: dict[int, Any], *,
                      train: bool, sizes: list[int]) -> tuple[str, Any, list[LogRecord], Any, list[Any]]:
        """What the last stage relays to every stage: the batch loss, the logged values, the merged outputs (for
        training, what training_step returned besides the loss), on the CPU, and the ``self.print`` calls."""
        loss = sum(w * result.losses[i].double() for i, w in enumerate(weights)).cpu() if train else None
        merged = None
        values = [outputs[i] for i in sorted(outputs)]
        if train:
            values = [{k: v for k, v in out.items() if k != "loss"} for out in values if isinstance(out, Mapping)]
        if values and not all(v is None or (isinstance(v, Mapping) and not v) for v in values):
            merged = _to_device(merge_microbatches(values, sizes if len(values) == len(sizes) else None),
                                torch.device("cpu"))
        return ("ok", loss, combine_records(recorder, weights, sizes), merged, recorder.prints)

    def _loss_scale(self) -> Callable[[torch.Tensor], torch.Tensor]:
        trainer = self.lightning_module.trainer
        accumulate = trainer.accumulate_grad_batches
        scaler = getattr(self.precision_plugin, "scaler", None)

        def scale(loss: torch.Tensor) -> torch.Tensor:
            # What Lightning's closure does to the loss before backward: 1/accumulate, then the GradScaler.
            loss = loss / accumulate
            return scaler.scale(loss) if scaler is not None else loss

        return scale

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        module = self.lightning_module
        params = [p for p in module.parameters() if p.requires_grad]
        before = self._stash.begin(params)
        try:
            # Autocast around each forward only: on one device Lightning runs backward outside it.
            loss, extras = self._run_step(module.training_step, args, kwargs, train=True,
                                          after_run=lambda: self._start_data_parallel_average(params, before),
                                          forward_context=self.precision_plugin.train_step_context)
        finally:
            self._stash.end(params, before)
        assert loss is not None
        # Lightning needs a loss on every rank; backward() below installs the gradients the step computed.
        loss = loss.detach().requires_grad_(True)
        return {"loss": loss, **extras} if isinstance(extras, Mapping) else loss

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        module = self.lightning_module
        self.pre_backward(closure_loss)
        Precision.pre_backward(self.precision_plugin, closure_loss, module)  # hooks only: no loss scaling here
        self._stash.apply()
        if self._dp_average.finish():
            self._dp_averaged = True
            self.async_dp_averages += 1
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: LightningModule | torch.nn.Module | None = None, **kwargs: Any) -> Any:
        calls = 0

        def closure_then_sync() -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:  # SAM-like optimizers: every rank makes the second call, so every rank raises here
                raise PipelineError(_closure_calls_message(optimizer))
            out = closure()
            self._reduce_gradients()
            return out

        return super().optimizer_step(optimizer, closure_then_sync, model, **kwargs)

    def _start_data_parallel_average(self, params: list[torch.nn.Parameter],
                                     before: list[torch.Tensor | None]) -> None:
        """On the last batch of an accumulation window, start averaging the window's gradients over the replicas
        right away (it completes in ``backward``, overlapping what runs in between)."""
        trainer = self.lightning_module.trainer
        if (self.data_parallel_size or 1) == 1 or trainer.fit_loop.epoch_loop._should_accumulate():
            return
        accumulate = trainer.accumulate_grad_batches
        batch_idx = trainer.fit_loop.epoch_loop.batch_idx  # the hook may not take batch_idx: ask the loop
        # On the first batch of a window Lightning zeroes the earlier gradients after this hook: they do not count.
        earlier = [None] * len(params) if batch_idx % accumulate == 0 else before
        self._dp_average.start(params, earlier, self._dp_group, self.data_parallel_size or 1, device=self.root_device)

    def _reduce_gradients(self) -> None:
        """Once per optimizer step: sum replicated parameters' gradients over the stages, and average every
        gradient over the data-parallel replicas unless that already happened asynchronously."""
        assert self._replicated is not None
        if self.num_stages > 1:
            self._replicated.sum_grads(self._pp_group)
        averaged, self._dp_averaged = self._dp_averaged, False
        if (self.data_parallel_size or 1) > 1 and not averaged:
            # Not started at the end of the backward (a loop that steps without accumulation bookkeeping): now.
            params = [p for p in self.lightning_module.parameters() if p.requires_grad]
            self._dp_average.start(params, [None] * len(params), self._dp_group, self.data_parallel_size or 1,
                                   device=self.root_device)
            self._dp_average.finish()

    def _install_precision_hooks(self) -> None:
        plugin = self.precision_plugin
        if getattr(plugin, "_lightning_pipe_hooked", False):
            return
        plugin._lightning_pipe_hooked = True  # type: ignore[attr-defined]

        def clip_grad_by_norm(optimizer: Optimizer, clip_val: float) -> None:
            params = list(plugin.main_params(optimizer))
            clip_by_global_norm(params, float(clip_val), self._counted, self._pp_group, device=self.root_device)

        plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None:
            make_scaler_agree(scaler, None)  # over every process: replicas and stages skip the same steps

    # -- the replicas run as many steps --------------------------------------------------------------------------
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._counted_epoch = None  # a new fit: check its first epoch too

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        trainer = self.lightning_module.trainer
        if self._counted_epoch != trainer.current_epoch:  # once an epoch, at its first batch (also after resuming)
            self._counted_epoch = trainer.current_epoch
            self._agree_batch_counts("training", [trainer.num_training_batches])
            self._each_train_batch = self._replicas_need_each_batch(trainer.train_dataloader)
        if self._each_train_batch:
            # The loop's own last batch too (limit_train_batches, max_steps): a replica whose data ends exactly
            # there stops with the others.
            steps_left = trainer.max_steps - trainer.global_step if trainer.max_steps >= 0 else math.inf
            ends = (trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
                    or batch_idx + 1 >= trainer.num_training_batches
                    or (steps_left <= 1 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0))
            self._agree_last_batch("training", batch_idx, 0, ends)

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        trainer = self.lightning_module.trainer
        self._agree_batch_counts("validation", trainer.num_sanity_val_batches if trainer.sanity_checking
                                 else trainer.num_val_batches)
        self._each_eval_batch = self._replicas_need_each_batch(trainer.val_dataloaders)
        self._eval_batches = {}

    @override
    def on_test_start(self) -> None:
        super().on_test_start()
        trainer = self.lightning_module.trainer
        self._agree_batch_counts("test", trainer.num_test_batches)
        self._each_eval_batch = self._replicas_need_each_batch(trainer.test_dataloaders)
        self._eval_batches = {}

    def _agree_batch_counts(self, what: str, counts: Sequence[float]) -> None:
        """Raise on every rank if the data-parallel replicas do not have as many batches: each step averages the
        gradients, and metrics sync, over the replicas, so a replica whose data ran out would leave the others
        waiting in a collective it never enters. (A loader without a length cannot be checked ahead.)"""
        replicas = self.data_parallel_size or 1
        if replicas == 1 or not counts:
            return
        mine = torch.tensor([float(c) for c in counts], dtype=torch.float64, device=self.root_device)
        rows = [[c if math.isfinite(c) else "unknown" for c in row]
                for row in gather_rows(mine, group=self._dp_group, size=replicas)]
        if any(row != rows[0] for row in rows):
            raise PipelineError(
                f"the data-parallel replicas have different numbers of {what} batches (per replica: {rows}); each "
                "must run as many steps, since gradients and metrics are averaged over them. Let Lightning shard "
                "the data (use_distributed_sampler=True, the default) or give every replica's sampler as many "
                "batches (drop_last)")

    def _replicas_need_each_batch(self, loaders: Any) -> bool:
        """Whether the replicas must compare every batch of ``loaders`` (one, or a collection of them): there are
        several, and a loader has no length (then even a ``limit_*_batches`` count may be more than its data)."""
        found: list[bool] = []
        apply_to_collection(loaders, object, lambda loader: found.append(sized_len(loader) is None),
                            wrong_dtype=(Sequence, Mapping))
        return (self.data_parallel_size or 1) > 1 and any(found)

    def _agree_last_batch(self, what: str, batch_idx: int, dataloader_idx: int, last: bool) -> None:
        """Raise on every rank if the data-parallel replicas are not at the same batch, or one is at its last
        (``last``: its data ends, or the loop stops there) and another is not: the one that stops would leave the
        others waiting in the next collective. Lightning fetches a batch ahead, so it knows at a batch whether the
        data ends there, and this step still has every replica."""
        mine = torch.tensor([batch_idx, dataloader_idx, int(last)], dtype=torch.int64, device=self.root_device)
        rows = gather_rows(mine, group=self._dp_group, size=self.data_parallel_size or 1)
        if any(row != rows[0] for row in rows):
            raise PipelineError(
                f"the data-parallel replicas' {what} data ends at different batches (per replica: [batch index, "
                f"dataloader index, whether it is the last] = {rows}); each must run as many steps, since gradients "
                "and metrics are averaged over them. Their loaders have no length, so this is found only where the "
                "first one ends: give every replica as many batches (shard the stream evenly, or stop it at a "
                "count every replica reaches)")

    def _agree_eval_batch(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._each_eval_batch:
            return
        # Lightning passes (batch[, batch_idx][, dataloader_idx]) by position, batch_idx only where the step takes
        # it; dataloader_idx is there whenever there are several loaders. The batch index is counted here.
        dataloader_idx = int(args[2] if len(args) > 2 else kwargs.get("dataloader_idx", 0))
        batch_idx = self._eval_batches.get(dataloader_idx, 0)
        self._eval_batches[dataloader_idx] = batch_idx + 1
        trainer = self.lightning_module.trainer
        loop = trainer._evaluation_loop
        limit = loop.max_batches[dataloader_idx] if dataloader_idx < len(loop.max_batches) else math.inf
        self._agree_last_batch("test" if trainer.testing else "validation", batch_idx, dataloader_idx,
                               loop.batch_progress.is_last_batch or batch_idx + 1 >= limit)

    # -- evaluation -----------------------------------------------------------------------------------------------
    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        self._agree_eval_batch(args, kwargs)
        with self.precision_plugin.val_step_context():
            return self._run_step(self.lightning_module.validation_step, args, kwargs, train=False)[1]

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        self._agree_eval_batch(args, kwargs)
        with self.precision_plugin.test_step_context():
            return self._run_step(self.lightning_module.test_step, args, kwargs, train=False)[1]

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._run_step(self.lightning_module.predict_step, args, kwargs, train=False)[1]

    # -- the whole model, seen from every rank ---------------------------------------------------------------------
    def grad_norms(self, module: torch.nn.Module, norm_type: float | int | str, *,
                   group_separator: str = "/") -> dict[str, torch.Tensor]:
        """``lightning.pytorch.utilities.grad_norm`` of the whole pipelined model, or of a submodule of it, as on one
        device, on every rank (what :func:`lightning_pipe.grad_norm` calls); call it on every rank of the pipeline
        (it gathers)."""
        root = self.lightning_module
        prefix = next((f"{name}." if name else "" for name, m in root.named_modules() if m is module), None)
        if prefix is None:
            raise PipelineError(f"grad_norm: the {type(module).__name__} given is not a module of the "
                                f"{type(root).__name__} this strategy trains")
        strip = len(prefix)
        order = [n[strip:] for n in self._param_order if n.startswith(prefix)]
        aliases = {n[strip:]: [a[strip:] for a in names if a.startswith(prefix)]
                   for n, names in self._aliases.items() if n.startswith(prefix)}
        return gather_grad_norms(module, norm_type, group_separator=group_separator, order=order, aliases=aliases,
                                 group=self._pp_group, size=self.num_stages, device=self.root_device)

    def pipeline_summary(self, module: LightningModule, *, max_depth: int = 1) -> PipelineSummary:
        """Lightning's model summary of the whole pipelined model (what ``ModelSummary`` prints at fit start): every
        stage's layers and parameters, and with an ``example_input_array`` the sizes and FLOPs of one pipelined
        forward of it. Call it on every rank of the pipeline (it gathers)."""
        assert self._runtime is not None
        rows = summary_rows(self._module_order, self._module_children, max_depth)
        local = local_summary(module, chain_path=self._chain_path, chain_type=self._chain_type, aliases=self._aliases)
        if module.example_input_array is not None:
            local.runs = record_example(module, runtime=self._runtime, names=rows, run=self._run_example)
        everyone: list[LocalSummary | None] = [None] * self.num_stages
        dist.all_gather_object(everyone, local, group=self._pp_group)
        merged = merge_summaries([s for s in everyone if s is not None], rows=rows, modules_once=self._module_order,
                                 chain_path=self._chain_path, last_stage=self.num_model_stages - 1)
        return PipelineSummary(module, max_depth=max_depth, merged=merged)

    def _run_example(self, hook: Callable[[Any], None]) -> None:
        """``hook`` on the module's ``example_input_array`` as a forward-only step of one micro-batch, prepared as
        Lightning's summary prepares it (the batch transfer hooks; the precision's forward context)."""
        module = self.lightning_module
        assert module is not None
        example = module._apply_batch_transfer_handler(module._on_before_batch_transfer(module.example_input_array))
        try:
            with torch.no_grad():
                # The stages may draw their own random examples: their shapes are what matters.
                # A forward that leaves the chain out (the model's steps call it) shows "?" there, as on one device.
                self._run_step(hook, (example,), {}, train=False, num_microbatches=1, check_batches=False,
                               forward_context=self.precision_plugin.forward_context, chain_optional=True)
        except Exception as err:
            if hasattr(err, "add_note"):
                err.add_note("(lightning_pipe) raised by the model summary's pipelined forward of "
                             "example_input_array; Trainer(enable_model_summary=False) skips it")
            raise

    # -- reductions -------------------------------------------------------------------------------------------------
    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        # Every stage logs the same relayed values: reducing across stages would count them once per stage.
        if group is None:
            if (self.data_parallel_size or 1) == 1:
                return tensor
            group = self._dp_group
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        # As reduce: the stages of a pipeline share one batch, so gathering over them would repeat each replica's
        # values once per stage. Gathered over the data-parallel replicas; without replicas, as on one device (no
        # new dimension). LightningModule.all_gather passes WORLD for its default.
        if group is None or group is dist.group.WORLD:
            if (self.data_parallel_size or 1) == 1:
                return tensor
            group = self._dp_group
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # Callbacks' decisions (ModelCheckpoint, EarlyStopping) are agreed over every process, unlike logged values.
        flag = torch.tensor(int(decision), device=self.root_device)
        dist.all_reduce(flag)
        return bool(flag == self.world_size) if all else bool(flag)

    # -- checkpoints: sharded, keyed by full names (see checkpoint.py) ------------------------------------------------
    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.lightning_module.named_parameters()}

    def _share_outside_buffers(self) -> bool:
        """Copy the buffers of modules outside the chain (a norm after it) from the last stage to the pipeline's
        other stages. The last stage runs the code before the chain and after it on real data, so its copies are
        current; other stages never run what follows the chain. A checkpoint writes one copy of each name, from
        any rank. Returns whether there were any."""
        if self.num_stages == 1 or not self._outside_buffers:
            return False
        buffers = [self.lightning_module.get_buffer(name) for name in self._outside_buffers]
        for buffer in buffers:
            dist.broadcast(buffer, src=self._pp_ranks[self.loss_rank], group=self._pp_group)
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self.lightning_module.state_dict()  # this stage's part; save_checkpoint writes every stage's

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return optimizer_state_by_name(optimizer, self._names())

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("PipelineStrategy.save_checkpoint(..., storage_options=...) is not supported: the "
                            "checkpoint is written with torch.distributed.checkpoint")
        path = Path(self.broadcast(str(filepath)))
        if self._share_outside_buffers():  # the state dict was taken before: take this stage's again
            checkpoint["state_dict"] = self.lightning_module_state_dict()
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        # meta.pt holds rank 0's LR schedulers; what differs per param group (base_lrs, ...) is saved by name.
        names = self._names()
        for i, (config, scheduler_state) in enumerate(zip(self.lr_scheduler_configs,
                                                          checkpoint.get("lr_schedulers", []))):
            optimizer = getattr(config.scheduler, "optimizer", None)
            if optimizer is not None:
                state[f"lr_scheduler_{i}"] = scheduler_state_by_name(scheduler_state, optimizer, names)
        checkpoint["pipeline"] = {"param_order": self._param_order, "pipeline_parallel_size": self.num_stages,
                                  "virtual_stages": self.virtual_stages, "schedule": self.schedule_name,
                                  "data_parallel_size": self.data_parallel_size}
        save_sharded(path, state=state, meta=checkpoint if self.is_global_zero else None,
                     is_rank_zero=self.is_global_zero, barrier=self.barrier, any_rank=self._any_rank)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if checkpoint_kind(path, any_rank=self._any_rank) == "directory":
            names = self._names()

            def every_name(optimizer: Optimizer) -> list[str]:
                own = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
                return [alias for name in own for alias in self._aliases.get(name, [name])]

            checkpoint = load_sharded(
                path, model_state=self.lightning_module.state_dict(), weights_only=weights_only,
                optimizer_names=[every_name(opt) for opt in self.optimizers],
                scheduler_names=[every_name(optimizer) if optimizer is not None else []
                                 for optimizer in self._scheduler_optimizers()],
                any_rank=self._any_rank,
            )
            checkpoint[_LOADED_IN_PLACE] = True  # DCP wrote into the module's own tensors already
            self._own_scheduler_states(checkpoint)
            return checkpoint
        checkpoint = super().load_checkpoint(path, weights_only=weights_only)  # an ordinary single file
        if "pipeline_optimizer_states" in checkpoint:  # consolidated from a pipeline checkpoint: exact by name
            checkpoint["optimizer_states"] = checkpoint.pop("pipeline_optimizer_states")
            self._own_scheduler_states(checkpoint)
        return checkpoint

    def _scheduler_optimizers(self) -> list[Optimizer | None]:
        return [getattr(config.scheduler, "optimizer", None) for config in self.lr_scheduler_configs]

    def _own_scheduler_states(self, checkpoint: dict[str, Any]) -> None:
        """Each LR scheduler's state as this rank's one was saved: rank 0's (meta.pt), with the per-group lists
        rebuilt for this rank's param groups from their name-keyed copies."""
        by_name = checkpoint.pop("pipeline_lr_scheduler_groups", None) or []
        states = checkpoint.get("lr_schedulers", [])
        names = self._names()
        for i, (config, optimizer) in enumerate(zip(self.lr_scheduler_configs, self._scheduler_optimizers())):
            if optimizer is not None and i < len(states) and i < len(by_name):
                states[i] = load_scheduler_state_by_name(states[i], config.scheduler.state_dict(), optimizer, names,
                                                         self._under_own_names(by_name[i]))

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        if checkpoint.get(_LOADED_IN_PLACE):
            return
        module = self.lightning_module

        def load() -> None:
            own = module.state_dict()
            state = checkpoint["state_dict"]
            missing = [k for k in own if k not in state]
            if strict and missing:
                raise PipelineError(f"the checkpoint lacks {len(missing)} entries this stage needs, e.g. "
                                    f"{missing[:3]}")
            module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

        on_every_rank(load, any_rank=self._any_rank,
                      elsewhere="loading the checkpoint's weights failed on another rank (see its error)")

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        names = self._names()

        def load() -> None:
            for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"]):
                if "param_groups" in saved:  # an ordinary index-keyed state from single-device training
                    saved = plain_optimizer_state_by_name(saved, self._param_order)
                saved = {part: self._under_own_names(entries) if part in ("state", "hparams", "groups") else entries
                         for part, entries in saved.items()}
                load_optimizer_state_by_name(optimizer, names, saved)
                _optimizers_to_device([optimizer], self.root_device)

        on_every_rank(load, any_rank=self._any_rank,
                      elsewhere="loading the checkpoint's optimizer states failed on another rank (see its error)")

    def _under_own_names(self, by_name: dict[str, Any]) -> dict[str, Any]:
        """``by_name`` (entries keyed by parameter name) with each entry saved under another name of a parameter
        with several (a tied weight) also under the names this rank has not got an entry for: a checkpoint written
        on one device, or in another layout, names a tied weight by its first name only."""
        out = dict(by_name)
        for name, aliases in self._aliases.items():
            if name not in out:
                found = next((a for a in aliases if a in by_name), None)
                if found is not None:
                    out[name] = by_name[found]
        return out

    def _any_rank(self, flag: bool) -> bool:
        return self.reduce_boolean_decision(flag, all=False)

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            if Path(filepath).is_dir():  # a sharded checkpoint, or a link to one (save_last="link")
                remove_checkpoint_path(Path(filepath))
            else:
                super().remove_checkpoint(filepath)

    @override
    def teardown(self) -> None:
        self._heap.thaw()
        MetricStates.release()
        self._executors.clear()
        if self._transport is not None:
            self._transport.close()  # its poster thread, if one was started
        self._transport = None
        super().teardown()


def _closure_calls_message(optimizer: Optimizer) -> str:
    return (f"{type(optimizer).__name__} calls the training closure more than once per step (a line search, "
            "sharpness-aware minimisation), which PipelineStrategy does not support: each stage's optimizer sees "
            "only its own stage's parameters and gradients, so such decisions would differ between stages. Use an "
            "optimizer that calls the closure once per step (SGD, Adam, AdamW, ...)")
