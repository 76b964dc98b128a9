"""Gradient bookkeeping across stages: keeping step gradients aside for Lightning's closure, summing the gradients
of parameters held by several stages, the global gradient norm, and agreeing on a GradScaler's inf check."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GradStash", "AsyncGradAverage", "ReplicatedParams", "global_grad_norm", "clip_by_global_norm",
           "agree_found_inf",
           "make_scaler_agree"]


class GradStash:
    """Holds the gradients one pipelined step computed until Lightning's ``backward`` asks for them.

    Lightning zeroes gradients *after* ``training_step`` (on the first batch of an accumulation window), but the
    pipeline computes them inside it. :meth:`capture` runs the step on fresh gradients and puts the earlier ones
    back; :meth:`apply` then adds the step's gradients on top, exactly where ``loss.backward()`` would have.
    """

    def __init__(self) -> None:
        self._grads: list[tuple[nn.Parameter, torch.Tensor]] = []

    def begin(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor | None]:
        before = [p.grad for p in params]
        for p in params:
            p.grad = None
        return before

    def end(self, params: Sequence[nn.Parameter], before: Sequence[torch.Tensor | None]) -> None:
        self._grads = [(p, p.grad) for p in params if p.grad is not None]
        for p, g in zip(params, before):
            p.grad = g

    def apply(self) -> None:
        for p, g in self._grads:
            p.grad = g if p.grad is None else p.grad + g
        self._grads = []


class AsyncGradAverage:
    """Averages a step's gradients over the data-parallel replicas, started as soon as the pipeline's backward for
    the last batch of an accumulation window has ended, so the reduction overlaps what follows (the relay of logged
    values, Lightning's bookkeeping, and the stages still finishing their backward).

    Every trainable parameter takes part (zeros where a replica has no gradient), one buffer per dtype, so all
    replicas enter the same collectives; a parameter gets a gradient if any replica had one.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[dist.Work, torch.Tensor, list[tuple[nn.Parameter, int]]]] = []
        self._flags: tuple[dist.Work, torch.Tensor, list[nn.Parameter]] | None = None
        self._size = 1

    def start(self, params: Sequence[nn.Parameter], earlier: Sequence[torch.Tensor | None],
              group: dist.ProcessGroup | None, size: int, *, device: torch.device = torch.device("cpu")) -> None:
        """Start summing ``earlier + p.grad`` (the whole window's gradient) over ``group`` (``device``: the
        process group's, for the flags of a stage without parameters)."""
        buckets: dict[torch.dtype, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        flags = []
        for p, before in zip(params, earlier):
            grad = p.grad
            flags.append(float(grad is not None or before is not None))
            if grad is None and before is None:
                total = torch.zeros_like(p)
            else:
                total = grad if before is None else (before if grad is None else before + grad)
            buckets.setdefault(total.dtype, []).append((p, total))
        self._size = size
        for _, entries in sorted(buckets.items(), key=lambda kv: str(kv[0])):  # same order on every replica
            flat = torch.cat([t.reshape(-1) for _, t in entries])
            layout, offset = [], 0
            for p, t in entries:
                layout.append((p, offset))
                offset += t.numel()
            self._pending.append((dist.all_reduce(flat, group=group, async_op=True), flat, layout))
        flag_tensor = torch.tensor(flags, device=params[0].device if params else device)
        self._flags = (dist.all_reduce(flag_tensor, group=group, async_op=True), flag_tensor, list(params))

    def finish(self) -> bool:
        """Wait for the reductions started last and make each gradient the replicas' average; ``False`` if none."""
        if self._flags is None:
            return False
        work, flag_tensor, params = self._flags
        work.wait()
        has_grad = {id(p): bool(f) for p, f in zip(params, flag_tensor.tolist())}
        for work, flat, layout in self._pending:
            work.wait()
            flat /= self._size
            for p, offset in layout:
                p.grad = flat[offset : offset + p.numel()].view_as(p) if has_grad[id(p)] else None
        self._pending, self._flags = [], None
        return True


class ReplicatedParams:
    """Parameters held by several stages (modules outside the chain, weights tied across stages).

    ``names`` is the same ordered list on every rank; a rank that does not hold one contributes zeros, so every
    rank enters the same all-reduce. ``count_here[i]`` marks the parameters whose norm this rank counts (the
    lowest stage holding it), so a global norm counts each once.
    """

    def __init__(self, aliases: list[list[str]], shapes: list[torch.Size], owners: list[list[int]], stage: int,
                 module: nn.Module) -> None:
        self.names = [a[0] for a in aliases]
        self.shapes = shapes
        self.owners = owners
        held = dict(module.named_parameters(remove_duplicate=False))
        # A parameter tied between blocks of two stages is found under whichever of its names this rank kept.
        self.params: list[nn.Parameter | None] = [next((held[n] for n in a if n in held), None) for a in aliases]
        self.count_here = [min(o) == stage for o in owners]
        # Each parameter's dtype, also where this rank does not hold it, and the device of the all-reduce (a rank
        # holding none of them must still enter it with a tensor of the group's device): see agree_dtypes.
        self.dtypes = [p.dtype if p is not None else torch.float32 for p in self.params]
        self.device = next((p.device for p in self.params if p is not None), torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.names)

    def agree_dtypes(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        """Learn the dtype of each parameter from the ranks holding it (after the precision plugin converted the
        module), so that every rank sums and broadcasts it in its own dtype: one small all-reduce."""
        if not self.names:
            return
        codes = torch.tensor([_DTYPES.index(p.dtype) if p is not None else -1 for p in self.params],
                             dtype=torch.int64, device=device)
        dist.all_reduce(codes, op=dist.ReduceOp.MAX, group=group)
        self.dtypes = [_DTYPES[c] for c in codes.tolist()]
        self.device = torch.device(device)

    def sum_grads(self, group: dist.ProcessGroup | None) -> None:
        """Sum each replicated parameter's gradient over the stages, in one all-reduce per dtype (each in its own:
        an fp32 gradient beside a bf16 embedding is not rounded to bf16). A parameter that no stage has a gradient
        for (frozen, or unused in this step) keeps ``grad = None``, as on one device: optimizers skip it then, where
        a zero gradient would still get weight decay and momentum."""
        if not self.names:
            return
        device = self.device
        flags = [float(p is not None and p.grad is not None) for p in self.params]
        kinds = sorted(set(self.dtypes), key=str)
        summed: list[tuple[list[int], torch.Tensor]] = []
        for dtype in kinds:
            members = [i for i, d in enumerate(self.dtypes) if d == dtype]
            flats = [self.params[i].grad.reshape(-1).to(dtype) if flags[i]  # type: ignore[union-attr]
                     else torch.zeros(self.shapes[i].numel(), device=device, dtype=dtype) for i in members]
            if dtype is kinds[0]:  # how many stages had each gradient (small integers: exact in any dtype)
                flats.append(torch.tensor(flags, device=device, dtype=dtype))
            buffer = torch.cat(flats)
            dist.all_reduce(buffer, group=group)
            summed.append((members, buffer))
        had = summed[0][1][-len(flags):].tolist()
        seen: set[int] = set()
        for members, buffer in summed:
            offset = 0
            for i in members:
                p, shape = self.params[i], self.shapes[i]
                n = shape.numel()
                if p is not None and id(p) not in seen and had[i] > 0:
                    seen.add(id(p))
                    grad = buffer[offset : offset + n].view(shape).to(p.dtype)
                    p.grad = grad.clone() if p.grad is None else p.grad.copy_(grad)
                offset += n


# Every dtype torch has, in a fixed order (the same on every rank): codes for agree_dtypes.
_DTYPES = sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


# Where torch's clip_grad_norm_ leaves the total norm: in the gradients' dtype (widest of those present).
_NORM_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def global_grad_norm(params: Iterable[nn.Parameter], counted: set[int], group: dist.ProcessGroup | None, *,
                     device: torch.device | None = None) -> torch.Tensor:
    """The 2-norm of every stage's gradients together (what Lightning's norm clipping uses); ``counted`` holds the ids
    of the parameters this rank counts. As ``torch.nn.utils.clip_grad_norm_`` on one device: each gradient's norm in
    its own dtype, the total in the gradients' dtype (float64 for a float64 model, bfloat16 for a bfloat16 one),
    summed here in float64 over the stages so that only that last rounding is left. ``device``: the group's (a
    rank without gradients to count still enters the all-reduce)."""
    grads = [p.grad for p in params if p.grad is not None and id(p) in counted]
    if device is None:
        device = grads[0].device if grads else torch.device("cpu")
    # One float64 all-reduce: the sum of squares, and how many gradients of each dtype there are (the widest
    # present on any rank is the total's dtype, the same on every rank).
    packed = torch.zeros(1 + len(_NORM_DTYPES), dtype=torch.float64, device=device)
    for g in grads:
        packed[0] += torch.linalg.vector_norm(g.detach()).double() ** 2
        packed[1 + (_NORM_DTYPES.index(g.dtype) if g.dtype in _NORM_DTYPES else 2)] += 1
    dist.all_reduce(packed, group=group)
    present = [i for i, n in enumerate(packed[1:].tolist()) if n > 0]
    return packed[0].sqrt().to(_NORM_DTYPES[max(present, default=2)])


def clip_by_global_norm(params: Sequence[nn.Parameter], max_norm: float, counted: set[int],
                        group: dist.ProcessGroup | None, *, device: torch.device | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the union of all stages' parameters."""
    total = global_grad_norm(params, counted, group, device=device)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return total


def agree_found_inf(found_inf: Sequence[torch.Tensor], group: dist.ProcessGroup | None,
                    device: torch.device | str = "cpu") -> None:
    """Make a GradScaler's per-device inf flags the maximum over all stages, so all stages skip the same steps.
    One flag per rank enters the all-reduce, also from a rank with no flags (no gradients at all: a frozen stage),
    which must not leave the others waiting in it; ``device``: where that flag lives (the scaler's)."""
    mine = torch.stack([f.reshape(()).float() for f in found_inf]).max().reshape(1) if found_inf else \
        torch.zeros(1, device=device)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)
    for f in found_inf:
        f.copy_(mine.to(f.device, f.dtype).reshape(f.shape))


def make_scaler_agree(scaler: torch.amp.GradScaler, group: dist.ProcessGroup | None) -> None:
    """Make a GradScaler work on a pipeline stage: its inf flags are agreed over ``group`` once it has checked them
    (in ``unscale_``, or in ``step`` for an optimizer that unscales inside its own step, such as fused AdamW), so a
    stage whose gradients overflowed makes every stage skip the step and lower the scale alike."""
    unscale, step, check = scaler.unscale_, scaler.step, scaler._check_inf_per_device

    def make_scale() -> None:
        if scaler.is_enabled() and scaler._scale is None:
            # Only the stage computing the loss calls scale(), which creates the scale on first use; the others
            # received gradients scaled by the same factor (every rank's scaler starts at init_scale and, with the
            # inf flags agreed, updates alike), so they make theirs the same way.
            scaler.scale(torch.zeros((), device=getattr(scaler, "_device", "cpu")))

    def agree(optimizer: torch.optim.Optimizer) -> None:
        found_inf = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        if not found_inf:
            # No gradient on this stage (frozen): the scaler recorded no check, and its step() and update() would
            # raise "No inf checks were recorded" here alone. Record the agreed flag instead, so this stage skips
            # and rescales with the others (stepping an optimizer without gradients changes nothing).
            assert scaler._scale is not None
            found_inf[scaler._scale.device] = torch.zeros(1, device=scaler._scale.device)
        agree_found_inf(list(found_inf.values()), group)

    def unscale_and_agree(optimizer: torch.optim.Optimizer) -> None:
        make_scale()
        unscale(optimizer)
        if scaler.is_enabled():  # alike on every rank
            agree(optimizer)

    def check_and_agree(optimizer: torch.optim.Optimizer) -> dict[Any, torch.Tensor]:
        found_inf = check(optimizer)
        agree(optimizer)
        return found_inf

    def make_scale_and_step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        make_scale()
        return step(optimizer, *args, **kwargs)

    scaler.unscale_ = unscale_and_agree  # type: ignore[method-assign]
    scaler._check_inf_per_device = check_and_agree  # type: ignore[method-assign]
    scaler.step = make_scale_and_step  # type: ignore[method-assign]
