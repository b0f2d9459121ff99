"""`gtransformer eval`: loss, perplexity and bits per byte of a run or checkpoint on val or test."""

from __future__ import annotations

import json

from gtransformer.data.corpus import PreparedCorpus
from gtransformer.errors import UserError
from gtransformer.runtime import pick_device
from gtransformer.training.checkpoint import load_for_inference
from gtransformer.training.evaluate import evaluate_split, token_byte_lengths


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a trained model on val or test",
        description="Evaluate a run (newest checkpoint) or a checkpoint folder; prints JSON.",
    )
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (train --out) or checkpoints/step-* folder")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="which held-out split (default val)")
    parser.add_argument("--data", help="prepared corpus folder (default: the one the run was trained on)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N predictions (default: whole split)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default auto)")
    parser.set_defaults(func=run_eval)


def run_eval(args) -> int:
    device = pick_device(args.device)
    model, tokenizer, meta = load_for_inference(args.run, device=device)
    corpus = PreparedCorpus(args.data or meta.get("config", {}).get("data", {}).get("path", ""))
    if not corpus.shard_path(args.split).is_file():
        raise UserError(f"{corpus.shard_path(args.split)} not found; pass --data with the prepared corpus folder "
                        f"(the one given to train --data)")
    result = evaluate_split(
        model,
        corpus.tokens(args.split),
        model.config.context_length,
        token_byte_lengths(tokenizer),
        split_bytes=corpus.split_bytes(args.split),
        max_targets=args.max_tokens,
        batch_size=args.batch_size,
        device=device,
    )
    print(json.dumps({"checkpoint": meta["checkpoint"], "step": meta.get("step"), "split": args.split, **result}, indent=2))
    return 0
