"""Lightning's model summary for a model cut into pipeline stages.

Each rank holds only its stages' blocks, so Lightning's ``ModelSummary`` callback would count rank 0's stage as the
model, and with an ``example_input_array`` its forward outside a step would fail (the other blocks are elsewhere).
Under the pipeline the callback asks the strategy instead (:func:`route_model_summaries`): every rank describes
what it holds (:func:`local_summary`), runs its part of one pipelined forward of the example (one micro-batch)
with hooks that take each layer's sizes and FLOPs as Lightning's do (:func:`record_example`), and the descriptions
are gathered and merged (:func:`merge_summaries`) into the whole model's table (:class:`PipelineSummary`), the same
as one device prints.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from types import MethodType
from typing import Any, Callable, Iterable, Sequence

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelSummary as ModelSummaryCallback
from lightning.pytorch.utilities.model_summary.model_summary import (
    UNKNOWN_SIZE,
    ModelSummary,
    parse_batch_shape,
)
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.utils.flop_counter import FlopCounterMode

from lightning_pipe.strategy.chain import ChainRuntime

__all__ = ["StageRun", "LocalSummary", "MergedSummary", "PipelineSummary", "local_summary", "record_example",
           "merge_summaries", "route_model_summaries", "summary_rows"]


@dataclass
class StageRun:
    """What one stage's part of the example forward showed on the rank that holds it."""

    stage: int
    sizes: dict[str, list[Any]] = field(default_factory=dict)
    """Module name -> [in size, out size], each None where not seen (Lightning's parsed shapes otherwise)."""
    flops: dict[str, int] = field(default_factory=dict)
    """Module name -> FLOPs of the ops run inside it."""
    total_flops: int = 0


@dataclass
class LocalSummary:
    """What one rank holds."""

    params: list[tuple[tuple[str, ...], int, bool]]
    """Per parameter: every name it has in the whole model, its element count, whether it is trained."""
    modules: dict[str, tuple[str, bool]]
    """Every name of each module held here (the root excluded) -> (class name, in training mode)."""
    runs: list[StageRun] = field(default_factory=list)


@dataclass
class MergedSummary:
    """The whole model's summary, the same on every rank."""

    names: list[str]
    types: list[str]
    params: list[int]
    training: list[bool]
    flops: list[int]
    in_sizes: list[Any]
    out_sizes: list[Any]
    total_parameters: int
    trainable_parameters: int
    training_modes: dict[str, int]
    total_flops: int


def summary_rows(modules: Sequence[str], children: Sequence[str], max_depth: int) -> list[str]:
    """The rows of Lightning's summary of ``max_depth``: the root's children for 1, else every module (each once,
    under its first name) down to that depth. ``modules``, ``children``: the uncut model's ``named_modules()`` and
    ``named_children()`` names."""
    if max_depth == 1:
        return list(children)
    return [n for n in modules if n and (max_depth == -1 or (max_depth > 0 and n.count(".") < max_depth))]


def local_summary(module: nn.Module, *, chain_path: str, chain_type: str,
                  aliases: dict[str, list[str]]) -> LocalSummary:
    """Parameters and modules ``module`` holds on this rank. ``chain_type``: the chain's class before the cut (its
    class is swapped for a subclass); ``aliases``: every name of each parameter held by several ranks."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).extend(aliases.get(name, [name]))
        params[id(param)] = param
    entries = [(tuple(sorted(set(names[k]))), 0 if isinstance(p, UninitializedParameter) else p.numel(),
                p.requires_grad) for k, p in params.items()]
    modules = {name: (chain_type if name == chain_path else type(m).__name__, m.training)
               for name, m in module.named_modules(remove_duplicate=False) if name}
    return LocalSummary(params=entries, modules=modules)


def record_example(module: LightningModule, *, runtime: ChainRuntime, names: Iterable[str],
                   run: Callable[[Callable[[Any], None]], None]) -> list[StageRun]:
    """Sizes and FLOPs of one pipelined forward of ``module.example_input_array`` on this rank, per stage held.

    ``run(hook)`` runs ``hook`` on the example as a step (forward only, one micro-batch); ``names``: the modules
    whose sizes are taken (those with a row in the summary)."""
    example = module.example_input_array
    runs: list[StageRun] = []
    current: list[StageRun | None] = [None]
    handles = []

    def watch(name: str, sub: nn.Module) -> None:
        # As Lightning's, the sizes of the first call. The input is taken before the call (after the hook that
        # swaps in the received hidden state): on all but the last stage the chain's container never returns (the
        # stage ends by raising from its last block's hook; ours on that block runs first, so it gets the output).
        def before(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen = current[0]
            if seen is not None and name not in seen.sizes:
                inp: Any = (*args, *kwargs.values())
                seen.sizes[name] = [parse_batch_shape(inp[0] if len(inp) == 1 else inp), None]

        def after(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            seen = current[0]
            if seen is not None and name in seen.sizes and seen.sizes[name][1] is None:
                seen.sizes[name][1] = parse_batch_shape(out)

        handles.append(sub.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(sub.register_forward_hook(after, with_kwargs=True, prepend=True))

    wanted = set(names)
    for name, sub in module.named_modules(remove_duplicate=False):  # a row may name a module shared under others
        if name in wanted:
            watch(name, sub)
    root = type(module).__name__

    def hook(inputs: Any) -> None:
        seen = StageRun(stage=runtime.stage)
        runs.append(seen)
        current[0] = seen
        counter = FlopCounterMode(display=False)
        try:
            with counter:
                if isinstance(example, (list, tuple)):
                    module(*inputs)
                elif isinstance(example, dict):
                    module(**inputs)
                else:
                    module(inputs)
        finally:  # also when the stage ends early (StageExit): its part is done
            current[0] = None
            counts = counter.get_flop_counts()
            seen.total_flops = counter.get_total_flops()
            seen.flops = {k[len(root) + 1:]: sum(v.values()) for k, v in counts.items() if k.startswith(f"{root}.")}

    modes = {m: m.training for m in module.modules()}
    module.eval()  # as Lightning's summary runs its example
    try:
        run(hook)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return runs


def _row_prefixes(name: str, rows: set[str]) -> set[str]:
    parts = name.split(".")
    return {p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in rows}


def merge_summaries(summaries: Sequence[LocalSummary], *, rows: Sequence[str], modules_once: Sequence[str],
                    chain_path: str, last_stage: int) -> MergedSummary:
    """The whole model's summary from every pipeline rank's :class:`LocalSummary` (and their stage runs).

    ``rows``: the rows one device shows (:func:`summary_rows`); ``modules_once``: the uncut model's module names,
    each module once (``named_modules()``), which the train/eval counts go over. A layer's sizes and FLOPs come
    from the stage that ran it for real: the chain's blocks from their stage; the chain's container its input from
    stage 0, its output from the last stage and its FLOPs summed over the stages; every other module (run before
    or after the chain) from the last stage, where everything outside the chain runs on real values, plus, for a
    module holding the chain, the other stages' blocks."""
    modules: dict[str, tuple[str, bool]] = {}
    for s in summaries:
        for name, info in s.modules.items():
            modules.setdefault(name, info)
    rows = [n for n in rows if n in modules]
    row_set = set(rows)

    params: dict[str, tuple[set[str], int, bool]] = {}  # by the parameter's first name in sorted order
    for s in summaries:
        for names, numel, trainable in s.params:
            key = min(names)
            known = params.get(key)
            params[key] = (set(names) | (known[0] if known else set()), numel, trainable)
    per_row = dict.fromkeys(rows, 0)
    for names, numel, _ in params.values():
        for row in set().union(*(_row_prefixes(n, row_set) for n in names)):
            per_row[row] += numel

    runs = [r for s in summaries for r in s.runs]
    last = [r for r in runs if r.stage == last_stage]
    first = [r for r in runs if r.stage == 0]
    inside = f"{chain_path}."

    def blocks_flops(run: StageRun) -> int:
        held = {key[len(inside):].split(".", 1)[0] for key in run.flops if key.startswith(inside)}
        return sum(run.flops.get(f"{inside}{block}", 0) for block in held)

    # The ops the last stage did not run: the other stages' blocks.
    elsewhere = sum(blocks_flops(r) for r in runs if r.stage != last_stage)

    def from_runs(name: str) -> tuple[int, Any, Any]:
        if name == chain_path:
            return (sum(r.flops.get(name, 0) for r in runs),
                    next((r.sizes[name][0] for r in first if name in r.sizes), None),
                    next((r.sizes[name][1] for r in last if name in r.sizes), None))
        source = [r for r in runs if name in r.sizes or name in r.flops] if name.startswith(inside) else last
        flops = next((r.flops.get(name, 0) for r in source if name in r.flops), 0)
        if chain_path.startswith(f"{name}.") and any(name in r.flops for r in last):
            flops += elsewhere  # a module holding the chain
        sizes = next((r.sizes[name] for r in source if name in r.sizes), [None, None])
        return flops, sizes[0], sizes[1]

    measured = [from_runs(n) for n in rows]
    # Every op once: the last stage's run has the code outside the chain, each other run adds its blocks' ops.
    total_flops = sum(r.total_flops for r in last[:1]) + elsewhere
    modes = [modules[n][1] for n in modules_once if n in modules]
    return MergedSummary(
        names=rows,
        types=[modules[n][0] for n in rows],
        params=[per_row[n] for n in rows],
        training=[modules[n][1] for n in rows],
        flops=[m[0] for m in measured],
        in_sizes=[m[1] or UNKNOWN_SIZE for m in measured],
        out_sizes=[m[2] or UNKNOWN_SIZE for m in measured],
        total_parameters=sum(p[1] for p in params.values()),
        trainable_parameters=sum(p[1] for p in params.values() if p[2]),
        training_modes={"train": modes.count(True), "eval": modes.count(False)},
        total_flops=total_flops,
    )


class PipelineSummary(ModelSummary):
    """Lightning's :class:`~lightning.pytorch.utilities.model_summary.ModelSummary` of the whole pipelined model
    (what its callback and ``str()`` print), from a :class:`MergedSummary`."""

    def __init__(self, model: LightningModule, *, max_depth: int, merged: MergedSummary) -> None:
        example = model._example_input_array
        model._example_input_array = None  # the base runs no forward (the blocks are on other ranks)
        try:
            super().__init__(model, max_depth=0)  # the precision and its warning, as Lightning's
        finally:
            model._example_input_array = example
        self._max_depth = max_depth
        self._merged = merged
        self._layer_summary = OrderedDict((name, None) for name in merged.names)  # type: ignore[misc]

    @property
    def layer_names(self) -> list[str]:
        return list(self._merged.names)

    @property
    def layer_types(self) -> list[str]:
        return list(self._merged.types)

    @property
    def in_sizes(self) -> list:
        return list(self._merged.in_sizes)

    @property
    def out_sizes(self) -> list:
        return list(self._merged.out_sizes)

    @property
    def param_nums(self) -> list[int]:
        return list(self._merged.params)

    @property
    def training_modes(self) -> list[bool]:
        return list(self._merged.training)

    @property
    def total_training_modes(self) -> dict[str, int]:
        return dict(self._merged.training_modes)

    @property
    def total_parameters(self) -> int:
        return self._merged.total_parameters

    @property
    def trainable_parameters(self) -> int:
        return self._merged.trainable_parameters

    @property
    def total_flops(self) -> int:
        return self._merged.total_flops

    @property
    def flop_counts(self) -> dict[str, dict[Any, int]]:
        return {name: {"total": flops} for name, flops in zip(self._merged.names, self._merged.flops)}


def _summary(self: ModelSummaryCallback, trainer: Trainer, pl_module: LightningModule) -> ModelSummary:
    summarize = getattr(trainer.strategy, "pipeline_summary", None)
    if summarize is None:  # the callback reused under another strategy
        return type(self)._summary(self, trainer, pl_module)
    return summarize(pl_module, max_depth=self._max_depth)


def route_model_summaries(callbacks: Iterable[Callback]) -> None:
    """Have each ``ModelSummary`` callback (``RichModelSummary`` too) summarize through the strategy."""
    for callback in callbacks:
        if isinstance(callback, ModelSummaryCallback) and hasattr(callback, "_summary"):
            callback._summary = MethodType(_summary, callback)  # type: ignore[method-assign]
