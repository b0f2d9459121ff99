"""`gtransformer generate`: continue a prompt with a trained model, streaming the text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gtransformer.errors import UserError
from gtransformer.inference.generate import DecodeOptions, generate_text, prompt_ids, stream
from gtransformer.inference.sampling import SamplingConfig
from gtransformer.runtime import pick_device
from gtransformer.training.checkpoint import load_for_inference


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate Portuguese text from a trained model",
        description="Continue a prompt with a trained model (KV cache, streaming output).",
    )
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (newest checkpoint) or a checkpoint folder")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--prompt-file", help="read the prompt from this UTF-8 file instead of --prompt")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens, 0 = all (default 50)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold, 1 = off (default 0.95)")
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.1, help="penalise tokens already present, 1 = off (default 1.1)"
    )
    parser.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    parser.add_argument("--seed", type=int, help="random seed; the same seed gives the same text")
    parser.add_argument("--num-samples", type=int, default=1, help="independent continuations, generated as a batch")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default auto)")
    parser.add_argument(
        "--decode-dtype", choices=["float32", "float16", "bfloat16", "int8"], default=None,
        help="CPU decoding weights in this dtype: float16 reads half the bytes per token, int8 (per-channel "
        "weight-only quantisation) a quarter; faster, with approximate logits. Default: the model's dtype",
    )
    parser.add_argument(
        "--compile", action="store_true",
        help="decode with a torch.compile'd step after a one-off compile of 15-25 s (needs a C++ compiler on "
        "CPU): measured 2.2x the tokens/s of the default decoder for the tiny preset, 1.1x for small, whose "
        "steps are bound by reading the weights; worth it for long outputs",
    )
    parser.add_argument("--no-stream", action="store_true", help="print the text once finished instead of streaming")
    # Generated text streams to stdout: info lines (the expert-path choice) would land mid-text, so the CLI
    # logs warnings only unless -v.
    parser.set_defaults(func=run_generate, quiet_logging=True)


def run_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path} not found")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--prompt-file {path} is not UTF-8 text; save it as UTF-8") from None
    if args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples} must be >= 1")
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_strings=tuple(args.stop),
        seed=args.seed,
    )
    sampling.validate()
    # A command owns its process: few-row CPU steps on one thread (see DecodeOptions.single_thread_steps).
    options = DecodeOptions(dtype=args.decode_dtype, compile=args.compile, single_thread_steps=True)
    options.validate()
    model, tokenizer, _ = load_for_inference(args.run, device=pick_device(args.device))
    prompt_len = len(prompt_ids(tokenizer, prompt))
    if prompt_len + sampling.max_new_tokens > model.config.context_length:
        raise UserError(
            f"prompt ({prompt_len} tokens) + --max-new-tokens {sampling.max_new_tokens} exceeds the model's "
            f"context_length ({model.config.context_length}); shorten the prompt or lower --max-new-tokens"
        )
    out = sys.stdout
    if args.num_samples == 1 and not args.no_stream:
        out.write(prompt)
        out.flush()
        for piece in stream(model, tokenizer, prompt, sampling, options):
            out.write(piece)
            out.flush()
        out.write("\n")
        return 0
    texts = generate_text(model, tokenizer, [prompt] * args.num_samples, sampling, options)
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            out.write(f"--- sample {i + 1} ---\n")
        out.write(prompt + text + "\n")
    return 0
