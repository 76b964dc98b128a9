"""The gloo protocol's message layouts, without processes: what is cached, and that the metadata stays exact."""

from __future__ import annotations

import pickle
import struct
from typing import Any, Hashable

import pytest
import torch

from lightning_pipe.engine.transport import _PREFIX, _Layout, _message_layout, _pack, _unpack


def _round_trip(value: Any, cache: dict[Hashable, _Layout], *, host: bool = True) -> Any:
    """Build the message as ``Transport.send`` does and read it back as ``PendingRecv.wait`` does (``host``: cut
    the tensors out through numpy, as from a CPU buffer)."""
    tensors, layout = _message_layout(value, cache)
    message = torch.empty(layout.base + layout.meta[2], dtype=torch.uint8)
    message[: layout.base] = layout.prefix
    _pack(message, tensors, layout.meta[1], layout.base)
    meta_len, length = struct.unpack_from("<qq", message.numpy())
    assert length == layout.meta[2]
    meta = pickle.loads(message.numpy()[_PREFIX : _PREFIX + meta_len].tobytes())
    return _unpack(message, meta, layout.base, message.numpy() if host else None)


def test_layouts_of_tensor_values_are_reused_for_equal_shapes() -> None:
    cache: dict[Hashable, _Layout] = {}
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert _message_layout(a, cache)[1] is _message_layout(b, cache)[1]
    assert torch.equal(_round_trip(b, cache), b)
    # Another shape, dtype or requires_grad is another layout, and reads back as such.
    for other in (torch.randn(5, 8), torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, requires_grad=True)):
        out = _round_trip(other, cache)
        assert out.shape == other.shape and out.dtype == other.dtype
        assert out.requires_grad == other.requires_grad and torch.equal(out.detach(), other.detach())
    assert len(cache) == 4


def test_one_tensor_lists_have_their_own_layouts() -> None:
    """A list of one tensor (an input gradient) takes a short path: it must read back as a list, apart from the
    bare tensor of the same shape and from longer lists."""
    cache: dict[Hashable, _Layout] = {}
    g = torch.randn(4, 8)
    out = _round_trip([g], cache)
    assert type(out) is list and len(out) == 1 and torch.equal(out[0], g)
    assert _message_layout([torch.randn(4, 8)], cache)[1] is _message_layout([g], cache)[1]
    assert torch.equal(_round_trip(g, cache), g)  # the bare tensor: another layout
    assert _message_layout(g, cache)[1] is not _message_layout([g], cache)[1]
    two = _round_trip([g, g + 1], cache)
    assert len(two) == 2 and torch.equal(two[1], g + 1)
    assert _round_trip([None], cache) == [None]  # no gradient: the general path
    grad = _round_trip([torch.randn(3, requires_grad=True)], cache)[0]
    assert grad.requires_grad and grad.shape == (3,)
    assert len(cache) == 4  # [4x8], 4x8, [4x8, 4x8], [3 requiring grad]


def test_nested_tensor_values_round_trip_through_the_cache() -> None:
    cache: dict[Hashable, _Layout] = {}
    for step in range(3):
        value = [torch.randn(2, 3 + step), {"m": torch.ones(2, dtype=torch.bool)}]
        out = _round_trip(value, cache)
        assert torch.equal(out[0], value[0]) and torch.equal(out[1]["m"], value[1]["m"])
    out = _round_trip([torch.randn(2, 3), {"m": torch.ones(2, dtype=torch.bool)}], cache)  # the first shapes again
    assert out[0].shape == (2, 3)
    assert len(cache) == 3


def test_values_with_other_leaves_are_not_cached() -> None:
    """``1 == 1.0 == True`` and they hash alike: a cached layout would hand the receiver the wrong leaf."""
    cache: dict[Hashable, _Layout] = {}
    x = torch.randn(2)
    outs = [_round_trip((x, leaf), cache)[1] for leaf in (1, True, 1.0, "1")]
    assert [type(o) for o in outs] == [int, bool, float, str]
    assert cache == {}


def test_dict_keys_that_hash_alike_are_not_confused_by_the_cache() -> None:
    cache: dict[Hashable, _Layout] = {}
    x = torch.randn(2)
    keys = [next(iter(_round_trip({key: x}, cache))) for key in (1, True, 1.0, "k")]
    assert [type(k) for k in keys] == [int, bool, float, str]
    assert len(cache) == 1  # only the dict with string keys


def test_complex_tensors_keep_requires_grad() -> None:
    z = torch.complex(torch.randn(3), torch.randn(3)).requires_grad_(True)
    out = _round_trip(z, {})
    assert out.requires_grad and out.dtype == torch.complex64 and torch.equal(out.detach(), z.detach())


@pytest.mark.parametrize("host", [True, False])
def test_every_dtype_and_shape_reads_back_with_or_without_numpy(host: bool) -> None:
    """numpy has no bfloat16: such tensors are cut out with torch instead."""
    cache: dict[Hashable, _Layout] = {}
    values = [torch.randn(3, 5).to(dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)]
    values += [torch.tensor(2.5), torch.zeros(0, 4), torch.arange(6, dtype=torch.int64).view(2, 3),
               torch.tensor([True, False]), torch.randn(4, 4).t()]  # the last one is not contiguous
    for value in values:
        out = _round_trip(value, cache, host=host)
        assert out.dtype == value.dtype and out.shape == value.shape and torch.equal(out, value)
    out = _round_trip(torch.randn(2, 3, requires_grad=True), cache, host=host)
    assert out.requires_grad and out.is_leaf


def test_destroy_process_group_without_a_group_is_a_no_op() -> None:
    import torch.distributed as dist

    from lightning_pipe.engine import destroy_process_group

    assert not dist.is_initialized()
    destroy_process_group()  # must not raise: scripts call it on every path
    assert not dist.is_initialized()
