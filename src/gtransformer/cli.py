"""The `gtransformer` command line: one entry point, one subcommand per stage.

Each module of `gtransformer.commands` exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (called with the parsed args, returns an exit
code or None). The command modules are imported here, by name, so that a
library module never imports the CLI. This module owns the logging setup: a
command whose stdout carries its output (`generate`) sets ``quiet_logging`` and
gets warnings only unless ``-v``.
User mistakes surface as UserError and end as one line on stderr, exit code 2; so do argparse's own
errors (a missing option, a word where a number goes) and any float option given as nan or inf.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys

from gtransformer import __version__
from gtransformer.config import did_you_mean
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


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (`gtransformer CMD: error: ...`, exit 2), like UserError's,
    instead of the usage block followed by the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")

    def unrecognized(self, extras: list[str]):
        """The error for arguments no option takes, with the nearest option's name for a misspelt one."""
        options = [o for action in self._actions for o in action.option_strings]
        flag = next((e.split("=")[0] for e in extras if e.startswith("-")), None)
        hint = did_you_mean(flag, options).lstrip("; ") if flag else ""
        self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({hint})" if hint else ""))


def non_finite_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """'--option value' of the first float option holding nan or inf (argparse's float() accepts both)."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values) and action.option_strings:
            return f"{action.option_strings[-1]} {value if not isinstance(value, tuple) else '/'.join(map(str, value))}"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    args, extras = parser.parse_known_args(argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subparser = commands.choices.get(args.command, parser)
    if extras:
        subparser.unrecognized(extras)
    quiet = getattr(args, "quiet_logging", False)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    bad = non_finite_option(subparser, args)
    if bad:
        subparser.error(f"argument {bad}: must be a finite number")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        message = " ".join(str(exc).split("\n"))  # one line, whatever the message quotes
        print(f"gtransformer {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gtransformer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
