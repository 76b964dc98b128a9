"""Flatten/unflatten of the nested values that cross pipeline stages (``lightning_pipe.engine.tree``)."""

from __future__ import annotations

import collections
import dataclasses
import pickle
from collections import namedtuple
from typing import Any, NamedTuple, Optional

import pytest
import torch

from tests._helpers import Encoding, assert_same

from lightning_pipe.engine.tree import TreeSpec, flatten, unflatten

Pair = namedtuple("Pair", ["first", "second"])


class Output(NamedTuple):
    logits: torch.Tensor
    aux: Optional[torch.Tensor]
    step: int = 0


def round_trip(value: Any) -> Any:
    tensors, spec = flatten(value)
    return unflatten(tensors, spec)


# -- round trips -------------------------------------------------------------------------------------------------


def test_single_tensor_round_trip_is_the_same_object():
    t = torch.randn(3, 4)
    tensors, spec = flatten(t)
    assert len(tensors) == 1 and tensors[0] is t
    assert spec.kind == "tensor"
    assert unflatten(tensors, spec) is t


def test_tuple_round_trip():
    value = (torch.randn(2), torch.arange(3))
    out = round_trip(value)
    assert_same(out, value)
    assert type(out) is tuple
    assert out[0] is value[0] and out[1] is value[1]


@pytest.mark.parametrize(
    "value",
    [
        Pair(torch.randn(2, 2), torch.ones(1)),
        Output(torch.randn(4, 5), None, 7),
        Output(torch.randn(4, 5), torch.zeros(4)),
    ],
    ids=["namedtuple", "typing-NamedTuple-None-field", "typing-NamedTuple-defaults"],
)
def test_namedtuple_round_trip_keeps_type(value):
    out = round_trip(value)
    assert type(out) is type(value)
    assert out._fields == value._fields
    assert_same(out, value)


def test_namedtuple_spec_records_the_class():
    _, spec = flatten(Pair(torch.ones(1), 3))
    assert spec.kind == "namedtuple" and spec.value is Pair


def test_list_round_trip():
    value = [torch.randn(2), torch.randn(3, 1), torch.tensor(1.5)]
    out = round_trip(value)
    assert type(out) is list
    assert_same(out, value)


def test_dict_round_trip_keeps_key_order():
    value = {"zeta": torch.ones(2), "alpha": torch.zeros(1), 3: torch.arange(4), "mid": "text"}
    out = round_trip(value)
    assert type(out) is dict
    assert list(out.keys()) == ["zeta", "alpha", 3, "mid"]
    assert_same(out, value)


def test_user_dict_round_trip_keeps_class_and_keys():
    value = Encoding({"input_ids": torch.arange(4), "offsets": [1, 2], "mask": torch.ones(4)})
    tensors, spec = flatten(value)
    assert len(tensors) == 2
    out = unflatten(tensors, spec)
    assert type(out) is Encoding and out.input_ids is value["input_ids"]
    assert_same(out, value)


def test_nested_mix_with_non_tensor_leaves():
    value = {
        "hidden": torch.randn(2, 3),
        "meta": (1, "name", None, 2.5, True),
        "stack": [Pair(torch.ones(1), "x"), {"inner": [torch.zeros(2), None, 4]}, ()],
        "empty_list": [],
        "empty_dict": {},
        "scalar": torch.tensor(3.0),
    }
    tensors, spec = flatten(value)
    assert len(tensors) == 4  # hidden, Pair.first, inner[0], scalar
    out = unflatten(tensors, spec)
    assert_same(out, value)
    assert type(out["stack"][0]) is Pair


@pytest.mark.parametrize("leaf", [0, 17, "abc", None, 2.5, True, b"bytes", torch.float16])
def test_non_tensor_leaf_alone(leaf):
    tensors, spec = flatten(leaf)
    assert tensors == []
    assert spec.kind == "leaf"
    assert unflatten([], spec) == leaf


def test_list_of_optional_tensors_round_trips():
    a, c = torch.randn(2), torch.randn(3)
    value = [a, None, c, None]
    tensors, spec = flatten(value)
    assert len(tensors) == 2 and tensors[0] is a and tensors[1] is c
    out = unflatten(tensors, spec)
    assert out[1] is None and out[3] is None
    assert out[0] is a and out[2] is c


def test_unflatten_accepts_none_in_tensor_slots():
    """The executor passes gradients (some ``None``) through the spec of the values they belong to."""
    value = (torch.randn(2), {"b": torch.randn(3)}, "leaf")
    _, spec = flatten(value)
    g = torch.ones(2)
    out = unflatten((g, None), spec)
    assert type(out) is tuple and len(out) == 3
    assert out[0] is g and out[1]["b"] is None and out[2] == "leaf"


# -- flat order ----------------------------------------------------------------------------------------------------


def test_flat_order_is_depth_first_in_container_order():
    t = [torch.full((1,), float(i)) for i in range(6)]
    value = {"b": (t[0], [t[1], t[2]]), "a": {"y": t[3], "x": t[4]}, "c": Pair(t[5], 1)}
    tensors, _ = flatten(value)
    # dict insertion order (not sorted), then left to right in sequences.
    assert [x.item() for x in tensors] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(x is y for x, y in zip(tensors, t))


def test_flat_order_and_spec_are_deterministic():
    value = {"k": [torch.randn(2), (torch.randn(1), 4)], "j": Pair(torch.randn(3), None)}
    t1, s1 = flatten(value)
    t2, s2 = flatten(value)
    assert s1 == s2
    assert len(t1) == len(t2) and all(a is b for a, b in zip(t1, t2))
    # An equal-shaped value with other tensors gives the same spec.
    other = {"k": [torch.randn(2), (torch.randn(1), 4)], "j": Pair(torch.randn(3), None)}
    assert flatten(other)[1] == s1


def test_specs_differ_when_structure_differs():
    assert flatten((torch.ones(1),))[1] != flatten([torch.ones(1)])[1]
    assert flatten({"a": torch.ones(1)})[1] != flatten({"b": torch.ones(1)})[1]
    assert flatten((torch.ones(1), 1))[1] != flatten((torch.ones(1), 2))[1]
    assert flatten(Pair(torch.ones(1), 1))[1] != flatten((torch.ones(1), 1))[1]


# -- unflatten with other tensors -------------------------------------------------------------------------------


def test_unflatten_with_replaced_tensors_puts_them_in_place():
    value = {"a": torch.zeros(2), "b": [torch.zeros(3), "s", (torch.zeros(1), 5)], "c": Pair(None, torch.zeros(4))}
    tensors, spec = flatten(value)
    new = [torch.full_like(t, float(i + 1)) for i, t in enumerate(tensors)]
    out = unflatten(new, spec)
    assert out["a"] is new[0]
    assert out["b"][0] is new[1]
    assert out["b"][1] == "s"
    assert out["b"][2][0] is new[2] and out["b"][2][1] == 5
    assert type(out["c"]) is Pair and out["c"].first is None and out["c"].second is new[3]


def test_unflatten_with_detached_leaves_like_the_executor():
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    value = (y, {"idx": torch.arange(3)})
    tensors, spec = flatten(value)
    leaves = [t.detach().requires_grad_(t.requires_grad and t.is_floating_point()) for t in tensors]
    out = unflatten(leaves, spec)
    assert out[0].is_leaf and out[0].requires_grad
    assert not out[1]["idx"].requires_grad
    assert torch.equal(out[0], y.detach())


def test_unflatten_accepts_a_tuple_of_tensors():
    value = [torch.ones(1), torch.zeros(1)]
    tensors, spec = flatten(value)
    out = unflatten(tuple(tensors), spec)
    assert out[0] is tensors[0] and out[1] is tensors[1]


# -- the spec travels pickled in the transport header ------------------------------------------------------------


def test_spec_survives_pickle():
    value = {"out": Output(torch.randn(2), None, 3), "names": ["a", "b"], "t": (torch.ones(1), 1.5)}
    tensors, spec = flatten(value)
    spec2 = pickle.loads(pickle.dumps(spec))
    assert isinstance(spec2, TreeSpec)
    assert spec2 == spec
    out = unflatten(tensors, spec2)
    assert_same(out, value)
    assert type(out["out"]) is Output


def test_spec_is_immutable():
    _, spec = flatten((torch.ones(1),))
    with pytest.raises(Exception):
        spec.kind = "list"  # type: ignore[misc]


# -- dataclasses and dict subclasses keep their class ---------------------------------------------------------------


@dataclasses.dataclass
class Hidden:
    h: torch.Tensor
    label: str = "x"
    hops: int = dataclasses.field(init=False, default=0)


@dataclasses.dataclass(frozen=True)
class Frozen:
    h: torch.Tensor
    extra: Any = None


class AttrDict(collections.OrderedDict):
    """Shaped like transformers' ModelOutput: a dict whose keys are also attributes."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err


def test_dataclass_round_trip_keeps_class_tensors_and_fields_not_set_by_init() -> None:
    value = Hidden(torch.randn(2, 3), "y")
    value.hops = 4
    tensors, spec = flatten(value)
    assert tensors == [value.h] and spec.kind == "dataclass"  # the tensor travels as a tensor, not in the metadata
    out = unflatten(tensors, spec)
    assert type(out) is Hidden and out.h is value.h and out.label == "y" and out.hops == 4


def test_frozen_dataclass_nested_in_a_tuple_round_trips() -> None:
    value = (Frozen(torch.ones(2), extra=[torch.zeros(1), 3]), torch.arange(2))
    out = round_trip(value)
    assert type(out[0]) is Frozen and out[0].extra[1] == 3
    assert_same(out, value)


def test_dict_subclasses_keep_their_class_and_a_defaultdict_its_factory() -> None:
    out = round_trip(AttrDict(last_hidden_state=torch.ones(2, 3)))
    assert type(out) is AttrDict and out.last_hidden_state.shape == (2, 3)
    dd = round_trip(collections.defaultdict(list, x=torch.ones(1)))
    assert type(dd) is collections.defaultdict and dd.default_factory is list and dd["missing"] == []
    spec = flatten(AttrDict(a=torch.ones(1)))[1]
    assert pickle.loads(pickle.dumps(spec)) == spec  # travels in a message's metadata


class KeywordDict(dict):
    """EasyDict-style: keywords only, keys as attributes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.__dict__ = self


def test_dict_subclass_with_a_keyword_only_constructor_round_trips() -> None:
    out = round_trip(KeywordDict(h=torch.ones(2)))
    assert type(out) is KeywordDict and out.h.shape == (2,)
