"""Saving and loading checkpoints; the folder names belong to `run_dir.RunDir` / `CheckpointDir`.

Weights (parameters and buffers such as the MoE router biases) go to safetensors;
optimizer, schedule, grad scaler, RNG states and data position go to `state.pt`,
which holds only tensors and plain containers so it loads with
`torch.load(weights_only=True)`.

Writing is crash-safe: the files are written into `.tmp-step-XXXXXXX-PID/`, flushed to the disk
(fsync), hashed (size and SHA-256 of each file into meta.json, written last), the folder is flushed,
renamed to `step-XXXXXXX` and the parent folder flushed. A process killed at any moment leaves either
the complete checkpoint or a temporary folder that the next `train` removes.

Reading verifies: `load_model_state` / `load_train_state` check the files against meta.json first and
turn anything unreadable into `CorruptCheckpoint` (a `UserError` naming the file). `intact_checkpoint`
is how `train --resume` picks the newest checkpoint that passes, setting damaged newer ones aside as
`step-XXXXXXX.corrupt` (never deleting them) with a warning. Inference (`load_for_inference`: eval,
generate, serve, export, report) verifies meta.json and the weights, and fails with one line.

Test-only fault injection: with `GTRANSFORMER_TEST_CHECKPOINT_WRITE_DELAY_S=SECONDS` in the environment
`save_checkpoint` sleeps that long between writing model.safetensors and state.pt, so a test (or
benchmarks/soak_resume.py) can kill a process in the middle of a checkpoint write.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gtransformer.config import from_dict
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.files import sync_path
from gtransformer.model.config import ModelConfig
from gtransformer.model.model import GPT
from gtransformer.training.run_dir import (
    MODEL_FILE,
    STATE_FILE,
    CheckpointDir,
    CorruptCheckpoint,
    RunDir,
    one_line,
    resolve_checkpoint,
)

log = logging.getLogger(__name__)

WRITE_DELAY_ENV = "GTRANSFORMER_TEST_CHECKPOINT_WRITE_DELAY_S"
TRAIN_STATE_KEYS = ("optimizer", "scaler", "data", "run", "rng")  # what `train --resume` needs in state.pt

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


# --- save ----------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | Path | RunDir,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 3,
) -> CheckpointDir:
    """Write a checkpoint atomically and durably (see the module docstring), then prune old ones.

    `meta["keep"] = True` marks a checkpoint (e.g. end of an epoch) that pruning never removes.
    meta.json gets `step`, `meta`, and `files` (size and SHA-256 of model.safetensors and state.pt).
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    final = run.checkpoint(step)
    run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    tmp = run.temporary_checkpoint(step)
    if tmp.path.exists():
        shutil.rmtree(tmp.path)
    tmp.path.mkdir()
    # safetensors refuses tensors that share storage (tied embeddings): store each once, contiguous.
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model_state.items()}
    save_file(tensors, tmp.model_path, metadata={"format": "pt"})
    delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)
    if delay > 0:
        time.sleep(delay)  # test-only: widens the window in which a kill lands mid-write
    torch.save(train_state, tmp.state_path)
    for path in (tmp.model_path, tmp.state_path):
        sync_path(path)
    tmp.write_meta({"step": step, **meta, "files": tmp.describe_files()})
    sync_path(tmp.path)
    if final.path.exists():  # re-saving a step: move the old one aside first (a rename, never a half-deleted folder)
        aside = run.set_aside_path(step)
        os.replace(final.path, aside)
        os.replace(tmp.path, final.path)
        sync_path(run.checkpoints_dir)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp.path, final.path)
        sync_path(run.checkpoints_dir)
    prune_checkpoints(run, keep_last)
    return final


def prune_checkpoints(run: RunDir, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for checkpoint in run.checkpoints()[:-keep_last]:
        try:
            keep = checkpoint.read_meta().get("keep")
        except CorruptCheckpoint as exc:  # older than the ones kept: pruned like any other, but said
            log.warning("pruning %s, which is damaged (%s: %s)", checkpoint.path.name, exc.file, exc.problem)
            keep = False
        if not keep:
            shutil.rmtree(checkpoint.path, ignore_errors=True)


def remove_stale_temporaries(run: RunDir) -> list[Path]:
    """Delete the folders of checkpoint writes that never finished (their process was killed); logged."""
    removed = run.stale_temporaries()
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left behind by an interrupted checkpoint write", path)
    return removed


# --- load ------------------------------------------------------------------------------


def load_model_state(checkpoint: CheckpointDir, verify: bool = True) -> dict[str, torch.Tensor]:
    """The weights; `verify` checks meta.json's size and SHA-256 first. Damage -> `CorruptCheckpoint`."""
    if verify:
        checkpoint.verify([MODEL_FILE])
    try:
        return load_file(checkpoint.model_path)
    except FileNotFoundError:
        raise CorruptCheckpoint(checkpoint, MODEL_FILE, "the file is missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptCheckpoint(checkpoint, MODEL_FILE, f"not a readable safetensors file ({one_line(exc)})") from None


def load_train_state(checkpoint: CheckpointDir, verify: bool = True, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """state.pt (`weights_only`: tensors and plain containers only) holding at least the `required` keys.

    `verify` checks meta.json's size and SHA-256 first. Damage -> `CorruptCheckpoint`."""
    if verify:
        checkpoint.verify([STATE_FILE])
    try:
        state = torch.load(checkpoint.state_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptCheckpoint(checkpoint, STATE_FILE, "the file is missing") from None
    except Exception as exc:  # UnpicklingError (a class weights_only refuses), RuntimeError (no zip), EOFError...
        if "weights only" in str(exc).lower():
            problem = "refused by weights_only loading: it holds more than tensors and plain containers"
        else:
            problem = f"not a readable torch file ({one_line(exc, 100) or type(exc).__name__})"
        raise CorruptCheckpoint(checkpoint, STATE_FILE, problem) from exc
    if not isinstance(state, dict):
        raise CorruptCheckpoint(checkpoint, STATE_FILE, f"holds a {type(state).__name__}, not a dict")
    missing = [key for key in required if key not in state]
    if missing:
        raise CorruptCheckpoint(checkpoint, STATE_FILE, f"lacks {', '.join(map(repr, missing))}")
    return state


def check_resumable(checkpoint: CheckpointDir) -> dict[str, Any]:
    """Everything `train --resume` needs is intact; returns meta.json. `CorruptCheckpoint` otherwise.

    Checkpoints with hashes are verified by hash; older ones without are test-loaded instead."""
    meta = checkpoint.verify()
    if meta.get("files") is None:
        load_model_state(checkpoint, verify=False)
        load_train_state(checkpoint, verify=False, required=TRAIN_STATE_KEYS)
    return meta


def intact_checkpoint(run: RunDir) -> CheckpointDir | None:
    """The run's newest checkpoint that passes `check_resumable` (None when the run has none).

    Each damaged newer one is renamed to step-XXXXXXX.corrupt, with a warning naming the damaged file.
    When checkpoints exist (or were set aside earlier) but none is intact, a `UserError` says so: starting
    over silently would throw the run's logs away.
    """
    for checkpoint in reversed(run.checkpoints()):
        try:
            check_resumable(checkpoint)
            return checkpoint
        except CorruptCheckpoint as exc:
            aside = run.set_aside_corrupt(checkpoint)
            log.warning("checkpoint %s is damaged (%s: %s); renamed it to %s and falling back to an older one",
                        checkpoint.path.name, exc.file, exc.problem, aside.name)
    set_aside = run.corrupt_checkpoints()
    if set_aside:
        raise UserError(f"{run.path} has no intact checkpoint to resume (damaged ones were set aside: "
                        f"{', '.join(p.name for p in set_aside)}); to start over, delete {run.checkpoints_dir} "
                        f"or choose another --out")
    return None


def load_for_inference(run_or_checkpoint: str | Path, device: str | torch.device = "cpu"):
    """Rebuild (GPT, Tokenizer, meta) from a run folder or a checkpoint folder, in eval mode.

    meta.json and the weights are verified (`CorruptCheckpoint`, one line naming the file, when damaged)."""
    checkpoint, run = resolve_checkpoint(run_or_checkpoint)
    meta = checkpoint.read_meta()
    model_table = meta.get("config", {}).get("model")
    if model_table is None:
        model_table = run.read_config()["model"]
    tokenizer_path = next((p for p in (checkpoint.tokenizer_path, run.tokenizer_path) if p.is_file()), None)
    if tokenizer_path is None:
        raise UserError(f"no tokenizer.json in {checkpoint} or {run.path}; the run folder is incomplete")
    model = GPT(from_dict(ModelConfig, dict(model_table), "model"))
    try:
        missing, unexpected = model.load_state_dict(load_model_state(checkpoint), strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        raise UserError(f"checkpoint {checkpoint} does not match its [model] config ({one_line(exc)}); "
                        f"was config.toml edited?") from None
    # Tied weights are saved once under each name; anything else missing means a mismatched config.
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise UserError(
            f"checkpoint {checkpoint} does not match its [model] config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was config.toml edited?"
        )
    model.to(device).eval()
    return model, Tokenizer.from_file(tokenizer_path), {**meta, "checkpoint": str(checkpoint), "run_dir": str(run.path)}
