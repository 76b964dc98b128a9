"""Keeping a step's gradients aside for Lightning's closure, and the replicated-parameter table
(``lightning_pipe.strategy.grads``: ``GradStash``, ``ReplicatedParams``)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lightning_pipe.strategy.chain import find_chain, split_chain
from lightning_pipe.strategy.grads import GradStash, ReplicatedParams
from lightning_pipe.strategy.placement import plan_placement
from tests._models import TinyGPT


def make_params() -> tuple[nn.Linear, list[nn.Parameter]]:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    return layer, list(layer.parameters())


def backward(layer: nn.Linear, scale: float) -> None:
    (layer(torch.ones(4, 3)) * scale).sum().backward()


def grads_of(params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in params]


def run_step(stash: GradStash, layer: nn.Linear, params: list[nn.Parameter], scale: float) -> None:
    """A pipelined step: fresh gradients inside, the earlier ones put back after."""
    before = stash.begin(params)
    assert all(p.grad is None for p in params)
    backward(layer, scale)
    stash.end(params, before)


@pytest.fixture
def g0_g1() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The gradients of the earlier backward (scale 1) and of the step (scale 3), computed alone."""
    layer, params = make_params()
    backward(layer, 1.0)
    g0 = grads_of(params)
    layer.zero_grad(set_to_none=True)
    backward(layer, 3.0)
    return g0, grads_of(params)  # type: ignore[return-value]


def test_end_restores_earlier_grads_apply_adds(g0_g1: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    g0, g1 = g0_g1
    layer, params = make_params()
    backward(layer, 1.0)
    stash = GradStash()
    run_step(stash, layer, params, 3.0)
    for p, g in zip(params, g0):
        torch.testing.assert_close(p.grad, g)
    stash.apply()
    for p, a, b in zip(params, g0, g1):
        torch.testing.assert_close(p.grad, a + b)
    stash.apply()  # the stash is emptied: applying again adds nothing
    for p, a, b in zip(params, g0, g1):
        torch.testing.assert_close(p.grad, a + b)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_between_end_and_apply(g0_g1: tuple[list[torch.Tensor], list[torch.Tensor]],
                                         set_to_none: bool) -> None:
    """Lightning zeroes gradients after training_step on the first batch of a window: the step's stay."""
    _, g1 = g0_g1
    layer, params = make_params()
    backward(layer, 1.0)
    stash = GradStash()
    run_step(stash, layer, params, 3.0)
    layer.zero_grad(set_to_none=set_to_none)
    stash.apply()
    for p, g in zip(params, g1):
        torch.testing.assert_close(p.grad, g)


def test_no_earlier_grads(g0_g1: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    _, g1 = g0_g1
    layer, params = make_params()
    stash = GradStash()
    run_step(stash, layer, params, 3.0)
    assert all(p.grad is None for p in params)
    stash.apply()
    for p, g in zip(params, g1):
        torch.testing.assert_close(p.grad, g)


def test_param_without_step_grad_keeps_earlier(g0_g1: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    """A parameter the step does not reach keeps its earlier gradient, untouched by apply."""
    g0, _ = g0_g1
    layer, params = make_params()
    backward(layer, 1.0)
    stash = GradStash()
    before = stash.begin(params)
    layer.weight.grad = torch.ones_like(layer.weight)  # only the weight gets a step gradient
    stash.end(params, before)
    stash.apply()
    torch.testing.assert_close(layer.weight.grad, g0[0] + 1)
    torch.testing.assert_close(layer.bias.grad, g0[1])


def test_accumulation_over_two_steps(g0_g1: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    """Two steps of one accumulation window, no zeroing in between: the gradients sum."""
    g0, g1 = g0_g1
    layer, params = make_params()
    stash = GradStash()
    run_step(stash, layer, params, 1.0)
    stash.apply()
    run_step(stash, layer, params, 3.0)
    stash.apply()
    for p, a, b in zip(params, g0, g1):
        torch.testing.assert_close(p.grad, a + b)


# --- ReplicatedParams ----------------------------------------------------------------------------------------


def test_replicated_params_resolves_alias_held_here() -> None:
    """A weight tied between block 0 (stage 0) and block 3 (stage 1): stage 1 kept it only as blocks.3."""
    torch.manual_seed(0)
    model = TinyGPT()
    model.blocks[3].fc1.weight = model.blocks[0].fc1.weight
    placement = plan_placement(model, "blocks", [2, 2])
    tables = {}
    for stage in (0, 1):
        copy_ = copy.deepcopy(model)
        path, chain = find_chain(copy_, None)
        split_chain(copy_, path, chain, counts=[2, 2], stages=stage)
        tables[stage] = (copy_, ReplicatedParams(placement.replicated_names, placement.replicated_shapes,
                                                 placement.replicated_owners, stage, copy_))
    i = placement.replicated_names.index(["blocks.0.fc1.weight", "blocks.3.fc1.weight"])
    model0, table0 = tables[0]
    model1, table1 = tables[1]
    assert table0.names[i] == table1.names[i] == "blocks.0.fc1.weight"
    assert "blocks.0.fc1.weight" not in dict(model1.named_parameters(remove_duplicate=False))
    assert table0.params[i] is model0.blocks[0].fc1.weight
    assert table1.params[i] is model1.blocks[3].fc1.weight
    j = placement.replicated_names.index(["tok.weight", "head.weight"])
    assert table1.params[j] is model1.tok.weight is model1.head.weight
    assert len(table0) == len(table1) == len(placement.replicated_names)
    assert table0.count_here == [True] * len(table0)
    assert table1.count_here == [False] * len(table1)


def test_replicated_params_missing_and_count_here() -> None:
    """A parameter this module holds under no alias is None; only the lowest owner counts its norm."""
    module = nn.Linear(2, 2)
    aliases = [["weight"], ["gone.weight", "other.weight"], ["bias"]]
    shapes = [torch.Size([2, 2]), torch.Size([3]), torch.Size([2])]
    owners = [[1, 2], [0, 2], [2, 3]]
    expected = {0: [False, True, False], 1: [True, False, False], 2: [False, False, True], 3: [False] * 3}
    for stage, count_here in expected.items():
        table = ReplicatedParams(aliases, shapes, owners, stage, module)
        assert table.count_here == count_here
        assert table.names == ["weight", "gone.weight", "bias"]
        assert table.params[0] is module.weight and table.params[1] is None and table.params[2] is module.bias


def test_sum_grads_leaves_no_gradient_where_no_stage_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stages sharing ``tok`` (frozen) and ``aux``: ``aux.weight`` has a gradient on stage 1 only, ``aux.bias``
    on neither. After the sum both stages hold stage 1's ``aux.weight`` gradient and no gradient for the others, so
    an optimizer with weight decay leaves them as one device would."""
    from lightning_pipe.strategy import grads as grads_module

    def module(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = nn.Module()
        m.tok, m.aux = nn.Embedding(4, 3), nn.Linear(3, 3)
        m.tok.weight.requires_grad_(False)
        return m

    aliases = [["tok.weight"], ["aux.weight"], ["aux.bias"]]
    stages = {s: module(0) for s in (0, 1)}
    stages[1].aux.weight.grad = torch.full((3, 3), 2.0)
    tables = {s: ReplicatedParams(aliases, [p.shape for p in m.parameters()], [[0, 1]] * 3, s, m)
              for s, m in stages.items()}
    captured: list[torch.Tensor] = []
    monkeypatch.setattr(grads_module.dist, "all_reduce", lambda t, group=None: captured.append(t.clone()))
    tables[1].sum_grads(None)  # stage 1's contribution, taken as is
    monkeypatch.setattr(grads_module.dist, "all_reduce", lambda t, group=None: t.add_(captured[0]))
    tables[0].sum_grads(None)
    m = stages[0]
    assert m.tok.weight.grad is None and m.aux.bias.grad is None
    assert torch.equal(m.aux.weight.grad, torch.full((3, 3), 2.0))
    before = [p.detach().clone() for p in m.parameters()]
    torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1).step()
    assert torch.equal(m.tok.weight, before[0]) and torch.equal(m.aux.bias, before[2])
    assert not torch.equal(m.aux.weight, before[1])


def test_sum_grads_keeps_each_gradient_in_its_own_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 embedding listed first beside fp32 parameters: the fp32 gradients are summed in fp32, not rounded to
    bf16 (one all-reduce per dtype); a rank not holding a parameter learns its dtype from the ranks that do."""
    from lightning_pipe.strategy import grads as grads_module

    def module() -> nn.Module:
        m = nn.Module()
        m.tok, m.aux = nn.Embedding(4, 3).to(torch.bfloat16), nn.Linear(3, 3)
        return m

    aliases = [["tok.weight"], ["aux.weight"], ["aux.bias"]]
    shapes = [torch.Size([4, 3]), torch.Size([3, 3]), torch.Size([3])]
    m = module()
    fine = 1.0 + 2.0**-20  # rounds to 1.0 in bf16
    m.aux.weight.grad = torch.full((3, 3), fine)
    m.aux.bias.grad = torch.full((3,), fine)
    m.tok.weight.grad = torch.ones(4, 3, dtype=torch.bfloat16)
    table = ReplicatedParams(aliases, shapes, [[0, 1]] * 3, 0, m)
    elsewhere = ReplicatedParams(aliases, shapes, [[0, 1]] * 3, 1, nn.Module())  # holds none of them
    assert elsewhere.dtypes == [torch.float32] * 3
    codes: list[torch.Tensor] = []
    monkeypatch.setattr(grads_module.dist, "all_reduce", lambda t, op=None, group=None: codes.append(t.clone()))
    table.agree_dtypes(None, torch.device("cpu"))  # the holder's codes, as sent
    assert table.dtypes == [torch.bfloat16, torch.float32, torch.float32]
    monkeypatch.setattr(grads_module.dist, "all_reduce",
                        lambda t, op=None, group=None: t.copy_(torch.maximum(t, codes[0])))
    elsewhere.agree_dtypes(None, torch.device("cpu"))
    assert elsewhere.dtypes == table.dtypes
    reduced: list[torch.Tensor] = []
    monkeypatch.setattr(grads_module.dist, "all_reduce", lambda t, group=None: reduced.append(t.clone()))
    table.sum_grads(None)
    assert sorted(str(t.dtype) for t in reduced) == ["torch.bfloat16", "torch.float32"]
    assert torch.equal(m.aux.weight.grad, torch.full((3, 3), fine)) and m.aux.weight.grad.dtype == torch.float32
    assert m.tok.weight.grad.dtype == torch.bfloat16


def test_a_rank_without_inf_flags_still_joins_the_agreement(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage with no gradients (all frozen) records no inf flag; it must still enter the all-reduce the other
    stages wait in, and it takes their verdict."""
    from lightning_pipe.strategy import grads as grads_module

    reduced: list[torch.Tensor] = []

    def all_reduce(t: torch.Tensor, op: Any = None, group: Any = None) -> None:
        reduced.append(t.clone())
        t.fill_(1.0)  # another stage overflowed

    monkeypatch.setattr(grads_module.dist, "all_reduce", all_reduce)
    grads_module.agree_found_inf([], None)
    assert [t.tolist() for t in reduced] == [[0.0]]
    flags = [torch.zeros(1), torch.zeros(1)]  # two devices, no overflow here
    grads_module.agree_found_inf(flags, None)
    assert reduced[-1].tolist() == [0.0] and [f.item() for f in flags] == [1.0, 1.0]
