"""Point-to-point transfer of nested values between pipeline ranks with non-blocking isend/irecv.

A value is sent as up to three messages on its own tag: a fixed-size header (the length of the metadata, and
the metadata itself when it fits), the metadata when it did not fit, and one flat byte payload holding every
tensor. Shapes and dtypes can therefore change from one message to the next. Receives are posted ahead: the
header is posted early, and :meth:`PendingRecv.progress` posts the payload as soon as the header is in, so the
payload travels while the receiver computes.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from lightning_pipe.engine.tree import TreeSpec, flatten, unflatten
from lightning_pipe.errors import PipelineCommError

__all__ = ["Transport", "PendingRecv"]

HEADER_BYTES = 1024
"""Size of the fixed header. Metadata of up to ``HEADER_BYTES - 8`` bytes rides inside it."""
_ALIGN = 16
_PARTS = 3  # header, long metadata, payload


@dataclass(frozen=True)
class _TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool
    offset: int
    nbytes: int


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class PendingRecv:
    """A value being received from ``peer``; :meth:`wait` returns it."""

    def __init__(self, transport: "Transport", peer: int, tag: int, what: str) -> None:
        self._t = transport
        self.peer = peer
        self.tag = tag
        self.what = what
        self._header = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=transport.device)
        self._header_work = transport._irecv(self._header, peer, tag * _PARTS)
        self._meta: tuple[TreeSpec, list[_TensorMeta], int] | None = None
        self._payload: torch.Tensor | None = None
        self._payload_work: dist.Work | None = None

    def progress(self) -> None:
        """Post the payload's receive if the header has arrived; never blocks."""
        if self._meta is None and self._header_work.is_completed():
            self._read_header(self._header_work)

    def _read_header(self, work: dist.Work) -> None:
        self._t._wait(work, self, "header")
        header = self._header.cpu()
        n = int(header[:8].view(torch.int64).item())
        if n <= HEADER_BYTES - 8:
            raw = header[8 : 8 + n].numpy().tobytes()
        else:
            long_meta = torch.empty(n, dtype=torch.uint8, device=self._t.device)
            self._t._wait(self._t._irecv(long_meta, self.peer, self.tag * _PARTS + 1), self, "metadata")
            raw = long_meta.cpu().numpy().tobytes()
        self._meta = pickle.loads(raw)
        nbytes = self._meta[2]
        if nbytes:
            self._payload = torch.empty(nbytes, dtype=torch.uint8, device=self._t.device)
            self._payload_work = self._t._irecv(self._payload, self.peer, self.tag * _PARTS + 2)

    def wait(self) -> Any:
        """Block (at most the transport's timeout per message) until the value is in; return it."""
        if self._meta is None:
            self._read_header(self._header_work)
        assert self._meta is not None
        spec, metas, _ = self._meta
        if self._payload_work is not None:
            self._t._wait(self._payload_work, self, "payload")
        tensors: list[torch.Tensor] = []
        for m in metas:
            assert self._payload is not None
            t = self._payload[m.offset : m.offset + m.nbytes].view(m.dtype).view(m.shape)
            if m.requires_grad:
                t.requires_grad_(True)
            tensors.append(t)
        return unflatten(tensors, spec)


class Transport:
    """Sends and receives nested values between the ranks of one pipeline process group.

    ``peer`` arguments are ranks within ``group``. Every wait is bounded by ``timeout`` seconds; a failure or a
    timeout raises :class:`PipelineCommError` with the context given by ``describe``.
    """

    def __init__(
        self,
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        timeout: float = 300.0,
        describe: Callable[[], str] = lambda: "",
    ) -> None:
        self.group = group
        self.device = torch.device(device)
        self.timeout = datetime.timedelta(seconds=timeout)
        self.describe = describe
        self._sends: list[tuple[dist.Work, int, str, Any]] = []

    # -- raw operations ------------------------------------------------------------------------------------
    def _irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> dist.Work:
        return dist.irecv(tensor, group=self.group, group_src=peer, tag=tag)

    def _wait(self, work: dist.Work, pending: PendingRecv | None, part: str, peer: int | None = None,
              what: str = "") -> None:
        if pending is not None:
            peer, what = pending.peer, pending.what
        try:
            ok = work.wait(timeout=self.timeout)
        except RuntimeError as err:
            raise PipelineCommError(self._message(part, peer, what, str(err))) from err
        if ok is False:
            raise PipelineCommError(self._message(part, peer, what, "the operation reported failure"))

    def _message(self, part: str, peer: int | None, what: str, cause: str) -> str:
        where = self.describe()
        return (f"{where}: {what} ({part}) with pipeline rank {peer} failed or timed out after at most "
                f"{self.timeout.total_seconds():g}s (PipelineStrategy(timeout=...) sets the limit). "
                f"Check the logs of rank {peer}: it may have crashed. Cause: {cause.strip().splitlines()[0][:300]}")

    # -- public API -----------------------------------------------------------------------------------------
    def recv(self, peer: int, tag: int, what: str) -> PendingRecv:
        """Post the receive of the value that ``peer`` sends on ``tag``."""
        return PendingRecv(self, peer, tag, what)

    def send(self, value: Any, peer: int, tag: int, what: str) -> None:
        """Start sending ``value`` (a tensor or a nested container of tensors and other leaves) to ``peer``."""
        tensors, spec = flatten(value)
        metas: list[_TensorMeta] = []
        offset = 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            metas.append(_TensorMeta(t.dtype, tuple(t.shape), bool(t.requires_grad and t.is_floating_point()),
                                     offset, nbytes))
            offset = _aligned(offset + nbytes)
        if len(tensors) == 1 and tensors[0].numel() > 0:
            # The common case: one activation or gradient, sent as it is without a copy.
            payload = tensors[0].detach().contiguous().view(-1).view(torch.uint8)
        elif offset:
            payload = torch.empty(offset, dtype=torch.uint8, device=self.device)
            for t, m in zip(tensors, metas):
                if m.nbytes:
                    payload[m.offset : m.offset + m.nbytes].view(t.dtype).view(t.shape).copy_(t.detach())
        else:
            payload = None
        raw = pickle.dumps((spec, metas, offset if payload is not None else 0), protocol=pickle.HIGHEST_PROTOCOL)
        header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        header[:8].view(torch.int64)[0] = len(raw)
        ops: list[dist.P2POp] = []
        keep: list[torch.Tensor] = []
        if len(raw) <= HEADER_BYTES - 8:
            header[8 : 8 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        header = header.to(self.device)
        ops.append(dist.P2POp(dist.isend, header, group=self.group, group_peer=peer, tag=tag * _PARTS))
        keep.append(header)
        if len(raw) > HEADER_BYTES - 8:
            long_meta = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.device)
            ops.append(dist.P2POp(dist.isend, long_meta, group=self.group, group_peer=peer, tag=tag * _PARTS + 1))
            keep.append(long_meta)
        if payload is not None:
            ops.append(dist.P2POp(dist.isend, payload, group=self.group, group_peer=peer, tag=tag * _PARTS + 2))
            keep.append(payload)
        for work in dist.batch_isend_irecv(ops):
            # The buffers are kept alive until the send completes.
            self._sends.append((work, peer, what, keep))

    def flush(self) -> None:
        """Wait (bounded) until every send started so far has completed."""
        sends, self._sends = self._sends, []
        for work, peer, what, _ in sends:
            self._wait(work, None, "send", peer, what)

    def reap(self) -> None:
        """Forget the sends that have already completed (keeps the list short during a long step)."""
        self._sends = [s for s in self._sends if not s[0].is_completed()]
