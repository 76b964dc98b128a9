"""Flattening of the values that cross stages: a tensor, or nested tuples/lists/dicts/dataclasses of tensors and
other leaves.

The structure and the non-tensor leaves travel as metadata; the tensors travel as one payload. Containers come back
with their own class: named tuples, dataclasses (rebuilt from their fields) and mappings (an ``OrderedDict``, a
``UserDict``, a ``ModelOutput``-like dict whose keys are also attributes; a ``defaultdict`` keeps its
``default_factory``, which must then pickle to cross processes).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TreeSpec", "flatten", "unflatten", "make_dict"]


@dataclass(frozen=True)
class TreeSpec:
    """The shape of a nested value, with tensors replaced by their position in the flat list.

    ``kind`` is ``"tensor"``, ``"leaf"`` (a non-tensor value kept in ``value``), ``"tuple"``, ``"namedtuple"``
    (``value`` holds the class), ``"list"``, ``"dict"`` (``value`` holds the keys), ``"dictsub"`` (``value``:
    the class, the keys and, for a ``defaultdict``, its factory) or ``"dataclass"`` (``value``: the class and
    the field names, those set by ``__init__`` first).
    """

    kind: str
    value: Any = None
    children: tuple["TreeSpec", ...] = ()


_TENSOR = TreeSpec("tensor")


def make_dict(cls: type, items: list[tuple[Any, Any]], factory: Any = None) -> Mapping[Any, Any]:
    """A mapping of class ``cls`` (a ``dict`` subclass, or a ``UserDict`` such as a tokenizer's ``BatchEncoding``)
    holding ``items``; a ``defaultdict`` gets ``factory``."""
    if cls is dict:
        return dict(items)
    if issubclass(cls, collections.defaultdict):
        return cls(factory, items)
    if issubclass(cls, collections.UserDict):
        return cls(dict(items))
    try:
        return cls(items)
    except TypeError:  # a constructor taking keywords only (EasyDict-style)
        if all(isinstance(k, str) for k, _ in items):
            return cls(**dict(items))
        raise


def flatten(value: Any) -> tuple[list[torch.Tensor], TreeSpec]:
    """The tensors of ``value`` in a fixed order, and the spec that puts them back."""
    tensors: list[torch.Tensor] = []

    def walk(node: Any) -> TreeSpec:
        if isinstance(node, torch.Tensor):
            tensors.append(node)
            return _TENSOR
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            # Before dicts: a ModelOutput-like class may be both. Fields not set by __init__ are set afterwards.
            fields = dataclasses.fields(node)
            names = tuple(f.name for f in fields if f.init) + tuple(f.name for f in fields if not f.init)
            inits = sum(1 for f in fields if f.init)
            return TreeSpec("dataclass", (type(node), names, inits), tuple(walk(getattr(node, n)) for n in names))
        if isinstance(node, Mapping):  # dicts, and UserDicts such as a tokenizer's BatchEncoding
            keys = tuple(node.keys())
            children = tuple(walk(node[k]) for k in keys)
            if type(node) is dict:
                return TreeSpec("dict", keys, children)
            factory = node.default_factory if isinstance(node, collections.defaultdict) else None
            return TreeSpec("dictsub", (type(node), keys, factory), children)
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
        if node.kind == "dictsub":
            cls, keys, factory = node.value
            return make_dict(cls, list(zip(keys, children)), factory)
        if node.kind == "dataclass":
            cls, names, inits = node.value
            obj = cls(**dict(zip(names[:inits], children[:inits])))
            for name, child in zip(names[inits:], children[inits:]):
                object.__setattr__(obj, name, child)  # works for frozen dataclasses too
            return obj
        if node.kind == "tuple":
            return tuple(children)
        if node.kind == "namedtuple":
            return node.value(*children)
        return children

    return build(spec)
