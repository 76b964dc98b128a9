"""Point-to-point transfers between CPU ranks of one host through shared memory, woken by a pipe.

gloo passes a message between two processes of one host through a TCP socket and its own I/O threads, which compete
with the ranks for the cores. A round trip of a 1 KiB value between two processes of this 2-core machine took
260-340 us through :class:`~lightning_pipe.engine.transport.Transport` (gloo), 120-135 us through
:class:`ShmTransport` (most of it the wake-up of a process waiting in ``poll``); on CPU-bound transformer stages
whole steps were 0.81-1.00x as long as over gloo (``benchmarks/vs_torch.py --with-gloo``). In a pipeline a
transfer's time lies on the path from one rank's action to the next rank's. NCCL picks shared memory between the
GPUs of one node on its own; gloo has nothing of the kind, so :class:`ShmTransport` does it for CPU ranks.

Each ordered pair of ranks has a ring of shared memory (a file in ``/dev/shm``, mapped by both) written by the
sender alone, and a named pipe (FIFO) to the receiver. A message, laid out as in the gloo protocol, is written into
the ring as a record ``[tag | length | message]``; then one byte goes down the pipe, which wakes the receiver, and
orders the ring's bytes before it (the write and the read are system calls). The receiver copies the record out and
publishes how far it has read, which frees the space for the sender. A send never waits for its receiver: a message
that does not fit in the free space moves the pair to a larger ring (a ``switch`` record in the old one names it),
so no schedule can deadlock on a full ring; ``flush()``, at the end of a step, waits (bounded) until each peer has
read what was sent, as gloo's sends complete once received, so a sender is never more than a step ahead. The
receiver demultiplexes by tag (a value that comes before the one awaited waits in a queue of its tag), so the
executor's receives may be posted ahead and taken in any order, as on gloo.

A peer that exits closes its end of the pipe: the receiver sees end-of-file and fails at once, naming it, rather
than waiting for the timeout; a sender to an exited peer gets a broken pipe. The files are unlinked as soon as both
ends have them open (the pipes at set-up; a ring by its receiver, which opens it when the first message in it is
announced), so nothing is left in ``/dev/shm`` when the processes end; a ring never opened is unlinked by its
receiver's ``close()`` or when it sees the sender exit, and by the sender when it finds the receiver gone (only
both ends killed outright leave files behind). The pages of a ring are taken when it is made (``posix_fallocate``):
a ``/dev/shm`` too small (Docker's default is 64 MiB) gives an error that says so, never a ``SIGBUS`` at the first
write into a missing page.

Used only where every rank of the group runs on this host (same host name, boot and ``/dev/shm``), on Linux on
x86-64, whose stores are seen by other cores in program order: the receiver's published read position is then never
seen before it has copied the record out. :func:`make_transport` picks it (``kind="auto"``) and falls back to gloo
elsewhere.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import select
import socket
import struct
import sys
import time
import uuid
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Callable, Hashable

import numpy as np
import torch
import torch.distributed as dist

from lightning_pipe.engine.transport import (
    _FAILURE,
    _PREFIX,
    PendingRecv,
    Transport,
    _aligned,
    _Expected,
    _host_view,
    _Layout,
    _message_layout,
    _pack,
    _unpack,
)
from lightning_pipe.errors import PipelineCommError, PipelineError

__all__ = ["ShmTransport", "make_transport", "TRANSPORT_KINDS"]

TRANSPORT_KINDS = ("auto", "shm", "gloo")
"""What :func:`make_transport` accepts for CPU ranks: shared memory where possible, always, or never."""

SHM_DIR = Path("/dev/shm")
RING_BYTES = 1 << 20
"""The first ring of a pair of ranks, made at the first send between them (or a larger one, to hold two records of
that message); a message that does not fit in the free space moves the pair to a ring twice as large (or more)."""
_CONTROL = 128  # bytes before the ring; the receiver's read total at 64 (a cache line of its own)
_HEADER = 16  # a record's tag (int64) and message length (int64)
_RECORD_ALIGN = 64
_PAD, _SWITCH = -1, -2  # tags of records that hold no message: skip to the ring's start; go on in the next ring
_RESERVE = _RECORD_ALIGN  # always left free, for a switch record


def _shm_free() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensor subclasses (DTensor...) go through torch's copies


def _raw_prefix(layout: _Layout) -> bytes | None:
    """The first bytes of a message of ``layout`` where its payload is one real CPU tensor copied as it lies in
    memory (``None``: anything else)."""
    _, metas, payload = layout.meta
    if len(metas) != 1 or metas[0].nbytes != payload or metas[0].dtype.is_complex or metas[0].dtype in _QUANTIZED:
        return None
    return layout.prefix.numpy().tobytes()


def _record_bytes(message_bytes: int) -> int:
    return (_HEADER + message_bytes + _RECORD_ALIGN - 1) // _RECORD_ALIGN * _RECORD_ALIGN


class _Ring:
    """One ring of shared memory, mapped from its file (``size``: the ring's bytes when creating it; else read from
    the file)."""

    def __init__(self, path: Path, size: int = 0, *, create: bool) -> None:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                try:
                    # Taken now: a page of /dev/shm first written when the file system is full raises SIGBUS, which
                    # kills the process without a word; here it is an error that says what to do.
                    os.posix_fallocate(fd, 0, _CONTROL + size)
                except OSError as err:
                    os.close(fd)
                    fd = -1
                    path.unlink(missing_ok=True)
                    raise PipelineError(
                        f"the shared-memory transport needs {_CONTROL + size} bytes of {SHM_DIR} for a ring and "
                        f"could not have them ({err.strerror}; {SHM_DIR} has {_shm_free()} bytes free): give it "
                        "more room (docker run --shm-size=...), or use cpu_transport='gloo'") from err
            else:
                size = os.fstat(fd).st_size - _CONTROL
            self.map = mmap.mmap(fd, _CONTROL + size)
        finally:
            if fd >= 0:
                os.close(fd)
        self.path, self.size = path, size
        self.bytes = np.frombuffer(self.map, dtype=np.uint8, offset=_CONTROL, count=size)
        self.address = self.bytes.ctypes.data  # of the ring's first byte, for ctypes.memmove

    @property
    def read_total(self) -> int:
        """Bytes of this ring the receiver has read (and copied out), records and padding."""
        return int(struct.unpack_from("<q", self.map, 64)[0])

    @read_total.setter
    def read_total(self, value: int) -> None:
        struct.pack_into("<q", self.map, 64, value)

    def close(self) -> None:
        del self.bytes  # the view first: a map with views of it cannot close
        try:
            self.map.close()
        except BufferError:  # a view still held elsewhere: the map goes with it
            pass


_ENDS: weakref.WeakSet[Any] = weakref.WeakSet()  # every open end of a pipe in this process


def _close_ends_in_child() -> None:
    """In a process forked from this one (a DataLoader worker): close its copies of the pipes' ends. A copy of a
    write end would keep a peer from seeing this process exit (no end-of-file while the worker lives)."""
    for end in list(_ENDS):
        if end.fd >= 0:
            try:
                os.close(end.fd)
            except OSError:
                pass
            end.fd = -1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_ends_in_child)


class _End:
    """What both ends of a pair hold: this process's end of the pipe and its current ring."""

    fd: int
    ring: _Ring | None

    def _release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.ring is not None:
            self.ring.close()
            self.ring = None


class _Outbound(_End):
    """This rank's end of the pair to one peer: the ring it writes (made at the first send, so that ranks that never
    send to each other take no memory) and the pipe that wakes the peer."""

    def __init__(self, base: str, fd: int, ring_bytes: int, timeout_s: float = 300.0) -> None:
        self.base, self.fd, self.ring_bytes, self.timeout_s = base, fd, ring_bytes, timeout_s
        _ENDS.add(self)
        self.ring: _Ring | None = None
        self.generation = -1  # of the current ring: the peer opens ``{base}-{generation}`` in turn
        self.written = 0  # bytes written into the current ring, records and padding
        self.made: list[Path] = []  # rings made, which the peer unlinks when it opens them

    def _new_ring(self, size: int) -> _Ring:
        path = Path(f"{self.base}-{self.generation + 1}")
        ring = _Ring(path, size, create=True)
        self.generation += 1
        self.made.append(path)
        return ring

    def post(self, tag: int, size: int, fill: Callable[[np.ndarray], None] | None = None,
             parts: tuple[tuple[bytes | int, int], ...] = ()) -> None:
        """Write a message of ``size`` bytes on ``tag``, then wake the peer: ``fill(view)`` writes it into the ring,
        or it is the concatenation of ``parts``, each ``(bytes or address, length)``, copied by ``memmove``. Raises
        ``OSError`` where the peer has exited (a broken pipe), :class:`PipelineError` where no ring can be had."""
        record = _record_bytes(size)
        pos = self._place(record)
        ring = self.ring
        assert ring is not None
        struct.pack_into("<qq", ring.map, _CONTROL + pos, tag, size)
        if fill is not None:
            fill(ring.bytes[pos + _HEADER : pos + _HEADER + size])
        else:
            at = ring.address + pos + _HEADER
            for source, length in parts:
                ctypes.memmove(at, source, length)
                at += length
        self.written += record
        try:
            self._wake()
        except OSError:  # a broken pipe: the peer is gone, and will not open (and unlink) the rings it had not
            self.remove_unopened()
            raise

    def _wake(self) -> None:
        """One byte down the pipe. Its 64 KiB (as many unread messages) full: wait for room, within the timeout."""
        try:
            os.write(self.fd, b"\x01")
            return
        except BlockingIOError:
            pass
        deadline = time.monotonic() + self.timeout_s
        poll = select.poll()
        poll.register(self.fd, select.POLLOUT)
        while time.monotonic() < deadline:
            poll.poll(max(1, int((deadline - time.monotonic()) * 1000)))
            try:
                os.write(self.fd, b"\x01")
                return
            except BlockingIOError:
                pass
        raise TimeoutError(f"the peer left {2 ** 16} messages unread for {self.timeout_s:g}s")

    def peer_gone(self) -> bool:
        """Whether the peer closed its read end (exited, or closed its transport)."""
        if self.fd < 0:
            return True
        poll = select.poll()
        poll.register(self.fd, 0)  # POLLERR is reported whatever is asked for
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poll.poll(0))

    def wait_read(self, deadline: float) -> bool:
        """Wait until the peer has read everything sent (``False`` at ``deadline``); raises ``OSError`` where it
        is gone. A sender is thus at most one step ahead of its peers, as on gloo, whose sends complete once
        received: else a first stage looping over forward-only steps would fill ``/dev/shm`` without bound."""
        pause = 50e-6
        while self.ring is not None and self.ring.read_total < self.written:
            if self.peer_gone():
                self.remove_unopened()
                raise BrokenPipeError("the peer closed its end of the shared-memory channel before reading")
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        return True

    def remove_unopened(self) -> None:
        for path in self.made:  # those the peer opened are unlinked already
            path.unlink(missing_ok=True)
        self.made.clear()

    def _place(self, record: int) -> int:
        """Where a record of ``record`` bytes goes in the ring (padding to the ring's start, or moving to a larger
        ring, as needed); ``written`` is left there."""
        ring = self.ring
        if ring is None:
            self.ring = self._new_ring(_ring_size(self.ring_bytes, record))
            return 0
        pos = self.written % ring.size
        pad = ring.size - pos if record > ring.size - pos else 0
        free = ring.size - (self.written - ring.read_total)
        if pad + record + _RESERVE > free:
            # The peer reads what is left of this ring first: a larger one, twice the size at least.
            new = self._new_ring(_ring_size(2 * ring.size, record))
            struct.pack_into("<qq", ring.map, _CONTROL + pos, _SWITCH, new.size)
            ring.close()
            self.ring, self.written = new, 0
            return 0
        if pad:
            struct.pack_into("<qq", ring.map, _CONTROL + pos, _PAD, 0)
            self.written += pad
            return 0
        return pos

    def close(self) -> None:
        gone = self.peer_gone()
        self._release()
        # The rings made here are the peer's to unlink, once it opens them: a message may still be on its way into
        # one, announced before this rank closed; the peer's close() removes those it never opened. A peer that is
        # gone opens nothing more.
        if gone:
            self.remove_unopened()


def _ring_size(at_least: int, record: int) -> int:
    """A ring of ``at_least`` bytes, doubled until it holds two records of ``record`` bytes besides the reserve."""
    size = at_least
    while size < 2 * record + _RESERVE:
        size *= 2
    return size


class _Inbound(_End):
    """This rank's end of the pair from one peer: the ring it reads, the pipe it waits on, and the messages that
    arrived before the one awaited (by tag)."""

    def __init__(self, base: str, fd: int) -> None:
        self.base, self.fd, self.generation = base, fd, -1
        _ENDS.add(self)
        self.ring: _Ring | None = None  # opened with the first message
        self.read = 0  # bytes read from the current ring
        self.credits = 0  # messages announced on the pipe and not read yet
        self.early: dict[int, deque[np.ndarray]] = {}
        self.closed = False
        self.on_eof: Callable[[], None] | None = None
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)

    def next_record(self, timeout_s: float, failed: Callable[[str], PipelineCommError]) -> tuple[int, int, int]:
        """Wait (at most ``timeout_s``) for the next message; its tag, where it starts in :attr:`ring` and its
        length. The caller copies it out, then calls :meth:`consumed`."""
        if not self.credits:
            self._wait(timeout_s, failed)
        try:
            return self._next_record()
        except OSError as err:  # a ring the peer made and removed again: it closed its transport
            raise failed(f"the peer's ring {self.base}-{self.generation} could not be opened ({err})") from err

    def _next_record(self) -> tuple[int, int, int]:
        ring = self.ring
        if ring is None:
            ring = self.ring = self._open_next()
        while True:
            pos = self.read % ring.size
            tag, length = struct.unpack_from("<qq", ring.map, _CONTROL + pos)
            if tag == _PAD:
                self.read += ring.size - pos
            elif tag == _SWITCH:
                new = self._open_next()
                ring.close()
                self.ring = ring = new
                self.read = 0
            else:
                return tag, pos + _HEADER, length

    def _open_next(self) -> _Ring:
        """The sender's next ring, which it made before announcing a message in it."""
        self.generation += 1
        path = Path(f"{self.base}-{self.generation}")
        ring = _Ring(path, create=False)
        path.unlink(missing_ok=True)  # both ends have it now: it goes when both have closed it
        return ring

    def consumed(self, length: int) -> None:
        """The message of :meth:`next_record` (``length`` bytes) is copied out: its space may be written again."""
        assert self.ring is not None
        self.read += _record_bytes(length)
        self.credits -= 1
        self.ring.read_total = self.read  # the sender may reuse the space now

    def _wait(self, timeout_s: float, failed: Callable[[str], PipelineCommError]) -> None:
        if self.closed:
            raise failed("the peer closed its end of the shared-memory channel (it exited, or failed)")
        deadline = None
        while True:
            try:
                got = os.read(self.fd, 4096)
            except BlockingIOError:
                got = None
            if got:
                self.credits += len(got)
                return
            if got == b"":  # every writer gone (and every message read): the peer exited, or closed its transport
                self.closed = True
                self.remove_unopened()
                if self.on_eof is not None:  # nor will it open the rings this rank made for it
                    self.on_eof()
                raise failed("the peer closed its end of the shared-memory channel (it exited, or failed)")
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + timeout_s
            if now >= deadline:
                raise failed("timed out")
            self.poll.poll(max(1, int((deadline - now) * 1000)))

    def remove_unopened(self) -> None:
        """Unlink the rings that the peer made for this rank and this rank did not open: it never will."""
        for path in Path(self.base).parent.glob(f"{Path(self.base).name}-*"):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._release()
        self.remove_unopened()


class _ShmRecv(PendingRecv):
    """A value being received from ``peer`` through shared memory; :meth:`wait` returns it."""

    def __init__(self, transport: "ShmTransport", peer: int, tag: int, channel: Hashable, what: str) -> None:
        self._t = transport
        self.peer, self.tag, self.channel, self.what = peer, tag, channel, what
        # As on gloo: the value a message laid out as the channel's last one would hold, built now (off the path
        # from its arrival to its use) from views of a buffer that the message is copied into.
        expected = transport._expected.get(channel)
        self._prebuilt: tuple[bytes, Any, int, torch.Tensor] | None = None
        if expected is not None:
            # The buffer is held here, not only through the value's tensors: a value without any ([None], the input
            # gradient of a stage before a frozen one) would leave the copy below writing into freed memory.
            buffer = torch.empty(expected.total, dtype=torch.uint8)
            self._prebuilt = (expected.head, _unpack(buffer, expected.meta, expected.base, buffer.numpy()),
                              expected.total, buffer)

    def wait(self) -> Any:
        """Block (at most the transport's timeout) until the value is in; return it."""
        t, tag = self._t, self.tag
        inbound = t._inbound(self.peer, self.what)
        queue = inbound.early.get(tag)
        if queue:
            return self._parse(queue.popleft())
        while True:
            got, start, length = inbound.next_record(t.timeout.total_seconds(),
                                                     lambda cause: t._failed(self.peer, self.what, cause))
            ring = inbound.ring
            assert ring is not None
            if got == tag and self._prebuilt is not None:
                head, value, total, buffer = self._prebuilt
                if length == total and ring.map[_CONTROL + start : _CONTROL + start + len(head)] == head:
                    # A raw copy: no autograd, no version bump of the prepared tensors (few calls: this runs on the
                    # path from the value's arrival to its use, with the caches cold after the wait).
                    ctypes.memmove(buffer.data_ptr(), ring.address + start, total)
                    inbound.consumed(length)
                    return value
            message = ring.bytes[start : start + length].copy()
            inbound.consumed(length)
            if got == tag:
                return self._parse(message)
            inbound.early.setdefault(got, deque()).append(message)

    def _parse(self, host: np.ndarray) -> Any:
        meta_len, length = struct.unpack_from("<qq", host)
        buffer = torch.from_numpy(host)
        if meta_len == _FAILURE:
            self._raise_failure(buffer[_PREFIX : _PREFIX + length])
        base = _aligned(_PREFIX + meta_len)
        head = host[: _PREFIX + meta_len].tobytes()
        meta = self._t.decode(head[_PREFIX:])
        self._t._expected[self.channel] = _Expected(head, meta, base, base + length)
        return _unpack(buffer, meta, base, host)


def _host_key() -> tuple[Any, ...] | None:
    """What two processes share only on one host and one ``/dev/shm``; ``None`` where this transport cannot run."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        st = os.stat(SHM_DIR)
    except OSError:
        return None
    if not os.access(SHM_DIR, os.W_OK):
        return None
    return socket.gethostname(), boot, st.st_dev, st.st_ino


class ShmTransport(Transport):
    """Sends and receives nested values between the CPU ranks of one pipeline process group on this host, through
    shared memory (see the module docstring). The same interface as :class:`Transport`; creating it is a collective
    on ``group`` (every rank of it, at the same point), which raises :class:`PipelineError` on every rank where some
    rank runs on another host or could not open the channels.

    Args:
        group: The pipeline group (``None``: the default group); it must be a gloo group, used to set up.
        timeout: Seconds any single wait may take.
        describe: Returns where the caller is (rank, stage, action), for error messages.
        ring_bytes: Size of each pair's first ring.
    """

    def __init__(self, *, group: dist.ProcessGroup | None = None, timeout: float = 300.0,
                 describe: Callable[[], str] = lambda: "", ring_bytes: int = RING_BYTES) -> None:
        if ring_bytes < 4 * _RECORD_ALIGN or ring_bytes % _RECORD_ALIGN:
            raise ValueError(f"ring_bytes={ring_bytes}: use a multiple of {_RECORD_ALIGN} of at least "
                             f"{4 * _RECORD_ALIGN}")
        super().__init__(group=group, device="cpu", timeout=timeout, describe=describe, exact=False,
                         guard_io_threads=False, background=False)
        size = dist.get_world_size(group)
        keys: list[Any] = [None] * size
        dist.all_gather_object(keys, (_host_key(), uuid.uuid4().hex[:16]), group=group)
        if any(key[0] is None or key[0] != keys[0][0] for key in keys):
            raise PipelineError("the shared-memory transport needs every rank of the pipeline on one Linux x86-64 "
                                "host with a writable /dev/shm, and some are not: use cpu_transport='gloo' (or "
                                "'auto', which picks gloo there)")
        self._ring_bytes = ring_bytes
        self._raw: dict[int, tuple[_Layout, bytes | None]] = {}  # per layout (by id): see send()
        self._outbound: dict[int, _Outbound] = {}
        self._inbounds: dict[int, _Inbound] = {}
        peers = [q for q in range(size) if q != self._rank]
        prefix = f"{SHM_DIR}/lightning_pipe-{os.getuid()}-{keys[0][1]}"
        made: list[Path] = []  # the FIFOs this rank made: unlinked once both ends have them open
        try:
            self._agree(lambda: self._make_ends(prefix, peers, made), "create the channels")
            self._agree(lambda: self._open_ends(prefix, peers), "open the channels")
        finally:
            for path in made:
                path.unlink(missing_ok=True)
        # From here a peer that exits is seen (end-of-file on its pipe), not waited for until the timeout.

    def _make_ends(self, prefix: str, peers: list[int], made: list[Path]) -> None:
        for q in peers:  # the pipe from q, read here
            fifo = Path(f"{prefix}-{q}-{self._rank}.fifo")
            os.mkfifo(fifo, 0o600)
            made.append(fifo)
            self._inbounds[q] = _Inbound(f"{prefix}-{q}-{self._rank}", os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))

    def _open_ends(self, prefix: str, peers: list[int]) -> None:
        for q in peers:  # the pipe to q: q has its read end open (a blocking open would wait for it otherwise)
            # Non-blocking: q's read end is open (or q is gone: ENXIO, raised on every rank); a full pipe is then
            # waited for within the timeout (see _Outbound.post), never without bound.
            fd = os.open(f"{prefix}-{self._rank}-{q}.fifo", os.O_WRONLY | os.O_NONBLOCK)
            self._outbound[q] = _Outbound(f"{prefix}-{self._rank}-{q}", fd, self._ring_bytes,
                                          self.timeout.total_seconds())
            self._inbounds[q].on_eof = self._outbound[q].remove_unopened

    def _agree(self, work: Callable[[], None], what: str) -> None:
        """Run ``work`` here and raise on every rank if it failed on any (each then releases what it holds)."""
        error: BaseException | None = None
        try:
            work()
        except Exception as err:  # noqa: BLE001 - raised on every rank below
            error = err
        flags = torch.tensor([0 if error is None else 1])
        dist.all_reduce(flags, group=self.group)
        if int(flags) == 0:
            return
        self.close()
        cause = f" ({type(error).__name__}: {error})" if error is not None else " on another rank"
        raise PipelineError(f"the shared-memory transport could not {what}{cause}; use cpu_transport='gloo' to "
                            "send through the process group")

    def _inbound(self, peer: int, what: str) -> _Inbound:
        inbound = self._inbounds.get(peer)
        if inbound is None or inbound.fd < 0:
            raise PipelineCommError(self._message(peer, what, "no shared-memory channel from that rank (closed?)"))
        return inbound

    def _failed(self, peer: int, what: str, cause: str) -> PipelineCommError:
        return PipelineCommError(self._message(peer, what, cause))

    def recv(self, peer: int, tag: int, what: str, channel: Hashable = None) -> PendingRecv:
        """Prepare to receive the value that ``peer`` sends on ``tag`` (nothing is posted: it is read from the
        ring when :meth:`PendingRecv.wait` is called)."""
        return _ShmRecv(self, peer, tag, (peer, channel), what)

    def send(self, value: Any, peer: int, tag: int, what: str, channel: Hashable = None) -> None:
        """Write ``value`` into the ring to ``peer`` and wake it; waits for the peer only where 64 KiB of wake-ups
        lie unread in the pipe (bounded by the timeout)."""
        tensors, layout = _message_layout(value, self._layouts)
        meta, base = layout.meta, layout.base
        size = base + meta[2]
        out = self._outbound.get(peer)
        if out is None or out.fd < 0:
            raise PipelineCommError(self._message(peer, what, "no shared-memory channel to that rank (closed?)"))

        # One real CPU tensor in one piece (the usual value) is copied raw, prefix and payload, by two memmove calls:
        # right after a sleep every torch call costs tens of microseconds here (cold caches), and a send is on the
        # path from one action to the next. Anything else goes through torch's copies.
        fast = self._raw.get(id(layout))
        if fast is None or fast[0] is not layout:
            if len(self._raw) >= 256:  # as the layout cache: keeps the layouts alive, so bounded alike
                self._raw.clear()
            fast = self._raw[id(layout)] = (layout, _raw_prefix(layout))
        prefix = fast[1]
        one = tensors[0] if prefix is not None else None  # a layout with a raw prefix has exactly one tensor
        if one is not None and type(one) in _PLAIN and one.is_cpu and one.is_contiguous() and not one.is_neg():
            parts: tuple[tuple[bytes | int, int], ...] = ((prefix, base), (one.data_ptr(), meta[2])) if meta[2] \
                else ((prefix, base),)
            fill = None
        else:
            parts = ()

            def fill(view: np.ndarray) -> None:
                body = torch.from_numpy(view)
                body[:base] = layout.prefix
                _pack(body, tensors, meta[1], base)

        try:
            out.post(tag, size, fill, parts)
        except (OSError, TimeoutError) as err:  # a broken pipe: the peer exited
            raise self._comm_error(peer, what, err) from err

    def send_failure(self, error: BaseException, peer: int, tag: int) -> None:
        """Tell ``peer``, waiting for a value on ``tag``, that this rank failed (best effort, never blocks)."""
        out = self._outbound.get(peer)
        if out is None or out.fd < 0:
            return
        message = _host_view(self._failure_message(error)).tobytes()
        try:
            out.timeout_s, timeout = 0.0, out.timeout_s  # best effort: never waits for room in the pipe
            out.post(tag, len(message), parts=((message, len(message)),))
        except (OSError, PipelineError, TimeoutError):  # the peer may be gone already
            pass
        finally:
            out.timeout_s = timeout

    def flush(self) -> None:
        """Wait (bounded) until every peer has read what this rank sent it, as gloo's sends complete once received."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        for peer, out in self._outbound.items():
            try:
                done = out.wait_read(deadline)
            except OSError as err:
                raise self._comm_error(peer, "waiting for the peer to read what was sent", err) from err
            if not done:
                raise PipelineCommError(self._message(peer, "waiting for the peer to read what was sent", "timed out"))

    def drain(self, seconds: float) -> None:
        """Nothing to wait for: a send is complete once written."""

    def reap(self) -> None:
        """Nothing to forget: sends are not kept."""

    def end_step(self) -> None:
        """Nothing to agree between steps (rings grow when a message needs it)."""

    def close(self) -> None:
        """Close every channel; peers waiting on this rank then fail at once. The transport cannot be used after."""
        for out in self._outbound.values() if hasattr(self, "_outbound") else ():
            out.close()
        for inbound in self._inbounds.values() if hasattr(self, "_inbounds") else ():
            inbound.close()
        super().close()


def make_transport(
    *,
    kind: str = "auto",
    group: dist.ProcessGroup | None = None,
    device: torch.device | str = "cpu",
    timeout: float = 300.0,
    reverse_group: dist.ProcessGroup | None = None,
    guard_io_threads: bool | None = None,
    background: bool | None = None,
) -> Transport:
    """The transport for a pipeline group: :class:`ShmTransport` for CPU ranks of one host (``kind="auto"`` or
    ``"shm"``), else :class:`Transport` over the process group. A collective on ``group`` where CPU ranks may use
    shared memory (every rank calls it with the same arguments). ``background=True`` (gloo's poster thread) asks for
    the gloo transport. ``kind="shm"`` raises on every rank where shared memory cannot be used."""
    if kind not in TRANSPORT_KINDS:
        raise ValueError(f"cpu_transport={kind!r}: choose one of {', '.join(map(repr, TRANSPORT_KINDS))}")
    cpu = torch.device(device).type == "cpu" and dist.get_backend(group) == "gloo"
    if kind == "shm" and not cpu:
        raise PipelineError(f"cpu_transport='shm' is for CPU ranks on gloo (this run: {torch.device(device).type} "
                            f"on {dist.get_backend(group)}); leave it 'auto'")
    if kind == "shm" and background:
        raise PipelineError("cpu_transport='shm' sends on the caller's thread: comm_thread=True is for gloo's "
                            "transport; leave one of them unset")
    if cpu and kind != "gloo" and not background and dist.get_world_size(group) > 1:
        try:
            return ShmTransport(group=group, timeout=timeout)
        except PipelineError:
            if kind == "shm":
                raise
    return Transport(group=group, device=device, timeout=timeout, reverse_group=reverse_group,
                     guard_io_threads=guard_io_threads, background=background)
