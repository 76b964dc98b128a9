"""The shared-memory channel's rings, in one process: a pipe stands for the FIFO between two ranks, a temporary
folder for /dev/shm. What crosses processes is tested in ``test_engine_distributed.py``."""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from lightning_pipe.engine import shm
from lightning_pipe.engine.shm import _Inbound, _Outbound, _Ring
from lightning_pipe.errors import PipelineCommError, PipelineError


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[_Outbound, _Inbound]]:
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)  # as the FIFO's write end is opened
    base = str(tmp_path / "pair")
    out, inbound = _Outbound(base, write, ring_bytes=256), _Inbound(base, read)
    yield out, inbound
    out.close()
    inbound.close()


def _failed(cause: str) -> PipelineCommError:
    return PipelineCommError(cause)


def _payload(i: int, size: int) -> np.ndarray:
    return (np.arange(size, dtype=np.int64) * 7 + i).astype(np.uint8)


def _take(inbound: _Inbound, timeout: float = 5.0) -> tuple[int, np.ndarray]:
    tag, start, length = inbound.next_record(timeout, _failed)
    assert inbound.ring is not None
    message = inbound.ring.bytes[start : start + length].copy()
    inbound.consumed(length)
    return tag, message


def test_messages_of_any_size_arrive_whole_and_in_order(pair: tuple[_Outbound, _Inbound], tmp_path: Path) -> None:
    """Sizes from nothing to 40 times the first ring, the sender up to 12 messages ahead: each arrives with its tag
    and bytes, the records that do not fit before the ring's end pad to its start, and the pair moves to larger rings
    only as needed (a few times, not once per message). Every ring file is gone once the receiver opened it."""
    out, inbound = pair
    rng = random.Random(0)
    sizes = [rng.choice([0, 1, 15, 16, 48, 100, 200, 700, 3000, 10_000]) for _ in range(400)]
    sent = taken = 0
    pads = 0
    while taken < len(sizes):
        for _ in range(rng.randint(0, 12)):
            if sent < len(sizes):
                before = (out.generation, out.written)
                out.post(sent, sizes[sent], lambda view, i=sent: view.__setitem__(slice(None), _payload(i, view.size)))
                pads += out.generation == before[0] and out.written - before[1] > shm._record_bytes(sizes[sent])
                sent += 1
        for _ in range(rng.randint(1, 12)):
            if taken < sent:
                tag, message = _take(inbound)
                assert tag == taken and np.array_equal(message, _payload(taken, sizes[taken])), taken
                taken += 1
    assert pads > 0
    assert 1 <= out.generation == inbound.generation <= 8, out.generation
    # At most 12 messages of 10 KB or less in flight (123 KB of records): the ring holds them, and does not grow
    # past the power of two above that.
    assert out.ring is not None and out.ring.size <= 128 * 1024, out.ring.size
    assert list(tmp_path.iterdir()) == []


def test_a_ring_that_cannot_be_had_fails_with_what_to_change(pair: tuple[_Outbound, _Inbound], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A full /dev/shm (Docker gives 64 MiB) must not kill the process with SIGBUS at the first write into a page:
    the pages are taken when the ring is made, and a failure names the way out. The old ring stays usable."""
    out, inbound = pair
    out.post(1, 10, lambda view: view.__setitem__(slice(None), 5))

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shm.os, "posix_fallocate", full)
    with pytest.raises(PipelineError) as info:
        out.post(2, 5000, lambda view: None)  # needs a larger ring
    assert "could not have them (No space left on device" in str(info.value)
    assert "docker run --shm-size" in str(info.value) and "cpu_transport='gloo'" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair-0"]  # the half-made ring removed
    monkeypatch.undo()
    out.post(3, 20, lambda view: view.__setitem__(slice(None), 9))
    tag, message = _take(inbound)
    assert tag == 1 and np.array_equal(message, np.full(10, 5, dtype=np.uint8))
    tag, message = _take(inbound)
    assert tag == 3 and np.array_equal(message, np.full(20, 9, dtype=np.uint8))


def test_a_peer_that_exits_is_seen_at_once_and_its_rings_removed(pair: tuple[_Outbound, _Inbound],
                                                                 tmp_path: Path) -> None:
    """The write end of the pipe closes with the process: the receiver fails at once, naming it, and removes the
    rings that the peer made but it never opened (there is nobody else left to)."""
    out, inbound = pair
    out.post(1, 10, lambda view: None)
    assert _take(inbound)[0] == 1
    out._new_ring(4096)  # made, not announced: as when the peer dies in the middle of a send
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair-1"]
    os.close(out.fd)
    out.fd = -1
    start = time.monotonic()
    with pytest.raises(PipelineCommError, match="closed its end of the shared-memory channel"):
        inbound.next_record(30.0, _failed)
    assert time.monotonic() - start < 5.0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PipelineCommError, match="closed its end"):  # and stays failed
        inbound.next_record(30.0, _failed)


def test_a_silent_peer_turns_into_a_timeout(pair: tuple[_Outbound, _Inbound]) -> None:
    _, inbound = pair
    start = time.monotonic()
    with pytest.raises(PipelineCommError, match="timed out"):
        inbound.next_record(0.3, _failed)
    assert 0.25 <= time.monotonic() - start < 3.0


def test_ring_sizes_must_be_whole_records() -> None:
    with pytest.raises(ValueError, match="ring_bytes=1000: use a multiple of 64 of at least 256"):
        shm.ShmTransport(ring_bytes=1000)


def test_a_ring_made_here_is_read_there_with_its_size(tmp_path: Path) -> None:
    made = _Ring(tmp_path / "r", 1024, create=True)
    opened = _Ring(tmp_path / "r", create=False)
    assert opened.size == made.size == 1024
    made.bytes[:4] = [1, 2, 3, 4]
    assert opened.bytes[:4].tolist() == [1, 2, 3, 4]
    opened.read_total = 77
    assert made.read_total == 77
    made.close()
    opened.close()


def test_messages_sent_before_the_sender_closed_are_still_read(pair: tuple[_Outbound, _Inbound],
                                                               tmp_path: Path) -> None:
    """A rank may finish its step and close its transport while its last message, in a ring the peer has not opened
    yet, is still to be read: the ring stays until the peer opens it; only then does the peer see the end."""
    out, inbound = pair
    out.post(1, 10, lambda view: view.__setitem__(slice(None), 3))
    out.post(2, 5000, lambda view: view.__setitem__(slice(None), 4))  # a larger ring
    out.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair-0", "pair-1"]
    assert _take(inbound)[0] == 1
    tag, message = _take(inbound)
    assert tag == 2 and message.size == 5000 and (message == 4).all()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PipelineCommError, match="closed its end"):
        inbound.next_record(30.0, _failed)


def test_the_receiver_removes_rings_it_never_opened_when_it_closes(pair: tuple[_Outbound, _Inbound],
                                                                   tmp_path: Path) -> None:
    out, inbound = pair
    out.post(1, 10, lambda view: None)
    inbound.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):  # and the sender learns that the peer is gone at its next send
        out.post(2, 10, lambda view: None)


def test_a_forked_child_holds_no_end_of_the_pipes(pair: tuple[_Outbound, _Inbound]) -> None:
    """A DataLoader worker forked from a rank must not keep the rank's write ends open: a peer would not see the rank
    exit while the worker lives."""
    out, inbound = pair
    write_fd, read_fd = out.fd, inbound.fd
    pid = os.fork()
    if pid == 0:  # the child: its copies are closed
        closed = out.fd == inbound.fd == -1
        for fd in (write_fd, read_fd):
            try:
                os.fstat(fd)
                closed = False
            except OSError:
                pass
        os._exit(0 if closed else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    out.post(1, 10, lambda view: view.__setitem__(slice(None), 2))  # the parent's ends still work
    assert _take(inbound)[0] == 1


def test_a_sender_waits_for_its_peer_to_read_at_the_end_of_a_step(pair: tuple[_Outbound, _Inbound],
                                                                  tmp_path: Path) -> None:
    """flush(): at most one step ahead of its peer, as gloo's sends complete once received (a first stage looping
    over forward-only steps would otherwise fill /dev/shm); bounded; a peer gone is an error, and its rings go."""
    out, inbound = pair
    assert out.wait_read(time.monotonic())  # nothing sent
    out.post(1, 100, lambda view: None)
    out.post(2, 5000, lambda view: None)  # in a larger ring
    start = time.monotonic()
    assert not out.wait_read(start + 0.2)  # unread: gives up at the deadline
    assert 0.15 <= time.monotonic() - start < 2.0
    _take(inbound)
    assert not out.wait_read(time.monotonic() + 0.05)  # one of two read
    _take(inbound)
    assert out.wait_read(time.monotonic() + 5.0)
    out.post(3, 10, lambda view: None)
    out.post(4, 40_000, lambda view: None)  # in a ring the peer never opens
    os.close(inbound.fd)  # the peer dies (without its close(), which would remove that ring itself)
    inbound.fd = -1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair-2"]
    with pytest.raises(BrokenPipeError):
        out.wait_read(time.monotonic() + 5.0)
    assert list(tmp_path.iterdir()) == []


def test_a_full_pipe_is_waited_for_within_the_timeout(pair: tuple[_Outbound, _Inbound]) -> None:
    """64 KiB of unread wake-up bytes (as many unread messages): the send waits for room, not for ever."""
    out, inbound = pair
    while True:
        try:
            os.write(out.fd, b"x" * 4096)
        except BlockingIOError:
            break
    out.timeout_s = 0.2
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="messages unread for 0.2s"):
        out.post(1, 10, lambda view: None)
    assert 0.15 <= time.monotonic() - start < 2.0


def test_a_prepared_receive_holds_its_buffer_even_for_a_value_without_tensors() -> None:
    """The message is copied raw into the buffer of the prepared value: the buffer must live as long as the receive,
    also when the value holds no view of it ([None]: heap corruption, seen as 'malloc(): smallbin double linked list
    corrupted' under a frozen stage, before this was held)."""
    import gc
    import types

    from lightning_pipe.engine.shm import _ShmRecv
    from lightning_pipe.engine.transport import _Expected, _message_layout

    _, layout = _message_layout([None], {})
    head = layout.prefix.numpy().tobytes()
    transport = types.SimpleNamespace(_expected={"c": _Expected(head, layout.meta, layout.base, layout.base)})
    recv = _ShmRecv(transport, 0, 1, "c", "value")  # type: ignore[arg-type]
    gc.collect()
    assert recv._prebuilt is not None
    _, value, total, buffer = recv._prebuilt
    assert value == [None] and buffer.numel() == total == layout.base
