"""Soak test of crash-safe resume: a tiny run trained straight through, then the same run killed with SIGKILL at
random moments (and resumed with `--resume` after each kill until it finishes) must end with the same weights and
the same logs, bit for bit (CPU, one thread).

    python benchmarks/soak_resume.py                              # 20 kills, 60 steps
    python benchmarks/soak_resume.py --kills 3 --steps 30 --seed 1 --data data/prepared --work /tmp/soak

Every `train` is a real subprocess (`python -m gtransformer train ... --resume`). Every fourth kill lands
at a random moment of start-up (imports, preflight, stale-folder removal, checkpoint verification, restore,
log truncation); the others at a random moment after the session's first step began (the log's "model: ...
parameters" line), within twice the training time left (the straight run's, pro rata) divided by the kills
left, so that they spread over the steps, evaluations, samples, metrics appends and checkpoint writes of the
whole run. Checkpoint writes are widened by `--write-delay` seconds (checkpoint.WRITE_DELAY_ENV, a test-only
sleep between model.safetensors and state.pt) so that some kills land inside one; a kill that leaves its
`.tmp-step-*` folder behind counts as "mid_write".

Compared at the end: every tensor of the final checkpoint's model.safetensors (torch.equal), the train rows'
(step, loss), the eval rows' (step, val_loss), samples.jsonl's (step, prompt, text), and that no checkpoint
was set aside as damaged. Prints one JSON summary; exit code 0 when everything is equal, 1 otherwise.
Without `--data` a small synthetic corpus is prepared in the work folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:  # runs from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from gtransformer.config import to_toml  # noqa: E402
from gtransformer.data.toy import toy_corpus  # noqa: E402
from gtransformer.training.checkpoint import WRITE_DELAY_ENV  # noqa: E402
from gtransformer.training.run_dir import RunDir  # noqa: E402

def tables(data: Path, steps: int, seed: int) -> dict:
    return {
        "model": {"vocab_size": 384, "context_length": 32, "d_model": 32, "n_layers": 2, "n_heads": 4,
                  "n_kv_heads": 2, "n_experts": 4, "top_k": 2, "expert_hidden": 32, "balance": "bias"},
        "train": {"seed": seed, "batch_size": 8, "micro_batch_size": 4, "max_steps": steps, "lr": 3e-3,
                  "warmup_steps": 2, "log_every": 1, "eval_every": 5, "eval_tokens": 256, "checkpoint_every": 3,
                  "keep_last": 2, "sample_prompts": ["Era uma"], "sample_tokens": 4, "tensorboard": False},
        "data": {"path": str(data)},
    }


class Trainer:
    """`gtransformer train` subprocesses of one configuration."""

    def __init__(self, config: Path, write_delay: float):
        self.config = config
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", WRITE_DELAY_ENV: str(write_delay),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")]))}

    def start(self, out: Path, log: Path) -> subprocess.Popen:
        """A `train --resume` of `out`, its stderr appended to `log` (a file: a pipe nobody reads could fill up)."""
        command = [sys.executable, "-m", "gtransformer", "train", "--config", str(self.config), "--out", str(out),
                   "--resume", "--no-progress", "--threads", "1"]
        with log.open("a") as stderr:
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=self.env)


def first_row_time(process: subprocess.Popen, run: RunDir, started: float) -> float:
    """Wait for the process; the seconds until its first metrics row appeared."""
    first = None
    while process.poll() is None:
        if first is None and run.metrics_path.is_file() and run.metrics_path.stat().st_size > 0:
            first = time.perf_counter() - started
        time.sleep(0.02)
    return first if first is not None else time.perf_counter() - started


def compare(straight: RunDir, killed: RunDir) -> dict:
    a, b = straight.latest_checkpoint(), killed.latest_checkpoint()
    wa, wb = load_file(a.model_path), load_file(b.model_path)
    weights_equal = a.path.name == b.path.name and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    def rows(run: RunDir, kind: str, key: str):
        return [(r["step"], r[key]) for r in run.metrics() if r.get("kind") == kind]

    def samples(run: RunDir):
        return [(r["step"], r["prompt"], r["text"]) for r in run.samples()]

    train_equal = rows(straight, "train", "loss") == rows(killed, "train", "loss")
    steps = [s for s, _ in rows(killed, "train", "loss")]
    return {
        "final_checkpoint": b.path.name,
        "weights_equal": weights_equal,
        "train_losses_equal": train_equal,
        "eval_losses_equal": rows(straight, "eval", "val_loss") == rows(killed, "eval", "val_loss"),
        "samples_equal": samples(straight) == samples(killed),
        "train_rows": len(steps),
        "train_steps_in_order": steps == list(range(1, len(steps) + 1)),
        "corrupt_checkpoints": [p.name for p in killed.corrupt_checkpoints()],
        "stale_temporaries_left": [p.name for p in killed.stale_temporaries()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
    parser.add_argument("--steps", type=int, default=60, help="train.max_steps of the tiny run (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and of the run (default 0)")
    parser.add_argument("--write-delay", type=float, default=0.05,
                        help="seconds each checkpoint write pauses mid-way, so kills land inside some (default 0.05)")
    parser.add_argument("--data", help="prepared corpus folder (default: a small synthetic one in --work)")
    parser.add_argument("--work", help="work folder (default: a fresh temporary folder)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="soak-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve() if args.data else toy_corpus(work / "corpus", sentences=300)
    config = work / "soak.toml"
    config.write_text(to_toml(tables(data, args.steps, args.seed)), encoding="utf-8")
    trainer = Trainer(config, args.write_delay)
    rng = random.Random(args.seed)

    straight = RunDir(work / "straight")
    straight_log, killed_log, last_log = work / "straight.log", work / "killed.log", work / "last.log"
    t0 = time.perf_counter()
    process = trainer.start(straight.path, straight_log)
    startup_s = first_row_time(process, straight, t0)
    straight_s = time.perf_counter() - t0
    if process.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed (exit {process.returncode}); see {straight_log}")
    training_s = max(straight_s - startup_s, 0.1)

    killed = RunDir(work / "killed")
    kills, mid_write, in_startup, finished_early, attempts, progress = 0, 0, 0, 0, 0, []

    def sessions_started() -> int:  # the trainer logs "model: ... parameters" right before its first step
        return killed_log.read_text().count(" parameters (") if killed_log.is_file() else 0

    while kills < args.kills:
        attempts += 1
        started_before = sessions_started()
        startup = attempts % 4 == 2  # every fourth attempt (the second, sixth, ...) is killed in start-up
        process = trainer.start(killed.path, killed_log)
        if startup:
            delay = rng.uniform(0, startup_s)
        else:
            while process.poll() is None and sessions_started() == started_before:
                time.sleep(0.01)
            newest = killed.latest_checkpoint()
            remaining_s = training_s * (1 - (newest.step if newest else 0) / args.steps)
            delay = rng.uniform(0, 2 * remaining_s / (args.kills - kills))
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            in_startup += startup
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            mid_write += any(p.name.endswith(f"-{process.pid}") for p in killed.stale_temporaries())  # its own
            newest = killed.latest_checkpoint()
            progress.append(newest.step if newest else 0)
            continue
        if process.returncode != 0:
            raise SystemExit(f"a resumed run failed (exit {process.returncode}); see {killed_log}")
        finished_early += 1
        break  # the run finished before the next kill: nothing left to interrupt
    resumes = attempts
    process = trainer.start(killed.path, last_log)
    process.wait()
    if process.returncode != 0:
        raise SystemExit(f"the final resume failed (exit {process.returncode}); see {last_log}")
    logs = killed_log.read_text() + last_log.read_text() if killed_log.is_file() else last_log.read_text()

    result = {
        "kills": kills,
        "kills_requested": args.kills,
        "in_startup": in_startup,
        "mid_write": mid_write,
        "finished_before_all_kills": bool(finished_early),
        "resumes": resumes,
        "newest_checkpoint_after_each_kill": progress,
        "fallbacks": logs.count("falling back"),  # a damaged checkpoint set aside: never expected from kills
        "stale_temporaries_removed": logs.count("interrupted checkpoint write"),
        "steps": args.steps,
        "seed": args.seed,
        "straight_s": round(straight_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        **compare(straight, killed),
        "work": str(work),
    }
    result["equal"] = all(result[k] for k in ("weights_equal", "train_losses_equal", "eval_losses_equal",
                                                "samples_equal", "train_steps_in_order")) and \
        not result["corrupt_checkpoints"] and result["train_rows"] == args.steps
    print(json.dumps(result))
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
