"""`torchrun --nproc_per_node=2` on CPU (gloo) matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gtransformer.config import to_toml
from gtransformer.training.config import TrainConfig
from gtransformer.training.samples import generate_samples
from gtransformer.training.trainer import train


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def torchrun(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "gtransformer", "train", "--config", str(config), "--out", str(out), "--device", "cpu",
               "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def samples(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_corpus, tiny_tables):
    folder = tmp_path_factory.mktemp("dist")
    corpus = make_corpus(folder / "corpus", sentences=200)
    # Global batch 8 = 2 micro-batches of 4: one process accumulates both, two processes take one each.
    tables = tiny_tables(corpus, max_steps=5, micro_batch_size=4, eval_tokens=128)
    tables["model"]["balance"] = "bias"  # router loads must be summed over ranks before the bias update
    config = folder / "config.toml"
    config.write_text(to_toml(tables))
    single = train(tables, folder / "single", device="cpu", progress_bar=False)
    return folder, config, losses(folder / "single"), single


def test_two_processes_match_one_with_the_same_global_batch(setup):
    folder, config, reference, single = setup
    result = torchrun(config, folder / "ddp", "--set", 'train.sample_prompts=["Era uma"]', "--set", "train.sample_tokens=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(folder / "ddp") == pytest.approx(reference, abs=1e-5)
    # Only rank 0 wrote: one row per step, one checkpoint folder, one sample at the final evaluation.
    assert len(losses(folder / "ddp")) == 5
    assert [p.name for p in (folder / "ddp" / "checkpoints").iterdir()] == ["step-0000005"]
    assert [(s["step"], s["prompt"]) for s in samples(folder / "ddp")] == [(5, "Era uma")]


def test_fsdp2_interrupted_and_resumed_matches_one_process(setup):
    folder, config, reference, _ = setup
    result = torchrun(config, folder / "fsdp", "--set", "train.fsdp=true", "--stop-at-step", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(losses(folder / "fsdp")) == 3
    # Resuming gathers nothing by hand: full weights and optimizer state are resharded on load.
    result = torchrun(config, folder / "fsdp", "--set", "train.fsdp=true", "--resume",
                      "--set", 'train.sample_prompts=["Era uma"]', "--set", "train.sample_tokens=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(folder / "fsdp") == pytest.approx(reference, abs=1e-5)
    # Samples under sharding: every rank gathers the weights, rank 0 samples with a full copy.
    assert [(s["step"], s["prompt"]) for s in samples(folder / "fsdp")] == [(5, "Era uma")]
    # Its checkpoint holds full (unsharded) weights that a single process can load.
    from gtransformer.training.checkpoint import load_for_inference

    model, tokenizer, meta = load_for_inference(folder / "fsdp")
    assert meta["step"] == 5 and model.num_params() > 0
    # The sample came from those same weights, gathered.
    sampling = TrainConfig(sample_prompts=["Era uma"], sample_tokens=4)
    assert generate_samples(model, tokenizer, sampling, model.config.context_length) == [
        {"prompt": s["prompt"], "text": s["text"]} for s in samples(folder / "fsdp")]
