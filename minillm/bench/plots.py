"""Plots of a run: each request's timeline and its TTFT / TPOT (chapter 1; chapters 2 and 6 compare schedulers
with the same pictures).

A request's life on the timeline: waiting (arrival -> first scheduled), prefill (-> first token), decode
(-> finish). With static batching every bar starts together and the batch waits for its slowest member; with
continuous batching (chapter 6) new requests join as old ones leave. Matplotlib's Figure is used directly (no
pyplot): nothing global, works headless, and a notebook displays the returned Figure.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from minillm.bench.harness import BenchResult

PHASE_COLORS = {"waiting": "#bbbbbb", "prefill": "#d62728", "decode": "#1f77b4"}


def plot_timeline(outputs: Sequence[Any], ax: Any) -> None:
    """One horizontal bar per request: waiting, prefill and decode, in seconds from the first arrival."""
    t0 = min(o.metrics.arrival_time for o in outputs)
    for row, o in enumerate(outputs):
        m = o.metrics
        if m.first_token_time is None or m.finish_time is None:
            continue  # an errored request never reached its first token
        scheduled = m.first_scheduled_time if m.first_scheduled_time is not None else m.arrival_time
        spans = [("waiting", m.arrival_time, scheduled), ("prefill", scheduled, m.first_token_time),
                 ("decode", m.first_token_time, m.finish_time)]
        for phase, start, end in spans:
            if end > start:
                ax.barh(row, end - start, left=start - t0, color=PHASE_COLORS[phase],
                        label=phase if row == 0 else None)
    ax.set_yticks(range(len(outputs)), [str(row) for row in range(len(outputs))])  # the workload's order
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first arrival")
    ax.set_ylabel("request")
    ax.set_title("request timeline")
    ax.legend(fontsize=8, loc="lower right")


def plot_latency_bars(result: BenchResult, ax: Any) -> None:
    """TTFT and TPOT per request, in milliseconds, side by side."""
    ids = [r.request_id if r.index is None else str(r.index) for r in result.requests]
    xs = range(len(ids))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [1e3 * r.ttft for r in result.requests], width, label="TTFT",
           color=PHASE_COLORS["prefill"])
    ax.bar([x + width / 2 for x in xs], [1e3 * (r.tpot or 0.0) for r in result.requests], width, label="TPOT",
           color=PHASE_COLORS["decode"])
    ax.set_xticks(list(xs), ids)
    ax.set_xlabel("request")
    ax.set_ylabel("milliseconds")
    ax.set_title(f"TTFT and TPOT ({result.output_throughput:.1f} output tok/s overall)")
    ax.legend(fontsize=8)


def plot_run(outputs: Sequence[Any], result: BenchResult, title: str = "") -> Any:
    """Timeline on the left, TTFT/TPOT bars on the right. Returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    plot_timeline(outputs, left)
    plot_latency_bars(result, right)
    if title:
        fig.suptitle(title)
    return fig


def plot_stack(rows: Sequence[Any], ax: Any) -> None:
    """`minillm bench stack`'s rows (minillm.bench.stack.RowResult) as horizontal bars of output tokens/s on a log
    axis, top to bottom, each labelled with its gain over the first row; a row that did not run says why, in grey."""
    ran = [r.tok_per_s for r in rows if not r.skipped]
    first, low = (ran[0], min(ran)) if ran else (1.0, 1.0)
    for y, row in enumerate(rows):
        if row.skipped:
            ax.text(low, y, f"skipped: {row.skipped}", va="center", fontsize=7, color="grey")
            continue
        ax.barh(y, row.tok_per_s, color=PHASE_COLORS["decode"])
        ax.text(row.tok_per_s, y, f" {row.tok_per_s / first:.1f}x", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r.name} (ch. {r.chapters})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(low / 2, max(ran, default=1.0) * 4)
    ax.set_xlabel("output tokens/s (log scale); each bar's label: x the first row")
    ax.set_title("the optimizations stacked, each row on top of the rows above")


def save_figure(fig: Any, path: str | os.PathLike) -> str:
    """Save, creating the folder; returns the path written (matplotlib adds ".png" to a name without a format's
    extension: the path returned says so)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.splitext(path)[1].lstrip(".").lower() not in fig.canvas.get_supported_filetypes():
        path += ".png"
    fig.savefig(path, dpi=110)
    return path
