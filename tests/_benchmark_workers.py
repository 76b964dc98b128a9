"""Workers for the tests of ``benchmarks/schedule_efficiency.collect_from_workers`` (importable by spawned children)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

ITEMS, ITEM_BYTES = 64, 16 * 1024  # 1 MiB in all: far more than a pipe holds, so put() blocks until it is read


def put_many(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    for i in range(ITEMS):
        queue.put((rank, i, bytes(ITEM_BYTES)))


def rank1_dies(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    if rank == 1:
        os._exit(3)
    time.sleep(600)  # what a rank waiting for its dead peer does
