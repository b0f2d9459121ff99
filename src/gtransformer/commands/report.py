"""`gtransformer report`: PNG plots, report.md and MODEL_CARD.md for a run folder."""

from __future__ import annotations

from gtransformer.training.report import EVAL_TOKENS, make_report
from gtransformer.training.run_dir import RunDir


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="PNG plots, report.md and MODEL_CARD.md for a run folder",
        description="Write loss / learning-rate / throughput / expert-load plots, report.md and the model card "
        "(MODEL_CARD.md) into the run folder. For the card, the newest checkpoint is evaluated on the val and test "
        "splits (recorded in evals.jsonl) when the run's prepared corpus is reachable and evals.jsonl does not "
        "hold those measurements yet.",
    )
    parser.add_argument("run", metavar="RUN", help="run folder (the one given to `train --out`)")
    parser.add_argument("--no-eval", action="store_true",
                        help="evaluate nothing (the card then shows only what training and `eval` recorded)")
    parser.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, metavar="N",
                        help=f"evaluate at most the first N predictions of each split (default {EVAL_TOKENS:,}; "
                        "0 = whole splits)")
    parser.add_argument("--device", default="auto", help="device for the evaluation: cpu, cuda, mps or auto")
    parser.set_defaults(func=run_report)


def run_report(args) -> int:
    path = make_report(args.run, measure=not args.no_eval, eval_tokens=args.eval_tokens, device=args.device)
    print(f"wrote {path}, {RunDir(args.run).model_card_path.name} and plots in {path.parent}")
    return 0
