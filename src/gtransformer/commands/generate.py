"""`gtransformer generate`: continue a prompt with a trained model, streaming the text."""

from __future__ import annotations

import argparse
import json
import sys

try:
    import readline  # noqa: F401  (input() gains line editing and history; absent on Windows)
except ImportError:
    readline = None
from pathlib import Path

import torch

from gtransformer.errors import UserError
from gtransformer.inference.decode import DecodeOptions, decode_threads
from gtransformer.inference.generate import GenerationStats, check_prompts, generate_text, prompt_ids, stream
from gtransformer.inference.sampling import SamplingConfig
from gtransformer.runtime import pick_device
from gtransformer.training.checkpoint import load_for_inference


# SamplingConfig's fields as this command's options (its rules name the option a user got wrong).
OPTION_NAMES = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                "top_p": "--top-p", "repetition_penalty": "--repetition-penalty", "seed": "--seed",
                "stop_strings": "--stop"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate Portuguese text from a trained model",
        description="Continue a prompt with a trained model (KV cache, streaming output).",
    )
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (newest checkpoint) or a checkpoint folder")
    parser.add_argument("--prompt", help="text to continue (default: piped standard input, else a new document)")
    parser.add_argument("--prompt-file", help="read the prompt from this UTF-8 file (- = standard input)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="one prompt per line of this UTF-8 file, decoded as one batch; one JSON line per "
                        "prompt ({\"prompt\", \"text\"}) on standard output")
    parser.add_argument("--interactive", action="store_true",
                        help="a prompt loop with history: the model is loaded once; Ctrl-C stops the current "
                        "generation, Ctrl-D quits")
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


def read_prompt(args: argparse.Namespace) -> str:
    """--prompt, else --prompt-file (`-` = standard input), else piped standard input, else "" (a new document)."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty; pass the text to continue, or leave --prompt out to start a new document")
        return args.prompt
    if args.prompt_file == "-" or (args.prompt_file is None and not sys.stdin.isatty()):
        try:
            return sys.stdin.read()
        except UnicodeDecodeError:
            raise UserError("standard input is not UTF-8 text; pipe UTF-8 text or use --prompt") from None
        except OSError:  # no readable standard input (a closed or captured one): start a new document
            return ""
    if args.prompt_file:
        text = read_utf8(Path(args.prompt_file), "--prompt-file")
        if not text.strip():
            raise UserError(f"--prompt-file {args.prompt_file} is empty; write the text to continue in it, "
                            f"or leave --prompt-file out to start a new document")
        return text
    return ""


def read_utf8(path: Path, option: str) -> str:
    if not path.is_file():
        raise UserError(f"{option} {path} {'is a folder, not a file' if path.is_dir() else 'not found'}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{option} {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{option} {path} cannot be read ({exc.strerror or exc}); check its permissions") from None


def report_speed(stats: GenerationStats) -> None:
    print(f"[{stats.tokens} tokens in {stats.seconds:.2f} s, {stats.tokens_per_s:.1f} tokens/s]", file=sys.stderr)


def interactive(model, tokenizer, sampling: SamplingConfig, options: DecodeOptions) -> int:
    """A prompt loop: each line is continued as it streams; Ctrl-C stops that generation, Ctrl-D or an empty
    Ctrl-C at the prompt ends the session. The model stays loaded; readline keeps the history."""
    print("gtransformer generate --interactive: type a prompt and press Enter (Ctrl-C stops a generation, "
          "Ctrl-D quits)", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not prompt.strip():
            continue
        try:
            check_prompts(model.config, [prompt_ids(tokenizer, prompt)], sampling.max_new_tokens)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        stats = GenerationStats()
        sys.stdout.write(prompt)
        try:
            for piece in stream(model, tokenizer, prompt, sampling, options, stats):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [interrompido]")
        sys.stdout.write("\n")
        report_speed(stats)


def run_generate(args: argparse.Namespace) -> int:
    if args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples} must be >= 1")
    batch = None
    if args.prompts:
        batch = [line for line in read_utf8(Path(args.prompts), "--prompts").splitlines() if line.strip()]
        if not batch:
            raise UserError(f"--prompts {args.prompts} has no prompt (one per line)")
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_strings=tuple(args.stop),
        seed=args.seed,
    )
    sampling.validate(OPTION_NAMES)
    prompt = "" if batch is not None or args.interactive else read_prompt(args)
    options = DecodeOptions(dtype=args.decode_dtype, compile=args.compile)
    options.validate()
    device = pick_device(args.device)
    prompts = batch if batch is not None else [prompt] * args.num_samples
    threads = decode_threads(device, 1 if args.interactive else len(prompts), args.compile)
    if threads is not None:  # the command owns its process: its thread count is set here, once
        torch.set_num_threads(threads)
    model, tokenizer, _ = load_for_inference(args.run, device=device)
    if args.interactive:
        return interactive(model, tokenizer, sampling, options)
    check_prompts(model.config, [prompt_ids(tokenizer, p) for p in prompts], sampling.max_new_tokens)
    out, stats = sys.stdout, GenerationStats()
    if batch is not None:  # one JSON line per prompt, decoded as one batch
        texts = generate_text(model, tokenizer, batch, sampling, options, stats)
        for line_prompt, text in zip(batch, texts):
            out.write(json.dumps({"prompt": line_prompt, "text": text}, ensure_ascii=False) + "\n")
    elif args.num_samples == 1 and not args.no_stream:
        out.write(prompt)
        out.flush()
        for piece in stream(model, tokenizer, prompt, sampling, options, stats):
            out.write(piece)
            out.flush()
        out.write("\n")
    else:
        texts = generate_text(model, tokenizer, prompts, sampling, options, stats)
        for i, text in enumerate(texts):
            if args.num_samples > 1:
                out.write(f"--- sample {i + 1} ---\n")
            out.write(prompt + text + "\n")
    out.flush()
    report_speed(stats)
    return 0
