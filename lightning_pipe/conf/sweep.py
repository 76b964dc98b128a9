"""Summary of a sweep: one row per job (its overrides, throughput, measured bubble, loss), written as
``summary.csv``, ``summary.md`` and ``summary.png`` in the sweep directory.

:class:`SweepSummary` is a Hydra callback (``configs/config.yaml`` installs it) that runs after the last job of a
multirun; ``python -m lightning_pipe.conf.sweep DIR`` writes the same files for a sweep directory afterwards.

Each job leaves ``result.json`` (written by :func:`lightning_pipe.train.run`) and ``.hydra/overrides.yaml`` in its
directory. Throughput and step time are the job's own wall-time measurement (median time of a training step after
the warm-up, optimizer step included: the figures of the job's own "done" line), or where a job has none the
strategy's logged ``pipeline/samples_per_sec`` and ``pipeline/step_time`` (the schedule's actions only); the bubble is
the strategy's measured ``pipeline/bubble_fraction`` (mean over the logged steps) where logged, and always the
schedule's simulated one. After a multirun only the jobs it ran are listed (a sweep directory used again keeps the
``result.json`` of earlier jobs).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback

__all__ = ["SweepSummary", "collect", "write_summary"]

COLUMNS = ("samples_per_sec", "step_time_ms", "bubble_measured", "bubble_schedule", "val_loss", "status")


def _job_dirs(sweep_dir: Path, since: float | None = None) -> list[Path]:
    dirs = [p.parent for p in sweep_dir.rglob("result.json") if since is None or p.stat().st_mtime >= since]
    return sorted(dirs, key=lambda p: (len(p.parts), [int(s) if s.isdigit() else s for s in p.parts]))


def _overrides(job_dir: Path, result: dict[str, Any]) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        return [str(o) for o in OmegaConf.load(path)]
    return [str(o) for o in result.get("overrides", [])]


def collect(sweep_dir: str | Path, *, since: float | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """The swept keys (overrides whose values differ between jobs) and one row per job (``since``: only jobs whose
    ``result.json`` was written at or after that time, ``time.time()``)."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    for job_dir in _job_dirs(sweep_dir, since):
        result = json.loads((job_dir / "result.json").read_text())
        pairs = dict(o.lstrip("+~").split("=", 1) for o in _overrides(job_dir, result) if "=" in o)
        jobs.append((job_dir, result, pairs))
    keys: list[str] = []
    for _, _, pairs in jobs:
        keys += [k for k in pairs if k not in keys]
    swept = [k for k in keys if len({pairs.get(k) for _, _, pairs in jobs}) > 1] or keys
    rows = []
    for job_dir, result, pairs in jobs:
        sps = result.get("samples_per_sec") or result.get("samples_per_sec_logged")
        step = result.get("step_time_s") or result.get("step_time_logged_s")
        row: dict[str, Any] = {k: pairs.get(k, "") for k in swept}
        row.update(
            samples_per_sec=sps,
            step_time_ms=step * 1000 if step else None,
            bubble_measured=result.get("bubble_measured"),
            bubble_schedule=result.get("bubble_schedule"),
            val_loss=result.get("val_loss"),
            status=result.get("status", "?"),
            job=str(job_dir.relative_to(sweep_dir)),
        )
        rows.append(row)
    return swept, rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def markdown_table(swept: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table; the fastest setting is marked with ``*``."""
    ok = [r for r in rows if r["status"] == "ok" and r["samples_per_sec"]]
    best = max(ok, key=lambda r: r["samples_per_sec"]) if ok else None
    head = [*swept, "samples/s", "step (ms)", "bubble (measured)", "bubble (schedule)", "val_loss", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[k]) for k in swept] + [_fmt(r[c]) for c in COLUMNS]
        if r is best:
            cells[len(swept)] += " *"
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        setting = ", ".join(f"{k}={best[k]}" for k in swept)
        lines.append(f"\n\\* fastest: {setting} ({best['samples_per_sec']:.1f} samples/s)")
    return "\n".join(lines)


_SHORT = {"num_microbatches": "m", "pipeline_parallel_size": "pp", "data_parallel_size": "dp",
          "virtual_stages": "v", "schedule": ""}


def _short(key: str, value: Any) -> str:
    name = key.split(".")[-1]
    name = _SHORT.get(name, name)
    return f"{name}={value}" if name else str(value)


def _plot(swept: Sequence[str], rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["\n".join(_short(k, r[k]) for k in swept) for r in rows]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2))
    ax.bar(x, [r["samples_per_sec"] or 0.0 for r in rows], color="tab:blue", alpha=0.8, label="samples/s")
    ax.set_ylabel("throughput (samples/s)", color="tab:blue")
    ax.set_xticks(x, labels, fontsize=8)
    ax2 = ax.twinx()
    for key, style, name in (("bubble_measured", "o-", "bubble (measured)"),
                             ("bubble_schedule", "s--", "bubble (schedule, simulated)")):
        ys = [r[key] for r in rows]
        if any(y is not None for y in ys):
            ax2.plot(x, [float("nan") if y is None else y for y in ys], style, color="tab:red" if "meas" in key
                     else "tab:gray", label=name)
    ax2.set_ylabel("bubble (idle share)", color="tab:red")
    ax2.set_ylim(0, 1)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper right", fontsize=8)
    ax.set_title("throughput and bubble per setting")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(sweep_dir: str | Path, *, since: float | None = None) -> str:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` in ``sweep_dir``; return the Markdown table
    (``since``: as for :func:`collect`)."""
    sweep_dir = Path(sweep_dir)
    return _write(sweep_dir, *collect(sweep_dir, since=since))


def _write(sweep_dir: Path, swept: list[str], rows: list[dict[str, Any]]) -> str:
    """:func:`write_summary` for the rows :func:`collect` gave."""
    if not rows:
        return f"no finished jobs (result.json) under {sweep_dir}"
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*swept, *COLUMNS, "job"])
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(swept, rows)
    (sweep_dir / "summary.md").write_text(table + "\n")
    try:
        _plot(swept, rows, sweep_dir / "summary.png")
    except ImportError:  # matplotlib is a dependency, but a summary without a picture beats none
        table += "\n(matplotlib is not installed: no summary.png)"
    return table


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write and print the sweep's summary."""

    _started: float | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from lightning_pipe.train import SWEEP_UNDER_LAUNCHER, _external_rank

        # Each torchrun/SLURM process would run every job of the sweep itself (a preset can ask for a sweep, which
        # the command line check cannot see).
        if _external_rank() is not None:
            raise SystemExit(SWEEP_UNDER_LAUNCHER)
        # Less a margin for file systems that keep modification times to the second or two.
        self._started = time.time() - 2.0

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        swept, rows = collect(sweep_dir, since=self._started)  # once: for the files and the exit status
        table = _write(sweep_dir, swept, rows)
        print(f"\nsweep summary ({sweep_dir}/summary.{{csv,md,png}}):\n{table}", flush=True)
        failed = [row["job"] for row in rows if row["status"] != "ok"]
        if failed:  # the summary is written; the command still says that the sweep did not all succeed
            raise SystemExit(f"lightning-pipe-train: {len(failed)} sweep job(s) failed: {', '.join(failed)} (each "
                             f"one's output is in its run.log under {sweep_dir})")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m lightning_pipe.conf.sweep SWEEP_DIR", file=sys.stderr)
        return 2
    print(write_summary(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
