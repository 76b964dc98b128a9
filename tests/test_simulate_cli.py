"""The simulator's text timeline and its command line."""

from __future__ import annotations

import pytest

from lightning_pipe.schedules import gpipe, one_f_one_b
from lightning_pipe.simulate import Costs, format_timeline, main, simulate


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
