"""Sharded checkpoints: exact resume, resume under another layout, plain Lightning checkpoints both ways,
consolidation, interrupted saves and damaged checkpoints."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_pipe.errors import PipelineError
from tests._launch import launch

pytestmark = pytest.mark.distributed

TOLERANCE = 1e-5
CKPT = "epoch=1-step=9.ckpt"  # written mid-epoch by ModelCheckpoint(every_n_train_steps=3)


def _merge(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for r in results:
        merged.update(r["optimizer"]["state"] if key == "optimizer" else r[key])
    return merged


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert set(a) == set(b)
    worst = 0.0
    for name, value in a.items():
        if isinstance(value, dict):
            worst = max(worst, _max_diff(value, b[name]))
        else:
            worst = max(worst, (value.float() - b[name].float()).abs().max().item())
    return worst


def _run(world: int, **kwargs: Any) -> list[dict[str, Any]]:
    return [o.unwrap() for o in launch("tests._checkpoint_workers.job", world, deadline=200, **kwargs)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """12 steps at pp=2 with param groups that differ in lr and weight decay, checkpointing every 3 steps."""
    ckpt_dir = tmp_path_factory.mktemp("straight")
    return ckpt_dir, _run(2, pp=2, steps=12, optimizer="groups", checkpoint_dir=str(ckpt_dir))


@pytest.mark.timeout(400)
def test_resume_is_exact_in_the_same_and_in_other_layouts(straight: tuple[Path, list[dict[str, Any]]],
                                                          tmp_path: Path) -> None:
    ckpt_dir, reference = straight
    path = ckpt_dir / CKPT
    files = sorted(os.listdir(path))
    assert "meta.pt" in files and sum(f.endswith(".distcp") for f in files) == 2  # one shard per rank
    ref_params, ref_state = _merge(reference, "params"), _merge(reference, "optimizer")
    ref_losses = reference[-1]["losses"]
    report = []
    for pp, world in ((2, 2), (1, 1), (4, 4), (2, 4)):
        out = str(tmp_path / f"resaved-pp{pp}-w{world}.ckpt")
        resumed = _run(world, pp=pp, steps=12, optimizer="groups", ckpt_in=str(path), ckpt_out=out)
        params, state = _merge(resumed, "params"), _merge(resumed, "optimizer")
        diff_p, diff_s = _max_diff(params, ref_params), _max_diff(state, ref_state)
        report.append(f"pp={pp} x dp={world // pp}: params {diff_p:.1e}, optimizer state {diff_s:.1e}")
        if (pp, world) == (2, 2):
            assert diff_p == 0.0 and diff_s == 0.0, "same layout: bit for bit"
        assert diff_p <= TOLERANCE and diff_s <= TOLERANCE, report[-1]
        for step in (10, 11, 12):  # the losses logged after the resume (last stage's, relayed everywhere)
            # Each replica logs the loss of its half of the batch (as with DDP, without sync_dist): their mean is
            # the batch's.
            replicas = [resumed[r]["losses"][step] for r in range(0, world, pp)]
            assert abs(sum(replicas) / len(replicas) - ref_losses[step]) <= TOLERANCE, (pp, world, step)
        _assert_written_once(Path(out))
    print("\n".join(report))


def _assert_written_once(path: Path) -> None:
    """Every tensor of the checkpoint is stored once, whatever the number of stages and replicas holding it."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(path).read_metadata()
    stored = [index.fqn for index in metadata.storage_data]
    assert len(stored) == len(set(stored))
    assert "state_dict.tok.weight" in stored


@pytest.mark.timeout(400)
def test_layerwise_learning_rates_and_their_schedule_resume_in_other_layouts(tmp_path: Path) -> None:
    """Each stage holds its own blocks' param groups, so the LR scheduler's base_lrs differ per rank: resumed at
    pp=1 and, consolidated, by plain Lightning on one device, every group continues with its own schedule."""
    import lightning_pipe

    ckpt_dir = tmp_path / "layerwise"
    reference = _run(2, pp=2, steps=12, optimizer="layerwise", checkpoint_dir=str(ckpt_dir))
    ref_lrs = _merge(reference, "lrs")
    assert len(set(ref_lrs.values())) >= 5  # the groups really differ
    single = lightning_pipe.consolidate(ckpt_dir / CKPT)
    for pp, ckpt in ((1, ckpt_dir / CKPT), (None, single)):
        resumed = _run(1, pp=pp, steps=12, optimizer="layerwise", ckpt_in=str(ckpt))[0]
        assert resumed["lrs"] == pytest.approx(ref_lrs, rel=1e-6), pp
        assert _max_diff(resumed["params"], _merge(reference, "params")) <= TOLERANCE, pp


@pytest.mark.timeout(300)
def test_plain_lightning_checkpoint_resumes_under_the_pipeline(tmp_path: Path) -> None:
    """With a weight tied between the first and the last block: one device names it `layers.0.fc2.weight` only, the
    second stage holds it as `layers.3.fc2.weight` and finds its optimizer state under the other name (it started
    with none before, and its copy drifted from the first stage's)."""
    plain = _run(1, pp=None, steps=12, checkpoint_dir=str(tmp_path), tie_blocks=True)
    assert (tmp_path / CKPT).is_file()  # an ordinary single-file checkpoint
    resumed = _run(2, pp=2, steps=12, ckpt_in=str(tmp_path / CKPT), tie_blocks=True)
    params, state = _merge(resumed, "params"), _merge(resumed, "optimizer")
    first, last = "layers.0.fc2.weight", "layers.3.fc2.weight"
    assert torch.equal(params.pop(last), params[first]), "the tied copies stay one weight"
    assert _max_diff(state.pop(last), state[first]) == 0.0
    assert _max_diff(params, plain[0]["params"]) <= TOLERANCE
    assert _max_diff(state, plain[0]["optimizer"]["state"]) <= TOLERANCE


@pytest.mark.timeout(300)
def test_consolidated_checkpoint_resumes_plain_lightning_and_loads_on_one_device(
        straight: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    import lightning_pipe
    from tests._models import TinyGPT

    ckpt_dir, reference = straight
    sharded = tmp_path / CKPT
    shutil.copytree(ckpt_dir / CKPT, sharded)
    single = lightning_pipe.consolidate(sharded)
    resumed = _run(1, pp=None, steps=12, optimizer="groups", ckpt_in=str(single))
    assert _max_diff(resumed[0]["params"], _merge(reference, "params")) <= TOLERANCE
    assert _max_diff(resumed[0]["optimizer"]["state"], _merge(reference, "optimizer")) <= TOLERANCE
    model = TinyGPT.load_from_checkpoint(single, map_location="cpu")  # weights_only loading works on it
    # The console command (lightning-pipe-consolidate) gives the same file.
    by_cli = tmp_path / "by-cli.ckpt"
    subprocess.run([sys.executable, "-m", "lightning_pipe.strategy.checkpoint", str(sharded), "--output",
                    str(by_cli)], check=True, timeout=120)
    cli_state = torch.load(by_cli, weights_only=True)["state_dict"]
    assert all(torch.equal(cli_state[n], p) for n, p in model.state_dict().items())
    # Lightning's own tool reads the sharded directory too.
    out = tmp_path / "by-lightning.ckpt"
    subprocess.run([sys.executable, "-m", "lightning.fabric.utilities.consolidate_checkpoint", str(sharded),
                    "--output_file", str(out)], check=True, timeout=120)
    other = TinyGPT.load_from_checkpoint(out, map_location="cpu")
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.timeout(200)
def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    import lightning_pipe

    path = tmp_path / "last.ckpt"
    outcomes = launch("tests._checkpoint_workers.interrupted_save", 2, deadline=150, path=str(path))
    assert outcomes[1].error_type == "ProcessDied" and outcomes[1].exitcode == 7
    assert outcomes[0].error_type is not None  # the surviving rank's save failed instead of hanging
    full = torch.load(lightning_pipe.consolidate(path), weights_only=True)
    for rank in range(2):
        expected = torch.load(f"{path}.rank{rank}.expected", weights_only=True)
        for name, value in expected.items():
            assert torch.equal(full["state_dict"][name], value), name


@pytest.mark.timeout(200)
def test_a_failed_meta_write_raises_on_every_rank_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    import lightning_pipe

    path = tmp_path / "last.ckpt"
    outcomes = [o.unwrap() for o in launch("tests._checkpoint_workers.meta_fails", 2, deadline=150, path=str(path))]
    assert outcomes[0][0] == "PipelineError" and "meta.pt (loops, callbacks, hyper-parameters) failed" in outcomes[0][1]
    assert outcomes[1][0] == "PipelineError" and "rank 0 failed to write meta.pt" in outcomes[1][1]
    assert all("the previous checkpoint at" in message for _, message in outcomes)
    full = torch.load(lightning_pipe.consolidate(path), weights_only=True)
    for rank in range(2):
        for name, value in torch.load(f"{path}.rank{rank}.expected", weights_only=True).items():
            assert torch.equal(full["state_dict"][name], value), name


@pytest.mark.timeout(300)
def test_damaged_or_incompatible_checkpoints_fail_with_a_clear_error(
        straight: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    ckpt_dir, _ = straight
    cases = {}
    for case in ("missing_shard", "missing_meta", "shape", "deeper"):
        cases[case] = str(tmp_path / case)
        shutil.copytree(ckpt_dir / CKPT, cases[case])
    os.remove(Path(cases["missing_shard"]) / "__1_0.distcp")
    os.remove(Path(cases["missing_meta"]) / "meta.pt")
    # Rank 1 alone finds no meta.pt (a node whose view of the directory is not complete yet; the worker makes it
    # look for another name there): rank 0 must not go on into DCP's collectives alone.
    cases["meta_missing_on_rank_1"] = str(ckpt_dir / CKPT)
    cases["deeper_file"] = str(tmp_path / "deeper.ckpt")  # a plain single-file checkpoint of 4 layers
    import lightning

    from tests._models import TinyGPT
    torch.save({"state_dict": TinyGPT(body="modulelist").state_dict(),
                "pytorch-lightning_version": lightning.__version__}, cases["deeper_file"])
    cases["not_found"] = str(tmp_path / "nothing_here.ckpt")
    # Rank 1 sees nothing where rank 0 sees the checkpoint (storage that not every node sees): both raise.
    cases["unseen_on_rank_1"] = str(ckpt_dir / CKPT)
    outcomes = launch("tests._checkpoint_workers.damaged", 2, deadline=240, cases=cases,
                      save_base=str(tmp_path / "unshared"))
    expected = {
        "missing_shard": "reading the shards of",
        "missing_meta": "has no meta.pt",
        "shape": "`tok.weight` has shape (16, 16) in the checkpoint but (16, 24) in the model",
        # A model of 6 layers: rank 1 holds layers 3-5, of which the checkpoint lacks 4 and 5; rank 0's part fits,
        # and it raises too instead of waiting for rank 1 in DCP's collectives (then running the next case out of
        # step with it).
        "deeper": ["the part another rank holds does not load", "`layers.4.ln1.weight` is missing"],
        "meta_missing_on_rank_1": ["the part another rank holds does not load", "has no unseen.pt"],
        "deeper_file": ["loading the checkpoint's weights failed on another rank", "lacks 22 entries this stage"],
    }
    not_found = {  # FileNotFoundError too, as Lightning raises for a missing ckpt_path
        "not_found": "checkpoint not found: ",
        "unseen_on_rank_1": ["(this rank sees a directory there, another rank something else): checkpoints of a "
                             "pipeline are written and read by every rank",
                             "(this rank sees nothing there, another rank something else)"],
    }
    for outcome in outcomes:
        errors = outcome.unwrap()
        for case, text in {**expected, **not_found}.items():
            kind, message = errors[case]
            text = text[outcome.rank] if isinstance(text, list) else text
            want = "CheckpointNotFoundError" if case in not_found else "PipelineError"
            assert kind == want and text in message, (outcome.rank, case, kind, message)
        # A save to a directory the other rank does not see raises on both before DCP writes anything there, and
        # rank 0 takes away the directory it made.
        kind, message = errors["save_unshared"]
        assert kind == "PipelineError" and "does not see the directory" in message, (outcome.rank, message)
        assert ("this rank does not see" in message) == (outcome.rank == 1), message
        assert errors["save_unshared_left"] == ("files", "[]"), errors["save_unshared_left"]
    from lightning_pipe import CheckpointNotFoundError
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_an_optimizer_without_state_consolidates() -> None:
    """Plain SGD keeps no per-parameter state: its name-keyed form has no "state" at all."""
    from lightning_pipe.strategy.checkpoint import _to_plain

    saved = {"hparams": {"b": {"lr": 0.1}, "a": {"lr": 0.1}}}
    assert _to_plain(saved, ["a", "b"]) == {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}


def test_consolidated_param_groups_keep_the_order_configure_optimizers_gave() -> None:
    """Group 0 holds the parameters that come later in the model; groups with equal hyper-parameters stay apart."""
    from lightning_pipe.strategy.checkpoint import _to_plain

    saved = {"hparams": {"a": {"lr": 0.1}, "b": {"lr": 0.2}, "c": {"lr": 0.2}, "d": {"lr": 0.2}},
             "state": {n: {"step": i} for i, n in enumerate("abcd")},
             "groups": {"a": 1, "b": 0, "c": 2, "d": 0}}
    plain = _to_plain(saved, ["a", "b", "c", "d"])
    assert plain["param_groups"] == [{"lr": 0.2, "params": [0, 1]}, {"lr": 0.1, "params": [2]},
                                     {"lr": 0.2, "params": [3]}]
    assert plain["state"] == {0: {"step": 1}, 1: {"step": 3}, 2: {"step": 0}, 3: {"step": 2}}
    # Stages that numbered their groups differently (index 0 with two sets of hyper-parameters): by first appearance.
    saved["groups"] = {"a": 0, "b": 0, "c": 1, "d": 1}
    assert [g["params"] for g in _to_plain(saved, ["a", "b", "c", "d"])["param_groups"]] == [[0], [1, 2, 3]]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_save_stopped_between_its_renames_leaves_a_checkpoint_after_the_next_failed_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The previous checkpoint, moved aside to ``.old`` just before the crash, is put back before the next save
    starts, so a second crash does not leave nothing."""
    from lightning_pipe.strategy import checkpoint as ckpt

    path = tmp_path / "last.ckpt"
    first = {"state_dict": {"w": torch.arange(4.0)}}
    ckpt.save_sharded(path, state=first, meta={"step": 1}, is_rank_zero=True, barrier=lambda: None)
    path.rename(tmp_path / ".last.ckpt.old")  # the first rename of the next save, then the crash
    (tmp_path / ".last.ckpt.partial").mkdir()

    def dying_save(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.dcp, "save", dying_save)
    with pytest.raises(OSError):
        ckpt.save_sharded(path, state={"state_dict": {"w": torch.zeros(4)}}, meta={"step": 2}, is_rank_zero=True,
                          barrier=lambda: None)
    assert torch.load(path / ckpt.META_FILE, weights_only=True) == {"step": 1}
    monkeypatch.undo()
    loaded = ckpt.load_sharded(path, model_state={"w": torch.empty(4)}, optimizer_names=[], weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(4.0))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_directory_that_holds_other_files_is_not_replaced_by_a_save(tmp_path: Path) -> None:
    """``trainer.save_checkpoint("runs/exp1")`` given a run's output folder by mistake: refused, and its files kept
    (the save replaces what is at the path as a whole). An empty directory, or a checkpoint, is replaced."""
    from lightning_pipe.strategy import checkpoint as ckpt

    state = {"state_dict": {"w": torch.arange(4.0)}}
    run = tmp_path / "exp1"
    (run / "notes").mkdir(parents=True)
    (run / "results.csv").write_text("step,loss\n")
    with pytest.raises(PipelineError, match="it is a directory that holds other files and no checkpoint"):
        ckpt.save_sharded(run, state=state, meta={"step": 1}, is_rank_zero=True, barrier=lambda: None)
    assert sorted(p.name for p in run.iterdir()) == ["notes", "results.csv"]
    assert [p.name for p in tmp_path.iterdir()] == ["exp1"], "nothing else written"
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (empty, empty):  # an empty directory, then the checkpoint written there
        ckpt.save_sharded(target, state=state, meta={"step": 1}, is_rank_zero=True, barrier=lambda: None)
        assert ckpt.is_sharded_checkpoint(target)


def _stage_scheduler(lrs: list[float]) -> tuple[torch.optim.Optimizer, Any, dict[int, str], list[nn.Parameter]]:
    """A stage's optimizer (a group per learning rate, as with learning rates per layer) under warm-up then decay."""
    params = [nn.Parameter(torch.zeros(2)) for _ in lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=2),
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** step)], milestones=[2])
    return optimizer, scheduler, {id(p): f"layers.{lr}" for p, lr in zip(params, lrs)}, params


def test_chained_schedulers_restore_each_stages_own_learning_rates() -> None:
    """SequentialLR (and ChainedScheduler) keep their schedulers' per-group lists inside ``_schedulers``: each stage
    gets its own back, not rank 0's, whose groups are other layers."""
    from lightning_pipe.strategy import checkpoint as ckpt

    stages = [_stage_scheduler([1.0, 2.0]), _stage_scheduler([3.0, 4.0, 5.0])]  # rank 0, rank 1
    saved: dict[str, dict[str, Any]] = {}
    for optimizer, scheduler, names, _ in stages:
        for _ in range(3):  # past the milestone: the second scheduler's base_lrs are in use
            optimizer.step()
            scheduler.step()
        saved.update(ckpt.scheduler_state_by_name(scheduler.state_dict(), optimizer, names))
    meta = copy.deepcopy(stages[0][1].state_dict())  # meta.pt holds rank 0's
    assert "_schedulers/1/base_lrs" in saved["layers.3.0"]
    for optimizer, scheduler, names, _ in stages:
        fresh_optimizer, fresh, _, params = _stage_scheduler([g["initial_lr"] for g in optimizer.param_groups])
        fresh_names = {id(p): n for p, n in zip(params, names.values())}
        state = ckpt.load_scheduler_state_by_name(meta, fresh.state_dict(), fresh_optimizer, fresh_names, saved)
        fresh.load_state_dict(state)
        assert fresh.state_dict() == scheduler.state_dict()
        fresh.step()
        scheduler.step()
        assert fresh.get_last_lr() == scheduler.get_last_lr()
    # Consolidated (one file for one device): every list in the whole model's group order, chained ones too.
    by_name: dict[str, Any] = {"hparams": {}, "groups": {}}
    for optimizer, _, names, _ in stages:
        part = ckpt.optimizer_state_by_name(optimizer, names)
        by_name["hparams"].update(part["hparams"])
        by_name["groups"].update(part["groups"])
    full = {"lr_schedulers": [copy.deepcopy(meta)], "lr_scheduler_0": saved}
    ckpt._plain_schedulers(full, [by_name], [f"layers.{lr}" for lr in (1.0, 2.0, 3.0, 4.0, 5.0)])
    optimizer, one_device, _, _ = _stage_scheduler([1.0, 2.0, 3.0, 4.0, 5.0])
    for _ in range(3):
        optimizer.step()
        one_device.step()
    expected, consolidated = one_device.state_dict(), full["lr_schedulers"][0]
    assert consolidated["_last_lr"] == expected["_last_lr"]
    for key in ("base_lrs", "_last_lr"):
        assert [s[key] for s in consolidated["_schedulers"]] == [s[key] for s in expected["_schedulers"]]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_link_to_a_checkpoint_is_replaced_and_removed_as_a_link(tmp_path: Path) -> None:
    """``ModelCheckpoint(save_last="link")`` makes ``last.ckpt`` a link to a checkpoint directory. A save there
    replaced the link by moving it aside, failed to remove it (rmtree refuses links), and the next save failed on the
    leftover; removing the link (a renamed last checkpoint at the next epoch) failed the same way."""
    from lightning_pipe.strategy import checkpoint as ckpt

    def save(path: Path, step: int) -> None:
        ckpt.save_sharded(path, state={"state_dict": {"w": torch.full((4,), float(step))}}, meta={"step": step},
                          is_rank_zero=True, barrier=lambda: None)

    target, link = tmp_path / "epoch=0-step=6.ckpt", tmp_path / "last.ckpt"
    save(target, 6)
    link.symlink_to(target.name)
    for step in (7, 8):  # onto the link, then onto the directory that replaced it
        save(link, step)
        assert not link.is_symlink() and torch.load(link / ckpt.META_FILE, weights_only=True) == {"step": step}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=6.ckpt", "last.ckpt"], "no leftovers"
    assert torch.load(target / ckpt.META_FILE, weights_only=True) == {"step": 6}, "the link's target is kept"
    other = tmp_path / "epoch=0-last.ckpt"
    other.symlink_to(target.name)
    ckpt.remove_checkpoint_path(other)
    assert not other.exists() and not other.is_symlink() and ckpt.is_sharded_checkpoint(target)
    ckpt.remove_checkpoint_path(target)
    assert not target.exists()
