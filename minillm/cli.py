"""The `minillm` command: one parser, subcommands contributed by the packages that implement them.

cli.py only wires. Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its
subcommands and sets `func` (parsed args -> exit code) on each. To add a command, write it in its own
package's cli module and list that module here. check_output_path is the one check the commands share.

    minillm grade [chNN | chNN.name] [--impl ...] [--format table|json|gradescope]   (minillm.course.cli)
    minillm course sync | release | gradescope | notebooks | list                     (minillm.course.cli)
    minillm demo | estimate | bench [serve | stack | latency]                           (minillm.bench.cli)
    minillm serve [MODEL] --host 127.0.0.1 --port 8000 [engine options]                 (minillm.serve.cli)
    minillm run-batch -i requests.jsonl -o results.jsonl [MODEL] [engine options]       (minillm.serve.run_batch)
    minillm chat | complete [--url URL] [--quick TEXT]                                 (minillm.serve.client)
    minillm quantize [MODEL] --method gptq|awq|... --bits --group-size --out DIR        (minillm.quant.cli)
    minillm train-heads [MODEL] --kind draft|medusa|eagle|mtp --steps N --out DIR        (minillm.speculative.train_heads_cli)
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = ("minillm.course.cli", "minillm.bench.cli", "minillm.serve.cli", "minillm.serve.client",
                   "minillm.quant.cli", "minillm.speculative.train_heads_cli")


def check_output_path(path: str, flag: str, *, folder: bool) -> None:
    """ValueError unless `path` can take a command's output, checked before the long work whose result it holds
    (a bad path used to fail only at the end, and the result was lost). Nothing is created here.
    folder=True: a directory, made later if missing (so the nearest existing ancestor must be a writable
    directory); folder=False: a file, whose folder must exist."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file; give a directory (it is created if missing)")
    if not folder:
        if os.path.isdir(path):  # open() would fail after the work, and its result would be lost
            raise ValueError(f"cannot write {flag + ' ' if flag else ''}{path}: it is a directory; give a file path")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            why = "is not a directory" if os.path.exists(parent) else "does not exist"
            raise ValueError(f"cannot write {path}: the folder {parent} {why}")
        return
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {flag} {path}: {ancestor} is not a writable directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description="LLM inference optimization, built step by step.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
