"""Sharded checkpoints keyed by full parameter names, written with ``torch.distributed.checkpoint`` (DCP).

Layout (Lightning's sharded layout, as its FSDP and ModelParallel strategies write it): a directory holding the
DCP shards and ``meta.pt`` (everything but weights and optimizer states, written by rank 0). In the shards:

* ``state_dict.<full name>``: every stage's weights; a name held by several ranks (replicas, modules outside the
  chain) is written once;
* ``optimizer_<i>.state.<full name>.<key>``: the optimizer state of each parameter, and
  ``optimizer_<i>.hparams.<full name>.<key>`` the hyper-parameters of the group it belongs to (so stages whose
  param groups differ restore exactly).

Everything is addressed by name, so a checkpoint loads into any layout (pp, dp) with no conversion: each rank reads
the names it holds. A save goes to a temporary directory that replaces the old checkpoint only once every rank has
written, so an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from lightning_pipe.errors import CheckpointNotFoundError, PipelineError, on_every_rank

__all__ = [
    "META_FILE", "optimizer_state_by_name", "load_optimizer_state_by_name", "save_sharded", "load_sharded",
    "is_sharded_checkpoint", "consolidate", "plain_optimizer_state_by_name", "scheduler_state_by_name",
    "load_scheduler_state_by_name", "main", "remove_checkpoint_path", "checkpoint_kind",
]

META_FILE = "meta.pt"  # the name Lightning's sharded checkpoints use for their non-tensor part
_HPARAMS_SKIP = ("params",)


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file()


# -- optimizer state by parameter name ---------------------------------------------------------------------------
def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """``{"state": {name: {key: value}}, "hparams": {name: group hyper-parameters}, "groups": {name: index of its
    param group}}`` for ``optimizer`` (the index lets :func:`consolidate` list the groups in the order
    ``configure_optimizers`` made them)."""
    sd = optimizer.state_dict()
    state: dict[str, Any] = {}
    hparams: dict[str, Any] = {}
    groups: dict[str, int] = {}
    for group_index, (group_sd, group) in enumerate(zip(sd["param_groups"], optimizer.param_groups)):
        hp = {k: v for k, v in group_sd.items() if k not in _HPARAMS_SKIP}
        for index, param in zip(group_sd["params"], group["params"]):
            name = names[id(param)]
            hparams[name] = hp
            groups[name] = group_index
            if index in sd["state"]:
                state[name] = sd["state"][index]
    return {"state": state, "hparams": hparams, "groups": groups}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str],
                                 saved: dict[str, Any]) -> None:
    """Load a name-keyed optimizer state into ``optimizer`` (whose groups may be cut differently)."""
    sd = optimizer.state_dict()
    state: dict[int, Any] = {}
    for group_sd, group in zip(sd["param_groups"], optimizer.param_groups):
        saved_hparams = []
        for index, param in zip(group_sd["params"], group["params"]):
            name = names[id(param)]
            if name in saved.get("state", {}):  # absent altogether for an optimizer without state (plain SGD)
                state[index] = saved["state"][name]
            if name in saved.get("hparams", {}):
                saved_hparams.append(saved["hparams"][name])
        distinct = [h for i, h in enumerate(saved_hparams) if h not in saved_hparams[:i]]
        if len(distinct) > 1:
            raise PipelineError(
                "a param group of this stage's optimizer holds parameters that were saved with different "
                f"hyper-parameters ({distinct[0]} vs {distinct[1]}); configure_optimizers must group them as when "
                "the checkpoint was written"
            )
        if distinct:
            group_sd.update({k: v for k, v in distinct[0].items() if k in group_sd and k not in _HPARAMS_SKIP})
    sd["state"] = state
    optimizer.load_state_dict(sd)


def scheduler_state_by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                            names: dict[int, str]) -> dict[str, dict[str, Any]]:
    """The per-param-group entries of an LR scheduler's ``state`` (its lists of one number per group of
    ``optimizer``: ``base_lrs``, ``_last_lr``, ..., also those of the schedulers it chains: ``SequentialLR``,
    ``ChainedScheduler``), by the name of each parameter of the group; a chained scheduler's entry is keyed by its
    path (``_schedulers/1/base_lrs``)."""
    paths = _per_group_paths(state, len(optimizer.param_groups))
    return {names[id(p)]: {_path_key(path): _at(state, path)[g] for path in paths}
            for g, group in enumerate(optimizer.param_groups) for p in group["params"]} if paths else {}


def load_scheduler_state_by_name(state: dict[str, Any], current: dict[str, Any], optimizer: torch.optim.Optimizer,
                                 names: dict[int, str], saved: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``state`` (an LR scheduler's state as rank 0 saved it) with its per-group lists rebuilt for this rank's
    ``optimizer`` from ``saved`` (:func:`scheduler_state_by_name`, merged over the ranks). A group none of whose
    parameters was saved keeps ``current``'s value (the scheduler as ``configure_optimizers`` just made it)."""
    if not saved:
        return state
    out = copy.deepcopy(state)
    for path in _per_group_paths(current, len(optimizer.param_groups)):
        key = _path_key(path)
        values = []
        for g, group in enumerate(optimizer.param_groups):
            found = [saved[n][key] for n in (names[id(p)] for p in group["params"]) if key in saved.get(n, {})]
            values.append(found[0] if found else _at(current, path)[g])
        try:
            _at(out, path[:-1])[path[-1]] = values
        except (KeyError, IndexError, TypeError):  # rank 0's scheduler chains others: this rank's lists stand
            return state
    return out


def _per_group_paths(state: dict[str, Any], num_groups: int, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where ``state`` holds a list of one number per param group: top-level keys, and inside the states of the
    schedulers it chains (``_schedulers``: a list of state dicts)."""
    paths: list[tuple[Any, ...]] = []
    for key, value in state.items():
        if isinstance(value, list) and len(value) == num_groups \
                and all(x is None or isinstance(x, (bool, int, float)) for x in value):
            paths.append((*prefix, key))
        elif key == "_schedulers" and isinstance(value, list):
            for i, sub in enumerate(value):
                if isinstance(sub, dict):
                    paths += _per_group_paths(sub, num_groups, (*prefix, key, i))
    return paths


def _at(state: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        state = state[step]
    return state


def _path_key(path: tuple[Any, ...]) -> str:
    # "/": the shards' keys join names with ".", and their last part is this key. A top-level key stays as it is
    # (checkpoints written before still load).
    return "/".join(str(step) for step in path)


def plain_optimizer_state_by_name(plain: dict[str, Any], param_order: list[str]) -> dict[str, Any]:
    """Name-keyed form of an ordinary optimizer state dict saved by single-device training.

    The saved indices follow the order in which ``configure_optimizers`` listed the parameters. With one param group
    that is the model's parameter order, which ``param_order`` gives; with several it cannot be known here.
    """
    groups = plain["param_groups"]
    if len(groups) != 1:
        raise PipelineError(
            f"this checkpoint's optimizer has {len(groups)} param groups and no parameter names, so its state "
            "cannot be matched to pipeline stages. Load the weights only (MyModule.load_from_checkpoint), or "
            "resume from a checkpoint written by PipelineStrategy or lightning_pipe.consolidate"
        )
    indices = groups[0]["params"]
    if len(indices) != len(param_order):
        raise PipelineError(f"the checkpoint's optimizer holds {len(indices)} parameters; the model has "
                            f"{len(param_order)}")
    hp = {k: v for k, v in groups[0].items() if k not in _HPARAMS_SKIP}
    return {
        "state": {param_order[i]: plain["state"][idx] for i, idx in enumerate(indices) if idx in plain["state"]},
        "hparams": {name: hp for name in param_order},
    }


# -- save -----------------------------------------------------------------------------------------------------------
def save_sharded(path: Path, *, state: dict[str, Any], meta: dict[str, Any] | None, is_rank_zero: bool,
                 barrier: Callable[[], None], any_rank: Callable[[bool], bool] = bool) -> None:
    """Write ``state`` (this rank's part) with DCP and ``meta`` (rank 0's) to ``path``, replacing it atomically.
    ``any_rank(flag)``: whether any rank passed ``True`` (a collective), so that a failure to write ``meta`` raises
    on every rank."""
    tmp = path.with_name(f".{path.name}.partial")
    old = path.with_name(f".{path.name}.old")

    def check_target() -> None:
        # A save replaces a checkpoint at ``path`` as a whole: a directory that holds anything else is refused, so
        # that a path given by mistake (a run's output folder) does not lose its files.
        if path.is_dir() and not is_sharded_checkpoint(path) and any(path.iterdir()):
            raise PipelineError(f"cannot save a checkpoint to {path}: it is a directory that holds other files and "
                                f"no checkpoint ({META_FILE} is missing), which the save would replace. Give "
                                "another path (a new name, e.g. ending in .ckpt), or remove that directory")

    on_every_rank(check_target if is_rank_zero else None, any_rank=any_rank,
                  elsewhere=f"rank 0 refused to save a checkpoint to {path} (see its error); nothing was written")
    if is_rank_zero:
        if old.is_dir() and not path.exists():  # a save stopped between its two renames: the previous one is back
            old.rename(path)
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
        tmp.mkdir(parents=True)
    barrier()  # the check below looks before its collective: rank 0 must have made the directory by then

    def check_visible() -> None:
        # DCP makes the directory on a rank that does not see it: each node would then hold a part of the
        # checkpoint, which could never be read back whole.
        if not tmp.is_dir():
            raise PipelineError(f"cannot save a checkpoint to {path}: this rank does not see the directory "
                                f"{tmp.name} that rank 0 made beside it; {_SHARED_STORAGE}")

    try:
        on_every_rank(check_visible, any_rank=any_rank,
                      elsewhere=f"cannot save a checkpoint to {path}: another rank does not see the directory that "
                                f"rank 0 made beside it (see its error); {_SHARED_STORAGE}")
    except PipelineError:
        if is_rank_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dcp.save(state, checkpoint_id=tmp)
    kept = f"the previous checkpoint at {path} is kept" if path.exists() else "nothing was written"

    def write_meta() -> None:
        try:
            torch.save(meta, tmp / META_FILE)
        except Exception as err:
            raise PipelineError(f"writing {tmp / META_FILE} (loops, callbacks, hyper-parameters) failed: "
                                f"{type(err).__name__}: {err}; {kept}") from err

    # Also: every rank has written, so the new checkpoint is complete.
    on_every_rank(write_meta if is_rank_zero else None, any_rank=any_rank,
                  elsewhere=f"rank 0 failed to write {META_FILE} of {path} (see its error); {kept}")

    def swap() -> None:
        remove_checkpoint_path(old)
        if path.is_symlink() or path.is_file():  # a link (save_last="link") is replaced, not what it points to
            path.unlink()
        elif path.exists():
            path.rename(old)
        tmp.rename(path)
        remove_checkpoint_path(old)

    # Also the barrier after it: no rank goes on before the checkpoint is in place, and a failure raises on all.
    on_every_rank(swap if is_rank_zero else None, any_rank=any_rank,
                  elsewhere=f"rank 0 failed to put the new checkpoint in place at {path} (see its error)")


_SHARED_STORAGE = ("checkpoints of a pipeline are written and read by every rank: put them on storage that every node "
                   "sees (a shared filesystem), e.g. ModelCheckpoint(dirpath=...) or Trainer(default_root_dir=...)")


def checkpoint_kind(path: Path, *, any_rank: Callable[[bool], bool]) -> str:
    """``"directory"`` (sharded) or ``"file"`` for the checkpoint at ``path``, the same answer on every rank (each
    rank looks itself, then they agree: a rank that went one way while another went the other would wait for it in
    a collective). Raises :class:`CheckpointNotFoundError` on every rank when any rank finds nothing there, or the
    ranks see different things (storage that not every node sees). ``any_rank``: as for :func:`save_sharded`."""
    here = "directory" if path.is_dir() else "file" if path.is_file() else "missing"
    missing, directories, files = (any_rank(here == kind) for kind in ("missing", "directory", "file"))
    if missing or (directories and files):
        if here == "missing" and not (directories or files):
            raise CheckpointNotFoundError(f"checkpoint not found: {path} (check ckpt_path)")
        seen = "nothing" if here == "missing" else f"a {here}"
        raise CheckpointNotFoundError(f"checkpoint {path} does not look the same on every rank (this rank sees {seen} "
                                      f"there, another rank something else): {_SHARED_STORAGE}")
    return "directory" if directories else "file"


def remove_checkpoint_path(path: Path) -> None:
    """Remove the checkpoint at ``path``: a link to one (``ModelCheckpoint(save_last="link")``) is removed, not
    what it points to; a sharded directory with its shards; a file. Nothing there: nothing to do."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# -- load -----------------------------------------------------------------------------------------------------------
def _read_metadata(path: Path) -> Metadata:
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as err:  # noqa: BLE001 - reported with the path
        raise PipelineError(f"{path} is not a readable sharded checkpoint ({type(err).__name__}: {err})") from err


def load_sharded(path: Path, *, model_state: dict[str, torch.Tensor], optimizer_names: list[list[str]],
                 weights_only: bool | None, scheduler_names: list[list[str]] | None = None,
                 any_rank: Callable[[bool], bool] = bool) -> dict[str, Any]:
    """Read this rank's names from the checkpoint at ``path``; ``model_state`` is filled in place. ``any_rank``:
    as for :func:`save_sharded` (a rank whose part does not fit raises, and so does every other, instead of waiting
    for it in DCP's collectives).

    Returns Lightning's checkpoint dict: ``meta.pt`` plus ``state_dict``, name-keyed ``optimizer_states`` and, under
    ``pipeline_lr_scheduler_groups``, the per-group entries of each LR scheduler by name (``scheduler_names``: the
    parameters of each scheduler's optimizer).
    """
    scheduler_names = scheduler_names or []
    request: dict[str, Any] = {}
    found: list[Any] = []

    def check() -> None:
        # Each rank checks its own part; what fails on one (also a directory another node cannot see) must raise
        # on all before any enters DCP's collectives.
        if not (path / META_FILE).is_file():
            raise PipelineError(f"{path} has no {META_FILE}: not a checkpoint written by PipelineStrategy (or the "
                                "save was interrupted)")
        entries = _read_metadata(path).state_dict_metadata
        found.append(entries)
        problems = []
        for name, tensor in model_state.items():
            key = f"state_dict.{name}"
            saved = entries.get(key)
            if saved is None:
                problems.append(f"`{name}` is missing")
            elif isinstance(saved, TensorStorageMetadata) and tuple(saved.size) != tuple(tensor.shape):
                problems.append(f"`{name}` has shape {tuple(saved.size)} in the checkpoint but "
                                f"{tuple(tensor.shape)} in the model")
            else:
                request[key] = tensor
        if problems:
            raise PipelineError(f"cannot load {path} into this model: " + "; ".join(problems[:5])
                                + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))

    on_every_rank(check, any_rank=any_rank, elsewhere=f"cannot load {path} into this model: the part another rank "
                                                       "holds does not load (see that rank's error)")
    (entries,) = found
    # Optimizer entries grouped by "optimizer_<i>.<part>.<name>" once, instead of a scan of every entry per name.
    by_owner: dict[str, list[str]] = {}
    for key in entries:
        if key.startswith(("optimizer_", "lr_scheduler_")):
            by_owner.setdefault(key.rsplit(".", 1)[0], []).append(key)
    owned = [(i, part, name) for i, names in enumerate(optimizer_names) for name in names
             for part in ("state", "hparams")]
    scheduled = [(i, name) for i, names in enumerate(scheduler_names) for name in names]
    for owner in [f"optimizer_{i}.{part}.{name}" for i, part, name in owned] + \
            [f"lr_scheduler_{i}.{name}" for i, name in scheduled]:
        for key in by_owner.get(owner, []):
            entry = entries[key]
            request[key] = (torch.empty(entry.size, dtype=entry.properties.dtype)
                            if isinstance(entry, TensorStorageMetadata) else None)
    try:
        dcp.load(request, checkpoint_id=path)
    except (Exception, dcp.CheckpointException) as err:  # a missing or damaged shard file (on any rank)
        raise PipelineError(f"reading the shards of {path} failed: {_first_cause(err)}") from err
    meta = torch.load(path / META_FILE, map_location="cpu", weights_only=True if weights_only is None
                      else weights_only)
    optimizer_states = [{"state": {}, "hparams": {}} for _ in optimizer_names]
    for i, part, name in owned:
        keys = by_owner.get(f"optimizer_{i}.{part}.{name}", [])
        if keys:
            optimizer_states[i][part][name] = {k.rsplit(".", 1)[1]: request[k] for k in keys}
    scheduler_groups: list[dict[str, dict[str, Any]]] = [{} for _ in scheduler_names]
    for i, name in scheduled:
        keys = by_owner.get(f"lr_scheduler_{i}.{name}", [])
        if keys:
            scheduler_groups[i][name] = {k.rsplit(".", 1)[1]: request[k] for k in keys}
    return {**meta, "state_dict": dict(model_state), "optimizer_states": optimizer_states,
            "pipeline_lr_scheduler_groups": scheduler_groups}


def _first_cause(err: BaseException) -> str:
    """The first rank's underlying error of a DCP ``CheckpointException`` (which gathers every rank's)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        cause = getattr(cause, "exc", cause)  # a wrapped traceback in some torch versions
        return f"{type(cause).__name__}: {cause}"
    return f"{type(err).__name__}: {err}"


# -- consolidation ----------------------------------------------------------------------------------------------------
def consolidate(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *,
                overwrite: bool = False) -> Path:
    """Turn a sharded checkpoint directory into one ordinary Lightning ``.ckpt`` file; return its path. An existing
    ``output`` is an error unless ``overwrite`` (then it is replaced only once the new file is complete).

    The file has ``state_dict`` (every stage's weights, full names) for ``MyModule.load_from_checkpoint``, and
    ``optimizer_states`` in the ordinary index-keyed form (one param group per distinct set of hyper-parameters,
    parameters in model order) so that plain Lightning can resume from it; ``lightning_pipe`` resumes from its
    name-keyed copy, exactly, in any layout.
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise PipelineError(f"{path} is not a sharded checkpoint directory (no {META_FILE})")
    output = Path(output) if output is not None else path.with_name(path.name + ".consolidated.ckpt")
    if output.exists() and not overwrite:
        raise PipelineError(f"{output} exists; choose another output path, or overwrite it (--overwrite, "
                            "overwrite=True)")
    full = _load_distributed_checkpoint(path)
    order: list[str] = full.get("pipeline", {}).get("param_order") or list(full["state_dict"])
    by_name, plain = [], []
    i = 0
    while f"optimizer_{i}" in full:
        saved = full.pop(f"optimizer_{i}")
        by_name.append(saved)
        plain.append(_to_plain(saved, order))
        i += 1
    full["optimizer_states"] = plain
    full["pipeline_optimizer_states"] = by_name
    _plain_schedulers(full, by_name, order)
    tmp = output.with_name(f".{output.name}.partial")
    torch.save(full, tmp)
    tmp.replace(output)
    return output


def _plain_schedulers(full: dict[str, Any], by_name: list[dict[str, Any]], order: list[str]) -> None:
    """Each LR scheduler's per-group lists in the consolidated file's group order (from their name-keyed copies,
    which are kept under ``pipeline_lr_scheduler_groups`` for a resume under the pipeline)."""
    states = full.get("lr_schedulers", [])
    groups = []
    for i, state in enumerate(states):  # a scheduler with no per-group lists has no entry
        groups.append(saved := full.pop(f"lr_scheduler_{i}", {}))
        optimizer = next((o for o in by_name if saved and next(iter(saved)) in o["hparams"]), None)
        if optimizer is not None:
            buckets = _plain_groups(optimizer, order)
            for key in {k for entry in saved.values() for k in entry}:
                if all(key in saved.get(bucket[0], {}) for bucket in buckets):
                    path = tuple(int(step) if step.isdigit() else step for step in key.split("/"))
                    try:  # a chained scheduler's list lies at its path (_path_key)
                        _at(state, path[:-1])[path[-1]] = [saved[bucket[0]][key] for bucket in buckets]
                    except (KeyError, IndexError, TypeError):
                        pass
    full["pipeline_lr_scheduler_groups"] = groups


def _to_plain(saved: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """The ordinary index-keyed form: the param groups in the order ``configure_optimizers`` made them (each
    parameter's saved group index; every stage makes the same groups), parameters in model order within each."""
    groups: list[dict[str, Any]] = []
    state: dict[int, Any] = {}
    index = 0
    for bucket in _plain_groups(saved, order):
        ids = []
        for name in bucket:
            if name in saved.get("state", {}):  # absent altogether for an optimizer without state (plain SGD)
                state[index] = saved["state"][name]
            ids.append(index)
            index += 1
        groups.append({**saved["hparams"][bucket[0]], "params": ids})
    return {"state": state, "param_groups": groups}


def _plain_groups(saved: dict[str, Any], order: list[str]) -> list[list[str]]:
    """The names of each param group of the consolidated optimizer (see :func:`_to_plain`)."""
    names = [n for n in order if n in saved["hparams"]]
    by_index = _groups_by_index(saved, names)
    grouped: list[list[str]] = []
    if by_index is not None:
        grouped = [by_index[i] for i in sorted(by_index)]
    else:  # no group indices (an older checkpoint), or stages that numbered their groups differently
        for name in names:
            bucket = next((b for b in grouped if saved["hparams"][b[0]] == saved["hparams"][name]), None)
            if bucket is None:
                grouped.append([name])
            else:
                bucket.append(name)
    return grouped


def _groups_by_index(saved: dict[str, Any], names: list[str]) -> dict[int, list[str]] | None:
    """``names`` by their saved group index, or ``None`` where that cannot be trusted: indices missing, or one index
    holding different hyper-parameters (a ``configure_optimizers`` that drops the groups a stage leaves empty
    numbers them differently on each stage)."""
    indices = saved.get("groups") or {}
    if any(name not in indices for name in names):
        return None
    by_index: dict[int, list[str]] = {}
    for name in names:
        by_index.setdefault(int(indices[name]), []).append(name)
    if any(saved["hparams"][n] != saved["hparams"][b[0]] for b in by_index.values() for n in b):
        return None
    return by_index


def main(argv: list[str] | None = None) -> int:
    """``lightning-pipe-consolidate DIR [--output FILE]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Consolidate a lightning_pipe sharded checkpoint into one file.")
    parser.add_argument("checkpoint")
    parser.add_argument("--output", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = parser.parse_args(argv)
    print(consolidate(args.checkpoint, args.output, overwrite=args.overwrite))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
