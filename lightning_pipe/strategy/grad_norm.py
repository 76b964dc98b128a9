"""Lightning's ``grad_norm`` over the whole pipelined model.

``lightning.pytorch.utilities.grad_norm(self, 2)``, logged in ``on_before_optimizer_step``, sees the parameters of
this rank's stages only: rank 0's logger would record stage 0's layers, and a total over stage 0. :func:`grad_norm`
gathers every stage's per-parameter norms instead, so every rank gets the dictionary one device computes: the same
names in the same order (a parameter shared between stages under its first name), the same total.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import grad_norm as lightning_grad_norm
from torch import nn

__all__ = ["grad_norm", "gather_grad_norms", "local_grad_norms", "merge_grad_norms", "note_cut"]


def grad_norm(module: nn.Module, norm_type: float | int | str, group_separator: str = "/") -> dict[str, torch.Tensor]:
    """Each parameter's gradient norm and their total, as ``lightning.pytorch.utilities.grad_norm`` gives them on
    one device, for a LightningModule trained under ``PipelineStrategy`` or a submodule of it holding the chain of
    blocks (call it on every rank, e.g. in ``on_before_optimizer_step``: it gathers); elsewhere Lightning's own
    (a submodule outside the chain is whole on every stage)."""
    trainer = getattr(module, "_trainer", None)
    strategy = trainer.strategy if trainer is not None else _strategy_of_chain_in(module)
    gather = getattr(strategy, "grad_norms", None)
    if gather is None:
        return lightning_grad_norm(module, norm_type, group_separator)
    return gather(module, norm_type, group_separator=group_separator)


_CUT_BY: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def note_cut(chain: nn.Module, strategy: Any) -> None:
    """Record that ``strategy`` cut ``chain`` (weakly: neither is kept alive, and the model still pickles)."""
    _CUT_BY[chain] = weakref.ref(strategy)


def _strategy_of_chain_in(module: nn.Module) -> Any:
    for sub in module.modules():
        ref = _CUT_BY.get(sub)
        if ref is not None:
            return ref()
    return None


def gather_grad_norms(module: nn.Module, norm_type: float | int | str, *, group_separator: str, order: Sequence[str],
                      aliases: Mapping[str, Sequence[str]], group: dist.ProcessGroup | None, size: int,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """:func:`grad_norm` over the ``size`` ranks of ``group``, each holding some of the model's parameters; the
    norms on ``device``. ``order`` and ``aliases``: as :func:`merge_grad_norms` takes them."""
    mine = local_grad_norms(module, norm_type)
    everyone: list[dict[str, tuple[float, str]] | None] = [None] * size
    dist.all_gather_object(everyone, mine, group=group)
    return merge_grad_norms([part or {} for part in everyone], norm_type, group_separator=group_separator,
                            order=order, aliases=aliases, device=device)


def local_grad_norms(module: nn.Module, norm_type: float | int | str) -> dict[str, tuple[float, str]]:
    """Every name of each parameter with a gradient held here -> (its gradient's norm, the gradient's dtype)."""
    norm_type = float(norm_type)
    if norm_type <= 0:
        raise ValueError(f"`norm_type` must be a positive number or 'inf' (infinity norm). Got {norm_type}")
    held = [(name, p.grad) for name, p in module.named_parameters(remove_duplicate=False) if p.grad is not None]
    values = torch.stack([g.detach().norm(norm_type).double() for _, g in held]).tolist() if held else []
    return {name: (value, str(g.dtype).removeprefix("torch.")) for (name, g), value in zip(held, values)}


def merge_grad_norms(parts: Sequence[Mapping[str, tuple[float, str]]], norm_type: float | int | str, *,
                     group_separator: str, order: Sequence[str], aliases: Mapping[str, Sequence[str]],
                     device: torch.device) -> dict[str, torch.Tensor]:
    """One device's ``grad_norm`` from every rank's :func:`local_grad_norms`.

    ``order``: the whole model's parameter names as ``named_parameters()`` gives them on one device (each shared
    parameter once, under its first name); ``aliases``: every name of each parameter held by several ranks."""
    norm_type = float(norm_type)
    found: dict[str, tuple[float, str]] = {}
    for part in parts:
        for name, entry in part.items():
            found.setdefault(name, entry)
    norms = {}
    for name in order:
        entry = next((found[n] for n in aliases.get(name, [name]) if n in found), None)
        if entry is not None:
            value, dtype = entry
            norms[f"grad_{norm_type}_norm{group_separator}{name}"] = torch.tensor(value, dtype=getattr(torch, dtype),
                                                                                 device=device)
    if norms:  # as Lightning computes it
        norms[f"grad_{norm_type}_norm_total"] = torch.tensor(list(norms.values())).norm(norm_type)
    return norms
