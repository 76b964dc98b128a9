"""Splitting a batch into micro-batches and merging per-micro-batch outputs back.

Plain torch (no Lightning), so the engine can drive any training loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Sequence

import torch

from lightning_pipe.engine.tree import make_dict
from lightning_pipe.errors import PipelineError

__all__ = ["batch_size_of", "split_microbatches", "microbatch_weights", "merge_microbatches"]


def batch_size_of(batch: Any) -> int:
    """The size of dimension 0 of the tensor (with at least one dimension) in ``batch`` that the fewest lists
    enclose, the first such one in order: the batch's own tensors before the entries of a per-sample list (in
    ``{"ids": [one tensor per sample], "labels": labels}`` the batch size is ``len(labels)``, not the first
    sample's length); ``-1`` if there is none."""
    best: tuple[int, int] | None = None  # (enclosing lists, size)

    def visit(node: Any, lists: int) -> None:
        nonlocal best
        if best is not None and best[0] <= lists:
            return  # found one enclosed by as few lists already
        if isinstance(node, torch.Tensor):
            if node.dim() > 0:
                best = (lists, node.shape[0])
            return
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            children: Sequence[Any] = [getattr(node, f.name) for f in dataclasses.fields(node) if hasattr(node, f.name)]
        elif isinstance(node, Mapping):  # dicts, and UserDicts such as a tokenizer's BatchEncoding
            children = list(node.values())
        elif isinstance(node, (list, tuple)):
            children = node
            lists += isinstance(node, list)
        else:
            return
        for child in children:
            visit(child, lists)

    visit(batch, 0)
    return best[1] if best is not None else -1


def _split(node: Any, batch_size: int, bounds: list[tuple[int, int]]) -> list[Any]:
    n = len(bounds)
    if isinstance(node, torch.Tensor):
        if node.dim() > 0 and node.shape[0] == batch_size:
            return [node[a:b] for a, b in bounds]
        return [node] * n  # not per-sample (a shared table, a scalar): every micro-batch gets it whole
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        parts = {name: _split(getattr(node, name), batch_size, bounds) for name in _field_names(node)}
        return [_rebuild(node, {name: value[i] for name, value in parts.items()}) for i in range(n)]
    if isinstance(node, Mapping):
        parts_d = {k: _split(v, batch_size, bounds) for k, v in node.items()}
        return [_like(node, ((k, parts_d[k][i]) for k in node)) for i in range(n)]
    if isinstance(node, (list, tuple)):
        # A per-sample list has one entry per sample; a container ([x, y] from default_collate) holds at least
        # one batch-sized entry. (A list of ragged tensors one of which is batch-size long stays ambiguous.)
        per_sample = len(node) == batch_size and not any(batch_size_of(v) == batch_size for v in node)
        if isinstance(node, list) and per_sample:
            return [node[a:b] for a, b in bounds]  # one entry per sample (strings, ids, ragged tensors)
        parts_l = [_split(v, batch_size, bounds) for v in node]
        rebuilt = [[p[i] for p in parts_l] for i in range(n)]
        if isinstance(node, tuple):
            return [type(node)(*r) if hasattr(node, "_fields") else tuple(r) for r in rebuilt]
        return rebuilt
    return [node] * n


def _field_names(node: Any) -> list[str]:
    """The fields of a dataclass instance that hold a value (a field made with ``init=False`` may have none)."""
    return [f.name for f in dataclasses.fields(node) if hasattr(node, f.name)]


def _rebuild(node: Any, values: dict[str, Any]) -> Any:
    """A copy of dataclass ``node`` holding ``values``: made with its ``__init__`` fields; a field outside
    ``__init__`` that ``__post_init__`` computed keeps the new value, one set after construction (a mask: left
    unset, or at its default) gets its part of the old one, which ``dataclasses.replace`` alone would lose."""
    fields = [f for f in dataclasses.fields(node) if f.name in values]
    new = dataclasses.replace(node, **{f.name: values[f.name] for f in fields if f.init})
    for f in fields:
        if not f.init and (not hasattr(new, f.name) or (f.default is not dataclasses.MISSING
                                                        and getattr(new, f.name) is f.default)):
            object.__setattr__(new, f.name, values[f.name])  # also for a frozen dataclass
    return new


def _like(node: Mapping[Any, Any], items: Iterable[tuple[Any, Any]]) -> Mapping[Any, Any]:
    """A mapping of ``node``'s class (a ``defaultdict`` with its factory) holding ``items``."""
    return make_dict(type(node), list(items), getattr(node, "default_factory", None))


def split_microbatches(batch: Any, num_microbatches: int) -> list[Any]:
    """Split ``batch`` into ``min(num_microbatches, batch size)`` micro-batches along dimension 0.

    Tensors whose first dimension is the batch size are sliced (the first ``size % n`` chunks get one sample more,
    as :func:`torch.tensor_split` does); other tensors and non-tensor leaves are given whole to every micro-batch;
    a list as long as the batch none of whose entries holds a batch-sized tensor is taken as per-sample and sliced.
    Tuples, named tuples, lists, mappings (dicts, UserDicts) and dataclasses are rebuilt with the same type.
    """
    if num_microbatches < 1:
        raise PipelineError(f"num_microbatches must be at least 1, got {num_microbatches}")
    size = batch_size_of(batch)
    if size < 1:
        raise PipelineError(
            "cannot split this batch into micro-batches: it holds no tensor with a batch dimension "
            f"(got {type(batch).__name__})"
        )
    n = min(num_microbatches, size)
    base, extra = divmod(size, n)
    bounds, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return _split(batch, size, bounds)


def microbatch_weights(microbatches: Sequence[Any], weigh: Callable[[Any], Any] | None = None, *,
                       sizes: Sequence[int] | None = None) -> list[float]:
    """Each micro-batch's share of the batch, so that ``sum(w_i * mean_loss_i)`` is the full batch's mean loss:
    by samples (``sizes``, if already counted), or by ``weigh(micro_batch)`` (what the loss is a mean over, e.g.
    the target tokens left after ``ignore_index``: then the weighted sum is the mean over the whole batch's tokens,
    as on one device)."""
    if weigh is None:
        counts = [float(n) for n in sizes] if sizes is not None else \
            [float(batch_size_of(mb)) for mb in microbatches]
    else:
        counts = [float(weigh(mb)) for mb in microbatches]
        if not all(math.isfinite(c) and c >= 0 for c in counts) or sum(counts) <= 0:
            raise PipelineError(f"microbatch_weight gave {counts} for the micro-batches of a batch: each must be a "
                                "finite number >= 0 (what its loss is a mean over), and their sum positive")
    total = sum(counts)
    return [c / total for c in counts]


def _per_sample(outputs: Sequence[list[Any]], sizes: Sequence[int]) -> bool:
    """Whether per-micro-batch lists hold one entry per sample (joined), knowing each micro-batch's sample count:
    as long as it everywhere, and not a container of tensors that are all that long (``[x, y]``)."""
    if any(len(o) != n for o, n in zip(outputs, sizes)):
        return False
    return not all(all(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n for v in o)
                   for o, n in zip(outputs, sizes))


def merge_microbatches(outputs: Sequence[Any], sizes: Sequence[int] | None = None) -> Any:
    """Concatenate per-micro-batch outputs along dimension 0, recursing into tuples, lists, dicts and dataclasses.

    Tensors with a batch dimension are concatenated; scalar tensors are stacked; lists are joined when they are
    per-sample lists (ragged sequences, strings), else merged entry by entry; other leaves are returned as a list
    with one entry per micro-batch. Mappings keep their class. ``sizes``, each micro-batch's sample count, tells
    per-sample lists apart exactly (one entry per sample, not all batch-long tensors); without it a list is taken
    as per-sample when it holds no tensor or the lengths differ between micro-batches.
    """
    first = outputs[0]
    if len(outputs) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(list(outputs)) if first.dim() > 0 else torch.stack(list(outputs))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return _rebuild(first, {n: merge_microbatches([getattr(o, n) for o in outputs], sizes)
                                for n in _field_names(first)})
    if isinstance(first, Mapping):
        return _like(first, ((k, merge_microbatches([o[k] for o in outputs], sizes)) for k in first))
    if isinstance(first, tuple):
        merged = [merge_microbatches([o[i] for o in outputs], sizes) for i in range(len(first))]
        return type(first)(*merged) if hasattr(first, "_fields") else tuple(merged)
    if isinstance(first, list):
        lists = all(isinstance(o, list) for o in outputs)
        if lists and sizes is not None and len(sizes) == len(outputs):
            per_sample = _per_sample(outputs, sizes)
        else:
            per_sample = lists and (len({len(o) for o in outputs}) > 1
                                    or not any(batch_size_of(v) >= 0 for v in first))
        if per_sample:
            return [v for o in outputs for v in o]  # per-sample lists: joined
        return [merge_microbatches([o[i] for o in outputs], sizes) for i in range(len(first))]
    return list(outputs)
