"""Checkpoints: `checkpoints/step-XXXXXXX/{model.safetensors, state.pt, meta.json}`.

Weights (parameters and buffers such as the MoE router biases) go to safetensors;
optimizer, schedule, grad scaler, RNG states and data position go to `state.pt`,
which holds only tensors and plain containers so it loads with
`torch.load(weights_only=True)`. A checkpoint is written under a temporary name
and renamed, so a crash never leaves a half-written `step-*` folder behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gtransformer.errors import UserError

CHECKPOINT_DIR = "checkpoints"
STEP_PATTERN = re.compile(r"^step-(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := STEP_PATTERN.match(p.name)) and (p / "meta.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


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
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write a checkpoint atomically, then prune old ones.

    `meta["keep"] = True` marks a checkpoint (e.g. end of an epoch) that pruning never removes.
    """
    from safetensors.torch import save_file

    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(step)
    tmp = folder / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors refuses tensors that share storage (tied embeddings): store each once, contiguous.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model_state.items()}
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    torch.save(train_state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2), encoding="utf-8")
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    found = list_checkpoints(run_dir)
    for path in found[:-keep_last]:
        meta = read_meta(path)
        if not meta.get("keep"):
            shutil.rmtree(path, ignore_errors=True)


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "meta.json").read_text(encoding="utf-8"))


def load_model_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(checkpoint) / "model.safetensors")


def load_train_state(checkpoint: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / "state.pt", map_location="cpu", weights_only=True)


def resolve_checkpoint(run_or_checkpoint: str | Path) -> tuple[Path, Path]:
    """(checkpoint folder, run folder) for a run folder (newest checkpoint) or a checkpoint folder."""
    path = Path(run_or_checkpoint)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run folder (train --out) or one of its checkpoints/step-* folders")
    if (path / "meta.json").is_file() and (path / "model.safetensors").is_file():
        return path, path.parent.parent
    newest = latest_checkpoint(path)
    if newest is None:
        raise UserError(
            f"{path} has no checkpoints (looked for {path / CHECKPOINT_DIR}/step-*); "
            "train first with `gtransformer train --out " + str(path) + "`"
        )
    return newest, path


def load_for_inference(run_or_checkpoint: str | Path, device: str | torch.device = "cpu"):
    """Rebuild (GPT, Tokenizer, meta) from a run folder or a checkpoint folder, in eval mode."""
    from gtransformer.config import from_dict, load_toml
    from gtransformer.model import GPT, ModelConfig
    from gtransformer.tokenizer import Tokenizer

    checkpoint, run_dir = resolve_checkpoint(run_or_checkpoint)
    meta = read_meta(checkpoint)
    model_table = meta.get("config", {}).get("model")
    if model_table is None:
        model_table = load_toml(run_dir / "config.toml")["model"]
    tokenizer_path = next(
        (p for p in (checkpoint / "tokenizer.json", run_dir / "tokenizer.json") if p.is_file()), None
    )
    if tokenizer_path is None:
        raise UserError(f"no tokenizer.json in {checkpoint} or {run_dir}; the run folder is incomplete")
    model = GPT(from_dict(ModelConfig, dict(model_table), "model"))
    missing, unexpected = model.load_state_dict(load_model_state(checkpoint), strict=False)
    # Tied weights are saved once under each name; anything else missing means a mismatched config.
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise UserError(
            f"checkpoint {checkpoint} does not match its [model] config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was config.toml edited?"
        )
    model.to(device).eval()
    return model, Tokenizer.from_file(tokenizer_path), {**meta, "checkpoint": str(checkpoint), "run_dir": str(run_dir)}
