"""Seeing the pipeline: measured (or planned) timelines per rank, bubble figures, Chrome traces and PNG pictures.

Plain Python over schedules and the simulator; no Lightning, no torch.distributed (the strategy gathers records).
"""

from lightning_pipe.observe.timeline import Span, StepSummary, Timeline, pack_records, summarize_records
from lightning_pipe.observe.trace import chrome_trace, write_chrome_trace
from lightning_pipe.observe.plot import plot_timelines, save_timeline_png

__all__ = [
    "Span", "StepSummary", "Timeline", "pack_records", "summarize_records",
    "chrome_trace", "write_chrome_trace", "plot_timelines", "save_timeline_png",
]
