"""`minillm grade` and `minillm course ...`: the learner's and the instructor's commands.

    minillm grade [chNN | chNN.name] [--impl exercises|solutions|PATH] [--format table|json|gradescope]
                  [--out FILE] [-v] [--timeout S] [--time-budget S] [--seed N] [--notebooks]
    minillm course list                      the registry: id, points, where the engine calls it, nudge, hint
    minillm course sync [--check]            regenerate solutions/ and exercises/ from the reference's markers
    minillm course release DIR [--chapters ch05,ch06] [--seed N] [--force]
                                             a student copy (no solutions/, no hidden tests) for one assignment
    minillm release ...                      the same as `minillm course release`
    minillm course gradescope ZIP [--chapters ch05,ch06] [--seed N] [--hidden-seed N] [--time-budget S]
                                             the Gradescope autograder archive of one assignment
    minillm course notebooks [NAME ...] [--check] [--no-execute]   chapters/*.py -> executed .ipynb
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_grade(args: argparse.Namespace) -> int:
    from minillm.course import gradescope, report
    from minillm.course.grader import grade
    from minillm.course.impl import ImplementationError
    from minillm.course.registry import repo_root

    try:
        _check_grade_numbers(args)  # before any grading: a bad flag must not cost a run, or quietly mean another
        result = grade(args.target, impl=args.impl, timeout=args.timeout, jobs=args.jobs, seed=args.seed,
                       time_budget=args.time_budget)
    except (ValueError, KeyError, ImplementationError) as e:
        print(f"minillm grade: error: {e}", file=sys.stderr)
        if args.format == "gradescope" and args.out and isinstance(e, ImplementationError):
            # a submission that cannot be graded (no exercise module in it) still gets a results.json that
            # says why: without one, Gradescope shows the learner only "the autograder failed"
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(gradescope.ungradable_results(str(e)), indent=2) + "\n",
                                      encoding="utf-8")
        return 2
    if args.format == "table":
        text = report.format_table(result, verbose=args.verbose)
    elif args.format == "json":
        text = report.format_json(result, verbose=args.verbose)
    else:
        text = json.dumps(gradescope.results_json(result), indent=2) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}: {result.score:g} / {result.max_score:g}")
    else:
        sys.stdout.write(text)
    if args.notebooks:
        from minillm.course.notebooks import grade_notebook
        from minillm.course.registry import get, select
        chapters = sorted({get(ex.id).chapter for ex in result.exercises}  # results carry ids, not chapters
                          or {ex.chapter for ex in select(args.target)})
        print("notebooks (checked cells against the solution's stored outputs; no points):")
        for nb in sorted((Path(repo_root()) / "chapters").glob("*.ipynb")):
            if any(nb.name.startswith(f"{c:02d}_") for c in chapters):
                for line in grade_notebook(nb, args.impl or "exercises")[1]:
                    print("  " + line)
    if args.fail_under is not None and result.max_score and 100 * result.score / result.max_score < args.fail_under:
        return 1
    return 0


def _check_grade_numbers(args: argparse.Namespace) -> None:
    """ValueError naming the flag for a value grading would misread: an infinite or NaN timeout (a crash after
    start), a NaN --fail-under (a gate that never fails), --jobs 0 (once quietly the default), an --out that is
    a directory (a crash after the whole run)."""
    import math

    from minillm.cli import check_output_path
    from minillm.course import config
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    config.check_time_budget(args.time_budget, "--time-budget")
    if args.fail_under is not None and not (math.isfinite(args.fail_under) and 0 <= args.fail_under <= 100):
        raise ValueError(f"--fail-under must be a percentage in [0, 100], got {args.fail_under}")
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {args.jobs}")
    if args.out:
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a directory; give a file path")
        check_output_path(str(Path(args.out).parent), "--out", folder=True)  # its folder: made if missing


def _cmd_list(args: argparse.Namespace) -> int:
    from minillm.course.registry import EXERCISES
    for ex in EXERCISES.values():
        print(f"{ex.id:<28} {ex.points:>3} pts  exercises/{ex.module}.py  def {ex.signature}")
        print(f"{'':<28}          called from {ex.called_from}")
        print(f"{'':<28}          nudge: {ex.nudge}")
        print(f"{'':<28}          hint: {ex.hint}")
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    from minillm.course import sync
    try:
        result = sync.build()
    except sync.MarkerError as e:
        print(f"minillm course sync: error: {e}", file=sys.stderr)
        return 1
    for ex in result.missing:
        print(f"warning: {ex.id} is registered but {ex.source} has no '# >>> exercise {ex.id}' region", file=sys.stderr)
    for region in result.unregistered:
        print(f"warning: {region.source} marks {region.exercise_id}, which is not in minillm/course/registry.py "
              "(not generated)", file=sys.stderr)
    if args.check:
        stale = sync.drift(result)
        for rel in stale:
            print(f"{rel} differs from its reference's markers: run `minillm course sync`", file=sys.stderr)
        return 1 if stale or result.unregistered else 0
    for rel in sync.write(result):
        print(f"wrote {rel}")
    return 0


def _assignment(args: argparse.Namespace, hidden: bool = False):
    from minillm.course import config
    base = config.load()
    chapters = base.chapters if args.chapters is None else config.parse_chapters(args.chapters)  # '' is refused
    budget = getattr(args, "time_budget", None)
    return config.CourseConfig(seed=base.seed if args.seed is None else args.seed, chapters=chapters,
                               hidden_seed=(args.hidden_seed if args.hidden_seed is not None else base.hidden_seed)
                               if hidden else None, time_budget_s=base.time_budget_s if budget is None else budget)


def _cmd_release(args: argparse.Namespace) -> int:
    from minillm.cli import check_output_path
    from minillm.course.release import release
    try:
        check_output_path(args.dir, "DIR", folder=True)
        cfg = _assignment(args)
        written = release(Path(args.dir), overwrite=args.force, config=cfg)
    except (ValueError, FileExistsError) as e:
        print(f"minillm course release: error: {e}", file=sys.stderr)
        return 2
    chapters = ", ".join(f"ch{c:02d}" for c in cfg.chapters) or "every chapter"
    print(f"wrote a student release of {len(written)} files to {args.dir} (no solutions/, no hidden tests): "
          f"{chapters}, seed {cfg.seed}")
    return 0


def _cmd_gradescope(args: argparse.Namespace) -> int:
    from minillm.cli import check_output_path
    from minillm.course import config
    from minillm.course.gradescope import build_autograder
    try:
        check_output_path(args.zip, "ZIP", folder=False)
        cfg = _assignment(args, hidden=True)
        names = build_autograder(Path(args.zip), config=cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"minillm course gradescope: error: {e}", file=sys.stderr)
        return 2
    chapters = ", ".join(f"ch{c:02d}" for c in cfg.chapters) or "every chapter"
    print(f"wrote {args.zip} ({len(names)} files; {chapters}; seed {cfg.seed}; "
          f"time budget {cfg.time_budget_s or config.GRADESCOPE_TIME_BUDGET_S:g} s"
          + ("; hidden tests on the instructor's seed" if cfg.hidden_seed is not None else "")
          + "): upload it as the assignment's autograder")
    return 0


def _cmd_notebooks(args: argparse.Namespace) -> int:
    from minillm.course import notebooks
    try:
        if args.jobs < 1:
            raise ValueError(f"--jobs must be an integer >= 1, got {args.jobs}")
        chapters = notebooks.sources(names=args.names)  # refuses a name that is no chapter
    except ValueError as e:
        print(f"minillm course notebooks: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        problems = notebooks.out_of_sync(names=args.names)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    if args.smoke:
        from minillm.course.chapter_smoke import smoke
        return 1 if smoke(chapters, jobs=args.jobs) else 0
    for py in chapters:
        print(f"building {py.with_suffix('.ipynb').name}" + (" (executing with the solutions)" if args.execute else ""))
        notebooks.build(py, execute=args.execute)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("grade", help="grade exercises: a table, JSON or Gradescope's results.json")
    p.add_argument("target", nargs="?", default=None, help="chNN or chNN.name (default: every exercise)")
    p.add_argument("--impl", default=None, help="exercises (default), solutions, or a folder laid out like exercises/")
    p.add_argument("--format", choices=("table", "json", "gradescope"), default="table")
    p.add_argument("--out", default=None, help="write to this file instead of stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks and the test process's last output")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per exercise (default 60)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; exercises not graded by then fail as 'not run' "
                        "(default: course.json's time_budget_s, else none)")
    p.add_argument("--jobs", type=int, default=None, help="exercises graded at once (default: min(4, CPUs))")
    p.add_argument("--seed", type=int, default=None,
                   help="the graded inputs' seed (default: $MINILLM_GRADE_SEED, else the release's course.json)")
    p.add_argument("--notebooks", action="store_true",
                   help="also run the chapters' notebooks with this impl and name the checked cells that differ")
    p.add_argument("--fail-under", type=float, default=None, help="exit 1 when the score is below this percentage")
    p.set_defaults(func=_cmd_grade)

    course = subparsers.add_parser("course", help="instructor tools: sync, release, gradescope, notebooks, list")
    course.set_defaults(func=lambda args: (course.print_help(), 2)[1])
    sub = course.add_subparsers(dest="course_command", metavar="SUBCOMMAND")
    sub.add_parser("list", help="the registered exercises").set_defaults(func=_cmd_list)
    p = sub.add_parser("sync", help="regenerate solutions/ and exercises/ from the reference's markers")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when the committed files drifted")
    p.set_defaults(func=_cmd_sync)
    for parent, name in ((sub, "release"), (subparsers, "release")):  # `minillm release` is an alias
        p = parent.add_parser(name, help="write a student copy without solutions/ and hidden tests")
        p.add_argument("dir", metavar="DIR")
        p.add_argument("--chapters", default=None, help="the assignment, e.g. ch05,ch06 (default: every chapter)")
        p.add_argument("--seed", type=int, default=None, help="the graded inputs' seed (default: course.json's)")
        p.add_argument("--force", action="store_true", help="replace a non-empty DIR")
        p.set_defaults(func=_cmd_release)
    p = sub.add_parser("gradescope", help="build the Gradescope autograder archive")
    p.add_argument("zip", metavar="ZIP")
    p.add_argument("--chapters", default=None, help="the assignment, e.g. ch05,ch06 (default: every chapter)")
    p.add_argument("--seed", type=int, default=None, help="the visible tests' seed (default: course.json's)")
    p.add_argument("--hidden-seed", type=int, default=None,
                   help="a seed for the hidden tests only, never shown to learners (default: the same seed)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds run_autograder may grade for, under the assignment's Gradescope timeout "
                        "(default: course.json's, else 480: Gradescope's default timeout is 10 minutes)")
    p.set_defaults(func=_cmd_gradescope)
    p = sub.add_parser("notebooks", help="chapters/*.py (jupytext percent) -> .ipynb with the solution's outputs")
    p.add_argument("names", nargs="*", help="chapter stems (default: all)")
    p.add_argument("--check", action="store_true", help="only check every .ipynb matches its .py")
    p.add_argument("--no-execute", dest="execute", action="store_false", help="write cells without running them")
    p.add_argument("--smoke", action="store_true",
                   help="write nothing: run each chapter top to bottom on this machine (a GPU if there is one) with the "
                        "solutions, outputs unchecked; exit 1 if one fails")
    p.add_argument("--jobs", type=int, default=1, help="--smoke: chapters run at once (default 1)")
    p.set_defaults(func=_cmd_notebooks)

