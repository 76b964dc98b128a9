"""Flattening of the values that cross stages: a tensor, or nested tuples/lists/dicts of tensors and other leaves.

The structure and the non-tensor leaves travel as metadata; the tensors travel as one payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TreeSpec", "flatten", "unflatten"]


@dataclass(frozen=True)
class TreeSpec:
    """The shape of a nested value, with tensors replaced by their position in the flat list.

    ``kind`` is ``"tensor"``, ``"leaf"`` (a non-tensor value kept in ``value``), ``"tuple"``, ``"namedtuple"``
    (``value`` holds the class), ``"list"`` or ``"dict"`` (``value`` holds the keys).
    """

    kind: str
    value: Any = None
    children: tuple["TreeSpec", ...] = ()


_TENSOR = TreeSpec("tensor")


def flatten(value: Any) -> tuple[list[torch.Tensor], TreeSpec]:
    """The tensors of ``value`` in a fixed order, and the spec that puts them back."""
    tensors: list[torch.Tensor] = []

    def walk(node: Any) -> TreeSpec:
        if isinstance(node, torch.Tensor):
            tensors.append(node)
            return _TENSOR
        if isinstance(node, dict):
            keys = tuple(node.keys())
            return TreeSpec("dict", keys, tuple(walk(node[k]) for k in keys))
        if isinstance(node, tuple):
            # A named tuple keeps its type so that the receiver gets the same class back.
            kind, cls = ("namedtuple", type(node)) if hasattr(node, "_fields") else ("tuple", None)
            return TreeSpec(kind, cls, tuple(walk(v) for v in node))
        if isinstance(node, list):
            return TreeSpec("list", None, tuple(walk(v) for v in node))
        return TreeSpec("leaf", node)

    spec = walk(value)
    return tensors, spec


def unflatten(tensors: list[torch.Tensor] | tuple[torch.Tensor | None, ...], spec: TreeSpec) -> Any:
    """Inverse of :func:`flatten`: rebuild the nested value from ``tensors`` in flat order."""
    it = iter(tensors)

    def build(node: TreeSpec) -> Any:
        if node.kind == "tensor":
            return next(it)
        if node.kind == "leaf":
            return node.value
        children = [build(c) for c in node.children]
        if node.kind == "dict":
            return dict(zip(node.value, children))
        if node.kind == "tuple":
            return tuple(children)
        if node.kind == "namedtuple":
            return node.value(*children)
        return children

    return build(spec)
