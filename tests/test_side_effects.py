"""OutsideState: each held stage runs on its own buffers outside the chain; other stages' metric updates are undone."""

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
        self.register_buffer("mask", torch.ones(3), persistent=False)
        self.total, self.values = SumMetric(), CatMetric()


def _state(model: nn.Module, keeper: int = 1) -> OutsideState:
    names = [name for name, _ in model.named_buffers(remove_duplicate=False)]
    metrics = [m for m in model.modules() if isinstance(m, (SumMetric, CatMetric))]
    return OutsideState(model, names, lambda: metrics, keeper=keeper)


def test_other_stages_leave_buffers_and_metrics_as_they_were() -> None:
    model = _Model()
    model.total.update(torch.tensor(2.0))
    model.values.update(torch.tensor([1.0]))
    count, mean = model.count, model.norm.running_mean
    state = _state(model)
    state.begin_step()
    with state.running(0):
        model.count += 5  # in place
        model.norm(torch.randn(4, 3))  # running statistics, num_batches_tracked
        model.total.update(torch.tensor(3.0))
        model.values.update(torch.tensor([7.0, 8.0]))
        assert int(model.count) == 5 and float(model.total.compute()) == 5.0
    assert model.count is count and int(model.count) == 0
    assert model.norm.running_mean is mean and torch.equal(mean, torch.zeros(3))
    assert int(model.norm.num_batches_tracked) == 0
    assert model.total._update_count == 1 and float(model.total.compute()) == 2.0
    assert model.values.compute().reshape(-1).tolist() == [1.0]
    model.total.update(torch.tensor(1.0))  # updates after count from the restored state
    assert float(model.total.compute()) == 3.0


def test_each_stage_reads_and_updates_its_own_buffers() -> None:
    """Stage 0 must read the counter as one device would (its own history), not the keeper's lagging copy."""
    model = _Model()
    state = _state(model, keeper=1)
    seen: list[tuple[int, int]] = []
    for step in range(2):
        state.begin_step()
        for stage in (0, 0, 1, 0, 1, 1):  # stage 0 runs ahead of the keeper, as in a pipeline
            with state.running(stage):
                seen.append((stage, int(model.count)))
                model.count += 1
        assert int(model.count) == 3 * (step + 1)  # the keeper's copy: once per micro-batch
    assert seen == [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (1, 2),
                    (0, 3), (0, 4), (1, 3), (0, 5), (1, 4), (1, 5)]


def test_the_keeper_runs_on_the_visible_values() -> None:
    model = _Model()
    state = _state(model, keeper=3)
    state.begin_step()
    with state.running(3):
        model.count += 1
        model.total.update(torch.tensor(4.0))
    assert int(model.count) == 1 and float(model.total.compute()) == 4.0


def test_a_rebound_buffer_gets_its_object_back_under_every_name() -> None:
    model = nn.Module()
    model.a, model.b = nn.Module(), nn.Module()
    shared = torch.zeros(())
    model.a.register_buffer("n", shared)
    model.b.register_buffer("n", shared)
    state = _state(model, keeper=1)
    state.begin_step()
    with state.running(0):
        model.b.n = model.b.n + 1  # a new tensor under one of the names
    assert model.a.n is shared and model.b.n is shared and float(shared) == 0.0


def test_non_persistent_buffers_are_left_alone() -> None:
    model = _Model()
    state = _state(model)
    state.begin_step()
    with state.running(0):
        model.mask.mul_(2)
    assert torch.equal(model.mask, torch.full((3,), 2.0))


def test_copies_made_under_inference_mode_are_normal_tensors() -> None:
    """validate/test run under inference mode; the next fit updates the restored states in place."""
    model = _Model()
    state = _state(model)
    state.begin_step()
    with torch.inference_mode():
        with state.running(0):
            model.total.update(torch.tensor(1.0))
            model.count += 1
    assert not model.total.sum_value.is_inference() and not model.count.is_inference()
    model.total.update(torch.tensor(2.0))
    model.count += 1
    assert float(model.total.compute()) == 2.0 and int(model.count) == 1


def test_a_buffer_saved_by_autograd_can_be_restored_before_the_backward() -> None:
    """The restore must not count as an in-place write for autograd: the stage's backward runs after it."""
    model = _Model()
    model.register_buffer("scale", torch.ones(3))
    state = _state(model)
    state.begin_step()
    x = torch.randn(3, requires_grad=True)
    with state.running(0):
        y = (x * model.scale).sum()  # saves `scale` for the backward
        model.scale.data.mul_(3)
    y.backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_the_profile_puts_metrics_back_as_they_were() -> None:
    """balance="time" profiles the user's step on rank 0: a metric it updates is put back, state from before fit
    included (they were reset, which lost that state on rank 0 only)."""
    from lightning_pipe.strategy.profiling import _restore
    from lightning_pipe.strategy.side_effects import save_metric_states

    module = torch.nn.Module()
    module.total = SumMetric()
    module.total.update(torch.tensor(5.0))  # before fit
    saved = save_metric_states([module.total])
    module.total.update(torch.tensor(3.0))  # the profile's step
    _restore(module, {}, saved)
    assert float(module.total.compute()) == 5.0
    module.total.update(torch.tensor(1.0))
    assert float(module.total.compute()) == 6.0  # updates as before
