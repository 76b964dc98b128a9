"""Run a function on ``world_size`` fresh processes joined in a gloo group, with a hard deadline.

Each rank's return value (or the exception it raised, with its type, message and time) is written to a file and
handed back to the test; a rank still running at the deadline is killed and reported as hung, so a test fails
instead of hanging.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any


@dataclass
class RankOutcome:
    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    elapsed: float = 0.0
    """Seconds from the group's set-up to the return or the raise."""
    exitcode: int | None = None
    hung: bool = False

    def unwrap(self) -> Any:
        if self.hung:
            raise AssertionError(f"rank {self.rank} hung past the deadline")
        if self.error_type is not None:
            raise AssertionError(f"rank {self.rank} raised {self.error_type}: {self.error}\n{self.traceback}")
        return self.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(target: str, rank: int, world_size: int, port: int, out: str, kwargs: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    outcome = RankOutcome(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    t0 = time.monotonic()
    try:
        module, name = target.rsplit(".", 1)
        outcome.value = getattr(importlib.import_module(module), name)(rank=rank, world_size=world_size, **kwargs)
    except BaseException as err:  # noqa: BLE001 - reported to the test
        outcome.error_type = type(err).__name__
        outcome.error = str(err)
        outcome.traceback = traceback.format_exc()
    outcome.elapsed = time.monotonic() - t0
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(outcome, f)
    # Leave without tearing the group down politely: a failed peer must not make this exit wait.
    os._exit(0)


def launch(target: str, world_size: int, *, deadline: float = 120.0, **kwargs: Any) -> list[RankOutcome]:
    """Run ``target`` (``"module.function"``, called with ``rank``, ``world_size`` and ``kwargs``) on
    ``world_size`` processes; return one outcome per rank once all have ended or ``deadline`` seconds passed."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_entry, args=(target, r, world_size, port, out, kwargs)) for r in range(world_size)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        outcomes = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                outcomes.append(RankOutcome(r, hung=True))
                continue
            path = os.path.join(out, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    outcome = pickle.load(f)
            else:
                outcome = RankOutcome(r, error_type="ProcessDied", error=f"exit code {p.exitcode}")
            outcome.exitcode = p.exitcode
            outcomes.append(outcome)
        return outcomes
