"""Batch-1 generation speed of our GPT (preallocated KV cache) against Hugging Face `generate`.

Both models get the same random prompt and decode greedily for exactly
`--new-tokens` tokens (no end-of-text stop). Time covers the whole call, prefill
included; tokens/s = new tokens / seconds. Models alternate, a short warm-up
generation per model is excluded, and the median over repetitions is reported.

The tiny preset's context_length (256) is shorter than 32 + 256 tokens, so when
prompt + new tokens exceed it, context_length is raised for both models: that only
sizes the RoPE table and the KV cache, not any weight.

    python benchmarks/bench_generate.py --preset tiny
    python benchmarks/bench_generate.py --preset base --device cuda --dtype bf16 --models ours,hf:grouped_mm
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import UserError  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p, default_models="ours,hf:grouped_mm")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens of the untimed warm-up generation")
    p.add_argument("--dtype", default="float32", choices=["float32", "bf16"], help="weights and KV cache dtype")
    p.add_argument("--decode-dtype", default=None, choices=["float16", "bfloat16", "int8"],
                   help="ours only: reduced-precision decode weights (approximate logits; HF stays at --dtype)")
    common.add_run_args(p)
    return p


def generate_ours(model, prompt: torch.Tensor, new_tokens: int, decode_dtype: str | None = None,
                  compile: bool = False) -> list[int]:
    from gtransformer.inference.generate import DecodeOptions, generate
    from gtransformer.inference.sampling import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    # Threads are --threads' (the `generate` command sets 1 for eager CPU decoding of few rows).
    options = DecodeOptions(dtype=decode_dtype, compile=compile)
    return generate(model, [prompt.tolist()], sampling, options)[0]


def generate_hf(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    from transformers import GenerationConfig

    # eos None and min_new_tokens = max_new_tokens: exactly new_tokens tokens, never an early stop.
    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0, bos_token_id=None,
    )
    input_ids = prompt[None].to(model.device)
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return out[0, input_ids.shape[1]:].tolist()


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"bench_generate: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    device = common.resolve_device(args.device)
    common.set_threads(args.threads)
    if min(args.prompt_len, args.new_tokens, args.reps, args.warmup_tokens) < 1:
        raise UserError("--prompt-len, --new-tokens, --reps and --warmup-tokens must be at least 1")
    model_config = common.load_model_config(args.preset, args.set)
    needed = args.prompt_len + args.new_tokens
    raised_context = needed > model_config.context_length
    if raised_context:
        model_config = common.load_model_config(args.preset, [*args.set, f"context_length={needed}"])

    names = common.parse_models(args.models, common.OURS_VARIANTS)
    env = common.environment(device)
    print(f"# bench_generate  {env['date']}  commit {env['commit']}  {env.get('gpu', env['cpu'])}  "
          f"threads {env['torch_threads']}  torch {env['torch']}  transformers {env['transformers']}")
    print(f"# preset {args.preset}  batch 1  prompt {args.prompt_len} + {args.new_tokens} new tokens greedy  "
          f"dtype {args.dtype}  reps {args.reps}"
          + (f"  ours decodes with {args.decode_dtype} weights" if args.decode_dtype else "")
          + (f"  (context_length raised to {needed} for both)" if raised_context else ""))

    weight_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    prompt = torch.randint(0, model_config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(7))
    models, generators, errors = {}, {}, {}
    for name in names:
        if name in common.OURS_VARIANTS:
            generate_fn = functools.partial(generate_ours, decode_dtype=args.decode_dtype,
                                            compile=name == "ours:compiled")
        else:
            generate_fn = generate_hf
        # One model failing (an unsupported kernel on some device) must not lose the others' numbers.
        try:
            model = common.build_model(name, model_config, device).to(weight_dtype).eval()
            started = time.perf_counter()
            got = generate_fn(model, prompt, args.warmup_tokens)
            print(f"# {name}: warm-up generation (includes any compiling) {time.perf_counter() - started:.1f} s")
            if len(got) != args.warmup_tokens:
                raise RuntimeError(f"{name} generated {len(got)} tokens, expected {args.warmup_tokens}")
            models[name], generators[name] = model, generate_fn
        except (RuntimeError, NotImplementedError, torch.OutOfMemoryError, UserError) as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"# {name} failed, left out: {errors[name]}", file=sys.stderr)
            model = None
    names = [name for name in names if name in models]
    if not names:
        raise RuntimeError("every model failed; see the messages above")

    seconds = {name: [] for name in names}
    peaks = {}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            out: list[int] = []
            seconds[name].append(common.timed(
                lambda: out.extend(generators[name](models[name], prompt, args.new_tokens)), device))
            if len(out) != args.new_tokens:
                raise RuntimeError(f"{name} generated {len(out)} tokens, expected {args.new_tokens}")
            if torch.device(device).type == "cuda":
                # The other models' weights are resident too: count only this model's weights + transients.
                weights = sum(p.numel() * p.element_size() for p in models[name].parameters())
                peaks[name] = (torch.cuda.max_memory_allocated() - before + weights) / 2**20

    rows = []
    for name in names:
        elapsed = common.median(seconds[name])
        rows.append({
            "model": name,
            "seconds": elapsed,
            "tokens_per_s": args.new_tokens / elapsed,
            "tokens_per_s_all": [args.new_tokens / s for s in seconds[name]],
            "ms_per_token": 1000 * elapsed / args.new_tokens,
            "peak_mb": peaks.get(name),
        })
    reference_column = common.add_reference_speedups(rows)
    columns = [("model", "model", ""), ("tokens_per_s", "tokens/s", ",.1f"), ("ms_per_token", "ms/token", ".2f"),
               ("peak_mb", "peak MiB", ",.0f"),
               reference_column]
    rows += [{"model": name, "error": message} for name, message in errors.items()]
    if errors:
        columns.append(("error", "error", ""))
    common.print_table(rows, columns)
    common.write_json(args.json, {"benchmark": "generate", "env": env, "args": vars(args),
                                  "model_config": common.config_dict(model_config), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
