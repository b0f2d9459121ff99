"""Where a training step's time goes: the real `Trainer` on a prepared corpus, profiled with torch.profiler.

Runs `--warmup` steps, then profiles `--steps` steps and prints (1) the step's phases measured with
wall clocks around the trainer's own calls (data loading, forward + backward, optimizer, logging rows)
and (2) the operators taking the most CPU time. Nothing is tuned here; it says what to tune.

    .venv/bin/python benchmarks/profile_train.py --config configs/tiny.toml --data data/full8k --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from gtransformer.config import apply_overrides, load_toml  # noqa: E402
from gtransformer.training.trainer import Trainer  # noqa: E402


class PhaseClock:
    """Wraps methods of an object so each call's wall time adds to a named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attribute: str, phase: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started

        setattr(owner, attribute, timed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--data", required=True, help="prepared corpus folder")
    p.add_argument("--set", action="append", default=[], metavar="section.key=value")
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("--warmup", type=int, default=10, help="steps before profiling (compile happens here)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=18, help="operators listed")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = apply_overrides(load_toml(args.config), args.set)
    tables.setdefault("data", {})["path"] = args.data
    tables["train"].update(max_steps=args.warmup + args.steps, eval_every=0, checkpoint_every=0, tensorboard=False)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(tables, Path(out) / "run", progress_bar=False)
        for _ in range(args.warmup):
            trainer.step()
        clock = PhaseClock()
        clock.wrap(trainer.loader, "next_batch", "data loading")
        clock.wrap(trainer.parallel, "runner", "forward")
        clock.wrap(trainer.scaler, "step", "optimizer step")
        clock.wrap(trainer.scaler, "unscale_", "unscale")
        clock.wrap(trainer, "log_row", "log row")
        clock.wrap(trainer.model, "update_router_biases", "router bias update")
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                trainer.step()
        total = time.perf_counter() - started
        trainer.close()
    step_ms = 1000 * total / args.steps
    print(f"{args.steps} steps, {step_ms:.0f} ms a step under the profiler "
          f"({trainer.tokens_per_step * args.steps / total:,.0f} tokens/s)")
    rows = [{"phase": name, "ms": 1000 * s / args.steps, "share": s / total} for name, s in clock.seconds.items()]
    rest = total - sum(clock.seconds.values())
    rows.append({"phase": "backward, clipping, rest", "ms": 1000 * rest / args.steps, "share": rest / total})
    common.print_table(rows, [("phase", "phase", ""), ("ms", "ms/step", ".1f"), ("share", "share", ".1%")])
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
