"""The model summary of a pipelined model (``lightning_pipe.strategy.summary``), on one process: the stages are
cut from copies of one model and run in turn, and the merged summary must be Lightning's of the uncut model.
(``test_strategy_lightning`` checks the table ``ModelSummary`` prints under the strategy, across processes.)"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.model_summary import ModelSummary
from torch import nn

from lightning_pipe.strategy.chain import StageExit, find_chain, split_chain
from lightning_pipe.strategy.placement import plan_placement
from lightning_pipe.strategy.summary import (
    LocalSummary, PipelineSummary, local_summary, merge_summaries, record_example, summary_rows,
)
from tests._models import SEQ, VOCAB, TinyGPT


class _Inner(nn.Module):
    """Holds the chain one level down; one GELU shared by every block and by the code after the chain (named first
    in block 0, so only the rank holding block 0 sees it under that name)."""

    def __init__(self) -> None:
        super().__init__()
        act = nn.GELU()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), act) for _ in range(4)])
        self.head = nn.Linear(8, 3)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.blocks(self.embed(x))))


class _Nested(LightningModule):
    def __init__(self, runs_chain: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = _Inner()
        self.act = self.model.act  # a child of the root too: a row of its own at depth 1
        self.scale = nn.Parameter(torch.ones(()))  # on the root: Lightning's "other params" row
        self.runs_chain = runs_chain
        self.example_input_array = torch.randn(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_chain:  # the steps run the rest themselves: the rows after show "?"
            return self.model.embed(x)
        return self.model(x) * self.scale


def make_model(body: str, *, example: bool) -> TinyGPT:
    torch.manual_seed(0)
    model = TinyGPT(body=body, n_layer=4, tie_blocks=True)  # the first and last blocks share a weight
    model.ln_f.weight.requires_grad_(False)  # a frozen parameter: trainable and total counts differ
    if example:
        model.example_input_array = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    return model


def pipelined_summary(model: nn.Module, layout: list[int], max_depth: int,
                      blocks: str | None = None) -> PipelineSummary:
    """The merged summary of ``model`` cut into one-block stages, stage ``s`` on rank ``layout[s]``, each rank's
    part of the example's forward run in stage order as the pipeline runs it."""
    order = [name for name, _ in model.named_modules()]
    rows = summary_rows(order, [name for name, _ in model.named_children()], max_depth)
    chain_type = type(find_chain(model, blocks)[1]).__name__
    counts = [1] * len(layout)
    ranks = sorted(set(layout))
    copies, runtimes, aliases = {}, {}, {}
    for rank in ranks:
        copies[rank] = copy.deepcopy(model)
        path, chain = find_chain(copies[rank], blocks)
        placement = plan_placement(copies[rank], path, counts, layout)
        aliases = {n: names for names in placement.replicated_names for n in names}
        runtimes[rank] = split_chain(copies[rank], path, chain, counts=counts,
                                     stages=[s for s, r in enumerate(layout) if r == rank])
    locals_: dict[int, LocalSummary] = {r: local_summary(copies[r], chain_path=path, chain_type=chain_type,
                                                         aliases=aliases) for r in ranks}
    if model.example_input_array is not None:
        carried: list[Any] = [None]
        for stage, rank in enumerate(layout):
            def run(hook: Callable[[Any], None], stage: int = stage, rank: int = rank) -> None:
                runtime = runtimes[rank]
                runtime.begin(carried[0], stage)
                try:
                    hook(model.example_input_array)
                except StageExit as done:
                    carried[0] = done.output
                finally:
                    runtime.end()

            locals_[rank].runs += record_example(copies[rank], runtime=runtimes[rank], names=rows, run=run)
    merged = merge_summaries(list(locals_.values()), rows=rows, modules_once=order, chain_path=path,
                             last_stage=len(layout) - 1)
    return PipelineSummary(copies[0], max_depth=max_depth, merged=merged)


@pytest.mark.parametrize("body", ["sequential", "modulelist"])
@pytest.mark.parametrize("layout", [[0, 1, 1, 2], [0, 1, 1, 0]], ids=["contiguous", "v_shape"])
@pytest.mark.parametrize("max_depth", [1, 2, -1])
@pytest.mark.parametrize("example", [True, False])
def test_the_merged_summary_is_the_uncut_models(body: str, layout: list[int], max_depth: int, example: bool) -> None:
    model = make_model(body, example=example)
    ours = pipelined_summary(model, layout, max_depth)
    ref = ModelSummary(make_model(body, example=example), max_depth=max_depth)
    assert ours.layer_names == ref.layer_names and len(ref.layer_names) > 3
    assert ours.layer_types == ref.layer_types  # the chain's own class, not the cut one's
    assert ours.param_nums == ref.param_nums  # the tied head and the weight the first and last blocks share: once
    assert ours.training_modes == ref.training_modes
    assert ours.total_training_modes == ref.total_training_modes
    assert (ours.total_parameters, ours.trainable_parameters) == (ref.total_parameters, ref.trainable_parameters)
    assert ours.trainable_parameters < ours.total_parameters
    assert ours.model_size == ref.model_size
    assert ours.in_sizes == ref.in_sizes and ours.out_sizes == ref.out_sizes
    flops = {n: sum(v.values()) for n, v in ours.flop_counts.items()}
    assert flops == {n: sum(v.values()) for n, v in ref.flop_counts.items()}
    assert ours.total_flops == ref.total_flops
    if example:  # sizes and FLOPs were measured, across the stages (a ModuleList is never called: "?")
        assert ours.total_flops > 0
        name = "blocks" if body == "sequential" else "layers.3"  # the chain, or its last block (on stage 3)
        if name in ours.layer_names:
            row = ours.layer_names.index(name)
            hidden = [3, SEQ, 16]
            assert ours.in_sizes[row] == (hidden if body == "sequential" else [hidden, [SEQ, SEQ]])  # (x, mask)
            assert ours.out_sizes[row] == hidden
    # What Lightning's callback prints, column by column (index, name, type, params, mode, FLOPs, sizes).
    assert ours._get_summary_data() == ref._get_summary_data()
    assert str(ours) == str(ref)


def test_a_module_run_by_no_stage_shows_unknown_sizes() -> None:
    model = make_model("sequential", example=True)
    model.unused = torch.nn.Linear(2, 2)  # never called in forward: Lightning shows "?" for it
    ours = pipelined_summary(model, [0, 1, 1, 0], 1)
    ref = ModelSummary(copy.deepcopy(model), max_depth=1)
    assert ours._get_summary_data() == ref._get_summary_data()
    assert ours.in_sizes[ours.layer_names.index("unused")] == "?"


@pytest.mark.parametrize("max_depth", [1, 2, -1])
@pytest.mark.parametrize("runs_chain", [True, False])
def test_a_chain_held_deeper_a_shared_module_and_a_forward_without_the_chain(max_depth: int,
                                                                           runs_chain: bool) -> None:
    ours = pipelined_summary(_Nested(runs_chain), [0, 1, 1, 0], max_depth, blocks="model.blocks")
    ref = ModelSummary(_Nested(runs_chain), max_depth=max_depth)
    # The module holding the chain counts every stage's FLOPs; the shared GELU is one row, under its first name.
    assert ours._get_summary_data() == ref._get_summary_data()
    assert str(ours) == str(ref)
    if runs_chain:
        assert ours.flop_counts["model"]["total"] == ref.total_flops > 0
