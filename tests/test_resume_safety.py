"""Faults injected into real `gtransformer train` processes: SIGKILL mid-checkpoint-write and at random moments,
SIGTERM, and a checkpoint damaged on disk. Each time the run folder stays usable and `train --resume` ends
bit-identical (CPU) to a run that was never interrupted."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gtransformer.config import to_toml
from gtransformer.errors import UserError
from gtransformer.training import trainer as trainer_module
from gtransformer.training.checkpoint import WRITE_DELAY_ENV
from gtransformer.training.run_dir import RunDir
from gtransformer.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10

pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_corpus) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), sentences=150)


@pytest.fixture(scope="module")
def tables(corpus, tiny_tables) -> dict:
    tables = tiny_tables(corpus, max_steps=STEPS, micro_batch_size=4, checkpoint_every=2, keep_last=3, eval_every=4,
                         sample_prompts=["Era uma"], sample_tokens=4)
    tables["model"]["balance"] = "bias"
    return tables


@pytest.fixture(scope="module")
def config(tables, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(to_toml(tables), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def straight(tables, tmp_path_factory) -> RunDir:
    """The run trained once, never interrupted: what every interrupted one must end as."""
    run = RunDir(tmp_path_factory.mktemp("straight") / "run")
    train(tables, run.path, progress_bar=False)
    return run


def gtransformer(*args: str, env: dict | None = None, popen: bool = False):
    command = [sys.executable, "-m", "gtransformer", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if popen:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)


def train_args(config: Path, run: RunDir, *extra: str) -> list[str]:
    return ["train", "--config", str(config), "--out", str(run.path), "--no-progress", "--threads", "1", *extra]


def assert_same_run(run: RunDir, straight: RunDir) -> None:
    """Same final weights, tensor by tensor, and the same train / eval rows and samples."""
    assert run.latest_checkpoint().path.name == straight.latest_checkpoint().path.name == f"step-{STEPS:07d}"
    ours, theirs = load_file(run.latest_checkpoint().model_path), load_file(straight.latest_checkpoint().model_path)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    def rows(r: RunDir):
        return [(m["kind"], m["step"], m.get("loss"), m.get("val_loss")) for m in r.metrics()]

    assert rows(run) == rows(straight)
    assert [(s["step"], s["text"]) for s in run.samples()] == [(s["step"], s["text"]) for s in straight.samples()]


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended first: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_sigkill_mid_checkpoint_write_resumes_from_the_newest_complete_one(tables, config, straight, tmp_path):
    run = RunDir(tmp_path / "run")
    train(tables, run.path, stop_at_step=2, progress_bar=False)  # a complete checkpoint at step 2
    # The next checkpoint write pauses between model.safetensors and state.pt (test-only hook): kill it there.
    process = gtransformer(*train_args(config, run, "--resume"), env={WRITE_DELAY_ENV: "60"}, popen=True)
    wait_for(lambda: any((p / "model.safetensors").is_file() for p in run.stale_temporaries()), process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert [p.name for p in run.stale_temporaries()] == [f".tmp-step-0000004-{process.pid}"]
    assert [c.step for c in run.checkpoints()] == [2] and max(r["step"] for r in run.metrics()) >= 4
    resumed = gtransformer(*train_args(config, run, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "left behind by an interrupted checkpoint write" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step-0000002" in resumed.stderr
    assert run.stale_temporaries() == []
    assert_same_run(run, straight)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(config, tmp_path):
    run = RunDir(tmp_path / "run")
    process = gtransformer(*train_args(config, run, "--max-steps", "100000"), popen=True)
    wait_for(lambda: len(run.metrics()) >= 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert f"continue with `gtransformer train --out {run.path} --resume`" in err
    last = max(r["step"] for r in run.metrics())
    assert run.latest_checkpoint().step == last and last < 100000  # a checkpoint of the step it stopped at
    assert json.loads(run.latest_checkpoint().meta_path.read_text())["step"] == last


def test_damaged_checkpoint_inference_fails_in_one_line_and_resume_falls_back(tables, config, straight, tmp_path):
    run = RunDir(tmp_path / "run")
    train(tables, run.path, stop_at_step=6, progress_bar=False)
    damaged = run.latest_checkpoint()
    data = bytearray(damaged.model_path.read_bytes())
    data[-64:-60] = bytes(b ^ 0xFF for b in data[-64:-60])  # flip bytes inside the last tensor
    damaged.model_path.write_bytes(bytes(data))
    for command in (["eval", str(run.path), "--device", "cpu"],
                    ["generate", str(run.path), "--prompt", "Era", "--max-new-tokens", "2", "--device", "cpu"]):
        failed = gtransformer(*command)
        assert failed.returncode == 2, failed.stderr[-2000:]
        assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
        assert f"{damaged.model_path} is damaged: its SHA-256 differs" in failed.stderr
        assert "step-0000004" in failed.stderr  # the way out: an older checkpoint
    resumed = gtransformer(*train_args(config, run, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint step-0000006 is damaged (model.safetensors" in resumed.stderr
    assert "renamed it to step-0000006.corrupt" in resumed.stderr
    assert (run.checkpoints_dir / "step-0000006.corrupt" / "model.safetensors").read_bytes() == bytes(data)  # kept
    assert_same_run(run, straight)


@pytest.mark.slow
def test_soak_script_quick_version(corpus, tmp_path):
    """benchmarks/soak_resume.py with 3 random SIGKILLs (the full 20-kill run is in benchmarks/RESULTS.md)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak_resume.py"), "--kills", "3",
                             "--steps", "24", "--seed", "1", "--data", str(corpus), "--work", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["equal"] and summary["weights_equal"] and summary["train_losses_equal"]
    assert summary["kills"] + summary["finished_before_all_kills"] >= 1 and summary["corrupt_checkpoints"] == []


def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(tables, straight, tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    saves = []

    def save_until_the_disk_fills(*args, **kwargs):
        saves.append(args[1])
        if len(saves) == 2:  # the second checkpoint finds no room
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    real_save = trainer_module.save_checkpoint
    monkeypatch.setattr(trainer_module, "save_checkpoint", save_until_the_disk_fills)
    with pytest.raises(UserError, match=r"disk of .* is full while writing step 4 \(step-0000002 is the newest "
                                        r"intact checkpoint\); free some space.*--resume"):
        train(tables, run.path, progress_bar=False)
    monkeypatch.undo()
    train(tables, run.path, resume=True, progress_bar=False)
    assert_same_run(run, straight)
