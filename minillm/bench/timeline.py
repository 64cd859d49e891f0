"""Turn a scheduler's timeline into Gantt-chart data: which sequence did what at each step (chapter 6).

`Scheduler.timeline` keeps one StepRecord per `schedule()`: the (seq_id, num_new_tokens) pairs it scheduled,
which of them were (part of) a prefill, and who was preempted or swapped out. Drawn as one row per sequence and
one column per step, it shows what continuous batching does: a short request leaves and a waiting one takes its
slot the next step; a chunked prefill spreads over several steps next to running decodes; a preempted sequence
sits idle until it is recomputed or swapped back in.

    spans = gantt_spans(llm.llm_engine.scheduler.timeline)   # {seq_id: [(first_step, last_step, kind), ...]}
    plot_gantt(llm.llm_engine.scheduler.timeline)            # matplotlib, one bar per span
"""
from __future__ import annotations

from typing import Any, Iterable

KINDS = ("prefill", "decode", "preempted")
COLORS = {"prefill": "tab:orange", "decode": "tab:blue", "preempted": "tab:red"}


def step_states(timeline: Iterable[Any]) -> dict[int, dict[int, str]]:
    """{seq_id: {step: kind}}: "prefill" or "decode" where the sequence ran, "preempted" in the step that
    preempted it (it holds no slot until it runs again)."""
    states: dict[int, dict[int, str]] = {}
    for record in timeline:
        prefill = set(record.prefill_ids)
        for seq_id, _ in record.scheduled:
            states.setdefault(seq_id, {})[record.step] = "prefill" if seq_id in prefill else "decode"
        for seq_id in record.preempted:
            states.setdefault(seq_id, {})[record.step] = "preempted"
    return states


def gantt_spans(timeline: Iterable[Any]) -> dict[int, list[tuple[int, int, str]]]:
    """{seq_id: [(first_step, last_step, kind), ...]}: runs of consecutive steps of the same kind, in order.
    A gap between two spans is a stretch of steps in which the sequence did not run."""
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for seq_id, by_step in step_states(timeline).items():
        runs: list[tuple[int, int, str]] = []
        for step in sorted(by_step):
            kind = by_step[step]
            if runs and runs[-1][2] == kind and runs[-1][1] == step - 1:
                runs[-1] = (runs[-1][0], step, kind)
            else:
                runs.append((step, step, kind))
        spans[seq_id] = runs
    return dict(sorted(spans.items()))


def plot_gantt(timeline: Iterable[Any], ax: Any = None, title: str | None = None) -> Any:
    """Draw gantt_spans as horizontal bars (one row per sequence, x = scheduler step); returns the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    spans = gantt_spans(timeline)
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.3 * max(len(spans), 4) + 1))
    for row, (seq_id, runs) in enumerate(spans.items()):
        for first, last, kind in runs:
            ax.barh(row, last - first + 1, left=first - 0.5, height=0.8, color=COLORS[kind])
    ax.set_yticks(range(len(spans)), [f"seq {s}" for s in spans])
    ax.invert_yaxis()
    ax.set_xlabel("scheduler step")
    ax.legend(handles=[Patch(color=COLORS[k], label=k) for k in KINDS], loc="lower right")
    if title:
        ax.set_title(title)
    return ax
