"""Which stages hold each parameter, and blocks per stage (``lightning_pipe.strategy.placement``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_pipe.errors import PipelineError
from lightning_pipe.partition import optimal_partition
from lightning_pipe.strategy.placement import block_counts, plan_placement
from tests._models import TinyGPT


def make_model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


def test_tinygpt_replicates_non_chain_params() -> None:
    """Embeddings (tok tied to head) and the final norm live on every stage; blocks on one."""
    model = make_model()
    placement = plan_placement(model, "blocks", [2, 2])
    assert placement.replicated_names == [["tok.weight", "head.weight"], ["pos.weight"], ["ln_f.weight"],
                                          ["ln_f.bias"]]
    assert placement.replicated_owners == [[0, 1]] * 4
    assert placement.replicated_shapes == [model.tok.weight.shape, model.pos.weight.shape, model.ln_f.weight.shape,
                                           model.ln_f.bias.shape]
    replicated = {n for names in placement.replicated_names for n in names}
    assert not any(n.startswith("blocks.") for n in replicated)


def test_weight_tied_across_stages() -> None:
    """A Linear shared by block 0 (stage 0) and block 3 (stage 1) is held by both stages."""
    model = make_model()
    model.blocks[3].fc1 = model.blocks[0].fc1
    placement = plan_placement(model, "blocks", [2, 2])
    aliases = [names for names in placement.replicated_names if any(n.startswith("blocks.") for n in names)]
    assert aliases == [["blocks.0.fc1.weight", "blocks.3.fc1.weight"], ["blocks.0.fc1.bias", "blocks.3.fc1.bias"]]
    for names in aliases:
        i = placement.replicated_names.index(names)
        assert placement.replicated_owners[i] == [0, 1]
        assert placement.replicated_shapes[i] == model.get_parameter(names[0]).shape


def test_weight_tied_within_one_stage_not_replicated() -> None:
    """Blocks 0 and 1 share a weight but both sit on stage 0: nothing to replicate."""
    model = make_model()
    model.blocks[1].fc2.weight = model.blocks[0].fc2.weight
    placement = plan_placement(model, "blocks", [2, 2])
    assert not any(n.startswith("blocks.") for names in placement.replicated_names for n in names)


def test_tied_weight_replicated_with_three_stages() -> None:
    model = make_model()
    model.blocks[3].proj.weight = model.blocks[1].proj.weight
    placement = plan_placement(model, "blocks", [1, 1, 2])
    i = placement.replicated_names.index(["blocks.1.proj.weight", "blocks.3.proj.weight"])
    assert placement.replicated_owners[i] == [1, 2]


# --- block_counts --------------------------------------------------------------------------------------------


def test_block_counts_uniform() -> None:
    assert block_counts(make_model().blocks, "uniform", 3) == [1, 1, 2]


def test_block_counts_parameters() -> None:
    """Optimal by parameter count; parameter-free blocks cost nothing."""
    chain = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2), nn.Linear(2, 2), nn.Linear(2, 30))
    costs = [110, 0, 22, 6, 90]
    assert [sum(p.numel() for p in b.parameters()) for b in chain] == costs
    counts = block_counts(chain, "parameters", 2)
    assert counts == optimal_partition(costs, 2) == [2, 3]  # [110, 0] | [22, 6, 90]: max 118


def test_block_counts_parameters_tinygpt() -> None:
    """Equal blocks: the even cut."""
    assert block_counts(make_model().blocks, "parameters", 2) == [2, 2]


def test_block_counts_explicit() -> None:
    chain = make_model().blocks
    assert block_counts(chain, [1, 3], 2) == [1, 3]
    with pytest.raises(PipelineError, match="balance="):
        block_counts(chain, [2, 3], 2)


def test_named_sequential_blocks_belong_to_their_stage_only() -> None:
    """Keys of an nn.Sequential(OrderedDict) are names, not indices: blocks are still placed by position."""
    from collections import OrderedDict

    from torch import nn

    model = nn.Module()
    model.body = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), b=nn.Linear(4, 4), c=nn.Linear(4, 4)))
    model.head = nn.Linear(4, 2)
    placement = plan_placement(model, "body", [2, 1])
    assert placement.replicated_names == [["head.weight"], ["head.bias"]]
