"""Saving and loading checkpoints; the folder names belong to `run_dir.RunDir` / `CheckpointDir`.

Weights (parameters and buffers such as the MoE router biases) go to safetensors;
optimizer, schedule, grad scaler, RNG states and data position go to `state.pt`,
which holds only tensors and plain containers so it loads with
`torch.load(weights_only=True)`. A checkpoint is written under a temporary name
and renamed, so a crash never leaves a half-written `step-*` folder behind.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gtransformer.config import from_dict
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.model.config import ModelConfig
from gtransformer.model.model import GPT
from gtransformer.training.run_dir import CheckpointDir, RunDir, resolve_checkpoint

# --- RNG state, in weights_only-loadable form -------------------------------------------


def rng_state() -> dict[str, Any]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save / load -------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | Path | RunDir,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 3,
) -> CheckpointDir:
    """Write a checkpoint atomically, then prune old ones.

    `meta["keep"] = True` marks a checkpoint (e.g. end of an epoch) that pruning never removes.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    final = run.checkpoint(step)
    run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    tmp = CheckpointDir(final.path.with_name(f".tmp-{final.path.name}-{os.getpid()}"))
    if tmp.path.exists():
        shutil.rmtree(tmp.path)
    tmp.path.mkdir()
    # safetensors refuses tensors that share storage (tied embeddings): store each once, contiguous.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model_state.items()}
    save_file(tensors, tmp.model_path, metadata={"format": "pt"})
    torch.save(train_state, tmp.state_path)
    tmp.write_meta({"step": step, **meta})
    if final.path.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final.path)
    os.replace(tmp.path, final.path)
    prune_checkpoints(run, keep_last)
    return final


def prune_checkpoints(run: RunDir, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for checkpoint in run.checkpoints()[:-keep_last]:
        if not checkpoint.read_meta().get("keep"):
            shutil.rmtree(checkpoint.path, ignore_errors=True)


def load_model_state(checkpoint: CheckpointDir) -> dict[str, torch.Tensor]:
    return load_file(checkpoint.model_path)


def load_train_state(checkpoint: CheckpointDir) -> dict[str, Any]:
    return torch.load(checkpoint.state_path, map_location="cpu", weights_only=True)


def load_for_inference(run_or_checkpoint: str | Path, device: str | torch.device = "cpu"):
    """Rebuild (GPT, Tokenizer, meta) from a run folder or a checkpoint folder, in eval mode."""
    checkpoint, run = resolve_checkpoint(run_or_checkpoint)
    meta = checkpoint.read_meta()
    model_table = meta.get("config", {}).get("model")
    if model_table is None:
        model_table = run.read_config()["model"]
    tokenizer_path = next((p for p in (checkpoint.tokenizer_path, run.tokenizer_path) if p.is_file()), None)
    if tokenizer_path is None:
        raise UserError(f"no tokenizer.json in {checkpoint} or {run.path}; the run folder is incomplete")
    model = GPT(from_dict(ModelConfig, dict(model_table), "model"))
    missing, unexpected = model.load_state_dict(load_model_state(checkpoint), strict=False)
    # Tied weights are saved once under each name; anything else missing means a mismatched config.
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise UserError(
            f"checkpoint {checkpoint} does not match its [model] config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was config.toml edited?"
        )
    model.to(device).eval()
    return model, Tokenizer.from_file(tokenizer_path), {**meta, "checkpoint": str(checkpoint), "run_dir": str(run.path)}
