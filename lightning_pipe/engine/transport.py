"""Point-to-point transfer of nested values between pipeline ranks with non-blocking isend/irecv.

A value (a tensor, or nested tuples/lists/dicts of tensors and other leaves) travels with its metadata, so
shapes and dtypes may change from one message to the next. Two wire protocols:

* **gloo** (CPU): one message per value, ``[prefix | metadata | payload]``, received into a buffer of the
  channel's current capacity (gloo accepts a message shorter than the posted buffer). Capacities grow between
  steps to the largest message seen, identically on both ends; a value larger than the capacity is announced by
  a short overflow message and sent whole on an overflow tag. Receives are posted ahead of need.
* **exact** (NCCL and other backends that need equal send and receive sizes): a fixed-size header, then the
  metadata if it did not fit, then the payload, each posted when needed and in the same order on both ends.
  Messages are matched by their order between two ranks alone, as NCCL does (tags are not used, on gloo either);
  messages to a lower rank travel on a second group (``reverse_group``), so that one direction never waits in line
  behind the other on NCCL's stream of the pair.

Every wait is bounded by the timeout and fails with :class:`PipelineCommError` naming rank, action and peer (on
NCCL the process group's timeout bounds it, through NCCL's watchdog: a timed wait there would poll the host). On
gloo, gloo's I/O threads may not preempt the caller during a send or receive call (see ``io_threads.py``), and the
sends and receive posts move to the transport's poster thread while the steps leave the cores idle (``poster.py``).
"""

from __future__ import annotations

import datetime
import pickle
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
import torch.distributed as dist

from lightning_pipe.engine.io_threads import IoThreadGuard
from lightning_pipe.engine.poster import IdleMeter, Poster, wants_poster
from lightning_pipe.engine.tree import TreeSpec, flatten, unflatten
from lightning_pipe.errors import PipelineCommError, PipelineError

__all__ = ["Transport", "PendingRecv"]

HEADER_BYTES = 1024
"""Exact protocol: size of the fixed header; metadata of up to ``HEADER_BYTES - 8`` bytes rides inside it."""
INITIAL_CAPACITY = 4096
"""gloo protocol: the receive buffer of a channel before any message was seen on it."""
_PREFIX = 16  # gloo protocol: int64 metadata length (-1: overflow), int64 payload length (overflow: total length)
_OVERFLOW, _FAILURE = -1, -2  # markers in the first int64 of a message (both protocols)
_FAILURE_TEXT = 900  # bytes of a failure message that travel (fits any receive buffer of either protocol)
_ALIGN = 16
_REAP_AT = 64  # pending sends before the list of them is first scanned for completed ones


@dataclass(frozen=True)
class _Expected:
    """The layout of the last message received on a channel (gloo protocol), which the next one usually repeats."""

    head: bytes  # the message's lengths and metadata
    meta: "_Meta"
    base: int
    total: int  # message bytes


def differentiable(t: torch.Tensor) -> bool:
    """Whether a tensor crossing stages may carry a gradient back (floating or complex)."""
    return t.is_floating_point() or t.is_complex()


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class _TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool
    offset: int  # within the payload
    nbytes: int


_Meta = tuple[TreeSpec, list[_TensorMeta], int]  # spec, tensors, payload bytes


@dataclass(frozen=True)
class _Layout:
    """How a message for values of one structure, dtypes and shapes is laid out (gloo protocol)."""

    meta: _Meta
    raw: bytes  # the pickled metadata
    base: int  # where the payload starts
    prefix: torch.Tensor  # the message's first ``base`` bytes: lengths and metadata


def _describe_tensors(tensors: list[torch.Tensor], spec: TreeSpec) -> _Meta:
    """The metadata of a flattened value: its spec, each tensor's dtype, shape and place, the payload size."""
    metas, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        metas.append(_TensorMeta(t.dtype, tuple(t.shape), bool(t.requires_grad and differentiable(t)), offset, nbytes))
        offset = _aligned(offset + nbytes)
    return spec, metas, offset


def _tensors_only(spec: TreeSpec) -> bool:
    """Whether every leaf of ``spec`` is a tensor. Only such layouts are cached: other leaves travel in the
    metadata, and equal keys may still differ there (``1 == 1.0 == True``) or not hash at all; for the same
    reason, only dicts whose keys are all strings."""
    if spec.kind == "leaf":
        return False
    if spec.kind == "dict" and not all(type(k) is str for k in spec.value):
        return False
    if spec.kind == "dictsub" and not all(type(k) is str for k in spec.value[1]):
        return False
    return all(_tensors_only(c) for c in spec.children)


_TENSOR_SPEC = flatten(torch.empty(0))[1]
_ONE_TENSOR_LIST_SPEC = flatten([torch.empty(0)])[1]


def _message_layout(value: Any, cache: dict[Hashable, _Layout]) -> tuple[list[torch.Tensor], _Layout]:
    """The tensors of ``value`` and how its message is laid out. Consecutive values usually have the same
    structure, dtypes and shapes, so layouts of values made of tensors alone are kept in ``cache``: a send then
    skips building and pickling the metadata (this runs once per transfer, on the critical path)."""
    if isinstance(value, torch.Tensor):  # the usual value: no tree to walk or hash
        tensors, spec, cacheable = [value], _TENSOR_SPEC, True
        key: Hashable = (value.dtype, value.shape, value.requires_grad)
    elif type(value) is list and len(value) == 1 and isinstance(value[0], torch.Tensor):
        # The input gradient of a one-tensor stage input, which every backward sends: no tree either (walking and
        # hashing it took 4 us here on idle cores, 20-30 us between the actions of a loaded pipeline).
        t = value[0]
        tensors, spec, cacheable = [t], _ONE_TENSOR_LIST_SPEC, True
        key = (list, t.dtype, t.shape, t.requires_grad)
    else:
        tensors, spec = flatten(value)
        cacheable = _tensors_only(spec)
        key = (spec, tuple((t.dtype, t.shape, t.requires_grad) for t in tensors)) if cacheable else None
    layout = cache.get(key) if cacheable else None
    if layout is None:
        meta = _describe_tensors(tensors, spec)
        raw = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
        base = _aligned(_PREFIX + len(raw))
        prefix = torch.zeros(base, dtype=torch.uint8)
        prefix[: _PREFIX + len(raw)] = _bytes_tensor(struct.pack("<qq", len(raw), meta[2]) + raw)
        layout = _Layout(meta, raw, base, prefix)
        if cacheable:
            if len(cache) >= 256:
                cache.clear()
            cache[key] = layout
    return tensors, layout


def _versions(tensors: list[torch.Tensor]) -> list[int]:
    """Each tensor's version counter, which in-place changes bump (-1 for inference tensors: they keep none)."""
    return [-1 if t.is_inference() else t._version for t in tensors]


def _pack(buffer: torch.Tensor, tensors: list[torch.Tensor], metas: list[_TensorMeta], base: int) -> None:
    for t, m in zip(tensors, metas):
        if m.nbytes:
            buffer[base + m.offset : base + m.offset + m.nbytes].view(t.dtype).view(t.shape).copy_(t.detach())


_NUMPY_DTYPES: dict[torch.dtype, Any] = {}


def _numpy_dtype(dtype: torch.dtype) -> Any:
    """The numpy dtype of ``dtype``, or ``None`` where numpy has none (bfloat16, float8...)."""
    if dtype not in _NUMPY_DTYPES:
        try:
            _NUMPY_DTYPES[dtype] = torch.empty((), dtype=dtype).numpy().dtype
        except TypeError:
            _NUMPY_DTYPES[dtype] = None
    return _NUMPY_DTYPES[dtype]


def _unpack(buffer: torch.Tensor, meta: _Meta, base: int, host: Any = None) -> Any:
    """The value in ``buffer``, its tensors viewing the buffer. ``host``, a numpy view of a CPU buffer, lets
    tensors be cut out with numpy's cheaper indexing (on the critical path from a value's arrival to its use)."""
    spec, metas, _ = meta
    tensors = []
    for m in metas:
        begin = base + m.offset
        np_dtype = _numpy_dtype(m.dtype) if host is not None else None
        if np_dtype is not None:
            t = torch.from_numpy(host[begin : begin + m.nbytes].view(np_dtype).reshape(m.shape))
        else:
            t = buffer[begin : begin + m.nbytes].view(m.dtype).view(m.shape)
        if m.requires_grad:
            t.requires_grad_(True)
        tensors.append(t)
    return unflatten(tensors, spec)


def _host_view(buffer: torch.Tensor) -> Any:
    """A numpy array of the start of ``buffer`` (its lengths and, usually, its metadata): the buffer itself, not a
    copy, on the CPU (read in place: no tensor op on the critical path); else a copy of its first bytes."""
    if buffer.device.type == "cpu":
        return buffer.numpy()
    return buffer[: _PREFIX + HEADER_BYTES].cpu().numpy()


def _bytes_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


class _Sent:
    """A send started by this rank: its work (set by the poster thread when there is one) and what it sends."""

    __slots__ = ("work", "error", "peer", "what", "buffer")

    def __init__(self, peer: int, what: str) -> None:
        self.work: dist.Work | None = None
        self.error: BaseException | None = None
        self.buffer: torch.Tensor | None = None  # kept until the send completed
        self.peer, self.what = peer, what

    def done(self) -> bool:
        return self.error is not None or (self.work is not None and self.work.is_completed())


class PendingRecv:
    """A value being received from ``peer``; :meth:`wait` returns it."""

    def __init__(self, transport: "Transport", peer: int, tag: int, channel: Hashable, what: str) -> None:
        self._t = transport
        self.peer, self.tag, self.channel, self.what = peer, tag, channel, what
        if transport.exact:
            self._buffer = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=transport.device)
            self._work = transport._irecv(self._buffer, peer, tag * 3)
            self._expected = None
        else:
            self._posted: threading.Event | None = None
            self._error: BaseException | None = None
            capacity, expected = transport.capacity(channel), transport._expected.get(channel)
            if transport._poster is None:
                self._post(capacity, expected)
            else:  # posted on the poster thread; wait() waits for that first
                self._posted = threading.Event()
                transport._poster.submit(lambda: self._post_catching(capacity, expected))

    def _post(self, capacity: int, expected: _Expected | None) -> None:
        self._buffer = torch.empty(capacity, dtype=torch.uint8, device=self._t.device)
        self._work = self._t._irecv(self._buffer, self.peer, self.tag * 2)
        self._expected = self._prebuild(expected)

    def _post_catching(self, capacity: int, expected: _Expected | None) -> None:
        try:
            self._post(capacity, expected)
        except BaseException as err:  # noqa: BLE001 - raised by wait(), on the caller's thread
            self._error = err
        finally:
            assert self._posted is not None
            self._posted.set()

    def _prebuild(self, expected: _Expected | None) -> tuple[bytes, Any, int] | None:
        """The value that a message laid out as the channel's last one would hold, built now from views of the
        receive buffer (CPU only), so that on arrival :meth:`wait` only compares the message's prefix with the
        expected one instead of parsing it: unpacking is taken off the path from a value's arrival to its use."""
        buffer = self._buffer
        if expected is None or buffer.device.type != "cpu" or expected.total > buffer.numel():
            return None
        self._host = buffer.numpy()
        return expected.head, _unpack(buffer, expected.meta, expected.base, self._host), expected.total

    def wait(self) -> Any:
        """Block (at most the transport's timeout per message) until the value is in; return it."""
        t = self._t
        if t.exact:
            t._wait(self._work, self.peer, self.what)
            return self._wait_exact()
        if self._posted is not None and not self._posted.wait(t.timeout.total_seconds()):
            raise PipelineCommError(t._message(self.peer, self.what, "the receive was never posted"))
        if self._error is not None:
            raise t._comm_error(self.peer, self.what, self._error) from self._error
        t._wait(self._work, self.peer, self.what)
        expected = self._expected
        if expected is not None:
            head_bytes, value, total = expected
            if self._host[: len(head_bytes)].tobytes() == head_bytes:  # laid out as expected: nothing to parse
                t.observe(self.channel, total)
                return value
        buffer = self._buffer
        head = _host_view(buffer)
        meta_len, length = struct.unpack_from("<qq", head)
        if meta_len == _FAILURE:
            self._raise_failure(buffer[_PREFIX : _PREFIX + length])
        if meta_len == _OVERFLOW:  # the whole message follows on the overflow tag
            buffer = torch.empty(length, dtype=torch.uint8, device=t.device)
            t._wait(t._in_order(lambda: t._irecv(buffer, self.peer, self.tag * 2 + 1), self.peer,
                              self.what), self.peer, self.what)
            head = _host_view(buffer)
            meta_len, length = struct.unpack_from("<qq", head)
        if _PREFIX + meta_len > len(head):
            head = buffer[: _PREFIX + meta_len].cpu().numpy()
        base = _aligned(_PREFIX + meta_len)
        t.observe(self.channel, base + length)
        head_bytes = head[: _PREFIX + meta_len].tobytes()
        meta = t.decode(head_bytes[_PREFIX:])
        if buffer is self._buffer:  # the next receive on this channel expects this layout
            t._expected[self.channel] = _Expected(head_bytes, meta, base, base + length)
        return _unpack(buffer, meta, base, head if buffer.device.type == "cpu" else None)

    def _raise_failure(self, text: torch.Tensor) -> None:
        message = text.cpu().numpy().tobytes().decode("utf-8", errors="replace")
        error = PipelineCommError(f"{self._t.describe()}: pipeline rank {self.peer} failed instead of sending "
                                  f"{self.what.split(' of ', 1)[-1]}: {message}")
        error.peer_failed = True
        raise error

    def _wait_exact(self) -> Any:
        t = self._t
        n, length = (int(v) for v in self._buffer[:16].cpu().view(torch.int64))
        if n == _FAILURE:
            self._raise_failure(self._buffer[16 : 16 + length])
        if n <= HEADER_BYTES - 8:
            raw = self._buffer[8 : 8 + n].cpu().numpy().tobytes()
        else:
            long_meta = torch.empty(n, dtype=torch.uint8, device=t.device)
            t._wait(t._irecv(long_meta, self.peer, self.tag * 3 + 1), self.peer, self.what)
            raw = long_meta.cpu().numpy().tobytes()
        meta = t.decode(raw)
        payload = torch.empty(meta[2], dtype=torch.uint8, device=t.device)
        if meta[2]:
            t._wait(t._irecv(payload, self.peer, self.tag * 3 + 2), self.peer, self.what)
        return _unpack(payload, meta, 0)


class Transport:
    """Sends and receives nested values between the ranks of one pipeline process group.

    Args:
        group: The pipeline group; ``peer`` arguments are ranks within it (``None``: the default group).
        device: Where buffers and received tensors live.
        timeout: Seconds any single wait may take.
        describe: Returns where the caller is (rank, stage, action), for error messages.
        exact: Use the exact-size protocol (default: for every backend but gloo).
        reverse_group: A second group over the same ranks, for messages to a lower rank (``group`` carries those
            to a higher one). NCCL runs the sends and receives between two ranks of a group in order on one stream,
            and a send may wait there for its receive: with each direction on a communicator of its own, a send
            waiting in one direction never holds up a transfer going the other way, whatever the schedule sends
            which way (zbv and interleaved schedules send activations and gradients both ways). Required by the
            exact protocol on backends other than gloo (whose sends do not wait in line).
        guard_io_threads: Keep gloo's I/O threads from preempting this thread during each send and receive call
            (see ``io_threads.py``; default: on with gloo, where the platform allows it).
        background: Make the gloo protocol's sends and receive posts on a thread of the transport's own, so that
            they overlap the caller's next action (see ``poster.py``). ``None`` (default): each step decides from
            how idle the last one left this thread and the machine. Needs the gloo protocol on the CPU; the exact
            protocol always calls on the caller's thread.
    """

    def __init__(
        self,
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        timeout: float = 300.0,
        describe: Callable[[], str] = lambda: "",
        exact: bool | None = None,
        reverse_group: dist.ProcessGroup | None = None,
        guard_io_threads: bool | None = None,
        background: bool | None = None,
    ) -> None:
        self.group = group
        self.reverse_group = reverse_group
        # The process groups themselves: their send/recv skip the argument checks of dist.isend/irecv, which cost
        # tens of microseconds on the critical path of every transfer (messages here are always uint8 tensors).
        world = group if group is not None else dist.group.WORLD
        # By direction: messages to a higher rank on ``group``, to a lower one on ``reverse_group``.
        self._pg = {False: world, True: reverse_group if reverse_group is not None else world}
        self.device = torch.device(device)
        self.timeout = datetime.timedelta(seconds=timeout)
        self.describe = describe
        gloo = self._gloo = dist.get_backend(group) == "gloo"
        self.exact = not gloo if exact is None else exact
        if self.exact and not gloo and reverse_group is None and dist.get_world_size(group) > 1:
            raise PipelineError(f"Transport on a {dist.get_backend(group)} group needs reverse_group: a second group "
                                "over the same ranks (dist.new_group(ranks), made on every rank), for the messages "
                                "to lower ranks; without it a send waiting for its receive can hold up the transfer "
                                "going the other way, and the pipeline hangs. PipelineExecutor: pass "
                                "transport=Transport(group=..., device=..., reverse_group=...)")
        # The groups exist by now, so their I/O threads do: found once, not on every call.
        self.io_guard = IoThreadGuard() if (gloo if guard_io_threads is None else guard_io_threads) \
            else IoThreadGuard([])
        self._rank = dist.get_rank(group)
        self._capacity: dict[Hashable, int] = {}
        self._seen: dict[Hashable, int] = {}
        self._sends: list[_Sent] = []
        can_post = not self.exact and self.device.type == "cpu"
        if background and not can_post:
            raise ValueError("Transport(background=True) needs the gloo protocol on the CPU (exact=False, "
                             f"device='cpu'); got exact={self.exact}, device='{self.device}': leave background unset")
        # The poster in use during this step (None: calls are made on the caller's thread), and the one kept for later.
        self._poster: Poster | None = None
        self._spare: Poster | None = None
        self._meter = IdleMeter() if background is None and can_post else None
        if background:
            self._poster = Poster()
        self.broken: str | None = None  # set when a step failed: its messages may still be in flight
        self._decoded: dict[bytes, _Meta] = {}
        self._layouts: dict[Hashable, _Layout] = {}
        self._expected: dict[Hashable, _Expected] = {}
        self._reap_at = _REAP_AT

    def decode(self, raw: bytes) -> _Meta:
        """The metadata pickled in ``raw``; consecutive messages usually repeat it, so recent ones are cached."""
        meta = self._decoded.get(raw)
        if meta is None:
            meta = pickle.loads(raw)
            if len(self._decoded) >= 256:
                self._decoded.clear()
            self._decoded[raw] = meta
        return meta

    # -- channel capacities (gloo protocol) ------------------------------------------------------------------
    def capacity(self, channel: Hashable) -> int:
        """Bytes the receiver of ``channel`` posts for one message during the current step."""
        return self._capacity.get(channel, INITIAL_CAPACITY)

    def observe(self, channel: Hashable, nbytes: int) -> None:
        if nbytes > self._seen.get(channel, 0):
            self._seen[channel] = nbytes

    def end_step(self) -> None:
        """Grow each channel's capacity to the largest message of the step just ended.

        Both ends of a channel call this after the same messages, so they agree on every capacity.
        """
        for channel, nbytes in self._seen.items():
            if nbytes > self.capacity(channel):
                self._capacity[channel] = 1 << (nbytes - 1).bit_length()
        self._seen.clear()
        sample = self._meter.sample() if self._meter is not None else None
        if sample is not None:  # else the step was too short to tell: as it was
            self._choose_poster(wants_poster(*sample, using=self._poster is not None))

    @property
    def posting_in_background(self) -> bool:
        """Whether this step's sends and receive posts are made on the poster thread."""
        return self._poster is not None

    def _choose_poster(self, use: bool) -> None:
        """Between steps (every job done): use the poster thread for the next step, or not."""
        if use and self._poster is None:
            self._poster, self._spare = self._spare or Poster(), None
        elif not use and self._poster is not None:
            self._poster, self._spare = None, self._poster

    def close(self) -> None:
        """End the poster thread, if any (after what was submitted to it). The transport may still be used: its
        calls are then made on the caller's thread."""
        for poster in (self._poster, self._spare):
            if poster is not None:
                poster.close()
        self._poster = self._spare = None
        self._meter = None

    # -- raw operations --------------------------------------------------------------------------------------
    def _irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> dist.Work:
        with self.io_guard:  # from a higher rank: that rank sent it on reverse_group
            return self._pg[peer > self._rank].recv([tensor], peer, 0 if self.exact else tag)

    def _in_order(self, call: Callable[[], Any], peer: int, what: str) -> Any:
        """``call()`` now, on the poster thread after what was queued before it when one is in use (gloo calls are
        made from one thread at a time)."""
        if self._poster is None:
            return call()
        box: list[Any] = []

        def job() -> None:
            try:
                box.append(call())
            except BaseException as err:  # noqa: BLE001 - raised below, on the caller's thread
                box.append(err)

        self._poster.submit(job)
        self._sync_poster(peer, what)
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _isend(self, tensor: torch.Tensor, peer: int, tag: int) -> dist.Work:
        # The exact protocol matches messages by order alone, as NCCL does (it ignores tags): over gloo too, so that
        # the tests run the same matching as NCCL would.
        with self.io_guard:
            return self._pg[peer < self._rank].send([tensor], peer, 0 if self.exact else tag)

    def _wait(self, work: dist.Work, peer: int, what: str) -> None:
        try:
            # On NCCL a wait with a timeout polls the host in 1 ms sleeps, on the path of every transfer; without
            # one it orders the current stream after the work, and the header read that follows blocks the host
            # until the data is in. The process group's timeout (PipelineStrategy(timeout=...)) still bounds it.
            ok = work.wait(timeout=self.timeout) if self._gloo else work.wait()
        except RuntimeError as err:
            raise self._comm_error(peer, what, err) from err
        if ok is False:
            raise PipelineCommError(self._message(peer, what, "the operation reported failure"))

    def _comm_error(self, peer: int, what: str, cause: BaseException) -> PipelineCommError:
        return PipelineCommError(self._message(peer, what, str(cause) or type(cause).__name__))

    def _sync_poster(self, peer: int, what: str) -> None:
        """Wait (bounded) until the poster thread has run every job submitted so far."""
        assert self._poster is not None
        if not self._poster.sync(self.timeout.total_seconds()):
            raise PipelineCommError(self._message(peer, what, "the transport's poster thread did not finish in time"))

    def _message(self, peer: int, what: str, cause: str) -> str:
        return (f"{self.describe()}: {what} with pipeline rank {peer} failed or timed out after at most "
                f"{self.timeout.total_seconds():g}s (PipelineStrategy(timeout=...) sets the limit). "
                f"Check the logs of rank {peer}: it may have crashed. Cause: {cause.strip().splitlines()[0][:300]}")

    # -- public API ------------------------------------------------------------------------------------------
    def recv(self, peer: int, tag: int, what: str, channel: Hashable = None) -> PendingRecv:
        """Post the receive of the value that ``peer`` sends on ``tag``; ``channel`` groups messages that share
        a receive capacity (the same key must be given to :meth:`send` on the other end)."""
        return PendingRecv(self, peer, tag, (peer, channel), what)

    def send(self, value: Any, peer: int, tag: int, what: str, channel: Hashable = None) -> None:
        """Start sending ``value`` to ``peer`` on ``tag``; the buffers are kept until :meth:`flush`."""
        tensors, layout = _message_layout(value, self._layouts)
        meta, base = layout.meta, layout.base
        if self.exact:
            self._send_exact(tensors, meta, layout.raw, peer, tag, what)
            return
        channel = (self._rank, channel)
        self.observe(channel, base + meta[2])
        if len(self._sends) > self._reap_at:
            self.reap()
        one = tensors[0] if len(tensors) == 1 else None
        if one is not None and (meta[1][0].nbytes != meta[2] or one.device.type != "cpu" or not one.is_contiguous()
                                or one.is_complex()):
            one = None
        prefix, size = layout.prefix, base + meta[2]
        device = self.device
        # In-place changes bump a tensor's version: a value changed before the poster thread copied it is caught.
        versions = _versions(tensors) if self._poster is not None else None

        def build() -> torch.Tensor:
            if one is not None:  # one CPU tensor (the usual case): prefix and payload in one op
                message = torch.cat((prefix, one.detach().view(-1).view(torch.uint8)))
            else:
                message = torch.empty(size, dtype=torch.uint8)
                message[:base] = prefix
                _pack(message, tensors, meta[1], base)
            if versions is not None and versions != _versions(tensors):
                raise PipelineError(f"{what}: the value was changed in place after it was sent, before the "
                                    "transport copied it. Return a tensor that the stage does not modify later, or "
                                    "make the copy on the caller's thread: Transport(background=False)")
            return message if device.type == "cpu" else message.to(device)

        tags = [tag * 2] if size <= self.capacity(channel) else [tag * 2, tag * 2 + 1]
        self._start(build, size, tags, peer, what)

    def _start(self, build: Callable[[], torch.Tensor], size: int, tags: list[int], peer: int, what: str) -> None:
        """Send the message that ``build()`` makes (``size`` bytes) to ``peer``: on ``tags[0]``, or when it is larger
        than the receiver's buffer a notice of its size on ``tags[0]`` and the message on ``tags[1]``. Made on the
        poster thread when one is in use (the copy into the message too: the caller then goes on at once)."""
        sent = [_Sent(peer, what) for _ in tags]

        def post() -> None:
            message = build()
            if len(tags) == 2:
                sent[0].buffer = torch.tensor([-1, size], dtype=torch.int64).view(torch.uint8).to(self.device)
            sent[-1].buffer = message
            for entry, tag in zip(sent, tags):
                assert entry.buffer is not None
                entry.work = self._isend(entry.buffer, peer, tag)

        if self._poster is None:
            post()
            self._sends += sent
            return

        def post_catching() -> None:
            try:
                post()
            except BaseException as err:  # noqa: BLE001 - raised by flush(), on the caller's thread
                for entry in sent:
                    if entry.work is None:
                        entry.error = err
                if sent[0].work is None:  # nothing went out: tell the receiver why, or it waits for the timeout
                    try:
                        sent[0].buffer = self._failure_message(err)
                        sent[0].work = self._isend(sent[0].buffer, peer, tags[0])
                    except BaseException:  # noqa: BLE001 - best effort, as send_failure; the peer may be gone
                        pass

        self._sends += sent
        self._poster.submit(post_catching)

    def _send_exact(self, tensors: list[torch.Tensor], meta: _Meta, raw: bytes, peer: int, tag: int,
                    what: str) -> None:
        # On a GPU the header leaves from pinned memory without waiting: a copy from ordinary memory would make the
        # host wait for all the work queued on the stream first (pinned blocks are not reused before their copy ran).
        cuda = self.device.type == "cuda"
        header = torch.zeros(HEADER_BYTES, dtype=torch.uint8, pin_memory=cuda)
        header[:8].view(torch.int64)[0] = len(raw)
        parts = []
        if len(raw) <= HEADER_BYTES - 8:
            header[8 : 8 + len(raw)] = _bytes_tensor(raw)
            parts.append((header.to(self.device, non_blocking=cuda), 0))
        else:
            long_meta = _bytes_tensor(raw).pin_memory() if cuda else _bytes_tensor(raw)
            parts += [(header.to(self.device, non_blocking=cuda), 0), (long_meta.to(self.device, non_blocking=cuda), 1)]
        if meta[2]:
            if len(tensors) == 1 and meta[1][0].nbytes == meta[2]:  # one aligned tensor: sent as it is, no copy
                payload = tensors[0].detach().to(self.device).contiguous().view(-1).view(torch.uint8)
            else:
                payload = torch.empty(meta[2], dtype=torch.uint8, device=self.device)
                _pack(payload, tensors, meta[1], 0)
            parts.append((payload, 2))
        for tensor, part in parts:
            entry = _Sent(peer, what)
            entry.buffer, entry.work = tensor, self._isend(tensor, peer, tag * 3 + part)
            self._sends.append(entry)

    def send_failure(self, error: BaseException, peer: int, tag: int) -> None:
        """Tell ``peer``, waiting for a value on ``tag``, that this rank failed (best effort, never blocks).

        The receiver raises :class:`PipelineCommError` with ``error``'s type and message, and passes it on in turn,
        so every rank of the pipeline stops with the original cause instead of waiting for the timeout.
        """
        message = self._failure_message(error)
        if self._poster is not None:  # on the thread of the other gloo calls, after the sends queued before it
            self._start(lambda: message, message.numel(), [tag * 2], peer, "failure notice")
            return
        entry = _Sent(peer, "failure notice")
        try:
            entry.work = self._isend(message, peer, tag * (3 if self.exact else 2))
        except RuntimeError:  # the peer may be gone already
            return
        entry.buffer = message
        self._sends.append(entry)

    def _failure_message(self, error: BaseException) -> torch.Tensor:
        text = f"{type(error).__name__}: {error}".encode("utf-8", errors="replace")[:_FAILURE_TEXT]
        # Exact-size backends receive a whole header; gloo accepts any message up to its receive buffer.
        message = torch.zeros(HEADER_BYTES if self.exact else _PREFIX + len(text), dtype=torch.uint8)
        message[:_PREFIX].view(torch.int64).copy_(torch.tensor([_FAILURE, len(text)]))
        if text:
            message[_PREFIX : _PREFIX + len(text)] = _bytes_tensor(text)
        return message.to(self.device)

    def flush(self) -> None:
        """Wait (bounded) until every send started so far has completed."""
        if self._poster is not None:
            self._sync_poster(self._sends[0].peer if self._sends else -1, "posting the sends")
        sends, self._sends = self._sends, []
        for entry in sends:
            if isinstance(entry.error, PipelineError):
                raise entry.error
            if entry.error is not None:
                raise self._comm_error(entry.peer, entry.what, entry.error) from entry.error
            assert entry.work is not None
            self._wait(entry.work, entry.peer, entry.what)

    def drain(self, seconds: float) -> None:
        """Give the pending sends at most ``seconds`` in all to complete (used while failing).

        Polls instead of a timed wait: a gloo wait that times out closes the connection to the peer, which would
        break the whole process group; a send that a failed peer never receives is simply left behind.
        """
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._sends = [s for s in self._sends if not s.done()]
            if not self._sends:
                return
            time.sleep(0.001)

    def reap(self) -> None:
        """Forget the sends that have already completed (keeps the list short during a long step).

        gloo reports a send completed only once it was waited for, so there the list only grows until
        :meth:`flush`; the next scan comes when it has doubled, which keeps the cost per send constant."""
        self._sends = [s for s in self._sends if not s.done()]
        self._reap_at = max(_REAP_AT, 2 * len(self._sends))
