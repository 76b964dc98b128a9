"""Splitting batches into micro-batches, their loss weights, and merging outputs back (``engine.microbatch``)."""

from __future__ import annotations

import collections

import dataclasses
from collections import namedtuple
from typing import Any

import pytest
import torch

from tests._helpers import Encoding, assert_same
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_pipe.engine.microbatch import (
    batch_size_of,
    merge_microbatches,
    microbatch_weights,
    split_microbatches,
)
from lightning_pipe.errors import PipelineError

Batch = namedtuple("Batch", ["inputs", "targets"])


@dataclasses.dataclass
class DataBatch:
    inputs: torch.Tensor
    targets: torch.Tensor
    name: str = "train"


@dataclasses.dataclass(frozen=True)
class FrozenBatch:
    x: torch.Tensor
    ids: list


@dataclasses.dataclass
class WithDerived:
    x: torch.Tensor
    n: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.n = self.x.shape[0]


def sizes(mbs: list[Any]) -> list[int]:
    return [batch_size_of(mb) for mb in mbs]


# -- batch_size_of -----------------------------------------------------------------------------------------------


def test_batch_size_of():
    x = torch.randn(5, 3)
    assert batch_size_of(x) == 5
    assert batch_size_of(torch.tensor(1.0)) == -1
    assert batch_size_of((torch.tensor(1.0), x)) == 5  # scalars are skipped
    assert batch_size_of({"names": ["a"] * 5, "x": x}) == 5
    assert batch_size_of(DataBatch(x, x[:, 0])) == 5
    assert batch_size_of(["a", "b"]) == -1
    assert batch_size_of("abc") == -1
    assert batch_size_of(None) == -1
    assert batch_size_of(DataBatch) == -1  # a dataclass type, not an instance


def test_batch_size_of_prefers_the_batch_tensors_to_a_per_sample_lists_entries():
    """The tensor that the fewest lists enclose decides, whatever the order of the keys."""
    ragged = [torch.ones(n) for n in (5, 7, 3, 6)]
    labels = torch.arange(4)
    assert batch_size_of({"input_ids": ragged, "labels": labels}) == 4
    assert batch_size_of({"labels": labels, "input_ids": ragged}) == 4
    assert batch_size_of([ragged, labels]) == 4  # default_collate's list around both
    assert batch_size_of([torch.zeros(8, 3), torch.zeros(8)]) == 8
    assert batch_size_of({"seqs": ragged}) == 5  # nothing else: the first entry, as before
    mbs = split_microbatches({"input_ids": ragged, "labels": labels}, 2)
    assert [mb["input_ids"] for mb in mbs] == [ragged[:2], ragged[2:]]
    assert [mb["labels"].tolist() for mb in mbs] == [[0, 1], [2, 3]]


# -- split: tensors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "m", "expected"),
    [(10, 3, [4, 3, 3]), (10, 4, [3, 3, 2, 2]), (8, 4, [2, 2, 2, 2]), (7, 2, [4, 3]), (5, 5, [1] * 5), (1, 1, [1])],
)
def test_split_tensor_uneven_like_tensor_split(size, m, expected):
    x = torch.arange(size * 2).view(size, 2)
    mbs = split_microbatches(x, m)
    assert [mb.shape[0] for mb in mbs] == expected
    ref = torch.tensor_split(x, m)
    assert len(mbs) == len(ref)
    for got, want in zip(mbs, ref):
        assert torch.equal(got, want)
    assert torch.equal(torch.cat(mbs), x)


def test_split_tensor_pieces_are_views_of_the_batch():
    x = torch.randn(6, 2)
    mbs = split_microbatches(x, 3)
    assert all(mb.data_ptr() == x[2 * i].data_ptr() for i, mb in enumerate(mbs))


def test_split_batch_smaller_than_m_gives_micro_batches_of_one():
    x = torch.arange(3)
    mbs = split_microbatches(x, 8)
    assert len(mbs) == 3
    assert [mb.tolist() for mb in mbs] == [[0], [1], [2]]
    mbs = split_microbatches({"x": torch.randn(2, 4), "y": torch.arange(2)}, 5)
    assert len(mbs) == 2 and sizes(mbs) == [1, 1]


def test_split_m1_returns_batch_unchanged_in_content():
    batch = {"x": torch.randn(4, 3), "y": (torch.arange(4), ["a", "b", "c", "d"]), "tag": "t", "w": torch.tensor(2.0)}
    mbs = split_microbatches(batch, 1)
    assert len(mbs) == 1
    assert_same(mbs[0], batch)


# -- split: containers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("container", [list, tuple])
@pytest.mark.parametrize(("size", "m"), [(10, 3), (2, 2), (2, 1), (3, 2), (4, 2)])
def test_split_default_collate_pair(container, size, m):
    """``[x, y]`` from default_collate; with size 2 the list's length equals the batch size, yet it is a pair."""
    x = torch.randn(size, 3)
    y = torch.arange(size)
    batch = container([x, y])
    mbs = split_microbatches(batch, m)
    ref_x, ref_y = torch.tensor_split(x, min(m, size)), torch.tensor_split(y, min(m, size))
    assert len(mbs) == min(m, size)
    for mb, rx, ry in zip(mbs, ref_x, ref_y):
        assert type(mb) is container and len(mb) == 2
        assert torch.equal(mb[0], rx) and torch.equal(mb[1], ry)
    assert torch.equal(torch.cat([mb[0] for mb in mbs]), x)
    assert torch.equal(torch.cat([mb[1] for mb in mbs]), y)


def test_split_default_collate_triple_with_batch_size_three():
    x, y, w = torch.randn(3, 2), torch.arange(3), torch.rand(3)
    mbs = split_microbatches([x, y, w], 3)
    assert len(mbs) == 3
    for i, mb in enumerate(mbs):
        assert type(mb) is list and len(mb) == 3
        for part, whole in zip(mb, (x, y, w)):
            assert torch.equal(part, whole[i : i + 1])


def test_split_dict_keeps_keys_and_order():
    batch = {"labels": torch.arange(7), "input_ids": torch.randn(7, 5), "mask": torch.ones(7, 5, dtype=torch.bool)}
    mbs = split_microbatches(batch, 3)
    assert sizes(mbs) == [3, 2, 2]
    for mb in mbs:
        assert type(mb) is dict and list(mb) == ["labels", "input_ids", "mask"]
    for k, v in batch.items():
        assert torch.equal(torch.cat([mb[k] for mb in mbs]), v)


def test_split_and_merge_a_user_dict_batch():
    """A tokenizer's BatchEncoding is a UserDict, not a dict: split by its tensors, rebuilt with its class."""
    batch = Encoding({"input_ids": torch.arange(12).reshape(6, 2), "attention_mask": torch.ones(6, 2)})
    assert batch_size_of(batch) == 6
    mbs = split_microbatches(batch, 4)
    assert sizes(mbs) == [2, 2, 1, 1]
    assert all(type(mb) is Encoding and list(mb) == ["input_ids", "attention_mask"] for mb in mbs)
    assert torch.equal(mbs[1].input_ids, batch["input_ids"][2:4])
    assert_same(merge_microbatches(mbs), batch)


def test_split_nested_dict_of_tuples():
    batch = {"pair": (torch.randn(6, 2), torch.randn(6)), "meta": {"ids": torch.arange(6), "lr": 0.1}}
    mbs = split_microbatches(batch, 4)
    assert sizes(mbs) == [2, 2, 1, 1]
    assert all(mb["meta"]["lr"] == 0.1 and type(mb["pair"]) is tuple for mb in mbs)
    assert torch.equal(torch.cat([mb["meta"]["ids"] for mb in mbs]), batch["meta"]["ids"])
    assert torch.equal(torch.cat([mb["pair"][1] for mb in mbs]), batch["pair"][1])


def test_split_dataclass_keeps_type_and_splits_fields():
    batch = DataBatch(torch.randn(5, 3), torch.arange(5), name="val")
    mbs = split_microbatches(batch, 2)
    assert [type(mb) for mb in mbs] == [DataBatch, DataBatch]
    assert sizes(mbs) == [3, 2]
    assert all(mb.name == "val" for mb in mbs)
    assert torch.equal(torch.cat([mb.inputs for mb in mbs]), batch.inputs)
    assert torch.equal(torch.cat([mb.targets for mb in mbs]), batch.targets)
    assert batch.inputs.shape[0] == 5  # the original is not modified


def test_split_frozen_dataclass_with_per_sample_list():
    batch = FrozenBatch(torch.randn(4, 2), ["a", "b", "c", "d"])
    mbs = split_microbatches(batch, 2)
    assert [type(mb) for mb in mbs] == [FrozenBatch, FrozenBatch]
    assert [mb.ids for mb in mbs] == [["a", "b"], ["c", "d"]]


def test_split_dataclass_with_init_false_field_recomputed():
    mbs = split_microbatches(WithDerived(torch.randn(5, 2)), 2)
    assert [mb.n for mb in mbs] == [3, 2]


@dataclasses.dataclass
class WithMask:
    x: torch.Tensor
    mask: torch.Tensor = dataclasses.field(init=False)  # set after construction
    weights: torch.Tensor | None = dataclasses.field(init=False, default=None)  # also set after, or left None


def test_split_and_merge_keep_fields_set_after_construction():
    batch = WithMask(torch.arange(6))
    batch.mask = torch.arange(6) % 2 == 0
    batch.weights = torch.arange(6.0)
    mbs = split_microbatches(batch, 3)
    assert [mb.mask.tolist() for mb in mbs] == [[True, False]] * 3
    assert [mb.weights.tolist() for mb in mbs] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    merged = merge_microbatches(mbs)
    assert torch.equal(merged.x, batch.x) and torch.equal(merged.mask, batch.mask)
    unset = split_microbatches(WithMask(torch.arange(4)), 2)[0]
    assert not hasattr(unset, "mask") and unset.weights is None  # never set: as they were


def test_split_namedtuple_keeps_type():
    batch = Batch(torch.randn(9, 2), torch.arange(9))
    mbs = split_microbatches(batch, 4)
    assert all(type(mb) is Batch for mb in mbs)
    assert sizes(mbs) == [3, 2, 2, 2]
    assert torch.equal(torch.cat([mb.targets for mb in mbs]), batch.targets)


def test_split_per_sample_strings_alongside_tensors():
    names = [f"s{i}" for i in range(5)]
    batch = {"x": torch.randn(5, 2), "names": names}
    mbs = split_microbatches(batch, 2)
    assert [mb["names"] for mb in mbs] == [["s0", "s1", "s2"], ["s3", "s4"]]
    assert [mb["x"].shape[0] for mb in mbs] == [3, 2]
    assert sum((mb["names"] for mb in mbs), []) == names


def test_split_per_sample_list_in_tuple_batch():
    """A tuple of (tensor, per-sample strings): tuples are containers, the inner list is per sample."""
    batch = (torch.randn(4, 2), ["a", "b", "c", "d"])
    mbs = split_microbatches(batch, 4)
    assert [mb[1] for mb in mbs] == [["a"], ["b"], ["c"], ["d"]]


def test_split_per_sample_list_of_ragged_tensors():
    seqs = [torch.ones(5), torch.ones(2), torch.ones(7)]
    mbs = split_microbatches({"x": torch.zeros(3, 2), "seqs": seqs}, 2)
    assert [len(mb["seqs"]) for mb in mbs] == [2, 1]
    assert mbs[0]["seqs"][0] is seqs[0] and mbs[1]["seqs"][0] is seqs[2]


def test_split_replicates_non_batch_tensors_scalars_and_leaves():
    table = torch.randn(7, 4)  # dim 0 != batch size
    scale = torch.tensor(0.5)  # scalar
    batch = {"x": torch.randn(5, 3), "table": table, "scale": scale, "step": 3, "mode": "train", "none": None}
    mbs = split_microbatches(batch, 3)
    assert len(mbs) == 3
    for mb in mbs:
        assert mb["table"] is table
        assert mb["scale"] is scale
        assert mb["step"] == 3 and mb["mode"] == "train" and mb["none"] is None
    assert sizes(mbs) == [2, 2, 1]


def test_split_replicates_non_batch_tensor_inside_tuple():
    x = torch.randn(4, 2)
    shared = torch.randn(3)
    mbs = split_microbatches((x, shared), 2)
    assert all(mb[1] is shared for mb in mbs)
    assert torch.equal(torch.cat([mb[0] for mb in mbs]), x)


# -- split: containers as long as the batch ------------------------------------------------------------------------
# default_collate of samples (tensor, str) / (tensor, scalar-like) / (dict, label) gives lists as long as the batch
# when the batch size equals the number of fields: they are containers, not per-sample lists.


def test_split_default_collate_tensor_and_strings_batch_size_two():
    x = torch.randn(2, 3)
    batch = [x, ["a", "b"]]  # default_collate([(x0, "a"), (x1, "b")])
    mbs = split_microbatches(batch, 2)
    assert len(mbs) == 2
    assert torch.equal(mbs[0][0], x[:1]) and mbs[0][1] == ["a"]
    assert torch.equal(mbs[1][0], x[1:]) and mbs[1][1] == ["b"]


def test_split_list_of_tensor_and_scalar_batch_size_two():
    x = torch.randn(2, 3)
    scale = torch.tensor(5.0)
    mbs = split_microbatches([x, scale], 2)
    assert len(mbs) == 2
    for i, mb in enumerate(mbs):
        assert torch.equal(mb[0], x[i : i + 1]) and mb[1] is scale


def test_split_default_collate_dict_and_label_batch_size_two():
    x, y = torch.randn(2, 3), torch.arange(2)
    mbs = split_microbatches([{"a": x}, y], 2)
    for i, mb in enumerate(mbs):
        assert torch.equal(mb[0]["a"], x[i : i + 1]) and torch.equal(mb[1], y[i : i + 1])


def test_weights_default_collate_tensor_and_strings_batch_size_two():
    mbs = split_microbatches([torch.randn(2, 3), ["a", "b"]], 2)
    assert microbatch_weights(mbs) == [0.5, 0.5]


# -- split: errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [0, -1])
def test_split_rejects_non_positive_num_microbatches(m):
    with pytest.raises(PipelineError, match="num_microbatches"):
        split_microbatches(torch.randn(4, 2), m)


@pytest.mark.parametrize(
    "batch",
    [["a", "b"], {"k": 1}, 3, None, torch.tensor(1.0), (torch.tensor(1.0), "x"), torch.empty(0, 3)],
    ids=["strings", "dict-no-tensor", "int", "none", "scalar-tensor", "scalar-in-tuple", "empty-batch"],
)
def test_split_rejects_batch_without_batch_dimension(batch):
    with pytest.raises(PipelineError, match="no tensor with a batch dimension"):
        split_microbatches(batch, 2)


def test_pipeline_error_is_a_runtime_error():
    with pytest.raises(RuntimeError):
        split_microbatches(torch.randn(2), 0)


# -- microbatch_weights ------------------------------------------------------------------------------------------


def test_weights_sum_to_one_and_proportional():
    mbs = split_microbatches(torch.randn(10, 2), 3)
    w = microbatch_weights(mbs)
    assert w == pytest.approx([0.4, 0.3, 0.3])
    assert sum(w) == pytest.approx(1.0)


def test_weights_of_structured_micro_batches():
    mbs = split_microbatches({"names": list("abcdefg"), "x": torch.randn(7, 2), "t": torch.randn(3, 3)}, 2)
    assert microbatch_weights(mbs) == pytest.approx([4 / 7, 3 / 7])


def test_weights_from_counted_sizes_equal_the_counted_ones():
    mbs = split_microbatches(torch.randn(7, 2), 3)
    assert microbatch_weights(mbs, sizes=[3, 2, 2]) == microbatch_weights(mbs) == [3 / 7, 2 / 7, 2 / 7]


def test_weights_single_micro_batch():
    assert microbatch_weights([torch.randn(5)]) == [1.0]


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 40), m=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_weighted_micro_batch_means_equal_full_batch_mean(batch, m, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, generator=gen, dtype=torch.float64)
    mbs = split_microbatches((x, y), m)
    assert len(mbs) == min(m, batch)

    s = sizes(mbs)
    assert sum(s) == batch
    assert max(s) - min(s) <= 1
    assert s == sorted(s, reverse=True)  # the larger chunks come first, as in torch.tensor_split

    w = microbatch_weights(mbs)
    assert sum(w) == pytest.approx(1.0, abs=1e-12)

    def loss(xb, yb):
        return ((xb.sum(dim=1) - yb) ** 2).mean()

    full = loss(x, y)
    weighted = sum(wi * loss(xb, yb) for wi, (xb, yb) in zip(w, mbs))
    assert abs(float(weighted) - float(full)) <= 1e-6 * max(1.0, abs(float(full)))


# -- merge_microbatches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3, 7])
def test_merge_inverts_split_for_tensors(m):
    x = torch.randn(7, 3)
    out = merge_microbatches(split_microbatches(x, m))
    assert torch.equal(out, x)


def test_merge_inverts_split_for_tuples_and_namedtuples():
    batch = (torch.randn(5, 2), torch.arange(5))
    assert_same(merge_microbatches(split_microbatches(batch, 2)), batch)
    nt = Batch(torch.randn(5, 2), torch.arange(5))
    assert_same(merge_microbatches(split_microbatches(nt, 3)), nt)


def test_merge_inverts_split_for_lists():
    batch = [torch.randn(6, 2), torch.arange(6)]
    assert_same(merge_microbatches(split_microbatches(batch, 4)), batch)


def test_merge_inverts_split_for_dicts():
    batch = {"b": torch.randn(6, 2), "a": {"ids": torch.arange(6), "pair": (torch.rand(6), torch.rand(6, 1))}}
    out = merge_microbatches(split_microbatches(batch, 4))
    assert_same(out, batch)
    assert list(out) == ["b", "a"]


def test_merge_inverts_split_for_dataclasses():
    batch = DataBatch(torch.randn(5, 3), torch.arange(5), name="n")
    mbs = split_microbatches(batch, 3)
    out = merge_microbatches(mbs)
    assert type(out) is DataBatch
    assert torch.equal(out.inputs, batch.inputs) and torch.equal(out.targets, batch.targets)


def test_merge_inverts_split_for_per_sample_lists():
    batch = {"x": torch.randn(5, 2), "names": ["a", "b", "c", "d", "e"], "ids": [10, 11, 12, 13, 14]}
    out = merge_microbatches(split_microbatches(batch, 3))
    assert out["names"] == batch["names"] and out["ids"] == batch["ids"]
    assert torch.equal(out["x"], batch["x"])


def test_merge_frozen_dataclass_with_per_sample_list():
    batch = FrozenBatch(torch.randn(4, 2), ["a", "b", "c", "d"])
    out = merge_microbatches(split_microbatches(batch, 3))
    assert type(out) is FrozenBatch and out.ids == batch.ids and torch.equal(out.x, batch.x)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 20), m=st.integers(1, 8))
def test_merge_inverts_split_property(batch, m):
    value = {"x": torch.randn(batch, 2), "pair": (torch.arange(batch), [f"n{i}" for i in range(batch)])}
    assert_same(merge_microbatches(split_microbatches(value, m)), value)


def test_merge_inverts_split_for_per_sample_list_of_ragged_tensors():
    seqs = [torch.ones(5), torch.ones(2), torch.ones(7)]
    batch = {"x": torch.zeros(3, 2), "seqs": seqs}
    out = merge_microbatches(split_microbatches(batch, 2))
    assert len(out["seqs"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(out["seqs"], seqs))


def test_merge_stacks_scalar_tensors():
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)]
    out = merge_microbatches(losses)
    assert out.shape == (3,)
    assert out.tolist() == [1.0, 2.0, 3.0]
    nested = merge_microbatches([{"loss": torch.tensor(1.0), "y": torch.ones(2, 1)},
                                 {"loss": torch.tensor(4.0), "y": torch.zeros(1, 1)}])
    assert nested["loss"].tolist() == [1.0, 4.0]
    assert nested["y"].shape == (3, 1)


def test_merge_single_output_returned_as_is():
    out = {"y": torch.randn(3), "tag": "t"}
    assert merge_microbatches([out]) is out
    t = torch.tensor(2.0)
    assert merge_microbatches([t]) is t


def test_merge_non_tensor_leaves_become_a_list_per_micro_batch():
    out = merge_microbatches([(torch.ones(1), "a", 1), (torch.zeros(2), "b", 2)])
    assert type(out) is tuple
    assert out[0].tolist() == [1.0, 0.0, 0.0]
    assert out[1] == ["a", "b"] and out[2] == [1, 2]


def test_merge_keeps_autograd_graph():
    x = torch.randn(4, 2, requires_grad=True)
    outs = [mb * 2 for mb in split_microbatches(x, 2)]
    merged = merge_microbatches(outs)
    merged.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_split_and_merge_keep_a_defaultdict_and_its_factory() -> None:
    batch = collections.defaultdict(list, x=torch.arange(4.0).view(4, 1), n=3)
    parts = split_microbatches(batch, 2)
    assert all(type(p) is collections.defaultdict and p.default_factory is list for p in parts)
    assert parts[1]["x"].flatten().tolist() == [2.0, 3.0] and parts[1]["n"] == 3
    merged = merge_microbatches(parts)
    assert type(merged) is collections.defaultdict and merged.default_factory is list
    assert torch.equal(merged["x"], batch["x"])


def test_merge_with_sizes_tells_per_sample_lists_from_containers() -> None:
    """Given each micro-batch's sample count, a list with one entry per sample (ragged sequences) is joined, even
    where the micro-batches are equal or hold one sample; a container of tensors is merged entry by entry."""
    seqs = [torch.ones(5), torch.ones(2), torch.ones(7), torch.ones(3)]
    batch = {"x": torch.zeros(4, 2), "seqs": seqs}
    parts = split_microbatches(batch, 2)
    merged = merge_microbatches(parts, [batch_size_of(p) for p in parts])
    assert [s.shape[0] for s in merged["seqs"]] == [5, 2, 7, 3]
    # One sample per micro-batch, and a micro-batch whose sequences happen to be equally long.
    ones = merge_microbatches([[s] for s in seqs], [1, 1, 1, 1])
    assert [s.shape[0] for s in ones] == [5, 2, 7, 3]
    even = merge_microbatches([[torch.zeros(3), torch.zeros(3)], [torch.zeros(5), torch.zeros(2)]], [2, 2])
    assert [s.shape[0] for s in even] == [3, 3, 5, 2]
    # Containers are merged entry by entry: batched tensors, and a batched tensor beside a per-class count.
    pairs = merge_microbatches([[torch.zeros(2, 3), torch.ones(2)], [torch.zeros(2, 3), torch.ones(2)]], [2, 2])
    assert [p.shape for p in pairs] == [(4, 3), (4,)]
    preds, counts = merge_microbatches([[torch.zeros(4), torch.ones(3)], [torch.zeros(4), torch.ones(3)]], [4, 4])
    assert preds.shape == (8,) and counts.shape == (6,)


def test_weights_by_a_count_of_the_users():
    """Weighed by what the loss is a mean over (tokens left): sum(w_i * mean_i) is the mean over all of them."""
    targets = torch.tensor([[1, -100, 2], [3, 4, 5], [-100, -100, 6], [7, 8, -100]])
    mbs = split_microbatches(targets, 2)
    weights = microbatch_weights(mbs, lambda mb: (mb != -100).sum())
    assert weights == [5 / 8, 3 / 8]  # 5 and 3 tokens, where the samples' shares are 1/2 each
    mbs = split_microbatches(targets, 4)
    weights = microbatch_weights(mbs, lambda mb: (mb != -100).sum())
    assert weights == pytest.approx([2 / 8, 3 / 8, 1 / 8, 2 / 8])
    means = [mb[mb != -100].float().mean() for mb in mbs]
    whole = targets[targets != -100].float().mean()
    assert float(sum(w * m for w, m in zip(weights, means))) == pytest.approx(float(whole))
    for bad in (lambda mb: -1.0, lambda mb: float("nan"), lambda mb: 0.0):
        with pytest.raises(PipelineError, match="microbatch_weight gave"):
            microbatch_weights(mbs, bad)
