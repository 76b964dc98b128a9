"""Tearing the process groups down at the end of a script that drove the engine itself."""

from __future__ import annotations

import gc

import torch.distributed as dist

__all__ = ["destroy_process_group"]


def destroy_process_group() -> None:
    """``torch.distributed.destroy_process_group()``, then free what still refers to the groups (finished works and
    their tensors) while the interpreter is whole. Left to the interpreter's final garbage collection, a gloo worker
    thread sometimes aborts the process at exit ("terminate called without an active exception") after a
    successful run. A no-op when no group was initialized."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
