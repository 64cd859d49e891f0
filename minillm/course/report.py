"""Render a GradeReport: a terminal table for the learner, JSON for tools (Gradescope: see gradescope.py).

    exercise                      points  status
    ch01.rms_norm                 2 / 10  fail
        test_rms_norm_eps_matters: an all-zero row must give zeros, not nan: did you forget eps?
        hint: x * rsqrt(mean(x**2 over the LAST dim, keepdim) + eps) in fp32, cast back, then * weight
    ch01.rope                     0 / 10  not attempted
        nudge: RoPE rotates pairs of channels by a position-dependent angle; which channels form a pair ...

Before any attempt the table shows the exercise's nudge; the stronger hint only after a failed attempt. A function
never written (still its stub, or its chapter's module missing or failing to import) gets the nudge whatever its
status.
"""
from __future__ import annotations

import json
import textwrap

from minillm.course.grader import GradeReport


def _pts(x: float) -> str:
    return f"{x:g}"


def format_table(report: GradeReport, verbose: bool = False, width: int = 110) -> str:
    seed = f", inputs seed {report.seed}: --seed {report.seed} reproduces" if report.seed is not None else ""
    if report.hidden_seed:
        seed += "; hidden tests use the instructor's seed"
    w = max([30] + [len(ex.id) + 2 for ex in report.exercises])  # the id column fits the longest id
    lines = [f"minillm grade (impl: {report.impl}{seed})", "",
             f"{'exercise':<{w}}{'points':>9}  status"]
    for ex in report.exercises:
        hidden = any(t.hidden for t in ex.tests)
        visible_ok = hidden and all(t.outcome == "passed" for t in ex.tests if not t.hidden)
        status = f"{ex.status} (all visible tests passed)" if visible_ok and ex.status in ("pass", "fail") else ex.status
        lines.append(f"{ex.id:<{w}}{_pts(ex.earned) + ' / ' + _pts(ex.points):>9}  {status}")
        if ex.status != "pass" or ex.message:
            if ex.message and ex.message != f"{ex.id} is not attempted yet":  # a reason, if it gives one
                lines += textwrap.wrap(ex.message, width, initial_indent="    ", subsequent_indent="      ")
            if ex.advice:
                lines += textwrap.wrap(ex.advice, width, initial_indent="    ", subsequent_indent="      ")
        if verbose:
            for t in ex.tests:
                if t.outcome not in ("passed", "not_attempted"):
                    lines.append(f"    --- {t.name} ({t.outcome}) ---")
                    lines += ["    " + row for row in (t.traceback or t.message).splitlines()]
            if ex.status in ("error", "timeout") and ex.log.strip():
                lines.append("    --- last output of the test process ---")
                lines += ["    " + row for row in ex.log.strip().splitlines()[-40:]]
    pct = 100.0 * report.score / report.max_score if report.max_score else 0.0
    lines += ["", f"total: {_pts(report.score)} / {_pts(report.max_score)} ({pct:.1f}%) "
                  f"in {report.execution_time:.1f} s"]
    if not verbose and any(e.status in ("fail", "error") for e in report.exercises):
        lines.append("(-v shows the tracebacks)")
    return "\n".join(lines) + "\n"


def format_json(report: GradeReport, verbose: bool = False) -> str:
    data = report.to_dict()
    if not verbose:  # the same content as the table; tracebacks and logs only on request
        for ex in data["exercises"]:
            ex.pop("log", None)
            for t in ex["tests"]:
                t.pop("traceback", None)
    return json.dumps(data, indent=2) + "\n"
