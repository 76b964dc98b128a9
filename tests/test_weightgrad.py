"""Backward split into B (input gradient) and W (weight gradient): same gradients, no work done twice."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_pipe.engine import WeightGradCollector, active_collector, deferring


class TiedHead(nn.Module):
    """An embedding and a head that reuses its weight through F.linear, as GPTs do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8, bias=False), nn.LayerNorm(8))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.linear(self.body(self.emb(idx)), self.emb.weight)


def grads_both_ways(model: nn.Module, x: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    model.zero_grad()
    model(x).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    collector = WeightGradCollector()
    with deferring(collector):
        out = model(x)
    out.square().mean().backward()  # B
    deferred = len(collector)
    collector.run()  # W
    split = {n: p.grad.clone() for n, p in model.named_parameters()}
    return plain, split, deferred


def test_tied_head_and_linear_layers_match_an_ordinary_backward() -> None:
    torch.manual_seed(0)
    model = TiedHead()
    plain, split, deferred = grads_both_ways(model, torch.randint(0, 11, (3, 5)))
    assert deferred == 3  # two Linear layers and the tied head
    for name in plain:
        torch.testing.assert_close(split[name], plain[name], rtol=1e-6, atol=1e-7)


def test_b_leaves_linear_weights_for_w_and_computes_the_rest() -> None:
    torch.manual_seed(0)
    model = TiedHead()
    collector = WeightGradCollector()
    with deferring(collector):
        out = model(torch.randint(0, 11, (2, 4)))
    out.sum().backward()
    assert model.body[0].weight.grad is None and model.body[0].bias.grad is None
    assert model.body[2].weight.grad is None
    assert model.body[3].weight.grad is not None  # LayerNorm: computed in B
    emb_after_b = model.emb.weight.grad.clone()  # the embedding's lookup gradient, in B
    collector.run()
    assert not torch.equal(model.emb.weight.grad, emb_after_b)  # W added the tied head's part
    assert len(collector) == 0


def test_w_adds_to_existing_gradients() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    layer(x).sum().backward()
    once = layer.weight.grad.clone()
    collector = WeightGradCollector()
    with deferring(collector):
        y = layer(x)
    y.sum().backward()
    collector.run()
    torch.testing.assert_close(layer.weight.grad, 2 * once)


def test_backward_work_is_not_done_twice() -> None:
    """B + W cost the floating-point operations of one ordinary backward, counted by torch's FLOP counter."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(8, 16, 64, requires_grad=True)

    out = block(x)
    with FlopCounterMode(display=False) as plain:
        out.sum().backward()
    collector = WeightGradCollector()
    with deferring(collector):
        out = block(x)
    with FlopCounterMode(display=False) as b:
        out.sum().backward()
    with FlopCounterMode(display=False) as w:
        collector.run()
    assert b.get_total_flops() > 0 and w.get_total_flops() > 0
    assert b.get_total_flops() + w.get_total_flops() == plain.get_total_flops()


def test_non_leaf_weights_and_no_grad_are_left_alone() -> None:
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 4))
    x = torch.randn(2, 4)
    collector = WeightGradCollector()
    with deferring(collector):
        y = F.linear(x, weight * 2)  # a computed weight: its gradient flows in B as usual
        with torch.no_grad():
            F.linear(x, weight)
    y.sum().backward()
    assert len(collector) == 0 and weight.grad is not None


def test_custom_function_can_defer_its_weight_gradient() -> None:
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, w)
            ctx.collector = active_collector()
            return x * w

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            x, w = ctx.saved_tensors
            if ctx.collector is None:
                return g * w, (g * x).sum(0)

            def weight_grad() -> None:
                w.grad = (g * x).sum(0) if w.grad is None else w.grad + (g * x).sum(0)

            ctx.collector.defer(weight_grad)
            return g * w, None

    w = nn.Parameter(torch.randn(3))
    x = torch.randn(4, 3)
    Scale.apply(x, w).sum().backward()
    expected = w.grad.clone()
    w.grad = None
    collector = WeightGradCollector()
    assert active_collector() is None
    with deferring(collector):
        assert active_collector() is collector
        y = Scale.apply(x, w)
    y.sum().backward()
    assert w.grad is None and len(collector) == 1
    collector.run()
    torch.testing.assert_close(w.grad, expected)


def test_autocast_bfloat16() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    expected = layer.weight.grad.clone()
    layer.zero_grad()
    collector = WeightGradCollector()
    with deferring(collector), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    collector.run()
    assert layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(6, 8), (2, 3, 8), (1, 2, 3, 8)])
def test_any_leading_dimensions(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 5)
    plain, split, _ = grads_both_ways(layer, torch.randn(*shape))
    for name in plain:
        torch.testing.assert_close(split[name], plain[name])




def test_activation_checkpointing_inside_a_block() -> None:
    """Checkpointed layers recompute their forward during B, outside the deferral: they are not deferred (their
    weight gradients come in B), so the recomputation saves what the forward saved; the others still wait for W."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    outer = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    outer(checkpoint(inner, x, use_reentrant=False)).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in [*inner.named_parameters("inner"), *outer.named_parameters("outer")]}
    inner.zero_grad()
    outer.zero_grad()
    collector = WeightGradCollector()
    with deferring(collector):
        y = outer(checkpoint(inner, x, use_reentrant=False))
    y.square().sum().backward()
    assert all(p.grad is not None for p in inner.parameters())  # checkpointed: computed in B
    assert outer.weight.grad is None and len(collector) == 1  # deferred to W
    collector.run()
    for name, p in [*inner.named_parameters("inner"), *outer.named_parameters("outer")]:
        torch.testing.assert_close(p.grad, expected[name])


@pytest.mark.parametrize("batch_first", [True, False])
def test_multi_head_attention_projections_are_deferred_and_match(batch_first: bool) -> None:
    """nn.MultiheadAttention computes its projections with torch.nn.functional's own ``linear``: the packed input
    projection (self-attention) and the output projection are deferred too, with the same gradients."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    x = torch.randn(3, 5, 16)
    plain, split, deferred = grads_both_ways(layer, x)
    assert deferred == 4  # in_proj, out_proj, linear1, linear2
    for name in plain:
        torch.testing.assert_close(split[name], plain[name], rtol=1e-5, atol=1e-6)


def test_linear_is_restored_and_other_threads_are_left_alone() -> None:
    import threading

    original = F.linear
    layer = nn.Linear(4, 4)
    seen: list[int] = []

    def other_thread() -> None:  # runs while the main thread defers: its linear must not be deferred
        collector = active_collector()
        layer(torch.randn(2, 4)).sum().backward()
        seen.append(0 if collector is None and layer.weight.grad is not None else 1)

    collector = WeightGradCollector()
    with deferring(collector):
        with deferring(WeightGradCollector()):  # nested
            assert F.linear is not original
        assert F.linear is not original
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert F.linear is original and seen == [0] and len(collector) == 0


def test_weights_with_gradient_hooks_get_their_gradient_in_b_through_the_hooks() -> None:
    """A hook registered on a weight (here masking rows, as partial fine-tuning does) must see the gradient when
    autograd makes it: such weights are not deferred to W."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    mask = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    seen = []
    model[0].weight.register_hook(lambda g: (seen.append(g.shape), g * mask)[1])
    accumulated = []
    model[1].weight.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.grad.clone()))
    plain, split, deferred = grads_both_ways(model, torch.randn(3, 4))
    assert deferred == 0  # both hooked weights (and their layers' biases) get their gradient in B, through the hooks
    assert seen == [(4, 4), (4, 4)] and len(accumulated) == 2
    assert split["0.weight"][2:].abs().sum() == 0
    for name in plain:
        torch.testing.assert_close(split[name], plain[name])
