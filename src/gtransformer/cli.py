"""The `gtransformer` command line: one entry point, one subcommand per stage.

Each module of `gtransformer.commands` exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (called with the parsed args, returns an exit
code or None). The command modules are imported here, by name, so that a
library module never imports the CLI. This module owns the logging setup: a
command whose stdout carries its output (`generate`) sets ``quiet_logging`` and
gets warnings only unless ``-v``.
User mistakes surface as UserError and end as one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gtransformer import __version__
from gtransformer.errors import UserError

# In pipeline order: the order `gtransformer --help` lists them.
COMMAND_MODULES = [
    "gtransformer.commands.download",
    "gtransformer.commands.prepare",
    "gtransformer.commands.train",
    "gtransformer.commands.eval",
    "gtransformer.commands.generate",
    "gtransformer.commands.serve",
    "gtransformer.commands.report",
    "gtransformer.commands.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gtransformer",
        description="Train, study and use a GQA + Mixture-of-Experts language model on Portuguese books.",
        epilog="Pipeline: download -> prepare -> train -> eval / generate / report / export. "
        "Run `gtransformer COMMAND --help` for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"gtransformer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet_logging", False)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"gtransformer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gtransformer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
