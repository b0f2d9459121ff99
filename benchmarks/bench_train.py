"""Training throughput of our GPT against Hugging Face's `MixtralForCausalLM` at one shape.

One training step is forward + backward + AdamW step + zero_grad on the same random
token batch for every model, under the same precision. Models run alternately in one
process (the order rotates each repetition), warm-up steps are excluded, and the
median over repetitions is reported with the ratio ours / theirs. Peak memory is
measured separately: on CPU each model trains in a fresh subprocess and reports its
peak RSS; on CUDA the allocator's peak during the model's own steps is added to the
bytes its weights and optimiser state hold.

    python benchmarks/bench_train.py --preset tiny --batch 8 --seq 256 --dtype float32
    python benchmarks/bench_train.py --preset base --batch 16 --seq 1024 --dtype bf16 \
        --device cuda --compile --models ours,hf:grouped_mm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import UserError  # noqa: E402

from gtransformer.runtime import device_peak_flops  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_model_args(p, default_models="ours,hf:grouped_mm,hf:eager")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (at most the preset's context)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per repetition")
    p.add_argument("--reps", type=int, default=5, help="repetitions; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    p.add_argument("--dtype", default="float32", choices=["float32", "bf16"],
                   help="float32, or bf16 autocast over float32 weights")
    common.add_run_args(p)
    p.add_argument("--compile", action="store_true", help="torch.compile every model before timing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--measure-memory", default=None, metavar="MODEL", help=argparse.SUPPRESS)
    return p


def make_batches(vocab_size: int, batch: int, seq: int, device: str, count: int = 4):
    generator = torch.Generator().manual_seed(1234)
    data = torch.randint(0, vocab_size, (count, batch, seq + 1), generator=generator)
    return [(d[:, :-1].contiguous().to(device), d[:, 1:].contiguous().to(device)) for d in data]


def make_optimizer(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    # fused AdamW, for every model: the fast path on CUDA and on CPU (4.7x faster than foreach here).
    fused = torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)


def make_step(name: str, model, optimizer, batches, device: str, dtype: str):
    """A closure running one training step on the next batch; returns the loss tensor (no sync)."""
    position = [0]
    compiled = getattr(model, "_bench_forward", model)

    def loss_of(inputs, targets):
        if name in common.OURS_VARIANTS:
            out = compiled(inputs, targets=targets)
            return out.loss + out.aux_loss if out.aux_loss is not None else out.loss
        # HF shifts `labels` itself; `shift_labels` hands it our already-shifted targets so
        # both models score the same seq positions. Its loss already includes the
        # weighted balancing loss (output_router_logits=True in the config).
        out = compiled(input_ids=inputs, labels=targets, shift_labels=targets, use_cache=False)
        return out.loss

    def step():
        inputs, targets = batches[position[0] % len(batches)]
        position[0] += 1
        with common.autocast(device, dtype):
            loss = loss_of(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def prepare(name: str, model_config, args, device: str):
    model = common.build_model(name, model_config, device)
    model.train()
    if args.compile or name == "ours:compiled":
        model._bench_forward = torch.compile(model)
    optimizer = make_optimizer(model, device)
    return model, optimizer


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def measure_memory_here(name: str, model_config, args, device: str) -> dict:
    """Peak memory of training `name` alone (run in its own process on CPU)."""
    # Both processes import both libraries first, so the baseline is the same code in memory.
    import gtransformer.model.model  # noqa: F401
    from transformers import MixtralForCausalLM  # noqa: F401

    baseline = common.current_rss_mb()
    model, optimizer = prepare(name, model_config, args, device)
    batches = make_batches(model_config.vocab_size, args.batch, args.seq, device)
    step = make_step(name, model, optimizer, batches, device, args.dtype)
    for _ in range(max(2, args.warmup)):
        step()
    return {"model": name, "peak_rss_mb": common.peak_rss_mb(), "baseline_rss_mb": baseline}


def measure_memory(names, model_config, args, device: str, models) -> dict[str, float]:
    """Peak MiB per model: CPU via one subprocess per model, CUDA via allocator stats."""
    peaks = {}
    if torch.device(device).type == "cuda":
        for name in names:
            model, optimizer, step = models[name]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            transient = torch.cuda.max_memory_allocated() - before
            peaks[name] = (resident_bytes(model, optimizer) + transient) / 2**20
        return peaks
    script = Path(__file__).resolve()
    passthrough = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--dtype", args.dtype, "--device", device, "--warmup", str(args.warmup)]
    for item in args.set:
        passthrough += ["--set", item]
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    if args.compile:
        passthrough.append("--compile")
    for name in names:
        try:
            result = common.run_isolated(script, [*passthrough, "--measure-memory", name])
        except RuntimeError as exc:
            print(f"# memory {name} not measured: {str(exc).splitlines()[0]}", file=sys.stderr)
            continue
        peaks[name] = result["peak_rss_mb"] - result["baseline_rss_mb"]
        print(f"# memory {name}: peak RSS {result['peak_rss_mb']:.0f} MiB, baseline {result['baseline_rss_mb']:.0f} MiB")
    return peaks


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"bench_train: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    device = common.resolve_device(args.device)
    common.set_threads(args.threads)
    model_config = common.load_model_config(args.preset, args.set)
    if args.seq > model_config.context_length:
        raise UserError(f"--seq {args.seq} exceeds the preset's context_length {model_config.context_length}")
    if min(args.batch, args.seq, args.steps, args.reps) < 1:
        raise UserError("--batch, --seq, --steps and --reps must be at least 1")

    if args.measure_memory:
        print(common.json.dumps(measure_memory_here(args.measure_memory, model_config, args, device)))
        return 0

    names = common.parse_models(args.models, common.OURS_VARIANTS)
    env = common.environment(device)
    tokens_per_step = args.batch * args.seq
    flops_per_token = common.training_flops_per_token(model_config, args.seq)
    print(f"# bench_train  {env['date']}  commit {env['commit']}  {env.get('gpu', env['cpu'])}  "
          f"threads {env['torch_threads']}  torch {env['torch']}  transformers {env['transformers']}")
    print(f"# preset {args.preset}  batch {args.batch} x seq {args.seq}  dtype {args.dtype}  "
          f"compile {args.compile}  steps {args.steps} x reps {args.reps} (+{args.warmup} warm-up)")

    batches = make_batches(model_config.vocab_size, args.batch, args.seq, device)
    models, first_loss, errors = {}, {}, {}
    for name in names:
        # One model failing (an unsupported kernel on some device) must not lose the others' numbers.
        try:
            model, optimizer = prepare(name, model_config, args, device)
            step = make_step(name, model, optimizer, batches, device, args.dtype)
            first_loss[name] = float(step())
            for _ in range(args.warmup - 1):
                step()
            models[name] = (model, optimizer, step)
        except (RuntimeError, NotImplementedError, torch.OutOfMemoryError) as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"# {name} failed, left out: {errors[name]}", file=sys.stderr)
            model = optimizer = step = None
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    names = [name for name in names if name in models]
    if not names:
        raise RuntimeError("every model failed; see the messages above")

    seconds = {name: [] for name in names}
    for rep in range(args.reps):
        # Rotate the order so neither model always runs right after the other's cache churn.
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            step = models[name][2]
            seconds[name].append(common.timed(lambda: [step() for _ in range(args.steps)], device) / args.steps)

    peaks = {}
    if not args.no_memory:
        peaks = measure_memory(names, model_config, args, device, models)

    peak = device_peak_flops(torch.device(device))
    rows = []
    for name in names:
        step_time = common.median(seconds[name])
        tokens_per_s = tokens_per_step / step_time
        rows.append({
            "model": name,
            "params": sum(p.numel() for p in models[name][0].parameters()),
            "first_loss": first_loss[name],
            "step_s": step_time,
            "steps_per_s": 1 / step_time,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_all": [tokens_per_step / s for s in seconds[name]],
            "mfu": tokens_per_s * flops_per_token / peak if peak else None,  # known GPUs only
            "peak_mb": peaks.get(name),
        })
    if "ours" in seconds:
        ours = next(r for r in rows if r["model"] == "ours")
        for row in rows:
            row["ours_speedup"] = ours["tokens_per_s"] / row["tokens_per_s"]
            if row.get("peak_mb") and ours.get("peak_mb"):
                row["ours_memory_ratio"] = ours["peak_mb"] / row["peak_mb"]
    reference_column = common.add_reference_speedups(rows)

    columns = [("model", "model", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("steps_per_s", "steps/s", ".3f"),
               ("first_loss", "loss@0", ".3f"), ("peak_mb", "peak MiB", ",.0f"),
               ("ours_speedup", "ours x faster", ".2f"), ("ours_memory_ratio", "ours/their mem", ".2f"),
               reference_column]
    if torch.device(device).type == "cuda":
        columns.insert(3, ("mfu", "MFU", ".1%"))
    rows += [{"model": name, "error": message} for name, message in errors.items()]
    if errors:
        columns.append(("error", "error", ""))
    common.print_table(rows, columns)
    memory_note = "subprocess peak RSS (VmHWM) minus import baseline" if device == "cpu" else "weights+optimizer+step peak"
    print(f"# peak memory: {memory_note}; FLOPs/token {flops_per_token:.3e}")
    common.write_json(args.json, {"benchmark": "train", "env": env, "args": vars(args),
                                  "model_config": common.config_dict(model_config),
                                  "flops_per_token": flops_per_token, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
