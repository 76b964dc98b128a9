"""Worker functions for the engine's multi-process tests (run by ``_launch.launch``)."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_pipe.engine import (
    ModuleStages,
    PipelineExecutor,
    ShmTransport,
    Transport,
    make_transport,
    microbatch_weights,
    split_microbatches,
    split_sequential,
)
from lightning_pipe.schedules import build_schedule, stage_to_rank


class MaskedBlock(nn.Module):
    """A transformer block that passes a nested value on: ``(hidden, {"mask": bool tensor, "seq_len": int})``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)

    def forward(self, value: tuple[torch.Tensor, dict[str, Any]]) -> tuple[torch.Tensor, dict[str, Any]]:
        x, extra = value
        assert extra["seq_len"] == x.shape[1]  # the non-tensor leaf crossed stages intact
        return self.layer(x, src_key_padding_mask=extra["mask"]), extra


class Unpack(nn.Module):
    """Takes the hidden state out of ``(hidden, extra)`` so the last stage ends in a plain tensor."""

    def forward(self, value: tuple[torch.Tensor, dict[str, Any]]) -> torch.Tensor:
        return value[0]


@dataclasses.dataclass
class Hidden:
    """A dataclass crossing stages, holding a complex tensor too (both carry gradients back) and a field that
    ``__init__`` does not set."""

    h: torch.Tensor
    z: torch.Tensor
    label: str = "hidden"
    hops: int = dataclasses.field(init=False, default=0)


class Wrap(nn.Module):
    def forward(self, x: torch.Tensor) -> Hidden:
        return Hidden(x, torch.complex(x, -x))


class DataBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, value: Hidden) -> Hidden:
        assert isinstance(value, Hidden) and value.label == "hidden", type(value)
        h = torch.tanh(self.linear(value.h)) + 0.1 * value.z.real * value.z.imag
        # Updated in place, as model code often does: the received tensors are replaced in their container.
        value.z = torch.complex(h, 0.5 * h) * value.z.abs().clamp(max=2.0)
        value.h = h
        value.hops += 1
        return value


class Unwrap(nn.Module):
    def forward(self, value: Hidden) -> torch.Tensor:
        assert value.hops == 6, value.hops  # the non-init field crossed every stage
        return value.h + value.z.real


def make_model(kind: str) -> nn.Sequential:
    torch.manual_seed(1234)
    if kind == "dataclass":
        return nn.Sequential(Wrap(), *[DataBlock(16) for _ in range(6)], Unwrap())
    if kind == "mlp":
        layers: list[nn.Module] = []
        for i in range(8):
            layers.append(nn.Linear(16, 16))
            if i < 7:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)
    return nn.Sequential(*[MaskedBlock(16, 2) for _ in range(12)], Unpack())


def make_batch(kind: str, step: int, batch_size: int) -> tuple[Any, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    if kind in ("mlp", "dataclass"):
        return torch.randn(batch_size, 16, generator=g), torch.randn(batch_size, 16, generator=g)
    seq = 5 + 3 * step  # the sequence length changes between steps
    x = torch.randn(batch_size, seq, 16, generator=g)
    mask = torch.zeros(batch_size, seq, dtype=torch.bool)
    mask[:, -1] = step % 2 == 1  # pad the last position on odd steps
    return (x, {"mask": mask, "seq_len": seq}), torch.randn(batch_size, seq, 16, generator=g)


def _balance(n: int, p: int) -> list[int]:
    base, extra = divmod(n, p)
    return [base + (1 if i < extra else 0) for i in range(p)]


def transparency(rank: int, world_size: int, *, models: list[str], schedules: list[str], ms: list[int],
                 steps: int = 2, batch_size: int = 10, unweighted: bool = False,
                 exact: bool = False, post_ahead: int | None = None, one_group: bool = False,
                 background: bool | None = None, shm: bool = False) -> dict[str, float]:
    """For each configuration, the largest |pipelined - reference| over this rank's loss and gradients.

    ``unweighted=True`` sums the micro-batch losses instead of weighting them: a control that must show a
    difference, so the comparison is known to be able to fail. ``post_ahead``: receives gloo keeps posted ahead.
    ``one_group`` (with ``exact``): no group of their own for messages to lower ranks. ``background``: the gloo
    transport's poster thread on (True), off (False) or chosen each step (None, as by default). ``shm``: through
    shared memory (``ShmTransport``), with rings small enough that the values move each pair to larger ones.
    """
    loss_fn = nn.MSELoss()
    report: dict[str, float] = {}
    # exact=True: the protocol used with NCCL (exact sizes, receives posted just in time, messages to lower ranks on
    # a group of their own), run here over gloo.
    # one_group: the exact protocol with both directions on one group (allowed over gloo only): matched by order
    # across both.
    reverse_group = None if one_group else dist.new_group(list(range(world_size))) if exact else None
    transport = Transport(exact=True, reverse_group=reverse_group, timeout=60) if exact \
        else ShmTransport(timeout=60, ring_bytes=1024) if shm else Transport(timeout=60, background=background)
    for kind in models:
        reference = make_model(kind)
        ref_grads, ref_losses = [], []
        for step in range(steps):
            x, y = make_batch(kind, step, batch_size)
            reference.zero_grad()
            loss = loss_fn(reference(x), y)
            loss.backward()
            ref_losses.append(loss.detach())
            ref_grads.append({n: p.grad.clone() for n, p in reference.named_parameters()})
        for spec in schedules:
            name, _, v_text = spec.partition(":")  # "zero_bubble:2": two chunks per rank
            v = int(v_text) if v_text else None
            name, early = name.removesuffix("+early"), name.endswith("+early")  # "1f1b+early": early_input_grads
            layout = stage_to_rank(name, num_ranks=world_size, virtual_stages=v)
            for m in ms:
                model = make_model(kind)
                pieces = split_sequential(model, _balance(len(model), len(layout)))
                names = {id(p): n for n, p in model.named_parameters()}
                held = {s: pieces[s] for s, r in enumerate(layout) if r == rank}
                mine = nn.ModuleList(held.values())
                worst = 0.0
                for step in range(steps):
                    x, y = make_batch(kind, step, batch_size)
                    micro_x, micro_y = split_microbatches(x, m), split_microbatches(y, m)
                    schedule = build_schedule(name, num_ranks=world_size, num_microbatches=len(micro_x),
                                              virtual_stages=v, early_input_grads=early)
                    executor = PipelineExecutor(schedule, rank=rank, timeout=60, transport=transport,
                                                post_ahead=post_ahead)
                    mine.zero_grad()
                    stages = ModuleStages(held, num_stages=len(layout), microbatches=micro_x,
                                          targets=micro_y, loss_fn=loss_fn)
                    weights = [1.0] * len(micro_x) if unweighted else microbatch_weights(micro_x)
                    result = executor.run(stages, loss_weights=weights)
                    if rank == layout[-1]:
                        total = sum(w * result.losses[i] for i, w in enumerate(microbatch_weights(micro_x)))
                        worst = max(worst, (total - ref_losses[step]).abs().item())
                    else:
                        assert not result.losses
                    for p in mine.parameters():
                        assert p.grad is not None, f"no gradient for {names[id(p)]}"
                        worst = max(worst, (p.grad - ref_grads[step][names[id(p)]]).abs().max().item())
                report[f"{kind}/{spec}/m={m}"] = worst
    return report


def _record_ops(transport: Transport, ops: list[tuple[Any, ...]]) -> None:
    """Log the transport's raw operations as tests/_nccl_model.py reads them (the group by name: "group" or
    "reverse"); the works are kept so that their ids stay theirs."""
    isend, irecv, wait = transport._isend, transport._irecv, transport._wait
    index: dict[int, int] = {}
    works: list[Any] = []

    def name(pg: Any) -> str:
        return "reverse" if transport.reverse_group is not None and pg is transport.reverse_group else "group"

    def traced_isend(tensor: torch.Tensor, peer: int, tag: int) -> Any:
        work = isend(tensor, peer, tag)
        works.append(work)
        index[id(work)] = len(ops)
        ops.append(("send", name(transport._pg[peer < transport._rank]), peer))
        return work

    def traced_irecv(tensor: torch.Tensor, peer: int, tag: int) -> Any:
        work = irecv(tensor, peer, tag)
        works.append(work)
        index[id(work)] = len(ops)
        ops.append(("recv", name(transport._pg[peer > transport._rank]), peer))
        return work

    def traced_wait(work: Any, peer: int, what: str) -> None:
        ops.append(("wait", index[id(work)]))
        wait(work, peer, what)

    transport._isend, transport._irecv, transport._wait = traced_isend, traced_irecv, traced_wait  # type: ignore


def exact_traces(rank: int, world_size: int, *, schedules: list[str], m: int) -> dict[str, list[tuple[Any, ...]]]:
    """One training step per schedule with the exact (NCCL) protocol over gloo, messages to lower ranks on a group
    of their own: this rank's raw transport operations, for tests/_nccl_model.py."""
    reverse = dist.new_group(list(range(world_size)))
    traces = {}
    for spec in schedules:
        name, _, v_text = spec.partition(":")
        v = int(v_text) if v_text else None
        name, early = name.removesuffix("+early"), name.endswith("+early")
        layout = stage_to_rank(name, num_ranks=world_size, virtual_stages=v)
        model = make_model("mlp")
        pieces = split_sequential(model, _balance(len(model), len(layout)))
        held = {s: pieces[s] for s, r in enumerate(layout) if r == rank}
        x, y = make_batch("mlp", 0, 2 * m)
        micro_x, micro_y = split_microbatches(x, m), split_microbatches(y, m)
        transport = Transport(exact=True, reverse_group=reverse, timeout=60)
        traces[spec] = ops = []
        _record_ops(transport, ops)
        schedule = build_schedule(name, num_ranks=world_size, num_microbatches=m, virtual_stages=v,
                                  early_input_grads=early)
        PipelineExecutor(schedule, rank=rank, timeout=60, transport=transport).run(
            ModuleStages(held, num_stages=len(layout), microbatches=micro_x, targets=micro_y, loss_fn=nn.MSELoss()))
    return traces


def failing_step(rank: int, world_size: int, *, fail_rank: int, mode: str, timeout: float,
                 background: bool | None = None, train: bool = True, microbatches: int = 4,
                 shm: bool = False) -> str:
    """Run 1F1B steps in which ``fail_rank`` raises (``mode="raise"``), dies (``"exit"``) or stalls (``"hang"``)
    in the middle of the second step (``background``, ``shm``: as in :func:`transparency`; ``train=False``: that
    step runs the forwards only)."""
    model = make_model("mlp")
    mine = split_sequential(model, _balance(len(model), world_size))[rank]
    x, y = make_batch("mlp", 0, 2 * microbatches)
    micro_x, micro_y = split_microbatches(x, microbatches), split_microbatches(y, microbatches)
    executor = PipelineExecutor(build_schedule("1f1b", num_ranks=world_size, num_microbatches=microbatches),
                                rank=rank,
                                transport=ShmTransport(timeout=timeout) if shm else
                                Transport(timeout=timeout, background=background))
    stages = ModuleStages({rank: mine}, num_stages=world_size, microbatches=micro_x, targets=micro_y,
                          loss_fn=nn.MSELoss())

    def forward_fn(stage: int, microbatch: int, inputs: Any) -> Any:
        if rank == fail_rank and microbatch == 2:
            if mode == "raise":
                raise ValueError("injected failure in the user's forward")
            if mode == "exit":
                os._exit(3)  # a crash that says nothing
            time.sleep(4 * timeout)  # far past the peers' timeout, yet bounded
            raise TimeoutError("stalled on purpose")
        return stages(stage, microbatch, inputs)

    executor.run(stages)  # one clean step first: the failure comes in the middle of a later one
    try:
        executor.run(forward_fn, train=train)
    except Exception as first:
        try:
            executor.run(stages)  # messages of the failed step may be in flight: must refuse, not mix them up
        except Exception as second:  # noqa: BLE001
            first.add_note(f"then: {second}")
        raise
    return "finished"


def out_of_order(rank: int, world_size: int, *, exact: bool) -> tuple[float, int]:
    """A hand-made 2-rank schedule whose second rank needs micro-batch 1's activation before micro-batch 0's, while
    the first rank sends them in order: over the exact protocol (messages matched by order, as NCCL does) the
    executor must receive micro-batch 0 first and keep it. Returns the largest |gradient - reference| and the
    receives posted before the first action's compute."""
    from lightning_pipe.schedules import B, F, Schedule

    schedule = Schedule("out-of-order", 2, 2, (0, 1),
                        ((F(0, 0), F(1, 0), B(1, 0), B(0, 0)), (F(1, 1), B(1, 1), F(0, 1), B(0, 1))))
    loss_fn = nn.MSELoss()
    reference = make_model("mlp")
    x, y = make_batch("mlp", 0, 8)
    loss_fn(reference(x), y).backward()
    model = make_model("mlp")
    names = {id(p): n for n, p in model.named_parameters()}
    mine = split_sequential(model, _balance(len(model), 2))[rank]
    transport = Transport(exact=True, reverse_group=dist.new_group([0, 1]), timeout=60) if exact else None
    executor = PipelineExecutor(schedule, rank=rank, timeout=60, transport=transport)
    micro_x, micro_y = split_microbatches(x, 2), split_microbatches(y, 2)
    stages = ModuleStages({rank: mine}, num_stages=2, microbatches=micro_x, targets=micro_y, loss_fn=loss_fn)
    posted = [0]  # receives posted so far
    before_first: list[int] = []  # receives posted when the first compute began
    recv = executor.transport.recv

    def counted_recv(*args: Any, **kwargs: Any) -> Any:
        posted[0] += 1
        return recv(*args, **kwargs)

    executor.transport.recv = counted_recv  # type: ignore[method-assign]

    def forward_fn(stage: int, microbatch: int, inputs: Any) -> Any:
        if not before_first:
            before_first.append(posted[0])
        return stages(stage, microbatch, inputs)

    executor.run(forward_fn)
    ref = dict(reference.named_parameters())
    return (max((p.grad - ref[names[id(p)]].grad).abs().max().item() for p in mine.parameters()),
            before_first[0])


def _sequence_value(i: int) -> Any:
    """The ``i``-th value of :func:`message_sequence`: runs of one layout, broken by other shapes, flags, trees,
    leaves and a value too large for the receive buffer."""
    g = torch.Generator().manual_seed(i)
    kinds = ["a", "a", "a", "wide", "grad", "tree3", "tree3", "tree4", "a", "big", "a", "a"]
    kind = kinds[i]
    if kind == "a":
        return torch.randn(4, 8, generator=g)
    if kind == "wide":
        return torch.randn(5, 8, generator=g)
    if kind == "grad":
        return torch.randn(5, 8, generator=g).requires_grad_()
    if kind.startswith("tree"):
        return (torch.randn(2, 3, generator=g), {"n": int(kind[-1]), "m": torch.ones(2, dtype=torch.bool)})
    return torch.randn(4000, generator=g)  # 16 KB: announced, then sent on the overflow tag


SEQUENCE_LENGTH = 12


def _check_sequence_value(i: int, value: Any) -> None:
    """``value`` is :func:`_sequence_value` ``i``: same tensors, flags and leaves."""
    expected = _sequence_value(i)
    got, want = (value[0], expected[0]) if isinstance(expected, tuple) else (value, expected)
    assert torch.equal(got.detach(), want.detach()) and got.requires_grad == want.requires_grad, i
    if isinstance(expected, tuple):
        assert value[1]["n"] == expected[1]["n"] and torch.equal(value[1]["m"], expected[1]["m"]), i


class _PolicySpy:
    """Stands for a process group: records the scheduling policies of the guarded gloo I/O threads during each send
    and receive call, then makes the call."""

    def __init__(self, group: Any, threads: list[int]) -> None:
        self.group, self.threads, self.seen = group, threads, set()
        self.callers: set[str] = set()  # the names of the threads that made the calls

    def _record(self) -> None:
        self.seen.update(os.sched_getscheduler(t) for t in self.threads)
        self.callers.add(threading.current_thread().name)

    def send(self, *args: Any) -> Any:
        self._record()
        return self.group.send(*args)

    def recv(self, *args: Any) -> Any:
        self._record()
        return self.group.recv(*args)


def _io_guard_report(transport: Transport, spy: _PolicySpy | None) -> dict[str, Any]:
    threads = transport.io_guard.threads
    return {"guarded": len(threads), "disabled": transport.io_guard.disabled,
            "during_calls": sorted(spy.seen) if spy is not None else [],
            "after": sorted({os.sched_getscheduler(t) for t in threads}),
            "callers": sorted(spy.callers) if spy is not None else []}


def message_sequence(rank: int, world_size: int, *, background: bool) -> dict[str, Any]:
    """Rank 0 sends :func:`_sequence_value` 0, 1, ... on one channel, then a failure notice; rank 1 keeps two
    receives posted ahead, as the executor does, and checks every value. Returns how many receives found the
    layout they had prepared for (the prepared views of the buffer) and how many parsed the message, and on each
    rank what the guard of gloo's I/O threads did (their policies during the group's calls and after) and which
    threads made the calls (``background``: the transport's poster thread, else the caller's)."""
    from lightning_pipe.errors import PipelineCommError

    transport = Transport(timeout=60, background=background)
    spy = None
    if sys.platform.startswith("linux"):
        spy = _PolicySpy(transport._pg[False], transport.io_guard.threads)
        transport._pg = {False: spy, True: spy}
    if rank == 0:
        for i in range(SEQUENCE_LENGTH):
            transport.send(_sequence_value(i), 1, i, f"value {i}", channel="c")
        transport.send_failure(RuntimeError("boom on purpose"), 1, SEQUENCE_LENGTH)
        transport.flush()
        transport.close()
        report = _io_guard_report(transport, spy)
        dist.barrier()  # stay until rank 1 has made its last receive post: leaving closes the connection
        return report
    counts: dict[str, Any] = {"prepared": 0, "parsed": 0}
    posted = [transport.recv(0, i, f"value {i}", channel="c") for i in range(2)]
    for i in range(SEQUENCE_LENGTH):
        pending = posted[i]
        value = pending.wait()
        prepared = pending._expected[1] if pending._expected is not None else None  # set once posted
        counts["prepared" if value is prepared and prepared is not None else "parsed"] += 1
        posted.append(transport.recv(0, i + 2, f"value {i + 2}", channel="c"))
        _check_sequence_value(i, value)
    try:
        posted[SEQUENCE_LENGTH].wait()
    except PipelineCommError as error:
        assert "boom on purpose" in str(error)
    else:
        raise AssertionError("the failure notice was not raised")
    # The receive still posted ahead may be inside its guarded gloo call on the poster thread right now; close()
    # lets the thread finish what was handed to it, so "after" reads the policy between calls, not during one.
    transport.close()
    report = _io_guard_report(transport, spy)
    dist.barrier()
    return {**counts, **report}


def bad_setups(rank: int, world_size: int) -> dict[str, str]:
    """Mistakes that must fail at once on every rank with the setting to change, not hang: a schedule for more
    ranks than the group has, a rank that is not this process's, a poster thread for the exact protocol, and a stage
    whose first op is in place."""
    from lightning_pipe.errors import PipelineError

    errors: dict[str, str] = {}
    for key, kwargs in (("ranks", dict(num_ranks=world_size + 1, rank=rank)),
                        ("rank", dict(num_ranks=world_size, rank=1 - rank))):
        schedule = build_schedule("1f1b", num_ranks=kwargs["num_ranks"], num_microbatches=2)
        try:
            PipelineExecutor(schedule, rank=kwargs["rank"], timeout=30)
        except PipelineError as err:
            errors[key] = str(err)
    try:
        Transport(exact=True, background=True)
    except ValueError as err:
        errors["background"] = str(err)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4))
    stages = {0: model[:1], 1: model[1:]}
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    schedule = build_schedule("1f1b", num_ranks=2, num_microbatches=2)
    executor = PipelineExecutor(schedule, rank=rank, timeout=30)
    try:
        executor.run(ModuleStages({rank: stages[rank]}, num_stages=2, microbatches=split_microbatches(x, 2),
                                  targets=split_microbatches(y, 2), loss_fn=nn.MSELoss()))
    except Exception as err:  # noqa: BLE001
        errors["inplace"] = f"{type(err).__name__}: {err}"
    return errors


def poster_modes(rank: int, world_size: int) -> dict[str, Any]:
    """The transport choosing its poster thread step by step (default mode), from scripted idle samples; then a
    value changed in place before the poster copied it. Rank 0 sends three values a step (one larger than the
    receive buffer in step 2), rank 1 checks them. Returns per step whether the poster was in use and which threads
    made the gloo calls, whether the same poster thread came back, whether an inference tensor crossed, and the
    in-place errors."""
    from lightning_pipe.errors import PipelineCommError, PipelineError

    transport = Transport(timeout=30)
    spy = _PolicySpy(transport._pg[False], [])
    transport._pg = {False: spy, True: spy}
    # (caller's busy share, machine's idle share) at the end of each step: idle, idle, half busy (stays on),
    # busy (off), idle (on again)
    samples = iter([(0.05, 0.9), (0.05, 0.9), (0.3, 0.9), (0.9, 0.1), (0.05, 0.9)])
    assert transport._meter is not None
    transport._meter.sample = lambda: next(samples)  # type: ignore[method-assign]
    report: dict[str, Any] = {"modes": [], "callers": [], "threads": []}
    for step in range(5):
        report["modes"].append(transport.posting_in_background)
        report["threads"].append(id(transport._poster) if transport._poster is not None else None)
        spy.callers.clear()
        values = [torch.full((3, 4), float(10 * step + i)) for i in range(3)]
        if step == 2:
            values[1] = torch.arange(5000.0)  # over the receive buffer: a notice, then the overflow tag
        if rank == 0:
            for i, value in enumerate(values):
                transport.send(value, 1, 10 * step + i, f"value {i} of step {step}")
        else:
            posted = [transport.recv(0, 10 * step + i, f"value {i} of step {step}") for i in range(3)]
            for pending, value in zip(posted, values):
                assert torch.equal(pending.wait(), value), step
        transport.flush()
        transport.end_step()
        report["callers"].append(sorted(spy.callers))
    report["modes"].append(transport.posting_in_background)
    report["same_thread"] = report["threads"][1] is not None and report["threads"][1] == id(transport._poster)
    # Inference tensors (Lightning validates under torch.inference_mode) keep no version counter; they still cross.
    with torch.inference_mode():
        value = torch.arange(12.0).view(3, 4) * 2
        if rank == 0:
            transport.send(value, 1, 90, "an inference tensor")
        else:
            report["inference"] = torch.equal(transport.recv(0, 90, "an inference tensor").wait(), value)
        transport.flush()
    # A value changed in place after send() returned, before the poster copied it (held up here on purpose): the
    # sender fails at flush, and the receiver is told why instead of waiting for the timeout.
    if rank == 0:
        gate = threading.Event()
        assert transport._poster is not None
        transport._poster.submit(lambda: gate.wait(10.0) and None)
        x = torch.ones(4)
        transport.send(x, 1, 100, "the activation of micro-batch 7")
        x.add_(1.0)
        gate.set()
        try:
            transport.flush()
        except PipelineError as error:
            report["in_place"] = str(error)
    else:
        try:
            transport.recv(0, 100, "the activation of micro-batch 7").wait()
        except PipelineCommError as error:
            report["in_place"] = str(error)
    transport.close()
    report["closed"] = not transport.posting_in_background
    # Rank 0 stays until rank 1 has read the failure notice: its send may still be in flight (the executor drains
    # it after a failure), and leaving closes the connection.
    dist.barrier()
    return report


def _shm_files(prefix: str = "lightning_pipe-") -> list[str]:
    from lightning_pipe.engine.shm import SHM_DIR

    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(prefix))


def _odd_values() -> list[Any]:
    """No tensor at all (a stage before a frozen one sends ``[None]`` as its input gradient; twice, so that the
    second is received into the value prepared from the first), an empty tensor, a transposed one, bfloat16, a
    parameter, a negative view."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=g)
    return [[None], [None], {"n": 1}, torch.empty(0), x.t(), x.to(torch.bfloat16), nn.Parameter(x.clone()),
            torch.randn(2, 2, dtype=torch.complex64, generator=g).conj().imag]


def shm_channels(rank: int, world_size: int) -> dict[str, Any]:
    """The shared-memory transport between two ranks. Rank 0 sends :func:`_sequence_value` 0, 1, ... on one channel
    (rings of 512 bytes: values pad to the ring's start and move the pair to larger rings), then two values on tags
    that rank 1 takes in the other order, then a failure notice; rank 1 keeps two receives posted ahead and checks
    every value, then sends one back. Also: no file left in /dev/shm once the channels are open; ``make_transport``
    picks shared memory here, and gloo (``"auto"``) or an error on every rank (``"shm"``) where the ranks report
    different hosts. Returns what rank 1 saw."""
    from lightning_pipe.engine import shm
    from lightning_pipe.errors import PipelineCommError, PipelineError

    before = _shm_files()
    transport = ShmTransport(timeout=60, ring_bytes=512)
    dist.barrier()  # each rank removes the pipes it made once every end has them open: both have done so now
    report: dict[str, Any] = {"left_after_setup": [f for f in _shm_files() if f not in before]}
    dist.barrier()  # before rank 0 makes rings
    if rank == 0:
        for i in range(SEQUENCE_LENGTH):
            transport.send(_sequence_value(i), 1, i, f"value {i}", channel="c")
        transport.send(torch.ones(3), 1, 100, "first")
        transport.send(torch.zeros(3), 1, 101, "second")
        for j, value in enumerate(_odd_values()):  # values the raw copy must leave to torch's, or copy right
            transport.send(value, 1, 200 + j, f"odd {j}")
        transport.send_failure(RuntimeError("boom on purpose"), 1, SEQUENCE_LENGTH)
        back = transport.recv(1, 7, "back").wait()
        assert torch.equal(back, torch.arange(5.0)), back
        report["generations"] = transport._outbound[1].generation
    else:
        report.update(prepared=0, parsed=0)
        posted = [transport.recv(0, i, f"value {i}", channel="c") for i in range(2)]
        for i in range(SEQUENCE_LENGTH):
            pending = posted[i]
            prepared = pending._prebuilt[1] if pending._prebuilt is not None else None
            value = pending.wait()
            report["prepared" if prepared is not None and value is prepared else "parsed"] += 1
            posted.append(transport.recv(0, i + 2, f"value {i + 2}", channel="c"))
            _check_sequence_value(i, value)
        second = transport.recv(0, 101, "second").wait()  # sent after "first", which waits in its queue
        first = transport.recv(0, 100, "first").wait()
        report["out_of_order"] = bool(torch.equal(first, torch.ones(3)) and torch.equal(second, torch.zeros(3)))
        report["odd"] = []
        for j, want in enumerate(_odd_values()):
            got = transport.recv(0, 200 + j, f"odd {j}").wait()
            if isinstance(want, torch.Tensor):
                report["odd"].append(got.dtype == want.dtype and got.shape == want.shape
                                     and bool(torch.equal(got.detach(), want.detach())))
            else:
                report["odd"].append(got == want)
        try:
            posted[SEQUENCE_LENGTH].wait()
        except PipelineCommError as error:
            report["failure"] = str(error)
        transport.send(torch.arange(5.0), 0, 7, "back")
        report["generations"] = transport._inbounds[0].generation
    dist.barrier()
    transport.close()
    dist.barrier()
    report["left_after_close"] = [f for f in _shm_files() if f not in before]
    # Ranks that report different hosts: "auto" falls back to gloo on every rank, "shm" raises on every rank.
    real = shm._host_key
    shm._host_key = lambda: (f"host{rank}", *real()[1:])  # type: ignore[misc]
    try:
        report["auto_elsewhere"] = type(make_transport(kind="auto", timeout=60)).__name__
        try:
            make_transport(kind="shm", timeout=60)
        except PipelineError as error:
            report["shm_elsewhere"] = str(error)
    finally:
        shm._host_key = real
    chosen = make_transport(kind="auto", timeout=60)
    report["auto_here"] = type(chosen).__name__
    chosen.close()
    report["gloo_here"] = type(make_transport(kind="gloo", timeout=60)).__name__
    dist.barrier()
    return report
