"""Batch-1 generation speed of our GPT (preallocated KV cache) against Hugging Face `generate` and llama.cpp.

Every model gets the same random prompt and decodes greedily for exactly
`--new-tokens` tokens (no end-of-text stop). Time covers the whole call, prefill
included; tokens/s = new tokens / seconds. prompt tokens/s = prompt tokens / the
seconds to the first new token (a generation of one token). Models alternate, a
short warm-up generation per model is excluded, and the median over repetitions
is reported.

`llamacpp` (or `llamacpp:f16`, `llamacpp:q8_0`) is llama.cpp through
llama-cpp-python, on the GGUF file `export --format gguf` writes of the very
weights `ours` has (same seed), with --threads threads (default: torch's). Its
own counters (llama_perf_context: time inside llama_decode) are printed too, to
separate the runtime from the Python binding's per-token cost.

The tiny preset's context_length (256) is shorter than 32 + 256 tokens, so when
prompt + new tokens exceed it, context_length is raised for both models: that only
sizes the RoPE table and the KV cache, not any weight.

    python benchmarks/bench_generate.py --preset tiny
    python benchmarks/bench_generate.py --preset base --device cuda --dtype bf16 --models ours,hf:grouped_mm
    python benchmarks/bench_generate.py --preset laptop --threads 1 --models ours,ours:compiled,llamacpp
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
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


LLAMACPP_TYPES = ("f32", "f16", "q8_0")


def is_llamacpp(name: str) -> bool:
    return name.partition(":")[0] == "llamacpp"


def build_llamacpp(name: str, model_config, threads: int, n_ctx: int, n_batch: int, folder: Path):
    """llama.cpp's Llama over our export of `ours`' weights (seed 0), in the GGUF type the name gives."""
    import llama_cpp

    from gtransformer.data.tokenizer import Tokenizer
    from gtransformer.interop.gguf import export_gguf

    dtype = name.partition(":")[2] or "f32"
    if dtype not in LLAMACPP_TYPES:
        raise UserError(f"unknown llama.cpp type in {name!r}; use llamacpp or llamacpp:TYPE with TYPE one of "
                        f"{', '.join(LLAMACPP_TYPES)}")
    model = common.build_ours(model_config, "cpu").eval()
    # The benchmark feeds ids, never text: a small byte-level BPE (llama.cpp needs merges), padded to the model's
    # vocabulary by the export.
    tokenizer = Tokenizer.train_bpe(["Era uma vez o amor, era uma vez a cidade."], vocab_size=280, min_frequency=1)
    path, _ = export_gguf(model, tokenizer, folder / f"{dtype}.gguf", dtype=dtype)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                           n_threads_batch=threads, verbose=False)


def generate_llamacpp(llm, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    import llama_cpp

    llm.reset()  # no KV-cache reuse between repetitions: every call prefills the whole prompt
    llama_cpp.llama_perf_context_reset(llm.ctx)
    out = []
    for token in llm.generate(prompt.tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                              reset=True):
        out.append(token)
        if len(out) == new_tokens:
            break
    return out


def llamacpp_counters(llm) -> dict:
    """The runtime's own timing of its last generation: prompt and decode seconds inside llama_decode."""
    import llama_cpp

    perf = llama_cpp.llama_perf_context(llm.ctx)
    return {"prompt_s": perf.t_p_eval_ms / 1000, "prompt_tokens": perf.n_p_eval,
            "decode_s": perf.t_eval_ms / 1000, "decode_tokens": perf.n_eval}


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
    threads = common.set_threads(args.threads)
    if min(args.prompt_len, args.new_tokens, args.reps, args.warmup_tokens) < 1:
        raise UserError("--prompt-len, --new-tokens, --reps and --warmup-tokens must be at least 1")
    model_config = common.load_model_config(args.preset, args.set)
    needed = args.prompt_len + args.new_tokens
    raised_context = needed > model_config.context_length
    if raised_context:
        model_config = common.load_model_config(args.preset, [*args.set, f"context_length={needed}"])

    names = common.parse_models(args.models, (*common.OURS_VARIANTS, "llamacpp",
                                              *(f"llamacpp:{t}" for t in LLAMACPP_TYPES)))
    env = common.environment(device)
    print(f"# bench_generate  {env['date']}  commit {env['commit']}  {env.get('gpu', env['cpu'])}  "
          f"threads {env['torch_threads']}  torch {env['torch']}  transformers {env['transformers']}"
          + (f"  llama-cpp-python {llamacpp_version()}" if any(map(is_llamacpp, names)) else ""))
    print(f"# preset {args.preset}  batch 1  prompt {args.prompt_len} + {args.new_tokens} new tokens greedy  "
          f"dtype {args.dtype}  reps {args.reps}"
          + (f"  ours decodes with {args.decode_dtype} weights" if args.decode_dtype else "")
          + (f"  (context_length raised to {needed} for both)" if raised_context else ""))

    weight_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    prompt = torch.randint(0, model_config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(7))
    models, generators, errors = {}, {}, {}
    scratch = tempfile.TemporaryDirectory(prefix="bench_generate-")
    for name in names:
        if name in common.OURS_VARIANTS:
            generate_fn = functools.partial(generate_ours, decode_dtype=args.decode_dtype,
                                            compile=name == "ours:compiled")
        elif is_llamacpp(name):
            generate_fn = generate_llamacpp
        else:
            generate_fn = generate_hf
        # One model failing (an unsupported kernel on some device) must not lose the others' numbers.
        try:
            if is_llamacpp(name):
                if torch.device(device).type != "cpu" or args.dtype != "float32":
                    raise UserError("llamacpp is measured on the CPU with --dtype float32 (its type is in the name)")
                model = build_llamacpp(name, model_config, threads, needed, args.prompt_len, Path(scratch.name))
            else:
                model = common.build_model(name, model_config, device).to(weight_dtype).eval()
            started = time.perf_counter()
            got = generate_fn(model, prompt, args.warmup_tokens)
            print(f"# {name}: warm-up generation (includes any compiling) {time.perf_counter() - started:.1f} s")
            if len(got) != args.warmup_tokens:
                raise RuntimeError(f"{name} generated {len(got)} tokens, expected {args.warmup_tokens}")
            models[name], generators[name] = model, generate_fn
        except (RuntimeError, NotImplementedError, torch.OutOfMemoryError, UserError, ImportError, ValueError) as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"# {name} failed, left out: {errors[name]}", file=sys.stderr)
            model = None
    names = [name for name in names if name in models]
    if not names:
        raise RuntimeError("every model failed; see the messages above")

    seconds = {name: [] for name in names}
    first_token = {name: [] for name in names}
    counters = {name: [] for name in names if is_llamacpp(name)}
    peaks = {}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            generate_fn, model = generators[name], models[name]
            first_token[name].append(common.timed(lambda: generate_fn(model, prompt, 1), device))
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            out: list[int] = []
            seconds[name].append(common.timed(lambda: out.extend(generate_fn(model, prompt, args.new_tokens)), device))
            if len(out) != args.new_tokens:
                raise RuntimeError(f"{name} generated {len(out)} tokens, expected {args.new_tokens}")
            if name in counters:
                counters[name].append(llamacpp_counters(model))
            if torch.device(device).type == "cuda":
                # The other models' weights are resident too: count only this model's weights + transients.
                weights = sum(p.numel() * p.element_size() for p in model.parameters())
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
            "prompt_tokens_per_s": args.prompt_len / common.median(first_token[name]),
            "peak_mb": peaks.get(name),
        })
        if name in counters:
            runtime = counters[name]
            rows[-1]["llamacpp_counters"] = runtime
            decode = common.median([c["decode_tokens"] / c["decode_s"] for c in runtime if c["decode_s"] > 0])
            print(f"# {name}: inside llama_decode {decode:,.1f} decode tokens/s "
                  f"({common.median([c['decode_s'] for c in runtime]) / elapsed:.0%} of the call's time; the rest is "
                  f"prefill, sampling and the Python binding)")
    reference_column = common.add_reference_speedups(rows)
    columns = [("model", "model", ""), ("tokens_per_s", "tokens/s", ",.1f"), ("ms_per_token", "ms/token", ".2f"),
               ("prompt_tokens_per_s", "prompt tokens/s", ",.0f"), ("peak_mb", "peak MiB", ",.0f"),
               reference_column]
    ours = next((row for row in rows if row["model"] == "ours"), None)
    if ours is not None and len(rows) > 1:
        for row in rows:
            row["x_ours"] = row["tokens_per_s"] / ours["tokens_per_s"]
        columns.append(("x_ours", "x ours", ".2f"))
    rows += [{"model": name, "error": message} for name, message in errors.items()]
    if errors:
        columns.append(("error", "error", ""))
    common.print_table(rows, columns)
    common.write_json(args.json, {"benchmark": "generate", "env": env, "args": vars(args),
                                  "model_config": common.config_dict(model_config), "results": rows})
    scratch.cleanup()
    return 0


def llamacpp_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        return "not installed"
    return llama_cpp.__version__


if __name__ == "__main__":
    raise SystemExit(main())
