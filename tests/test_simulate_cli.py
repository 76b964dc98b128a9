"""The simulator's text timeline and its command line."""

from __future__ import annotations

import pytest

from lightning_pipe.schedules import gpipe, one_f_one_b
from lightning_pipe.simulate import Costs, format_timeline, main, simulate
from tests._helpers import assert_usage_error


def test_timeline_has_one_row_per_rank_with_every_action() -> None:
    result = simulate(one_f_one_b(4, 6), Costs(1, 2))
    text = format_timeline(result, width=120)
    rows = text.splitlines()
    assert len(rows) == 4
    for rank, row in enumerate(rows):
        assert row.startswith(f"rank {rank:2d} |")
        assert row.count("F") == 6 and row.count("B") == 6
        assert f"bubble {result.bubble_fraction[rank]:.3f}" in row
    # GPipe's last rank idles at the start; 1F1B's first rank idles in the middle: the dots show it.
    assert format_timeline(simulate(gpipe(2, 2), Costs(1, 2)), width=30).splitlines()[1].split("|")[1][0] == "."


def test_command_line_prints_timeline_and_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--schedule", "gpipe", "--stages", "2", "--microbatches", "3", "--width", "40"]) == 0
    out = capsys.readouterr().out
    assert [line[:7] for line in out.splitlines()[:2]] == ["rank  0", "rank  1"]
    assert "step time 12; ideal (m+p-1)(tf+tb) = 12" in out
    assert "peak held activations per rank [3, 3]" in out


def test_command_line_zero_bubble_schedules(capsys: pytest.CaptureFixture[str]) -> None:
    """tF = 1, tB = 2 (half of it W) per stage, p = 4, m = 16: 1F1B 57, ZB-H1 51, ZBV 49.5 time units."""
    for name, step in [("1f1b", "57"), ("zero_bubble", "51"), ("zbv", "49.5"), ("interleaved_1f1b", "52.5")]:
        assert main(["--schedule", name, "--stages", "4", "--microbatches", "16", "--width", "60"]) == 0
        out = capsys.readouterr().out
        assert f"step time {step};" in out, out
    assert main(["--schedule", "zbv", "--stages", "2", "--microbatches", "4"]) == 0
    assert "W" in capsys.readouterr().out.splitlines()[0]
    # 1F1B with early input gradients: (m+p-1)(tF+tB) - (p-1)tW = 19 * 3 - 3 * 1 = 54.
    assert main(["--schedule", "1f1b", "--stages", "4", "--microbatches", "16", "--early-input-grads"]) == 0
    out = capsys.readouterr().out
    assert "step time 54;" in out and "W" in out.splitlines()[0], out


def test_python_dash_m_runs_without_runpy_warning() -> None:
    """``python -m lightning_pipe.simulate``: the package imports the simulator first (the strategy uses it), so the
    command lives in a ``__main__`` of its own; runpy warns when ``-m`` runs a module already imported."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "lightning_pipe.simulate",
                           "--schedule", "1f1b", "--stages", "2", "--microbatches", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "step time 9;" in done.stdout and "RuntimeWarning" not in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--stages", "0"], "got --stages=0"),
    (["--microbatches", "0"], "got --microbatches=0"),
    (["--virtual-stages", "3"], "got --virtual-stages=3"),
    (["--schedule", "zbv", "--virtual-stages", "1"], "got --virtual-stages=1"),
    (["--forward", "inf"], "--forward must be non-negative and finite, got [inf, inf, inf, inf]"),
])
def test_command_line_bad_values_are_usage_errors(args: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert_usage_error(main, args, message, capsys)
