"""A model of how NCCL runs point-to-point operations, to check the exact protocol's operation order for hangs.

ProcessGroupNCCL runs the sends and receives between two ranks of one group in order on one CUDA stream, and a send
may wait there until its receive is reached on the other side (assumed here of every send: the worst case). The host
waits for a value where the transport waits for its work. Traces are each rank's operations, as the transport made
them: ``("send", group, peer)``, ``("recv", group, peer)`` and ``("wait", i)`` (the host waits for operation ``i``).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

Op = tuple[Any, ...]


def find_hang(traces: Sequence[Sequence[Op]]) -> str | None:
    """``None`` if every operation completes under the model, else where each unfinished rank is stuck."""
    n = len(traces)
    host = [0] * n  # next entry of each rank's trace
    streams: dict[tuple[int, Any, frozenset[int]], deque[int]] = {}  # (rank, group, pair) -> ops in order
    where: dict[tuple[int, int], tuple[int, Any, frozenset[int]]] = {}  # (rank, op) -> its stream
    done: set[tuple[int, int]] = set()
    # The k-th send from a to b on a group meets the k-th receive at b from a on that group.
    sent: dict[tuple[Any, int, int], list[int]] = {}
    received: dict[tuple[Any, int, int], list[int]] = {}
    index: dict[tuple[int, int], tuple[Any, int, int, int]] = {}
    for rank, trace in enumerate(traces):
        for i, op in enumerate(trace):
            if op[0] in ("send", "recv"):
                _, group, peer = op
                key = (group, rank, peer) if op[0] == "send" else (group, peer, rank)
                bucket = (sent if op[0] == "send" else received).setdefault(key, [])
                index[(rank, i)] = (*key, len(bucket))
                bucket.append(i)
    progress = True
    while progress:
        progress = False
        for rank, trace in enumerate(traces):
            while host[rank] < len(trace):
                op = trace[host[rank]]
                if op[0] == "wait":
                    if (rank, op[1]) not in done:
                        break
                else:
                    stream = (rank, op[1], frozenset((rank, op[2])))
                    streams.setdefault(stream, deque()).append(host[rank])
                    where[(rank, host[rank])] = stream
                host[rank] += 1
                progress = True
        for (rank, _, _), queue in list(streams.items()):
            if not queue or traces[rank][queue[0]][0] != "send":
                continue
            group, src, dst, k = index[(rank, queue[0])]
            mates = received.get((group, src, dst), [])
            if k >= len(mates):
                continue  # never received: reported below
            mate = (dst, mates[k])
            other = where.get(mate)
            if other is not None and streams[other] and streams[other][0] == mates[k]:
                done.update({(rank, queue[0]), mate})
                queue.popleft()
                streams[other].popleft()
                progress = True
    stuck = [f"rank {r} at {traces[r][host[r]] if host[r] < len(traces[r]) else 'its end'}"
             + "".join(f"; {q[0]}:{traces[r][q[0]]} heads its stream with rank {sorted(p - {r})[0]} on {g}"
                       for (sr, g, p), q in streams.items() if sr == r and q)
             for r in range(n) if host[r] < len(traces[r]) or any(q for (sr, _, _), q in streams.items() if sr == r)]
    return "; ".join(stuck) if stuck else None
