"""Which stages hold each parameter, decided from the whole model before it is cut (the same on every rank)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lightning_pipe.partition import check_partition, optimal_partition, uniform_partition

__all__ = ["Placement", "plan_placement", "block_counts"]


def block_counts(chain: nn.Module, balance: str | list[int], num_stages: int) -> list[int]:
    """Blocks per stage for ``PipelineStrategy(balance=...)``."""
    n = len(chain)
    if isinstance(balance, str):
        if balance == "uniform":
            return uniform_partition(n, num_stages)
        # "parameters": the optimal contiguous cut by parameter count (a parameter shared by blocks counts once
        # in each block that holds it: each stage that holds it stores a copy)
        costs = [sum(p.numel() for p in block.parameters()) for block in chain]
        return optimal_partition(costs, num_stages)
    return check_partition(balance, num_blocks=n, num_stages=num_stages)


@dataclass(frozen=True)
class Placement:
    """``replicated``: for every parameter held by more than one rank, its names (aliases), shape and ranks."""

    replicated_names: list[list[str]]
    replicated_shapes: list[torch.Size]
    replicated_owners: list[list[int]]


def plan_placement(model: nn.Module, path: str, counts: list[int],
                   stage_to_rank: Sequence[int] | None = None) -> Placement:
    """Owners are pipeline ranks: stage ``s`` is held by ``stage_to_rank[s]`` (default: rank ``s``)."""
    layout = list(stage_to_rank) if stage_to_rank is not None else list(range(len(counts)))
    num_ranks = max(layout) + 1
    rank_of_block = [layout[s] for s, c in enumerate(counts) for _ in range(c)]
    chain = model.get_submodule(path) if path else model
    position = {key: i for i, key in enumerate(chain._modules)}  # keys may be names: nn.Sequential(OrderedDict)
    prefix = f"{path}." if path else ""
    everywhere = set(range(num_ranks))
    owners: dict[int, set[int]] = {}
    names: dict[int, list[str]] = {}
    shapes: dict[int, torch.Size] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        stages: set[int]
        if name.startswith(prefix):
            key = name[len(prefix):].split(".", 1)[0]
            stages = {rank_of_block[position[key]]} if key in position else everywhere
        else:
            stages = everywhere
        owners.setdefault(id(param), set()).update(stages)
        names.setdefault(id(param), []).append(name)
        shapes[id(param)] = param.shape
    replicated = [k for k in names if len(owners[k]) > 1]  # dict order: first appearance in the model
    return Placement(
        replicated_names=[names[k] for k in replicated],
        replicated_shapes=[shapes[k] for k in replicated],
        replicated_owners=[sorted(owners[k]) for k in replicated],
    )
