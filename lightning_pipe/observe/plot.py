"""PNG pictures of timelines (matplotlib, headless): one row per rank, actions coloured by kind (F blue,
B orange, W purple) and shaded by micro-batch, idle time left white on a grey rail so that bubbles show."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lightning_pipe.observe.timeline import Timeline

__all__ = ["plot_timelines", "save_timeline_png"]

_CMAPS = {"F": "Blues", "B": "Oranges", "W": "Purples"}


def _shade(kind: str, microbatch: int, num_microbatches: int) -> tuple[float, float, float, float]:
    import matplotlib

    cmap = matplotlib.colormaps[_CMAPS[kind]]
    # Alternate light/dark between neighbouring micro-batches, so adjacent actions stay distinct.
    level = 0.35 + 0.5 * ((microbatch * 3) % max(num_microbatches, 1)) / max(num_microbatches - 1, 1)
    return cmap(min(level, 0.9))


def plot_timelines(timelines: Sequence[Timeline], path: str | Path, *, title: str | None = None,
                   unit: str = "ms", share_time_axis: bool = True) -> Path:
    """Draw ``timelines`` one above the other (e.g. the plan and the measurement of a step) into ``path``.

    Each panel has one row per rank labelled ``rank r (bubble x%)``. The PNG carries a text chunk
    ``lightning_pipe.rows`` with the number of rows of each panel (comma-separated), for tools and tests.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    heights = [max(t.num_ranks, 1) * 0.45 + 0.9 for t in timelines]
    fig, axes = plt.subplots(len(timelines), 1, figsize=(12, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, sharex=share_time_axis)
    horizon = max((t.step_time for t in timelines), default=0.0) * scale
    for ax, timeline in zip(axes[:, 0], timelines):
        num_mb = 1 + max((sp.action.microbatch for row in timeline.spans for sp in row), default=0)
        bubbles = timeline.bubble_fraction
        t0 = min((sp.start for row in timeline.spans for sp in row), default=0.0)
        for rank, row in enumerate(timeline.spans):
            y = timeline.num_ranks - 1 - rank  # rank 0 on top
            ax.broken_barh([(0, timeline.step_time * scale)], (y - 0.4, 0.8), facecolors="#f2f2f2",
                           edgecolors="#cccccc", linewidth=0.5)
            for sp in row:
                k = sp.action.kind.value
                x, w = (sp.start - t0) * scale, sp.duration * scale
                ax.broken_barh([(x, w)], (y - 0.4, 0.8), facecolors=[_shade(k, sp.action.microbatch, num_mb)],
                               edgecolors="white", linewidth=0.4)
                if horizon > 0 and w / horizon > 0.012:
                    ax.text(x + w / 2, y, f"{k}{sp.action.microbatch}", ha="center", va="center", fontsize=6)
        ax.set_yticks(range(timeline.num_ranks))
        ax.set_yticklabels([f"rank {r} ({100 * bubbles[r]:.0f}% idle)" for r in reversed(range(timeline.num_ranks))],
                           fontsize=8)
        ax.set_ylim(-0.6, timeline.num_ranks - 0.4)
        mean = sum(bubbles) / len(bubbles) if bubbles else 0.0
        ax.set_title(f"{timeline.title}  step {timeline.step_time * scale:.1f} {unit}, mean bubble {100 * mean:.1f}%",
                     fontsize=9, loc="left")
        ax.grid(axis="x", linewidth=0.3)
    axes[-1, 0].set_xlabel(f"time ({unit})")
    handles = [Patch(color=matplotlib.colormaps[c](0.6), label=k) for k, c in _CMAPS.items()]
    handles.append(Patch(facecolor="#f2f2f2", edgecolor="#cccccc", label="idle (bubble)"))
    axes[0, 0].legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncol=4,
                     frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ",".join(str(t.num_ranks) for t in timelines)
    fig.savefig(path, dpi=110, metadata={"lightning_pipe.rows": rows})
    plt.close(fig)
    return path


def save_timeline_png(timeline: Timeline, path: str | Path, **kwargs: object) -> Path:
    """One timeline as a PNG (see :func:`plot_timelines`)."""
    return plot_timelines([timeline], path, **kwargs)  # type: ignore[arg-type]
