"""`gtransformer export`: a run or checkpoint as a Hugging Face `transformers` (Mixtral) folder, with the run's
model card as README.md (behind the Hub's metadata header)."""

from __future__ import annotations

import argparse
import logging

import torch

from gtransformer.interop.hf import export_hf
from gtransformer.training.card_facts import gather
from gtransformer.training.checkpoint import load_for_inference
from gtransformer.training.model_card import render
from gtransformer.training.run_dir import resolve_checkpoint

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained model to a Hugging Face transformers folder",
        description="Write a folder that transformers' AutoModelForCausalLM and AutoTokenizer load offline "
        "(Mixtral architecture), with the run's model card as README.md (Hub metadata header included).",
    )
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (newest checkpoint) or a checkpoint folder")
    parser.add_argument("--format", default="hf", choices=["hf"], help="output format (only hf: Hugging Face Mixtral)")
    parser.add_argument("--out", required=True, help="folder to write (must not exist or be empty, unless --force)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype (default float32)"
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    model, tokenizer, meta = load_for_inference(args.run)
    checkpoint, run = resolve_checkpoint(args.run)
    card = render(gather(run, checkpoint))
    out = export_hf(model, tokenizer, args.out, dtype=getattr(torch, args.dtype), force=args.force, model_card=card)
    log.info(
        "exported %s to %s; load it with transformers.AutoModelForCausalLM.from_pretrained(%r)",
        meta.get("checkpoint", args.run), out, str(out),
    )
    return 0
