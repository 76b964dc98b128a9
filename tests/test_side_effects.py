"""OutsideState: what a stage's step did to buffers and metrics outside the chain is undone exactly."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.aggregation import CatMetric, SumMetric

from lightning_pipe.strategy.side_effects import OutsideState


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.total, self.values = SumMetric(), CatMetric()


def _state(model: _Model) -> OutsideState:
    names = [name for name, _ in model.named_buffers()]
    return OutsideState(model, names, lambda: [model.total, model.values])


def test_buffers_and_metrics_are_put_back() -> None:
    model = _Model()
    model.total.update(torch.tensor(2.0))
    model.values.update(torch.tensor([1.0]))
    count, mean = model.count, model.norm.running_mean
    restore = _state(model).snapshot()
    model.count += 5  # in place
    model.norm(torch.randn(4, 3))  # running statistics, num_batches_tracked
    model.total.update(torch.tensor(3.0))
    model.values.update(torch.tensor([7.0, 8.0]))
    assert int(model.count) == 5 and float(model.total.compute()) == 5.0
    restore()
    assert model.count is count and int(model.count) == 0
    assert model.norm.running_mean is mean and torch.equal(mean, torch.zeros(3))
    assert int(model.norm.num_batches_tracked) == 0
    assert model.total._update_count == 1 and float(model.total.compute()) == 2.0
    assert model.values.compute().reshape(-1).tolist() == [1.0]
    # Updates after the restore count from the restored state.
    model.total.update(torch.tensor(1.0))
    assert float(model.total.compute()) == 3.0


def test_a_rebound_buffer_gets_its_object_back() -> None:
    model = _Model()
    original = model.count
    restore = _state(model).snapshot()
    model.count = model.count + 1  # a new tensor under the same name
    restore()
    assert model.count is original and int(model.count) == 0


def test_a_buffer_saved_by_autograd_can_be_restored_before_the_backward() -> None:
    """The restore must not count as an in-place write for autograd: the stage's backward runs after it."""
    model = _Model()
    model.register_buffer("scale", torch.ones(3))
    restore = OutsideState(model, ["scale"], lambda: []).snapshot()
    x = torch.randn(3, requires_grad=True)
    y = (x * model.scale).sum()  # saves `scale` for the backward
    restore()
    y.backward()
    assert torch.equal(x.grad, torch.ones(3))
