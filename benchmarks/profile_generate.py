"""Where a batch-1 decoding step's time goes: kernels or Python, under torch.profiler.

Generates `--new-tokens` greedy tokens from the model bench_generate builds (same
preset, seed and prompt) and profiles the whole generation. It prints the time a
token takes, how much of it the operators' own kernels account for (the sum of
self CPU time over aten/inductor ops), and the rest: Python, module calls and
dispatch. With --compile, the step is the compiled forward (gpt-fast style).

    python benchmarks/profile_generate.py --preset laptop --threads 1
    python benchmarks/profile_generate.py --preset tiny --threads 1 --compile
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402
import common  # noqa: E402
from common import UserError  # noqa: E402

# Operators whose self time is the model's arithmetic; everything else a profiler row shows is bookkeeping.
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::mv", "aten::addmv", "aten::matmul", "aten::linear",
           "aten::_int_mm", "aten::baddbmm")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p, default_models="ours")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="profile the compiled decoding step")
    p.add_argument("--top", type=int, default=15, help="operator rows to print")
    common.add_run_args(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"profile_generate: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    threads = common.set_threads(args.threads)
    config = common.load_model_config(args.preset, [*args.set, f"context_length={args.prompt_len + args.new_tokens}"])
    model = common.build_ours(config, "cpu").eval()
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(7))

    def generate(n: int) -> list[int]:
        return bench_generate.generate_ours(model, prompt, n, compile=args.compile)

    generate(16)  # warm-up (and compile)
    started = time.perf_counter()
    generate(args.new_tokens)
    plain = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        generate(args.new_tokens)
        profiled = time.perf_counter() - started
    events = prof.key_averages()
    self_us = sum(e.self_cpu_time_total for e in events)
    matmul_us = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    # The profiler's own rows (and the user-annotation wrappers) are not work of the model.
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    per_token_ms = 1000 * plain / args.new_tokens
    print(f"# profile_generate  preset {args.preset}  threads {threads}  {'compiled' if args.compile else 'eager'}  "
          f"prompt {args.prompt_len} + {args.new_tokens} tokens  torch {torch.__version__}")
    print(f"{per_token_ms:.3f} ms a token unprofiled ({args.new_tokens / plain:,.0f} tokens/s); "
          f"{1000 * profiled / args.new_tokens:.3f} ms under the profiler")
    kernel_ms = self_us / 1000 / args.new_tokens
    print(f"operators' self time: {kernel_ms:.3f} ms a token, of which matrix products "
          f"{matmul_us / 1000 / args.new_tokens:.3f} ms; {calls / args.new_tokens:.0f} aten calls a token")
    print(f"outside the operators (Python, module calls, dispatch, sampling): "
          f"{1000 * profiled / args.new_tokens - kernel_ms:.3f} ms a token "
          f"({1 - kernel_ms / (1000 * profiled / args.new_tokens):.0%} of the profiled time)")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
