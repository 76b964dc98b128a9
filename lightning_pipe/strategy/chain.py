"""Finding the user's chain of blocks and cutting it so that a rank keeps only its stage's blocks.

The chain (an ``nn.Sequential``, or an ``nn.ModuleList`` walked in a ``for`` loop) keeps its place in the model;
its class is swapped for a subclass whose ``_modules`` hold only this stage's blocks, under their original indices
(so parameter names stay ``layers.5.attn.weight``), and whose iteration yields, in order:

* for blocks of earlier stages, a stand-in that returns its first argument (the code before the chain still runs;
  its output is replaced at the stage's first block by the activation received from the previous stage);
* this stage's blocks, watched by hooks that check the order, swap in the received input at the first block and,
  on every stage but the last, end the step after the last block by raising :class:`StageExit` with its output.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from lightning_pipe.engine.tree import flatten, unflatten
from lightning_pipe.errors import PipelineError

__all__ = ["StageExit", "ChainRuntime", "find_chain", "split_chain", "is_cut"]


class StageExit(BaseException):
    """Raised after a non-last stage's last block to end the user's step hook; carries the stage output.

    A ``BaseException`` so that a user's ``except Exception`` in the step does not swallow it.
    """

    def __init__(self, output: Any) -> None:
        super().__init__("pipeline stage finished")
        self.output = output


class ChainRuntime:
    """Per-rank state of the cut chain: the blocks of each stage this rank holds, and the stage and micro-batch
    being computed. A rank holds several stages under virtual stages (interleaved and V-shaped schedules)."""

    def __init__(self, *, path: str, num_blocks: int, ranges: dict[int, tuple[int, int]], last_stage: int) -> None:
        self.path, self.num_blocks = path, num_blocks
        self.ranges = dict(sorted(ranges.items()))
        self.last_stage = last_stage
        self.blocks: dict[int, nn.Module] = {}
        self.active = False
        self.next_index = 0
        self.received: Any = None
        self.hidden_names: dict[int, str] = {}  # each block's first parameter: the hidden state, when passed by name
        self.passed: tuple[int, Any] = (-1, None)  # the last stand-in and the hidden state it passed on
        self.checked: set[int] = set()  # blocks found to return the form of the hidden state they take
        self._select(next(iter(self.ranges)))

    def _select(self, stage: int) -> None:
        self.stage = stage
        self.first, self.stop = self.ranges[stage]
        self.is_last_stage = stage == self.last_stage

    def begin(self, received: Any, stage: int | None = None) -> None:
        """Start computing ``stage`` (default: the only stage held) on ``received``."""
        if stage is not None:
            self._select(stage)
        self.active, self.next_index, self.received = True, 0, received
        self.passed = (-1, None)

    def end(self) -> None:
        self.active, self.received, self.passed = False, None, (-1, None)  # nor keep the placeholder's graph alive

    def note_failure(self, error: BaseException) -> None:
        """Add to ``error``, raised by the step hook, that this stage was standing in for earlier stages' blocks
        when it was raised, where that is so: a block returning more than its hidden state makes the hook fail
        there, in the user's code, before any block of this stage runs to say why."""
        if self.active and self.passed[0] >= 0 and self.next_index <= self.first and \
                not isinstance(error, PipelineError) and hasattr(error, "add_note"):
            error.add_note(
                f"(lightning_pipe) pipeline stage {self.stage} raised this after block {self.passed[0]} of "
                f"`{self.path}`, a block of an earlier stage that it stands in for by returning the hidden state it "
                "is given (its first argument). If the blocks return more than that ((hidden, aux), a tuple the "
                "loop unpacks or indexes), they cannot be cut into stages as they are: return the hidden state "
                "alone, carrying any extra value inside it (a tuple that each block takes and returns)")

    def describe_blocks(self) -> str:
        return ", ".join(f"stage {s}: blocks {a}..{b - 1}" for s, (a, b) in self.ranges.items())

    def visit(self, index: int) -> None:
        if not self.active and torch._C._current_graph_task_id() != -1:
            raise PipelineError(
                f"block {index} of `{self.path}` ran again during backward: activation checkpointing of whole "
                "blocks of the pipelined chain is not supported; checkpoint the layers inside a block instead"
            )
        if not self.active:
            raise PipelineError(
                f"block {index} of `{self.path}` was called outside a pipelined step. After the split, this rank "
                f"holds only {self.describe_blocks()}, so the model can run only inside "
                "training_step/validation_step/test_step/predict_step driven by the PipelineStrategy"
            )
        if index == 0 and self.next_index == self.num_blocks:
            raise PipelineError(
                f"block 0 of `{self.path}` was called again after the whole chain had run in this step: the "
                "model ran twice in one step (two views, generation in validation_step). Under a pipeline each "
                "block runs once per step, as stages hold a micro-batch's activations in flight: run the model "
                "once per step (e.g. on the views concatenated along the batch), or evaluate such steps without "
                "the pipeline"
            )
        if index != self.next_index:
            raise PipelineError(
                f"the blocks of `{self.path}` must each be called once per step, in order (block {self.next_index} "
                f"was expected, block {index} was called). Pipeline stages cut the chain by position; point "
                "`PipelineStrategy(blocks=...)` at a chain that is walked in order"
            )
        self.next_index = index + 1

    def check_finished(self) -> None:
        """On the last stage, after the step hook returned: the whole chain must have run."""
        if self.next_index != self.num_blocks:
            raise PipelineError(
                f"the step hook returned after block {self.next_index - 1} of `{self.path}` "
                f"({self.num_blocks} blocks); every block must run once per step under a pipeline"
            )

    def iterate(self) -> Iterator[nn.Module | "_Skipped"]:
        for i in range(self.num_blocks):
            yield self.block(i)

    def block(self, index: int) -> nn.Module | "_Skipped":
        """Block ``index`` if it belongs to the stage being computed (outside a step: to any stage held here), else
        its stand-in."""
        block = self.blocks.get(index)
        if block is None or (self.active and not self.first <= index < self.stop):
            return _Skipped(self, index)
        return block


class _Skipped:
    """Stands in for a block of an earlier stage (held elsewhere, or here for another stage): passes its first
    argument through."""

    def __init__(self, runtime: ChainRuntime, index: int) -> None:
        self.runtime, self.index = runtime, index

    def __getattr__(self, name: str) -> Any:
        # Only for names a stand-in lacks (its block's attributes): say why, instead of naming this class.
        runtime, index = self.__dict__["runtime"], self.__dict__["index"]
        raise AttributeError(
            f"block {index} of `{runtime.path}` is not here: this pipeline rank holds {runtime.describe_blocks()}, "
            f"and the others are on other ranks (or, during a step, belong to a stage not running now), so "
            f"`.{name}` cannot be read from it. To pick parameters per block (optimizer groups), select them by name "
            f"from self.named_parameters(), which lists this rank's own: e.g. "
            f"[p for n, p in self.named_parameters() if n.startswith('{runtime.path}.{index}.')]"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        runtime = self.runtime
        runtime.visit(self.index)
        if self.index >= runtime.stop:  # pragma: no cover - the stage exits before reaching these
            raise PipelineError(f"block {self.index} of `{runtime.path}` belongs to a later stage")
        hidden = _guarded(args[0] if args else _hidden_kwarg(runtime, self.index, kwargs)[1], runtime, self.index)
        runtime.passed = (self.index, hidden)
        return hidden


class _CutChainMixin:
    """Iteration, length and indexing over the whole chain, for a container that holds only some blocks."""

    _pipeline_runtime: ChainRuntime

    def __iter__(self) -> Iterator[Any]:
        return self._pipeline_runtime.iterate()

    def __len__(self) -> int:
        return self._pipeline_runtime.num_blocks

    def __getitem__(self, index: int) -> Any:
        if not isinstance(index, int):
            raise PipelineError(f"`{self._pipeline_runtime.path}` is cut into pipeline stages; index it with an int")
        runtime = self._pipeline_runtime
        index = index + runtime.num_blocks if index < 0 else index
        return runtime.block(index)


def _chain_sizes(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) > 0:
            found.append((name, module, sum(p.numel() for p in module.parameters())))
    return found


def find_chain(model: nn.Module, path: str | None) -> tuple[str, nn.Sequential | nn.ModuleList]:
    """The chain at ``path``, or (``None``) the ``nn.Sequential``/``nn.ModuleList`` holding the most parameters."""
    if path is not None:
        try:
            chain = model.get_submodule(path)
        except AttributeError:
            raise PipelineError(f"blocks={path!r} names no submodule of {type(model).__name__}") from None
        if not isinstance(chain, (nn.Sequential, nn.ModuleList)):
            raise PipelineError(f"blocks={path!r} is a {type(chain).__name__}; it must name an nn.Sequential or "
                                "nn.ModuleList whose blocks are called in order")
        return path, chain
    candidates = _chain_sizes(model)
    if not candidates:
        raise PipelineError(
            f"no chain of blocks found in {type(model).__name__}: the pipeline splits an nn.Sequential or an "
            "nn.ModuleList walked in a for loop. Put the model's body in one, or name it with "
            "PipelineStrategy(blocks='attribute.path')"
        )
    name, chain, _ = max(candidates, key=lambda c: c[2])  # max keeps the first of equals: deterministic
    return name, chain


def is_cut(module: nn.Module) -> bool:
    """Whether ``module`` is a chain that :func:`split_chain` already cut."""
    return isinstance(module, _CutChainMixin)


def split_chain(model: nn.Module, path: str, chain: nn.Module, *, counts: list[int],
                stages: int | Sequence[int]) -> ChainRuntime:
    """Cut ``chain`` in place so that it keeps only the blocks of ``stages`` (``counts[s]`` blocks per stage)."""
    if isinstance(chain, _CutChainMixin):
        raise PipelineError(f"`{path}` is already cut into pipeline stages")
    held = [stages] if isinstance(stages, int) else sorted(stages)
    starts = [sum(counts[:s]) for s in range(len(counts) + 1)]
    ranges = {s: (starts[s], starts[s + 1]) for s in held}
    runtime = ChainRuntime(path=path or type(chain).__name__, num_blocks=len(chain), ranges=ranges,
                           last_stage=len(counts) - 1)
    for i, (key, block) in enumerate(list(chain._modules.items())):
        try:  # a block given the hidden state by keyword gets it under its first parameter's name
            runtime.hidden_names[i] = next(iter(inspect.signature(block.forward).parameters))  # type: ignore[union-attr]
        except (StopIteration, TypeError, ValueError):
            pass
        if any(a <= i < b for a, b in ranges.values()):
            assert block is not None
            runtime.blocks[i] = block
            block.register_forward_pre_hook(_make_pre_hook(runtime, i), with_kwargs=True)
            block.register_forward_hook(_make_exit_hook(runtime, i), with_kwargs=True)
        else:
            del chain._modules[key]
    cls = type(chain)
    chain.__class__ = type(f"Pipelined{cls.__name__}", (_CutChainMixin, cls), {})
    chain._pipeline_runtime = runtime  # type: ignore[attr-defined]
    return runtime


def _make_pre_hook(runtime: ChainRuntime, index: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        runtime.visit(index)
        if index == runtime.first and runtime.stage > 0:
            # The hidden state computed before the chain on this rank is a placeholder: the real one was received.
            key, value = (None, args[0]) if args else _hidden_kwarg(runtime, index, kwargs)
            _check_unchanged(runtime, index, value)
            if key is None:
                args = (runtime.received,) + tuple(args[1:])
            else:
                kwargs = {**kwargs, key: runtime.received}
        return args, kwargs

    return hook


def _guarded(value: Any, runtime: ChainRuntime, index: int) -> Any:
    """``value`` (a stand-in's output: the placeholder computed on this rank) with each tensor that needs a gradient
    replaced by an alias that raises if a gradient reaches it. Passed on along the chain it is replaced by the
    received hidden state and gets none; kept aside and used later (a skip connection across stages, a list of the
    layers' outputs), it would silently stand for the real block output, which lives on another stage."""
    tensors, spec = flatten(value)
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return value

    def refuse(grad: torch.Tensor) -> None:
        raise PipelineError(
            f"the output of block {index} of `{runtime.path}`, computed on an earlier pipeline stage, is used on "
            f"stage {runtime.stage} outside the hidden state (kept aside and used after a later block: a skip "
            "connection across stages, a list of the blocks' outputs). Only the hidden state crosses stages: carry "
            "such values inside it (a tuple that each block takes and returns)")

    aliases = []
    for t in tensors:
        if t.requires_grad:
            t = t.view_as(t)
            t.register_hook(refuse)
        aliases.append(t)
    return unflatten(aliases, spec)


def _hidden_kwarg(runtime: ChainRuntime, index: int, kwargs: dict[str, Any]) -> tuple[str, Any]:
    """The keyword argument that holds the hidden state: the block's first parameter, else the first one given."""
    name = runtime.hidden_names.get(index)
    key = name if name in kwargs else next(iter(kwargs))
    return key, kwargs[key]


def _check_unchanged(runtime: ChainRuntime, index: int, value: Any) -> None:
    """At a stage's first block, the hidden state must be what the stand-in before it passed on: code between two
    blocks at a stage boundary (a norm after each block, a scaling) would change it there, and be skipped, since
    the previous stage sends its last block's output as it is."""
    before, passed = runtime.passed
    if before != index - 1:
        return
    mine, theirs = flatten(value)[0], flatten(passed)[0]
    if len(mine) != len(theirs) or any(a is not b for a, b in zip(mine, theirs)):
        raise PipelineError(
            f"the code between blocks {index - 1} and {index} of `{runtime.path}` changes the hidden state, and "
            f"pipeline stage {runtime.stage} starts at block {index}: that code would be skipped (a stage sends its "
            "last block's output as it is). Move it into the blocks (e.g. make each block apply its norm), or cut "
            "elsewhere with balance=[...]. (Calling whole blocks through torch.utils.checkpoint also gives a new "
            "value there: checkpoint the layers inside a block instead. A loop that takes part of what each block "
            "returns, as in `x = block(x)[0]`, does too: make the blocks return the hidden state alone.)")


def _shape_of(value: Any) -> tuple[bool, int]:
    """Whether ``value`` is a tensor, and how many tensors it holds: what a block must keep of its hidden state.
    (Containers may change class, a tuple for a list, and non-tensor leaves their values: a layer counter.)"""
    return isinstance(value, torch.Tensor), len(flatten(value)[0])


def _check_returns_hidden(runtime: ChainRuntime, index: int, args: tuple[Any, ...], kwargs: dict[str, Any],
                          output: Any) -> None:
    """A block must return a value of the form of the hidden state it takes: on a later stage its stand-in returns
    the hidden state it is given, and the stage's last block's output is the next stage's first block's input."""
    if not args and not kwargs:
        return
    taken = args[0] if args else _hidden_kwarg(runtime, index, kwargs)[1]
    if _shape_of(taken) != _shape_of(output):
        raise PipelineError(
            f"block {index} of `{runtime.path}` takes a hidden state of one structure ({_describe(taken)}) and "
            f"returns another ({_describe(output)}): pipeline stages need each block to return what it takes (a "
            "stage's last block's output is the next stage's first block's input, and a later stage stands in for "
            "the blocks before it by passing the hidden state on). Return the hidden state alone, carrying any "
            "extra value inside it (a tuple that each block takes and returns), or log it from inside the block")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "a tensor"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _make_exit_hook(runtime: ChainRuntime, index: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        # Once per block (the form does not change from step to step); one stage has no boundary to cross.
        if index not in runtime.checked and runtime.last_stage > 0:
            _check_returns_hidden(runtime, index, args, kwargs, output)
            runtime.checked.add(index)
        if index == runtime.stop - 1 and not runtime.is_last_stage:
            raise StageExit(output)  # the stage's last block: its output goes to the next stage

    return hook
