"""Runs one rank's actions of a schedule over its stage(s), moving values with :class:`Transport`.

The executor knows nothing of models or Lightning: the caller gives a ``forward_fn(stage, microbatch, inputs)``
that computes one stage for one micro-batch (``inputs`` is ``None`` on the first stage, which reads its own
micro-batch) and returns the stage output, or on the last stage the micro-batch's mean loss. The executor keeps
what backward needs, weights each loss by its micro-batch's share of the batch (so accumulated gradients equal the
full batch's), runs backward with the gradient received from the next stage, and sends input gradients back.
Under a schedule with W actions the forward runs under :func:`~lightning_pipe.engine.weightgrad.deferring`, so B
leaves the weight gradients of linear layers to the micro-batch's W (see ``weightgrad.py``).
"""

from __future__ import annotations

import functools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from lightning_pipe.engine.transport import PendingRecv, Transport, differentiable
from lightning_pipe.engine.tree import flatten, unflatten
from lightning_pipe.engine.weightgrad import WeightGradCollector, deferring
from lightning_pipe.errors import PipelineCommError, PipelineError, peers_reachable
from lightning_pipe.schedules.actions import Action, ActionKind, Schedule, Transfer

__all__ = ["ForwardFn", "ActionRecord", "StepResult", "PipelineExecutor"]

ForwardFn = Callable[[int, int, Any], Any]
"""``forward_fn(stage, microbatch, inputs) -> output``; on the last stage of a training step, the mean loss."""

_F, _B, _W = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.WEIGHT


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """When one action ran on this rank (``time.perf_counter`` seconds)."""

    action: Action
    ready: float
    """When the action's turn came (before waiting for its input)."""
    start: float
    """When its input was there and compute began."""
    end: float
    """When compute and the posting of its sends were done."""
    send: float = 0.0
    """Seconds at the end of the action spent packing and posting its send (the transfer itself completes in the
    background; with the transport's poster thread in use, only handing the value over); 0 when it sends nothing
    to another rank."""


@dataclass
class StepResult:
    """What one run of the schedule produced on this rank."""

    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per micro-batch, the unweighted loss (detached), on the rank of the last stage of a training step."""
    outputs: dict[int, Any] = field(default_factory=dict)
    """Per micro-batch, the last stage's output, on its rank, for a forward-only run."""
    records: list[ActionRecord] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    device_events: list[tuple[Any, Any]] | None = None
    """On a CUDA device: per record, CUDA events around its compute (``None`` on the CPU)."""
    anchor: Any = None
    """On a CUDA device: an event recorded at ``start``."""

    @property
    def step_time(self) -> float:
        return self.end - self.start

    def timed_records(self) -> list[ActionRecord]:
        """The records, with ``start``/``end`` from the CUDA events when the step ran on a GPU (when its kernels ran,
        not when they were launched), placed on the host clock from ``start``; on the CPU, the records as they are.
        On a GPU this waits for the step's last kernel."""
        if not self.device_events:
            return self.records
        self.device_events[-1][1].synchronize()
        anchor, t0 = self.anchor, self.start
        return [ActionRecord(r.action, r.ready, t0 + anchor.elapsed_time(a) / 1e3, t0 + anchor.elapsed_time(b) / 1e3,
                             r.send) for r, (a, b) in zip(self.records, self.device_events)]


class _CudaTimer:
    """On a GPU, CUDA events around each action's compute: the host clock sees only when kernels were launched."""

    def __init__(self, result: StepResult) -> None:
        result.anchor = self._record()
        result.device_events = self.events = []
        self._began: Any = None

    @staticmethod
    def _record() -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self) -> float:
        self._began = self._record()
        return time.perf_counter()

    def end(self) -> None:
        self.events.append((self._began, self._record()))


def _tag(transfer: Transfer, num_stages: int) -> int:
    return (transfer.microbatch * num_stages + transfer.src_stage) * 2 + int(transfer.is_gradient)


def _transfer_text(t: Transfer, *, receive: bool) -> str:
    """What a transfer is, for error messages."""
    value = f"the {'gradient' if t.is_gradient else 'activation'} of micro-batch {t.microbatch}"
    return f"receive of {value} from stage {t.src_stage}" if receive else f"send of {value} to stage {t.dst_stage}"


@dataclass(frozen=True)
class _Plan:
    """One rank's actions and their transfers, derived from the schedule once per kind of run (training or
    forward-only) instead of during every step: this work would sit between actions, on the critical path."""

    actions: tuple[Action, ...]
    receives: tuple[tuple[int, Transfer, str], ...]
    """(index of the action that needs it, transfer, description) for every value received, in action order."""
    sends: tuple[tuple[Transfer, int, str] | None, ...]
    """Per action, (transfer, tag, description) of what it sends to another rank; ``None`` when it sends nothing
    or hands its value to a stage of this rank."""


# What torch.autograd.backward calls once its arguments are checked: the engine, with the context that compiled
# regions' backward reads on device threads (a private function; absent, the public one is used).
_ENGINE_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _run_backward(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """``torch.autograd.backward(outputs, grads)`` without the Python argument checks that run before the engine
    (as Megatron-LM's ``custom_backward`` does). The gradients are the shapes and dtypes of the outputs already:
    received from the next stage, or built here for the loss; the engine itself still validates them."""
    if _ENGINE_RUN_BACKWARD is None:  # pragma: no cover - a torch without it
        torch.autograd.backward(list(outputs), list(grads))
    else:
        _ENGINE_RUN_BACKWARD(tuple(outputs), tuple(grads), False, False, (), allow_unreachable=True,
                             accumulate_grad=True)


def _as_leaves(value: Any) -> Any:
    """A copy of ``value`` whose floating tensors are fresh leaves, as if it had crossed to another rank."""
    tensors, spec = flatten(value)
    leaves = [t.detach().requires_grad_(t.requires_grad and differentiable(t)) for t in tensors]
    return unflatten(leaves, spec)


class PipelineExecutor:
    """Executes ``schedule.actions[rank]`` for one step at a time.

    Args:
        schedule: The schedule; ``rank`` indexes its ranks, which are the ranks of ``group``.
        rank: This process's rank within the pipeline group.
        group: The pipeline process group (``None``: the default group).
        device: Where received tensors are placed.
        timeout: Seconds any single wait may take before it fails with a message naming the peer.
        post_ahead: How many receives gloo keeps posted ahead of need (``None``: one more than the ranks; 0: each
            is posted when its value is needed). With exact-size backends (NCCL) each receive is posted when its
            action starts.
        transport: A transport to share with other executors of the same pipeline (``group``, ``device`` and
            ``timeout`` then come from it).
    """

    def __init__(
        self,
        schedule: Schedule,
        *,
        rank: int,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        timeout: float = 300.0,
        post_ahead: int | None = None,
        transport: Transport | None = None,
    ) -> None:
        if not 0 <= rank < schedule.num_ranks:
            raise PipelineError(f"rank {rank} is outside the schedule's {schedule.num_ranks} ranks")
        self.schedule = schedule
        self.rank = rank
        self.post_ahead = post_ahead
        self._send_order_cache: dict[bool, dict[int, tuple[Transfer, ...]]] = {}
        self._plan_cache: dict[bool, _Plan] = {}
        self._current: Action | None = None
        if transport is None:
            transport = Transport(group=group, device=device, timeout=timeout)
        size = dist.get_world_size(transport.group)
        if size != schedule.num_ranks:
            # Checked on every rank before any message: a mismatch would otherwise leave ranks waiting on peers
            # that do not exist or never send.
            raise PipelineError(f"the schedule {schedule.name!r} is for {schedule.num_ranks} ranks but the pipeline "
                                f"group has {size} processes: build it with num_ranks={size}, or pass the group "
                                f"of the pipeline's ranks")
        if transport._rank != rank:
            raise PipelineError(f"rank={rank} but this process is rank {transport._rank} of the pipeline group: "
                                f"pass its rank within the group")
        # Several executors (one per micro-batch count) may share a transport: its channel capacities then stay in
        # step with the peers whatever executor ran last.
        self.transport = transport  # run() points its error messages at this executor

    def _describe(self) -> str:
        action = self._current
        where = f"stage {action.stage}, action {action}" if action is not None else "between actions"
        return f"pipeline rank {self.rank} ({where})"

    def run(
        self,
        forward_fn: ForwardFn,
        *,
        loss_weights: Sequence[float] | None = None,
        train: bool = True,
        scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> StepResult:
        """Run this rank's actions once.

        Args:
            forward_fn: Computes one stage for one micro-batch (see the module docstring).
            loss_weights: Each micro-batch's share of the batch; default ``1/m`` each.
            train: ``False`` runs only the forwards, without autograd, and keeps the last stage's outputs.
            scale_loss: Applied to the weighted loss before backward (a gradient scaler's ``scale``).
        """
        sched, rank = self.schedule, self.rank
        if self.transport.broken is not None:
            raise PipelineError(f"pipeline rank {rank}: an earlier step failed ({self.transport.broken}); "
                                "messages of that step may still be in flight, so this pipeline cannot run again: "
                                "restart the processes")
        self.transport.describe = self._describe
        m, last = sched.num_microbatches, sched.last_stage
        weights = list(loss_weights) if loss_weights is not None else [1.0 / m] * m
        if len(weights) != m:
            raise PipelineError(f"{len(weights)} loss weights for {m} micro-batches")
        plan = self._plan(train)
        actions, receives = plan.actions, plan.receives
        result = StepResult(start=time.perf_counter())
        timer = _CudaTimer(result) if self.transport.device.type == "cuda" else None
        compute_begins = timer.begin if timer is not None else time.perf_counter
        pending: dict[tuple[bool, int, int], PendingRecv] = {}
        local: dict[tuple[bool, int, int], Any] = {}  # values handed between two stages of this rank
        # Per (micro-batch, stage): the stage input's tensors, the output, and on the last stage the gradient of the
        # loss (its micro-batch's weight: weighting by the backward's seed costs no op in the forward).
        saved: dict[tuple[int, int], tuple[list[torch.Tensor], Any, torch.Tensor | None]] = {}
        # Per (micro-batch, stage), the weight gradients that B left for W (schedules that split the backward).
        deferred: dict[tuple[int, int], WeightGradCollector] = {}
        split = train and sched.split_backward
        sent: set[tuple[bool, int, int]] = set()  # transfers already sent, so a failure notifies only the rest
        next_recv = 0
        # Exact-size backends (NCCL) match messages in posting order: a receive is posted only when its action
        # starts, after the sends of the actions before it. On gloo a few receives are posted ahead of need, so that
        # the sender writes the value as soon as it is made; a receive posted only when needed (post_ahead=0, as
        # torch.distributed.pipelining does) makes the sender's I/O thread write it then, competing with the
        # sender's compute. Measured here on CPU-bound stages (transformer, p=2, in turn in the same processes, with
        # the transport guarding gloo's I/O threads), posting when needed took 1.20-1.42x the step time of this
        # window for interleaved 1F1B and 0.97-1.07x for 1F1B; a window of 2 was 0.93-1.13x. Deferring each refill
        # to just before the next action that waits for a value cut the time between actions of 1F1B on sleeping
        # stages by up to half (step time unchanged, 0.996-1.001x) but made it slower on the transformer (m=8 and
        # 16: 1.02-1.09x; m=4: 0.99-1.00x), and left ZBV (sleeping, p=4, m=16) unchanged.
        if self.transport.exact:
            window = 0
        else:
            window = self.post_ahead if self.post_ahead is not None else sched.num_ranks + 1

        def post(t: Transfer, what: str) -> None:
            pending[t.key] = self.transport.recv(t.src_rank, _tag(t, sched.num_stages), what,
                                                 channel=(t.is_gradient, t.src_stage))

        def post_until(limit: int) -> None:
            nonlocal next_recv
            while not self.transport.exact and next_recv < len(receives) and next_recv < limit:
                post(*receives[next_recv][1:])
                next_recv += 1

        # Exact protocol: a value is received after every value sent before it on its pair (those wait in
        # ``early`` until needed); see _send_orders.
        in_send_order = {pair: deque(ts) for pair, ts in self._send_orders(train).items()} \
            if self.transport.exact else {}
        early: dict[tuple[bool, int, int], Any] = {}

        def take(is_gradient: bool, microbatch: int, src_stage: int) -> Any:
            key = (is_gradient, microbatch, src_stage)
            if key in local:
                return local.pop(key)
            if key in early:
                return early.pop(key)
            if key not in pending and not self.transport.exact:
                post_until(next_recv + 1)  # gloo, first action or post_ahead=0: taken in order, so this is the next
            if key not in pending:  # exact-size protocol: received now, after what its sender sent before it
                queue = in_send_order[sched.stage_to_rank[src_stage]]
                while (t := queue.popleft()).key != key:
                    post(t, _transfer_text(t, receive=True))
                    early[t.key] = pending.pop(t.key).wait()
                post(t, _transfer_text(t, receive=True))
            return pending.pop(key).wait()

        send_time = [0.0]  # of the current action

        def give(value: Any, i: int, is_gradient: bool) -> None:
            """Hand action ``i``'s output (or input gradient) to the stage that needs it."""
            out = plan.sends[i]
            if out is None:  # the next (or previous) stage is on this rank
                action = actions[i]
                local[(is_gradient, action.microbatch, action.stage)] = _as_leaves(value)
            else:
                transfer, tag, what = out
                posted = time.perf_counter()
                self.transport.send(value, transfer.dst_rank, tag, what, channel=(is_gradient, transfer.src_stage))
                send_time[0] = time.perf_counter() - posted
                sent.add(transfer.key)

        # Nothing is posted before the first action: if it needs a value, take() posts that receive, and the rest of
        # the window follows the action. Each post costs tens of microseconds with the caches cold between steps, and
        # the first action of the first stage starts the whole pipeline (measured at p=2: it began 0.22 ms into the
        # step with the window posted first, 0.03 ms without).
        recv_index = 0
        try:
            for i, action in enumerate(actions):
                self._current = action
                send_time[0] = 0.0
                ready = time.perf_counter()
                mb, s = action.microbatch, action.stage
                if action.kind is _F:
                    inputs = None if s == 0 else take(False, mb, s - 1)
                    # Taken before the forward: a stage may replace tensors inside its input container in place
                    # (``state.h = f(state.h)``), and the gradients to send back are those of the received leaves.
                    input_leaves = flatten(inputs)[0] if train and inputs is not None else []
                    start = compute_begins()
                    try:
                        with torch.set_grad_enabled(train):
                            if split:
                                deferred[(mb, s)] = collector = WeightGradCollector()
                                with deferring(collector):
                                    output = forward_fn(s, mb, inputs)
                            else:
                                output = forward_fn(s, mb, inputs)
                    except RuntimeError as err:
                        if s > 0 and "leaf Variable that requires grad" in str(err):
                            raise PipelineError(
                                f"stage {s} changes its input in place, or another leaf tensor ({err}): the input "
                                "of a stage is received from the stage before, as a leaf tensor that autograd may "
                                "not modify in place. "
                                "Make the stage's first operation out of place (e.g. nn.ReLU(inplace=False)), or "
                                "move the cut between stages (balance) so that the stage does not start with it"
                            ) from err
                        raise
                    if s == last:
                        if train:
                            if not isinstance(output, torch.Tensor) or output.numel() != 1:
                                raise PipelineError(
                                    f"the last stage must return the micro-batch's loss as a scalar tensor, got "
                                    f"{type(output).__name__}"
                                    + (f" of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else "")
                                )
                            result.losses[mb] = output.detach()
                            if scale_loss is None:
                                saved[(mb, s)] = (input_leaves, output, torch.full_like(output, weights[mb]))
                            else:
                                loss = scale_loss(output * weights[mb])
                                saved[(mb, s)] = (input_leaves, loss, torch.ones_like(loss))
                        else:
                            result.outputs[mb] = output
                    else:
                        if train:
                            saved[(mb, s)] = (input_leaves, output, None)
                        give(output, i, is_gradient=False)
                elif action.kind is _B:
                    grads = None if s == last else take(True, mb, s + 1)
                    start = compute_begins()
                    input_leaves, output, seed = saved.pop((mb, s))
                    self._backward(output, grads, seed)
                    if s > 0:  # one entry per tensor of the stage input, None where it has no gradient
                        give([t.grad if t.requires_grad else None for t in input_leaves], i, is_gradient=True)
                else:
                    start = compute_begins()
                    deferred.pop((mb, s)).run()
                result.records.append(ActionRecord(action, ready, start, time.perf_counter(), send_time[0]))
                if timer is not None:
                    timer.end()
                # With post_ahead, keep the window of posted receives full. Done after the action's send rather
                # than before its compute, so that posting is not on the critical path from a value's arrival to
                # its use.
                while recv_index < len(receives) and receives[recv_index][0] <= i:
                    recv_index += 1
                post_until(recv_index + window)
            self._current = None
            self.transport.flush()
            self.transport.end_step()
        except BaseException as error:
            self.transport.broken = f"{type(error).__name__}: {str(error)[:200]}"
            self._notify_peers(actions, sent, error)
            # Not after Ctrl-C (a KeyboardInterrupt is no Exception): the process is meant to stop now.
            if isinstance(error, Exception) and peers_reachable(error):
                self._absorb(pending, [t for _, t, _ in receives[next_recv:]] if not self.transport.exact else
                             [t for queue in in_send_order.values() for t in queue])
            raise
        finally:
            self._current = None
        result.end = time.perf_counter()
        if saved or local or pending or deferred or early:
            raise PipelineError(f"pipeline rank {rank}: schedule {sched.name!r} left work unfinished "
                                f"(saved={sorted(saved)}, local={sorted(local)}, pending={sorted(pending)}, "
                                f"received early={sorted(early)}, "
                                f"weight gradients={sorted(deferred)})")
        return result

    def _send_orders(self, train: bool) -> dict[int, tuple[Transfer, ...]]:
        """Per peer, the values that peer sends to this rank, in the order it sends them (activations and gradients
        alike: all of them travel on the one group of their direction). NCCL matches a pair's messages by order
        alone, and a schedule may need values in another order than they are sent. Derived from the schedule once
        per kind of run (training or forward-only), not every step."""
        orders = self._send_order_cache.get(train)
        if orders is None:
            sched, lists = self.schedule, {}
            for src in range(sched.num_ranks):
                for j, t in sched.sends(src):
                    if t.dst_rank == self.rank and (train or sched.actions[src][j].kind is _F):
                        lists.setdefault(src, []).append(t)
            orders = self._send_order_cache[train] = {pair: tuple(ts) for pair, ts in lists.items()}
        return orders

    def _notify_peers(self, actions: Sequence[Action], sent: set[tuple[bool, int, int]],
                      error: BaseException) -> None:
        """Send a failure notice in place of every value this rank still owed its peers in this step, so that
        they stop at once with this error instead of waiting for the timeout."""
        for action in actions:
            transfer = self.schedule.outgoing(action)
            if transfer is not None and transfer.key not in sent:
                self.transport.send_failure(error, transfer.dst_rank, _tag(transfer, self.schedule.num_stages))
        # Let the notices leave before the process may exit (peers waiting on them have posted their receives).
        self.transport.drain(seconds=min(2.0, self.transport.timeout.total_seconds()))

    def _absorb(self, pending: dict[tuple[bool, int, int], PendingRecv], unposted: Sequence[Transfer]) -> None:
        """After a failure: receive, and drop, every value still to come to this rank in this step. A send completes
        only once it is received (gloo, NCCL), so a peer that owes this rank values would otherwise wait in its
        sends until the timeout; in a forward-only step the earlier stages wait for nothing else from this rank and
        learn of its failure no other way. Each value arrives, or the failure notice of a peer that failed too.
        Skipped after a broken connection or a timeout (the cause): waiting again would only wait as long again.
        At most the transport's timeout in all."""
        deadline = time.monotonic() + self.transport.timeout.total_seconds()
        waits: list[Callable[[], Any]] = [recv.wait for recv in pending.values()]
        waits += [functools.partial(self._post_and_wait, t) for t in unposted]
        pending.clear()
        for wait in waits:
            if time.monotonic() > deadline:
                return
            try:
                wait()
            except PipelineCommError as err:
                if not peers_reachable(err):  # a broken connection or a timeout: stop here
                    return
            except Exception:  # noqa: BLE001 - a value that does not unpack: dropped anyway
                pass

    def _post_and_wait(self, t: Transfer) -> Any:
        return self.transport.recv(t.src_rank, _tag(t, self.schedule.num_stages), _transfer_text(t, receive=True),
                                   channel=(t.is_gradient, t.src_stage)).wait()

    def _plan(self, train: bool) -> _Plan:
        plan = self._plan_cache.get(train)
        if plan is None:
            sched = self.schedule
            actions = tuple(a for a in sched.actions[self.rank] if train or a.kind is _F)
            receives = tuple((i, t, _transfer_text(t, receive=True))
                             for i, t in enumerate(map(sched.incoming, actions)) if t is not None)
            sends = tuple(None if t is None else (t, _tag(t, sched.num_stages), _transfer_text(t, receive=False))
                          for t in map(sched.outgoing, actions))
            plan = self._plan_cache[train] = _Plan(actions, receives, sends)
        return plan

    @staticmethod
    def _backward(output: Any, grads: Any, seed: torch.Tensor | None) -> None:
        """Backward from ``output`` with the gradients received from the next stage, or on the last stage from the
        loss with ``seed`` (its weight)."""
        if grads is None:
            if output.requires_grad:
                _run_backward((output,), (seed,))
            return
        pairs = [(o, g) for o, g in zip(flatten(output)[0], grads) if g is not None and o.requires_grad]
        if pairs:
            _run_backward([o for o, _ in pairs], [g for _, g in pairs])
