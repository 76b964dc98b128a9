"""Chrome / Perfetto trace (JSON, "Trace Event Format") of a timeline: one thread per rank, with receive waits and
send postings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_pipe.observe.timeline import Timeline

__all__ = ["chrome_trace", "write_chrome_trace"]

_CATEGORY = {"F": "forward", "B": "backward", "W": "weight"}


def chrome_trace(timeline: Timeline, *, pid: int = 0, process_name: str | None = None) -> dict[str, Any]:
    """The trace as a dict: complete events (``ph: X``) in microseconds; open it in ui.perfetto.dev or
    chrome://tracing. Waits for an input show as ``wait`` events on the same row; the posting of an action's send
    as a ``send`` event at its end."""
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": process_name or timeline.title or "pipeline"}}
    ]
    for rank, row in enumerate(timeline.spans):
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": rank, "args": {"sort_index": rank}})
        for sp in row:
            a = sp.action
            args = {"microbatch": a.microbatch, "stage": a.stage}
            if sp.wait > 0:
                events.append({"name": f"wait {a.kind.value}{a.microbatch}", "cat": "wait", "ph": "X", "pid": pid,
                               "tid": rank, "ts": sp.ready * 1e6, "dur": sp.wait * 1e6, "args": args})
            events.append({"name": f"{a.kind.value}{a.microbatch}", "cat": _CATEGORY[a.kind.value], "ph": "X",
                           "pid": pid, "tid": rank, "ts": sp.start * 1e6, "dur": sp.duration * 1e6, "args": args})
            if sp.send > 0:  # nested inside the action's span: the posting is part of the action's time
                events.append({"name": f"send {a.kind.value}{a.microbatch}", "cat": "send", "ph": "X", "pid": pid,
                               "tid": rank, "ts": (sp.end - sp.send) * 1e6, "dur": sp.send * 1e6, "args": args})
    bubbles = timeline.bubble_fraction
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"title": timeline.title, "step_time_s": timeline.step_time,
                          "bubble_fraction": list(bubbles)}}


def write_chrome_trace(timeline: Timeline, path: str | Path, **kwargs: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(timeline, **kwargs)))
    return path
