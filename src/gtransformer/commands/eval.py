"""`gtransformer eval`: loss, perplexity and bits per byte of a run or checkpoint on val or test.

The result is printed as JSON and, for a checkpoint in a run folder, also appended to the run's evals.jsonl
(the model card's evaluation table reads it).
"""

from __future__ import annotations

import json

from gtransformer.errors import UserError
from gtransformer.runtime import pick_device
from gtransformer.training.evaluate import evaluate_checkpoint


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a trained model on val or test",
        description="Evaluate a run (newest checkpoint) or a checkpoint folder; prints JSON and records it "
        "in the run's evals.jsonl (the model card reads it).",
    )
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (train --out) or checkpoints/step-* folder")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="which held-out split (default val)")
    parser.add_argument("--data", help="prepared corpus folder (default: the one the run was trained on)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N predictions (default: whole split)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default auto)")
    parser.set_defaults(func=run_eval)


def run_eval(args) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens} must be at least 1 (leave it out for the whole split)")
    row = evaluate_checkpoint(args.run, args.split, data=args.data, max_tokens=args.max_tokens,
                              batch_size=args.batch_size, device=pick_device(args.device))
    print(json.dumps(row, indent=2))
    return 0
