"""The serving engine's batched decoding step: tokens/s at 1, 2, 4, 8, 16 rows, each row at its own cache slot.

What `Engine._batched_step` runs, without HTTP, sampling or threads: `Decoder.step` over
`Decoder.rows(cache, 0, rows, slots)` after each row's prompt (of a different length) was
prefilled into its own cache row. Random weights of the preset; the minimum over --reps runs
of --steps steps each (the step always writes the same slots, so every run does the same work).
tokens/s = rows / step time; "x 1 row" is against the 1-row step of the same model.

    python benchmarks/bench_step.py --preset tiny --threads 2 --rows 1,8 [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import UserError  # noqa: E402

from gtransformer.inference.decode import DecodeOptions, Decoder  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="configs/NAME.toml or a .toml path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a [model] key")
    p.add_argument("--rows", default="1,2,4,8,16", help="comma-separated row counts")
    p.add_argument("--steps", type=int, default=50, help="steps per timed run")
    p.add_argument("--reps", type=int, default=5, help="timed runs per row count; the minimum is reported")
    p.add_argument("--compile", action="store_true", help="the compiled step (DecodeOptions(compile=True))")
    p.add_argument("--decode-dtype", default=None, choices=["float16", "bfloat16", "int8"])
    common.add_run_args(p)
    return p


def step_seconds(decoder: Decoder, rows: int, steps: int, reps: int, vocab: int) -> float:
    context = decoder.model.config.context_length
    cache = decoder.cache(rows, context)
    generator = torch.Generator().manual_seed(rows)
    lengths = [min(8 + 5 * row, context - 2) for row in range(rows)]
    for row, length in enumerate(lengths):
        decoder.prefill(torch.randint(0, vocab, (1, length), generator=generator), cache.rows(row, row + 1))
    tokens = torch.randint(0, vocab, (rows,), generator=generator)
    step = lambda: decoder.step(tokens, decoder.rows(cache, 0, rows, lengths))  # noqa: E731
    step()  # warm-up (compiles this batch size)
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - started) / steps)
    return best


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"bench_step: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    common.set_threads(args.threads)
    device = common.resolve_device(args.device)
    rows_list = [int(r) for r in args.rows.split(",")]
    if min(rows_list + [args.steps, args.reps]) < 1:
        raise UserError("--rows, --steps and --reps must be at least 1")
    config = common.load_model_config(args.preset, args.set)
    torch.manual_seed(0)
    model = common.build_ours(config, device).eval()
    env = common.environment(device)
    name = "ours:compiled" if args.compile else "ours"
    print(f"# bench_step  {env['date']}  commit {env['commit']}  {env.get('gpu', env['cpu'])}  "
          f"threads {env['torch_threads']}  torch {env['torch']}")
    print(f"# preset {args.preset}  {name}  decode dtype {args.decode_dtype or 'the model'}  "
          f"min of {args.reps} x {args.steps} steps")
    rows_out = []
    with torch.inference_mode():
        decoder = Decoder(model, DecodeOptions(dtype=args.decode_dtype, compile=args.compile))
        for rows in rows_list:
            seconds = step_seconds(decoder, rows, args.steps, args.reps, config.vocab_size)
            rows_out.append({"model": f"{name} x{rows}", "rows": rows, "ms_per_step": 1000 * seconds,
                             "tokens_per_s": rows / seconds})
    one = next((r["tokens_per_s"] for r in rows_out if r["rows"] == 1), None)
    for row in rows_out:
        row["vs_one_row"] = row["tokens_per_s"] / one if one else None
    common.print_table(rows_out, [("rows", "rows", ""), ("ms_per_step", "ms/step", ".2f"),
                                  ("tokens_per_s", "tokens/s", ",.0f"), ("vs_one_row", "x 1 row", ".2f")])
    common.write_json(args.json, {"benchmark": "step", "env": env, "args": vars(args),
                                  "model_config": common.config_dict(config), "results": rows_out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
