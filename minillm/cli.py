"""The `minillm` command: one parser, subcommands contributed by the packages that implement them.

cli.py only wires. Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its
subcommands and sets `func` (parsed args -> exit code) on each. To add a command, write it in its own
package's cli module and list that module here.

    minillm grade [chNN | chNN.name] [--impl ...] [--format table|json|gradescope]   (minillm.course.cli)
    minillm course sync | release | gradescope | notebooks | list                     (minillm.course.cli)
    minillm demo | estimate | bench [serve]                                             (minillm.bench.cli)
    minillm serve [MODEL] --host 127.0.0.1 --port 8000 [engine options]                 (minillm.serve.cli)
    minillm quantize [MODEL] --method gptq|awq|... --bits --group-size --out DIR        (minillm.quant.cli)
    minillm train-heads [MODEL] --kind draft|medusa|eagle|mtp --steps N --out DIR        (minillm.speculative.train_heads_cli)
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("minillm.course.cli", "minillm.bench.cli", "minillm.serve.cli", "minillm.quant.cli",
                   "minillm.speculative.train_heads_cli")


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
