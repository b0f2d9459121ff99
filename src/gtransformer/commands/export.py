"""`gtransformer export`: a run or checkpoint as a Hugging Face `transformers` (Mixtral) folder, with the run's
model card as README.md (behind the Hub's metadata header), or as one GGUF file for llama.cpp, Ollama and LM Studio
with an Ollama Modelfile beside it."""

from __future__ import annotations

import argparse
import logging

import torch

from gtransformer.errors import UserError
from gtransformer.inference.chat import ChatTemplate
from gtransformer.interop.gguf import DTYPES as GGUF_DTYPES
from gtransformer.interop.gguf import export_gguf
from gtransformer.interop.hf import export_hf
from gtransformer.training.card_facts import gather
from gtransformer.training.checkpoint import load_for_inference
from gtransformer.training.model_card import render
from gtransformer.training.run_dir import resolve_checkpoint

log = logging.getLogger(__name__)

# --dtype per format, and the other spellings each accepts (f32 = float32 ...).
FORMAT_DTYPES = {"hf": ("float32", "bfloat16", "float16"), "gguf": GGUF_DTYPES}
ALIASES = {"f32": "float32", "fp32": "float32", "float32": "f32", "f16": "float16", "fp16": "float16",
           "float16": "f16", "bf16": "bfloat16"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained model to a Hugging Face folder or a GGUF file (llama.cpp, Ollama, LM Studio)",
        description="--format hf: a folder that transformers' AutoModelForCausalLM and AutoTokenizer load offline "
        "(Mixtral architecture), with the run's model card as README.md (Hub metadata header included). "
        "--format gguf: one .gguf file (llama.cpp's llama architecture, with experts for an MoE model) that "
        "llama.cpp, llama-server, Ollama and LM Studio load, and an Ollama Modelfile beside it (FILE.Modelfile).",
    )
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (newest checkpoint) or a checkpoint folder")
    parser.add_argument("--format", default="hf", choices=list(FORMAT_DTYPES),
                        help="hf: Hugging Face Mixtral folder (default); gguf: one GGUF file")
    parser.add_argument("--out", required=True,
                        help="hf: folder to write (must not exist or be empty, unless --force); gguf: the .gguf file")
    parser.add_argument("--dtype", default=None,
                        help="weights: hf float32 (default), bfloat16 or float16; gguf f32 (default), f16 or q8_0")
    parser.add_argument("--force", action="store_true", help="replace what --out names if it exists")
    parser.set_defaults(func=run_export)


def resolve_dtype(fmt: str, dtype: str | None) -> str:
    """--dtype as the format names it (its default when not given); one line naming the choices otherwise."""
    choices = FORMAT_DTYPES[fmt]
    if dtype is None:
        return choices[0]
    for candidate in (dtype, ALIASES.get(dtype)):
        if candidate in choices:
            return candidate
    raise UserError(f"--dtype {dtype} is not available for --format {fmt}; choose one of {', '.join(choices)}")


def run_export(args: argparse.Namespace) -> int:
    dtype = resolve_dtype(args.format, args.dtype)
    checkpoint, run = resolve_checkpoint(args.run)
    model, tokenizer, meta = load_for_inference(args.run)
    if args.format == "gguf":
        out, recipe = export_gguf(model, tokenizer, args.out, dtype=dtype, force=args.force,
                                  chat=ChatTemplate.load(run.chat_template_path), name=run.path.name)
        log.info("exported %s to %s (%s) and an Ollama Modelfile %s; run it with `llama-cli -m %s` or "
                 "`ollama create %s -f %s`", meta["checkpoint"], out, dtype, recipe, out, run.path.name, recipe)
        return 0
    card = render(gather(run, checkpoint))
    out = export_hf(model, tokenizer, args.out, dtype=getattr(torch, dtype), force=args.force, model_card=card)
    log.info(
        "exported %s to %s; load it with transformers.AutoModelForCausalLM.from_pretrained(%r)",
        meta.get("checkpoint", args.run), out, str(out),
    )
    return 0
