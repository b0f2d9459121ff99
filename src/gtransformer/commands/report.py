"""`gtransformer report`: PNG plots and report.md for a run folder."""

from __future__ import annotations

from gtransformer.training.report import make_report


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="PNG plots and report.md for a run folder",
        description="Write loss / learning-rate / throughput / expert-load plots and report.md into the run folder.",
    )
    parser.add_argument("run", metavar="RUN", help="run folder (the one given to `train --out`)")
    parser.set_defaults(func=run_report)


def run_report(args) -> int:
    path = make_report(args.run)
    print(f"wrote {path} and plots in {path.parent}")
    return 0
