"""Checkpoint files: atomic write, pruning, weights_only state, RNG round trip, loading for inference."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gtransformer.training import checkpoint as ckpt
from gtransformer.training.run_dir import CorruptCheckpoint, RunDir
from gtransformer.errors import UserError
from gtransformer.training.trainer import train


pytestmark = [pytest.mark.usefixtures("one_thread")]


def save(run: Path, step: int, keep: bool = False, keep_last: int = 2):
    return ckpt.save_checkpoint(run, step, {"w": torch.full((2, 2), float(step))}, {"x": torch.tensor(step)},
                                {"keep": keep}, keep_last=keep_last)


def test_prune_keeps_last_n_and_marked_ones(tmp_path):
    for step in range(1, 7):
        save(tmp_path, step, keep=step == 2)
    names = [p.path.name for p in RunDir(tmp_path).checkpoints()]
    assert names == ["step-0000002", "step-0000005", "step-0000006"]
    assert RunDir(tmp_path).latest_checkpoint().path.name == "step-0000006"
    assert float(ckpt.load_model_state(RunDir(tmp_path).latest_checkpoint())["w"][0, 0]) == 6.0
    assert int(ckpt.load_train_state(RunDir(tmp_path).latest_checkpoint())["x"]) == 6


def test_half_written_checkpoint_is_ignored(tmp_path):
    save(tmp_path, 1)
    # A crash mid-write leaves only a temporary folder, or a step folder without meta.json.
    (tmp_path / "checkpoints" / ".tmp-step-0000002-123").mkdir()
    (tmp_path / "checkpoints" / "step-0000003").mkdir()
    assert RunDir(tmp_path).latest_checkpoint().path.name == "step-0000001"


def test_state_with_foreign_pickles_is_refused(tmp_path):
    import argparse
    import pickle

    folder = save(tmp_path, 1)
    torch.save({"x": argparse.Namespace(evil=True)}, folder.state_path)  # any non-allowlisted class
    with pytest.raises(CorruptCheckpoint, match="state.pt"):  # the recorded size / SHA-256 no longer match
        ckpt.load_train_state(folder)
    with pytest.raises(CorruptCheckpoint, match="weights_only") as refused:  # and unverified, torch refuses it
        ckpt.load_train_state(folder, verify=False)
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_load_for_inference_from_run_or_checkpoint(tmp_path, make_corpus, tiny_tables):
    corpus = make_corpus(tmp_path / "corpus", sentences=150)
    tables = tiny_tables(corpus, max_steps=4, checkpoint_every=2, keep_last=5)
    tables["model"]["tie_embeddings"] = True  # shared tensors must survive safetensors
    train(tables, tmp_path / "run", progress_bar=False)
    model, tokenizer, meta = ckpt.load_for_inference(tmp_path / "run")
    assert meta["step"] == 4 and not model.training
    assert model.lm_head.weight is model.embed_tokens.weight
    older, _, older_meta = ckpt.load_for_inference(tmp_path / "run" / "checkpoints" / "step-0000002")
    assert older_meta["step"] == 2
    assert not torch.equal(older.embed_tokens.weight, model.embed_tokens.weight)
    ids = torch.tensor([tokenizer.encode("Era uma vez")])
    assert model(ids).logits.shape == (1, ids.shape[1], 384)
    with pytest.raises(UserError, match="does not exist"):
        ckpt.load_for_inference(tmp_path / "missing")
    with pytest.raises(UserError, match="no checkpoints"):
        ckpt.load_for_inference(corpus)
