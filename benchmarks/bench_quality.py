"""Quality per minute: configurations trained for the same wall-clock budget on one prepared corpus.

Each configuration is a preset plus `--set` overrides. They train one after another (never
side by side: they would share the cores), each through the real `gtransformer train` in a
subprocess with `--max-minutes`, then `gtransformer eval` measures validation bits per byte
over the whole val split. Prints a table and writes a bpb-against-minutes plot from each
run's in-training evaluations.

    .venv/bin/python benchmarks/bench_quality.py --data data/full8k --minutes 30 \\
        --config "tiny=configs/tiny.toml" \\
        --config "dense=configs/tiny.toml model.n_experts=0" \\
        --out benchmarks/out/quality

With `--interleave` the configurations train in one process instead, time-shared: the one
with the least training time so far takes the next step, so each gets the same budget of
its own training time and a shared host's slow minutes hit all of them alike (this host's
speed drifts by up to 1.6x within an hour). Each run's LR schedule and `--max-minutes` see
only its own time; the whole-val evaluation is the same `gtransformer eval`.

A configuration is `NAME=PRESET [section.key=value ...]`. `model.n_experts=0` gives the dense
model whose SwiGLU width is top_k * expert_hidden, so its active FLOPs per token match the
MoE's (`ModelConfig.dense_hidden`). A configuration trains on `--data` unless it sets its own
`data.path` (another vocabulary: `data.path=data/full4k model.vocab_size=4096`); bits per byte
compare across tokenizers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure

REPO_ROOT = Path(__file__).resolve().parents[1]
# Interleaved models share oneDNN's cache of bfloat16 kernels (one per shape); its default 1024 would thrash.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from gtransformer.config import apply_overrides, load_toml  # noqa: E402
from gtransformer.files import read_jsonl  # noqa: E402
from gtransformer.training.trainer import Trainer  # noqa: E402


def parse_config(text: str) -> tuple[str, str, list[str]]:
    """'NAME=PRESET key=value ...' -> (name, preset path, overrides)."""
    name, _, rest = text.partition("=")
    words = shlex.split(rest)
    if not name or not words:
        raise SystemExit(f"--config {text!r}: expected NAME=PRESET [section.key=value ...]")
    return name, words[0], words[1:]


def gtransformer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gtransformer", *args], capture_output=True, text=True)


def run_tables(preset: str, overrides: list[str], args) -> dict:
    """The preset with `--data` as its corpus, then the configuration's overrides (which may name another)."""
    tables = load_toml(preset)
    tables.setdefault("data", {})["path"] = args.data
    return apply_overrides(tables, overrides)


def train_and_eval(name: str, preset: str, overrides: list[str], args) -> dict:
    run = Path(args.out) / name
    data = run_tables(preset, overrides, args)["data"]["path"]  # train's --data would win over a --set data.path
    command = ["train", "--config", preset, "--data", data, "--out", str(run), "--max-minutes", str(args.minutes),
               "--no-progress", *[a for o in overrides for a in ("--set", o)]]
    if args.threads:
        command += ["--threads", str(args.threads)]
    started = time.monotonic()
    done = gtransformer(*command)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{name}: train failed:\n{done.stderr[-3000:]}")
    return evaluate_run(name, preset, overrides, wall, args)


class TurnTimer:
    """A clock that runs only during its configuration's turns: that run's own training time."""

    def __init__(self):
        self.used_s, self.turn_start = 0.0, None

    def __call__(self) -> float:
        return self.used_s + (time.perf_counter() - self.turn_start if self.turn_start is not None else 0.0)

    def start(self) -> None:
        self.turn_start = time.perf_counter()

    def stop(self) -> None:
        self.used_s, self.turn_start = self(), None


class TimeShare:
    """One configuration's `Trainer` in an interleaved run, timed by a `TurnTimer` (its budget, LR schedule and
    tokens/s see only its own turns)."""

    def __init__(self, name: str, preset: str, overrides: list[str], args):
        self.name, self.preset, self.overrides = name, preset, overrides
        tables = run_tables(preset, overrides, args)
        tables["train"]["max_minutes"] = args.minutes
        self.timer = TurnTimer()
        self.trainer = Trainer(tables, Path(args.out) / name, progress_bar=False, timer=self.timer)

    @property
    def used_s(self) -> float:
        return self.timer.used_s

    def turn(self) -> None:
        """One optimizer step, and the in-training evaluation when one is due (timed as `fit` does)."""
        trainer, config = self.trainer, self.trainer.config
        self.timer.start()
        trainer.step()
        if trainer.finished or (config.eval_every and trainer.state.step % config.eval_every == 0):
            trainer.evaluate_and_sample()
        self.timer.stop()
        if trainer.finished:
            trainer.save()
            trainer.close()


def train_interleaved(configs: list[tuple[str, str, list[str]]], args) -> list[dict]:
    shares = [TimeShare(name, preset, overrides, args) for name, preset, overrides in configs]
    started = time.monotonic()
    running = list(shares)
    while running:
        share = min(running, key=lambda s: s.used_s)
        share.turn()
        if share.trainer.finished:
            running.remove(share)
    wall = time.monotonic() - started
    return [evaluate_run(s.name, s.preset, s.overrides, wall, args) for s in shares]


def evaluate_run(name: str, preset: str, overrides: list[str], wall: float, args) -> dict:
    """`gtransformer eval` of a finished run folder, with its training rows' tokens, speed and curve."""
    run = Path(args.out) / name
    evaluated = gtransformer("eval", str(run), "--split", "val",
                             *(["--max-tokens", str(args.eval_max_tokens)] if args.eval_max_tokens else []))
    if evaluated.returncode != 0:
        raise SystemExit(f"{name}: eval failed:\n{evaluated.stderr[-3000:]}")
    result = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])
    rows = read_jsonl(run / "metrics.jsonl")
    train_rows = [r for r in rows if r.get("kind") == "train"]
    curve = [(r["elapsed_s"] / 60, r["val_bits_per_byte"]) for r in rows
             if r.get("kind") == "eval" and "elapsed_s" in r and "val_bits_per_byte" in r]
    return {
        "name": name, "preset": preset, "overrides": overrides, "wall_s": round(wall, 1),
        "steps": result["step"], "tokens_seen": train_rows[-1]["tokens"] if train_rows else 0,
        "tokens_per_s": sorted(r["tokens_per_s"] for r in train_rows)[len(train_rows) // 2] if train_rows else 0,
        "val_bpb": result["bits_per_byte"], "val_tokens": result["tokens"], "curve": curve,
    }


def plot(results: list[dict], path: Path) -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for r in results:
        if r["curve"]:
            ax.plot(*zip(*r["curve"]), "o-", label=f"{r['name']} (final {r['val_bpb']:.3f})")
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("val bits per byte (in-training evaluation)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared corpus folder of every configuration that sets no data.path")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget of each configuration (default 5)")
    p.add_argument("--config", action="append", required=True, metavar="NAME=PRESET [k=v ...]",
                   help="a configuration to train (repeatable; trained in the order given)")
    p.add_argument("--threads", type=int, help="train --threads (default: torch's choice)")
    p.add_argument("--eval-max-tokens", type=int, default=0,
                   help="measure only the first N val predictions (default 0: the whole split; explorations only)")
    p.add_argument("--interleave", action="store_true",
                   help="train the configurations time-shared in one process (each gets the same training time)")
    p.add_argument("--out", default="benchmarks/out/quality", help="folder for the run folders and the plot")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.config]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.interleave:
        common.set_threads(args.threads)  # the interleaved trainers run in this process
        results = train_interleaved(configs, args)
    else:
        results = [train_and_eval(name, preset, overrides, args) for name, preset, overrides in configs]
    first = results[0]["val_bpb"]
    for r in results:
        r["vs_first"] = r["val_bpb"] / first - 1
    common.print_table(results, [("name", "config", ""), ("steps", "steps", ""), ("tokens_seen", "tokens", ","),
                                 ("tokens_per_s", "tokens/s", ",.0f"), ("val_bpb", "val bpb", ".4f"),
                                 ("vs_first", f"vs {results[0]['name']}", "+.1%")])
    plot(results, Path(args.out) / "quality.png")
    print(f"plot: {Path(args.out) / 'quality.png'}")
    common.write_json(args.json, {"environment": common.environment("cpu"), "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
