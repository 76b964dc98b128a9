"""Under Lightning on 2 processes: balance='time' on sleeping blocks, num_microbatches='auto', the logged
pipeline figures and the timeline files, all from one launch."""

from __future__ import annotations

import csv
import io
import json

import pytest
from PIL import Image

from tests._launch import launch


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_time_balance_auto_microbatches_metrics_and_timeline(tmp_path) -> None:
    outcomes = launch("tests._observe_workers.observe_job", 2, deadline=120, out=str(tmp_path))
    results = [o.unwrap() for o in outcomes]
    for r in results:
        # Blocks sleep 2, 2, 2, 6 ms (+ per sample 0.25, 0.25, 0.25, 0.75): the equal cut by time is 3 | 1.
        assert r["counts"] == [3, 1]
        # Cost model: (m+1)(6 + 24/m) x 3 ms is smallest at m = 2 (see test_observe_tuning for the formula).
        assert r["microbatches"] == 2, r["report"]
        assert {"pipeline/bubble_fraction", "pipeline/bubble_fraction_max", "pipeline/step_time",
                "pipeline/samples_per_sec", "pipeline/tokens_per_sec"} <= set(r["metrics"])
        # 1F1B, p=2, m=2: planned bubble (p-1)/(m+p-1) = 1/3; measured within reach of it.
        assert 0.25 <= r["metrics"]["pipeline/bubble_fraction"] <= 0.45
        assert r["metrics"]["pipeline/tokens_per_sec"] == pytest.approx(
            4 * r["metrics"]["pipeline/samples_per_sec"], rel=1e-4)
    assert results[0]["metrics"] == results[1]["metrics"]  # the same figures on every rank
    # The profile (rank 0 only) drew its batch from the loader, whose iterator draws a seed: put back as well.
    assert results[0]["random_state_at_start"] == results[1]["random_state_at_start"]
    rows = list(csv.DictReader(io.StringIO(results[0]["csv"])))
    steps = [float(row["pipeline/step_time"]) for row in rows if row.get("pipeline/step_time")]
    assert len(steps) == 3 and all(0.1 < s < 0.4 for s in steps)  # predicted ~0.17 s
    assert results[0]["files"] == ["step1.png", "step1.trace.json"]
    trace = json.loads((tmp_path / "timelines" / "step1.trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    sends = [e for e in spans if e["cat"] == "send"]
    # Rank 0 posts each micro-batch's activation, rank 1 each input gradient; inside the action that sends it.
    assert {e["tid"] for e in sends} == {0, 1} and all(e["dur"] > 0 for e in sends)
    actions = {(e["tid"], e["name"]): e for e in spans if e["cat"] in ("forward", "backward")}
    for e in sends:
        action = actions[(e["tid"], e["name"].removeprefix("send "))]
        assert action["ts"] <= e["ts"] and e["ts"] + e["dur"] <= action["ts"] + action["dur"] + 1e-3
    image = Image.open(tmp_path / "timelines" / "step1.png")
    assert image.text["lightning_pipe.rows"] == "2,2"  # plan and measurement, one row per rank
