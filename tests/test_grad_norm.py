"""``lightning_pipe.grad_norm`` merging the stages' gradient norms (``lightning_pipe.strategy.grad_norm``), on one
process: stages cut from copies of one model with its gradients must give Lightning's ``grad_norm`` of the uncut
model. (``test_strategy_lightning`` logs it across processes and compares with one device.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import grad_norm as lightning_grad_norm

import lightning_pipe
from lightning_pipe.strategy.chain import find_chain, split_chain
from lightning_pipe.strategy.grad_norm import local_grad_norms, merge_grad_norms
from lightning_pipe.strategy.placement import plan_placement
from tests._models import SEQ, VOCAB, TinyGPT


def model_with_grads(body: str) -> TinyGPT:
    torch.manual_seed(0)
    model = TinyGPT(body=body, n_layer=4, tie_blocks=True)  # the first and last blocks share a weight
    find_chain(model, None)[1][1].fc1.weight.requires_grad_(False)  # frozen: no gradient, no entry
    idx = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(model(idx).reshape(-1, VOCAB), idx.reshape(-1)).backward()
    return model


@pytest.mark.parametrize("body", ["sequential", "modulelist"])
@pytest.mark.parametrize("layout", [[0, 1, 1, 2], [0, 1, 1, 0]], ids=["contiguous", "v_shape"])
@pytest.mark.parametrize("norm_type", [2, 1.0, "inf"])
def test_the_merged_norms_are_the_uncut_models(body: str, layout: list[int], norm_type: float | str) -> None:
    model = model_with_grads(body)
    order = [name for name, _ in model.named_parameters()]
    parts, aliases = [], {}
    for rank in sorted(set(layout)):
        stage = copy.deepcopy(model)
        for copied, param in zip(stage.parameters(), model.parameters()):  # deepcopy leaves the gradients out
            copied.grad = None if param.grad is None else param.grad.clone()
        path, chain = find_chain(stage, None)
        placement = plan_placement(stage, path, [1] * len(layout), layout)
        aliases = {n: names for names in placement.replicated_names for n in names}
        split_chain(stage, path, chain, counts=[1] * len(layout), stages=[s for s, r in enumerate(layout) if r == rank])
        parts.append(local_grad_norms(stage, norm_type))
    ours = merge_grad_norms(parts, norm_type, group_separator="/", order=order, aliases=aliases,
                            device=torch.device("cpu"))
    ref = lightning_grad_norm(model, norm_type)
    assert list(ours) == list(ref)  # the same names in the same order: a shared weight under its first name
    assert len(ref) == len(order) - 1 + 1  # one frozen weight left out, the total added
    for name, value in ref.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name


def test_outside_a_pipeline_it_is_lightnings() -> None:
    model = model_with_grads("sequential")
    assert list(lightning_pipe.grad_norm(model, 2)) == list(lightning_grad_norm(model, 2))
    with pytest.raises(ValueError, match="`norm_type` must be a positive number"):
        local_grad_norms(model, 0)
