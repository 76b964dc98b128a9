"""Finding the chain of blocks and cutting it per stage (``lightning_pipe.strategy.chain``), on one process."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lightning_pipe.errors import PipelineError
from lightning_pipe.strategy.chain import ChainRuntime, StageExit, find_chain, split_chain
from tests._models import SEQ, VOCAB, TinyGPT

COUNTS = [1, 2, 1]
OWNED = {0: {0}, 1: {1, 2}, 2: {3}}
NON_CHAIN = {"tok.weight", "pos.weight", "ln_f.weight", "ln_f.bias"}


def make_model(body: str = "sequential") -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(body=body).eval()


def chain_path(body: str) -> str:
    return "blocks" if body == "sequential" else "layers"


def cut(model: TinyGPT, stage: int, counts: list[int] = COUNTS) -> tuple[TinyGPT, ChainRuntime]:
    """A deep copy of ``model`` cut for ``stage``."""
    copy_ = copy.deepcopy(model)
    path, chain = find_chain(copy_, None)
    return copy_, split_chain(copy_, path, chain, counts=counts, stages=stage)


def call_block(block: nn.Module, x: torch.Tensor, body: str) -> torch.Tensor:
    """Call a block as the model's forward does (the ModuleList form passes a mask)."""
    if body == "sequential":
        return block(x)
    t = x.shape[1]
    return block(x, torch.ones(t, t, dtype=torch.bool).tril())


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


# --- find_chain ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["sequential", "modulelist"])
def test_find_chain_picks_largest_container(body: str) -> None:
    model = make_model(body)
    path, chain = find_chain(model, None)
    assert path == chain_path(body)
    assert chain is model.get_submodule(path)


def test_find_chain_prefers_most_parameters() -> None:
    """A small Sequential that comes first loses to a larger ModuleList."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
            self.big = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

    model = Two()
    assert find_chain(model, None) == ("big", model.big)


def test_find_chain_explicit_path() -> None:
    model = make_model()
    path, chain = find_chain(model, "blocks")
    assert path == "blocks" and chain is model.blocks


def test_find_chain_unknown_path() -> None:
    with pytest.raises(PipelineError, match="blocks='nope' names no submodule"):
        find_chain(make_model(), "nope")


def test_find_chain_not_a_container() -> None:
    with pytest.raises(PipelineError, match="blocks='ln_f' is a LayerNorm"):
        find_chain(make_model(), "ln_f")


def test_find_chain_no_container() -> None:
    with pytest.raises(PipelineError, match="no chain of blocks found"):
        find_chain(nn.Linear(3, 3), None)


# --- split_chain: structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_split_keeps_full_names_of_own_blocks(stage: int) -> None:
    model, runtime = cut(make_model(), stage)
    names = {n for n, _ in model.named_parameters()}
    block_indices = {int(n.split(".")[1]) for n in names if n.startswith("blocks.")}
    assert block_indices == OWNED[stage]
    assert NON_CHAIN <= names
    assert names - NON_CHAIN == {n for n in names if n.startswith("blocks.")}
    for i in OWNED[stage]:
        assert f"blocks.{i}.qkv.weight" in names
    assert (runtime.first, runtime.stop, runtime.is_last_stage) == (sum(COUNTS[:stage]), sum(COUNTS[: stage + 1]),
                                                                    stage == 2)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_split_len_and_iteration(stage: int) -> None:
    model, runtime = cut(make_model(), stage)
    assert len(model.blocks) == 4
    items = list(model.blocks)
    assert len(items) == 4
    for i, item in enumerate(items):
        if i in OWNED[stage]:
            assert isinstance(item, nn.Module) and item is runtime.blocks[i]
            assert model.blocks[i] is item
        else:
            assert not isinstance(item, nn.Module)  # a stand-in that passes its input through
    if stage == 2:
        assert model.blocks[-1] is runtime.blocks[3]  # negative indices count over the whole chain


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_block_call_outside_step(stage: int) -> None:
    model, _ = cut(make_model(), stage)
    with pytest.raises(PipelineError, match="outside a pipelined step"):
        model(tokens())


def test_split_twice() -> None:
    model, _ = cut(make_model(), 1)
    with pytest.raises(PipelineError, match="already cut"):
        split_chain(model, "blocks", model.blocks, counts=COUNTS, stages=1)


# --- split_chain: running a step -----------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["sequential", "modulelist"])
def test_first_stage_exits_with_block_output(body: str) -> None:
    reference = make_model(body)
    model, runtime = cut(reference, 0)
    idx = tokens()
    with torch.no_grad():
        x = reference.tok(idx) + reference.pos(torch.arange(SEQ))
        expected = call_block(reference.get_submodule(chain_path(body))[0], x, body)
        runtime.begin(None)
        with pytest.raises(StageExit) as info:
            model(idx)
    assert not isinstance(info.value, Exception)  # a BaseException: `except Exception` does not swallow it
    torch.testing.assert_close(info.value.output, expected)


@pytest.mark.parametrize("body", ["sequential", "modulelist"])
def test_middle_stage_swaps_in_received(body: str) -> None:
    reference = make_model(body)
    model, runtime = cut(reference, 1)
    chain = model.get_submodule(chain_path(body))
    received = torch.randn(2, SEQ, 16, generator=torch.Generator().manual_seed(2))
    seen: list[Any] = []
    chain[1].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ref_chain = reference.get_submodule(chain_path(body))
    with torch.no_grad():
        expected = call_block(ref_chain[2], call_block(ref_chain[1], received, body), body)
        runtime.begin(received)
        with pytest.raises(StageExit) as info:
            model(tokens())
    assert len(seen) == 1 and seen[0] is received
    torch.testing.assert_close(info.value.output, expected)


@pytest.mark.parametrize("body", ["sequential", "modulelist"])
def test_last_stage_returns_logits(body: str) -> None:
    reference = make_model(body)
    model, runtime = cut(reference, 2)
    received = torch.randn(2, SEQ, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = call_block(reference.get_submodule(chain_path(body))[3], received, body)
        expected = reference.head(reference.ln_f(h))
        runtime.begin(received)
        logits = model(tokens())
    torch.testing.assert_close(logits, expected)
    runtime.check_finished()
    runtime.end()
    with pytest.raises(PipelineError, match="outside a pipelined step"):
        model(tokens())


def test_out_of_order_block_call() -> None:
    model, runtime = cut(make_model(), 1)
    runtime.begin(torch.zeros(2, SEQ, 16))
    with pytest.raises(PipelineError, match="must each be called once per step, in order"):
        model.blocks[2](torch.zeros(2, SEQ, 16))


def test_repeated_block_call() -> None:
    model, runtime = cut(make_model(), 2)
    x = torch.zeros(2, SEQ, 16)
    runtime.begin(x)
    assert model.blocks[0](x) is x  # stand-in passes its input through
    with pytest.raises(PipelineError, match="must each be called once per step, in order"):
        model.blocks[0](x)


def test_check_finished_incomplete_chain() -> None:
    model, runtime = cut(make_model(), 2)
    x = torch.zeros(2, SEQ, 16)
    runtime.begin(x)
    model.blocks[0](x)
    model.blocks[1](x)
    with pytest.raises(PipelineError, match="every block must run once per step"):
        runtime.check_finished()


def test_begin_resets_order() -> None:
    """A new micro-batch starts the chain from block 0 again."""
    model, runtime = cut(make_model(), 2)
    received = torch.zeros(2, SEQ, 16)
    with torch.no_grad():
        for _ in range(2):
            runtime.begin(received)
            model(tokens())
            runtime.check_finished()


# --- several stages on one rank (virtual stages) -------------------------------------------------------------


@pytest.mark.parametrize("body", ["sequential", "modulelist"])
def test_a_rank_holding_the_first_and_the_last_stage(body: str) -> None:
    """As rank 0 under zbv: stages 0 and 3 of four one-block stages. Each forward runs only its own stage's blocks;
    the other stage's block stands in as a pass-through."""
    reference = make_model(body)
    copy_ = copy.deepcopy(reference)
    path, chain = find_chain(copy_, None)
    runtime = split_chain(copy_, path, chain, counts=[1, 1, 1, 1], stages=[3, 0])
    assert runtime.describe_blocks() == "stage 0: blocks 0..0, stage 3: blocks 3..3"
    assert {n.split(".")[1] for n, _ in copy_.named_parameters() if n.startswith(path)} == {"0", "3"}
    ref_chain = reference.get_submodule(chain_path(body))
    idx = tokens()
    with torch.no_grad():
        x = reference.tok(idx) + reference.pos(torch.arange(SEQ))
        runtime.begin(None, stage=0)
        with pytest.raises(StageExit) as first:
            copy_(idx)
        runtime.end()
        torch.testing.assert_close(first.value.output, call_block(ref_chain[0], x, body))
        received = torch.randn(2, SEQ, 16, generator=torch.Generator().manual_seed(4))
        runtime.begin(received, stage=3)
        logits = copy_(idx)  # block 0 is held here too, but belongs to another stage: it must not run now
        runtime.check_finished()
        runtime.end()
    torch.testing.assert_close(logits, reference.head(reference.ln_f(call_block(ref_chain[3], received, body))))
    assert runtime.stage == 3 and runtime.is_last_stage


class _KeywordBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + pos


class _KeywordNet(nn.Module):
    """Blocks given the hidden state by keyword, after another keyword of the same shape; ``between``: code that
    changes the hidden state between two blocks."""

    def __init__(self, between: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_KeywordBlock() for _ in range(4))
        self.between = between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.ones_like(x)
        for block in self.layers:
            x = block(pos=pos, x=x)
            if self.between:
                x = x * 0.9
        return x


def test_a_hidden_state_passed_by_keyword_is_found_by_the_blocks_parameter_name() -> None:
    """``block(pos=pos, x=x)``: the received value replaces ``x`` (the block's first parameter), not ``pos``, and a
    stand-in passes ``x`` on."""
    torch.manual_seed(0)
    model = _KeywordNet()
    received = torch.randn(2, 4)
    with torch.no_grad():
        expected = model.layers[3](x=model.layers[2](x=received, pos=torch.ones(2, 4)), pos=torch.ones(2, 4))
    path, chain = find_chain(model, "layers")
    runtime = split_chain(model, path, chain, counts=[2, 2], stages=1)
    runtime.begin(received)
    with torch.no_grad():
        out = model(torch.zeros(2, 4))
    torch.testing.assert_close(out, expected)


def test_code_between_blocks_at_a_stage_boundary_is_refused() -> None:
    """``x = block(x) * 0.9``: the scaling after block 1 would be skipped where stage 1 starts at block 2."""
    model = _KeywordNet(between=True)
    path, chain = find_chain(model, "layers")
    runtime = split_chain(model, path, chain, counts=[2, 2], stages=1)
    runtime.begin(torch.randn(2, 4))
    with pytest.raises(PipelineError, match="code between blocks 1 and 2 of `layers` changes the hidden state"):
        model(torch.zeros(2, 4))
    # Within a stage the same code is fine (stage 0 holds blocks 0 and 1, and exits after block 1).
    model = _KeywordNet(between=True)
    path, chain = find_chain(model, "layers")
    runtime = split_chain(model, path, chain, counts=[2, 2], stages=0)
    runtime.begin(None)
    with pytest.raises(StageExit):
        model(torch.zeros(2, 4))


class _SkipNet(nn.Module):
    """Block 0's output added after the last block: a skip connection across the stage boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 4)
        self.layers = nn.ModuleList(_KeywordBlock() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        pos = torch.zeros_like(x)
        skip = None
        for i, block in enumerate(self.layers):
            x = block(x, pos)
            if i == 0:
                skip = x
        return x + skip


def test_a_block_output_used_beyond_the_hidden_state_on_a_later_stage_is_refused() -> None:
    """On stage 1, block 0's "output" is the placeholder computed there: using it after block 3 would be silently
    wrong, so its gradient raises; passed along the chain only, it gets none."""
    model = _SkipNet()
    path, chain = find_chain(model, "layers")
    runtime = split_chain(model, path, chain, counts=[2, 2], stages=1)
    runtime.begin(torch.randn(2, 4, requires_grad=True))
    with pytest.raises(PipelineError, match="the output of block 0 of `layers`, computed on an earlier pipeline"):
        model(torch.zeros(2, 4)).sum().backward()
    model = _KeywordNet()  # the hidden state only: no gradient reaches a stand-in's output
    model.emb = nn.Linear(4, 4)
    path, chain = find_chain(model, "layers")
    runtime = split_chain(model, path, chain, counts=[2, 2], stages=1)
    received = torch.randn(2, 4, requires_grad=True)
    runtime.begin(received)
    model(model.emb(torch.zeros(2, 4))).sum().backward()
    assert received.grad is not None and model.emb.weight.grad is None


class _AuxBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x)
        return y, y.pow(2).mean()


class _AuxNet(nn.Module):
    """Blocks return ``(hidden, aux)`` and the loop unpacks them: a stand-in cannot give the aux of an earlier
    stage's block, and a stage's output (the pair) is not what the next stage's first block takes."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_AuxBlock() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for block in self.layers:
            x, aux = block(x)
            total = total + aux
        return x.sum() + total


def test_a_block_that_returns_more_than_its_hidden_state_is_refused_on_the_stage_that_holds_it() -> None:
    model = _AuxNet()
    path, chain = find_chain(model, "layers")
    runtime = split_chain(model, path, chain, counts=[2, 2], stages=0)
    runtime.begin(None)
    with pytest.raises(PipelineError, match=r"block 0 of `layers` takes a hidden state of one structure \(a tensor\) "
                                            r"and returns another \(a tuple of 2\)"):
        model(torch.zeros(2, 4))
    # The stage that stands in for those blocks fails in the user's loop: the error gets a note saying why.
    model = _AuxNet()
    path, chain = find_chain(model, "layers")
    runtime = split_chain(model, path, chain, counts=[2, 2], stages=1)
    runtime.begin(torch.randn(2, 4))
    with pytest.raises(ValueError, match="too many values to unpack") as info:
        try:
            model(torch.zeros(2, 4))
        except Exception as err:
            runtime.note_failure(err)
            raise
    assert "stands in for by returning the hidden state it is given" in "".join(info.value.__notes__)
    # One stage holds every block: nothing crosses a boundary, and the same model runs as on one device.
    model = _AuxNet()
    path, chain = find_chain(model, "layers")
    runtime = split_chain(model, path, chain, counts=[4], stages=0)
    runtime.begin(None)
    model(torch.zeros(2, 4))
    runtime.check_finished()


class _CountingBlock(nn.Module):
    """Takes ``(x, i)`` and returns ``[x', i + 1]``: another container class and another leaf value, the same
    tensors: what the next block takes is still there."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, state: tuple[torch.Tensor, int]) -> list[Any]:
        x, i = state
        return [self.lin(x), i + 1]


def test_a_block_may_change_its_hidden_states_container_and_plain_values() -> None:
    model = nn.Sequential(*[_CountingBlock() for _ in range(4)])
    path, chain = find_chain(model, None)
    runtime = split_chain(model, path, chain, counts=[2, 2], stages=0)
    runtime.begin(None)
    with pytest.raises(StageExit) as info:
        model((torch.zeros(2, 4), 0))
    assert info.value.output[1] == 2


def test_a_second_forward_in_one_step_is_named_as_such() -> None:
    model, runtime = cut(make_model(), 2)
    x = torch.zeros(2, SEQ, 16)
    runtime.begin(x)
    for block in model.blocks:  # the whole chain: stand-ins, then this stage's blocks
        x = block(x)
    with pytest.raises(PipelineError, match="the model ran twice in one step"):
        model.blocks[0](x)


def test_a_block_held_elsewhere_says_so_when_read_outside_a_step() -> None:
    model, runtime = cut(make_model(), 2)
    elsewhere = [block for block in model.blocks if not isinstance(block, torch.nn.Module)]
    assert elsewhere  # stage 2 stands in for the blocks of the stages before it
    expected = (r"block 0 of `blocks` is not here: this pipeline rank holds stage 2: blocks 3\.\.3.*"
                r"`\.parameters` cannot be read.*startswith\('blocks\.0\.'\)")
    with pytest.raises(AttributeError, match=expected):
        elsewhere[0].parameters()
    assert not hasattr(elsewhere[0], "weight")  # hasattr still answers (AttributeError)
