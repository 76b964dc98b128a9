"""``python -m lightning_pipe.train`` end to end on 2 CPU processes: Lightning's launcher (its second process lands
in the first one's Hydra output directory and creates none of its own), torchrun, and a sweep (one fresh process
group per job, then the summary table and PNG)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_pipe.conf.sweep import collect, write_summary
from tests._launch import free_port
from tests.test_launchers import _clean_env

pytestmark = pytest.mark.distributed

TRAIN = [sys.executable, "-m", "lightning_pipe.train"]
SMOKE = ["experiment=smoke", "trainer.max_steps=4", "trainer.val_check_interval=4"]


def _run(cmd: list[str], cwd: Path, timeout: float = 150, env: dict[str, str] | None = None) -> str:
    run = subprocess.run(cmd, env={**_clean_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout,
                         cwd=cwd)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    return output


def _check_run_dir(run_dir: Path, steps: int = 4) -> dict:
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == steps
    assert result["pipeline_parallel_size"] == 2 and result["samples_per_sec"] > 0
    assert result["val_loss"] is not None
    with (run_dir / "logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["train_loss"] for r in rows if r.get("train_loss")], "the training loss was logged"
    assert [r["val_loss"] for r in rows if r.get("val_loss")], "the validation loss was logged"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert (ckpt / "meta.pt").is_file() and len(list(ckpt.glob("*.distcp"))) == 2, "one shard per stage"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    return result


@pytest.mark.timeout(200)
def test_entry_point_with_lightnings_launcher(tmp_path: Path) -> None:
    # More micro-batches than the batch's 8 samples: the run has one per sample, and says so.
    output = _run([*TRAIN, *SMOKE, "strategy.num_microbatches=16"], cwd=tmp_path)
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, f"one output directory for both processes, got {runs}"
    run_dir = runs[0]
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"], "nothing else written in the working directory"
    # The second process ran in the same directory (Lightning passes hydra.run.dir) and left Hydra's files alone.
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert list(run_dir.rglob("config.yaml")) == [run_dir / ".hydra" / "config.yaml"]
    result = _check_run_dir(run_dir)
    assert "final val_loss" in output and "unigram baseline" in output
    assert "8 micro-batches (of 16 asked: one per sample of the batch of 8" in output
    from lightning_pipe.conf.progress import schedule_bubble
    assert result["num_microbatches"] == 8 and result["bubble_schedule"] == schedule_bubble("1f1b", 2, 8, None)


@pytest.mark.timeout(200)
def test_entry_point_under_torchrun(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lightning_pipe.train", *SMOKE]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    _run(cmd, cwd=tmp_path, env={"TMPDIR": str(scratch)})
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, f"rank 0 owns the output directory, got {runs}"
    _check_run_dir(runs[0])
    # The other ranks' Hydra directory in the temporary folder (nothing is written there) is gone too.
    assert not (scratch / "lightning_pipe_hydra").exists(), list(scratch.rglob("*"))


@pytest.mark.timeout(300)
def test_a_rerun_in_the_same_directory_replaces_the_consolidated_checkpoint(tmp_path: Path) -> None:
    """A fixed output directory (a requeued job): the second run's consolidation replaces the first one's file,
    which belongs to the checkpoint the second run has just replaced, instead of failing on rank 0 alone."""
    run_dir = tmp_path / "fixed"
    consolidated = run_dir / "checkpoints" / "last.ckpt.consolidated.ckpt"
    stamps = []
    for _ in range(2):
        _run([*TRAIN, *SMOKE, f"hydra.run.dir={run_dir}", "checkpoint.consolidate=true"], cwd=tmp_path)
        assert consolidated.is_file()
        stamps.append(consolidated.stat().st_mtime_ns)
    assert stamps[1] > stamps[0]
    _check_run_dir(run_dir)
    # A third run resumes from the checkpoint the second wrote: max_steps counts its 4 steps.
    output = _run([*TRAIN, *SMOKE, f"hydra.run.dir={run_dir}", "trainer.max_steps=6",
                   f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], cwd=tmp_path)
    assert "Restored all states from the checkpoint" in output, output[-3000:]
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 6
    # The consolidated file is an ordinary checkpoint of the shipped GPT: it loads on one device by its class.
    from lightning_pipe.models import GPT

    model = GPT.load_from_checkpoint(consolidated, map_location="cpu")
    full = torch.load(consolidated, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.equal(p, full[n]) for n, p in model.state_dict().items())


@pytest.mark.timeout(280)
def test_sweep_runs_each_setting_and_writes_a_summary(tmp_path: Path) -> None:
    output = _run([*TRAIN, "-m", *SMOKE, "strategy.num_microbatches=1,4", "checkpoint.enabled=false"],
                  cwd=tmp_path, timeout=240)
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    sweep = sweeps[0]
    for job in ("0", "1"):
        assert (sweep / job / "train_ddp_process_1.log").is_file(), "each job's second process in the job dir"
        assert json.loads((sweep / job / "result.json").read_text())["status"] == "ok"
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy.num_microbatches"] for r in rows] == ["1", "4"]
    assert all(float(r["samples_per_sec"]) > 0 for r in rows)
    assert (sweep / "summary.png").stat().st_size > 1000
    assert "| strategy.num_microbatches |" in (sweep / "summary.md").read_text()
    assert "sweep summary" in output


@pytest.mark.timeout(120)
def test_a_sweep_job_with_invalid_settings_is_a_failed_row(tmp_path: Path) -> None:
    # n_embd=32: 3 and 5 do not divide it, so neither job starts (and the sweep is quick).
    run = subprocess.run([*TRAIN, "-m", *SMOKE, "model.n_head=3,5"], env=_clean_env(), capture_output=True,
                         text=True, timeout=100, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode == 1 and "2 sweep job(s) failed: 0, 1" in output, output[-3000:]  # after the summary
    assert "Traceback" not in output, output[-3000:]
    (sweep,) = list((tmp_path / "multirun").glob("*/*"))
    for job in ("0", "1"):
        result = json.loads((sweep / job / "result.json").read_text())
        assert result["status"] == "failed" and "must divide model.n_embd=32" in result["error"], result
    with (sweep / "summary.csv").open() as f:  # written: the error used to end the sweep before it
        assert [(r["model.n_head"], r["status"]) for r in csv.DictReader(f)] == [("3", "failed"), ("5", "failed")]
    assert "invalid settings" in output


def test_summary_shows_each_jobs_own_throughput_and_the_measured_bubble(tmp_path: Path) -> None:
    """Without processes: jobs whose CSV logs carry ``pipeline/*`` columns and jobs whose do not. The throughput is
    the job's own (what its "done" line says), the strategy's logged one only where the job has none."""
    for num, (m, measured) in enumerate([(2, 0.31), (8, None)]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- strategy.num_microbatches={m}\n- experiment=smoke\n")
        result = {"status": "ok", "samples_per_sec": 100.0 * m, "step_time_s": 0.1, "bubble_schedule": 1 / (m + 1),
                  "bubble_measured": measured, "samples_per_sec_logged": 150.0 if measured else None, "val_loss": 2.0}
        (job / "result.json").write_text(json.dumps(result))
    failed = tmp_path / "2"
    failed.mkdir()
    (failed / "result.json").write_text(json.dumps({"status": "failed", "overrides": ["strategy.num_microbatches=16",
                                                                                      "experiment=smoke"]}))
    logged_only = tmp_path / "3"
    (logged_only / ".hydra").mkdir(parents=True)
    (logged_only / ".hydra" / "overrides.yaml").write_text("- strategy.num_microbatches=4\n- experiment=smoke\n")
    (logged_only / "result.json").write_text(json.dumps({"status": "ok", "samples_per_sec_logged": 120.0}))
    swept, rows = collect(tmp_path)
    assert swept == ["strategy.num_microbatches"]
    assert [r["samples_per_sec"] for r in rows] == [200.0, 800.0, None, 120.0]
    assert [r["bubble_measured"] for r in rows] == [0.31, None, None, None]
    # After a multirun into a directory used before: only this run's jobs (the older result.json files stay).
    for job in ("0", "1"):
        os.utime(tmp_path / job / "result.json", (1_000_000_000, 1_000_000_000))  # written in 2001
    assert [r["job"] for r in collect(tmp_path, since=1_000_000_001)[1]] == ["2", "3"]
    table = write_summary(tmp_path)
    assert "800.0 *" in table and "failed" in table
    assert (tmp_path / "summary.png").is_file() and (tmp_path / "summary.csv").is_file()


def test_step_clock_counts_tokens_of_sequences_not_labels() -> None:
    from types import SimpleNamespace

    from lightning_pipe.conf.progress import StepClock

    trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2}))
    clock = StepClock()
    clock.on_train_batch_start(trainer, None, (torch.zeros(4, 16, dtype=torch.long),), 0)  # type: ignore[arg-type]
    assert (clock.samples_per_batch, clock.tokens_per_sample) == (8, 16)
    labelled = (torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long))
    clock.on_train_batch_start(trainer, None, labelled, 1)  # type: ignore[arg-type]
    assert (clock.samples_per_batch, clock.tokens_per_sample) == (8, 0)
    clock.on_train_batch_start(trainer, None, (torch.zeros(4, 1, dtype=torch.long),), 2)  # type: ignore[arg-type]
    assert clock.tokens_per_sample == 0  # (batch, 1) integers: labels, as the strategy's tokens_per_sec says


def test_a_sweep_under_torchrun_is_refused_however_it_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A preset's ``hydra.mode: MULTIRUN`` is not on the command line: the sweep's start refuses it (every torchrun
    process ran every job of the sweep into one directory)."""
    from lightning_pipe.conf.sweep import SweepSummary
    from lightning_pipe.train import _prepare_argv

    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="not supported"):
        _prepare_argv(["-m", "strategy.num_microbatches=2,4"])
    with pytest.raises(SystemExit, match="or a preset with hydra.mode: MULTIRUN"):
        SweepSummary().on_multirun_start(config=None)
    monkeypatch.delenv("RANK")
    SweepSummary().on_multirun_start(config=None)  # Lightning's launcher: fine


def test_progress_prints_each_step_once_when_batches_accumulate(capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    from lightning_pipe.conf.progress import PrintProgress, StepClock

    progress = PrintProgress(StepClock(), every=2)
    trainer = SimpleNamespace(is_global_zero=True, callback_metrics={}, global_step=0)
    for step in (0, 0, 1, 1, 2, 2, 3, 3, 4, 4):  # accumulate_grad_batches=2: two batches per optimizer step
        trainer.global_step = step
        progress.on_train_batch_end(trainer, None, None, None, 0)  # type: ignore[arg-type]
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["2", "4"]
