"""Checks `train` runs before its first step, each failing with one line (`UserError`) that names the fix.

    check_inputs(run, corpus, ...)  before anything is written: the tokenizer fits model.vocab_size, the corpus
                                    is large enough (check_corpus), no checkpoint in the folder without --resume
    pick_checkpoint(run, dist, ...) the checkpoint a session continues from, after the run folder's checks:
                                    writable, what killed runs left cleared, the config fits, room on the disk
    check_corpus(tokens, ...)       the train split holds one batch of windows, val at least one window
    check_writable(run)             the run folder can be created and written
    checkpoint_bytes(config)        what one checkpoint of a model takes on disk (weights + AdamW state)
    check_free_space(run, config)   room for two checkpoints (`shutil.disk_usage`)
    check_resume_shapes(saved, now) `--resume` with a [model] table whose parameter shapes differ: which key
    check_resume_config(ckpt, ...)  `--resume` keeps the checkpoint's parameter shapes and its optimizer

Models are built on the meta device here: shapes and byte counts without allocating or drawing random numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from typing import Any

import torch

from gtransformer.config import from_dict
from gtransformer.data.corpus import PreparedCorpus
from gtransformer.errors import UserError
from gtransformer.model.config import ModelConfig
from gtransformer.model.model import GPT
from gtransformer.runtime import Distributed
from gtransformer.training.checkpoint import intact_checkpoint, remove_stale_temporaries
from gtransformer.training.config import TrainConfig
from gtransformer.training.run_dir import CheckpointDir, RunDir

log = logging.getLogger(__name__)

CHECKPOINTS_OF_ROOM = 2  # a new checkpoint is written before the oldest is pruned
ADAM_STATE_PER_PARAMETER = 2  # exp_avg and exp_avg_sq, in the parameter's dtype


def _meta_model(config: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


def check_corpus(train_tokens: int, val_tokens: int, context_length: int, batch_size: int) -> None:
    """One global batch of `context_length + 1`-token windows in train, one window in val."""
    window = context_length + 1
    windows = train_tokens // window
    if windows < batch_size:
        raise UserError(
            f"the train split has {train_tokens} tokens: {windows} windows of {window} (model.context_length + 1), "
            f"fewer than one batch of train.batch_size = {batch_size}; prepare more books, or lower "
            f"train.batch_size or model.context_length"
        )
    if val_tokens < window:
        raise UserError(
            f"the val split has {val_tokens} tokens, fewer than one window of {window} (model.context_length + 1); "
            f"prepare more books (or a larger val share), or lower model.context_length"
        )


def check_writable(run: RunDir) -> None:
    """Create the run folder and write (then remove) a scratch file in it."""
    probe = run.write_probe_path()
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to the run folder {run.path} ({exc.strerror or exc}); "
                        f"choose another --out or fix its permissions") from None


def checkpoint_bytes(config: ModelConfig) -> int:
    """Bytes of one checkpoint: every state-dict tensor (tied ones stored twice) + AdamW's two moments."""
    model = _meta_model(config)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = sum(p.numel() * p.element_size() for p in model.parameters()) * ADAM_STATE_PER_PARAMETER
    return weights + moments


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_free_space(run: RunDir, config: ModelConfig, copies: int = CHECKPOINTS_OF_ROOM) -> int:
    """Room for `copies` checkpoints on the run folder's disk; returns the bytes one checkpoint needs."""
    one = checkpoint_bytes(config)
    free = shutil.disk_usage(run.path).free
    if free < copies * one:
        raise UserError(
            f"{run.path} has {_size(free)} free, but {copies} checkpoints of this model need {_size(copies * one)} "
            f"({_size(one)} each: weights + optimizer state); free some space or choose another --out"
        )
    return one


def _shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in _meta_model(config).state_dict().items()}


def check_resume_shapes(saved_table: dict[str, Any], config: ModelConfig) -> None:
    """`--resume` must keep every [model] key that shapes the saved tensors; names the first one that changed.

    Keys that change nothing the checkpoint holds (e.g. aux_loss_coef, expert_impl) may change on resume.
    """
    saved = from_dict(ModelConfig, dict(saved_table), "model")
    if saved == config:
        return
    before = _shapes(saved)
    if before == _shapes(config):
        return
    now = dataclasses.asdict(config)
    changed = [key for key, value in dataclasses.asdict(saved).items() if now[key] != value]
    for key in changed:  # the keys that, changed alone, reshape the checkpoint's tensors
        try:
            alone = _shapes(dataclasses.replace(saved, **{key: now[key]}))
        except UserError:  # invalid on its own (e.g. n_heads without n_kv_heads): still one of the culprits
            alone = None
        if alone != before:
            raise UserError(
                f"--resume: model.{key} is {now[key]!r} but the checkpoint was trained with {getattr(saved, key)!r}, "
                f"which changes the shapes of its weights; drop --set model.{key} "
                f"(or train a new run with another --out)"
            )
    raise UserError(f"--resume: model.{', model.'.join(changed)} changed since the checkpoint, which changes the "
                    f"shapes of its weights; keep the run's [model] values (or train a new run with another --out)")


def check_resume_config(checkpoint: CheckpointDir, config: ModelConfig, optimizer: str) -> None:
    """`--resume` keeps the [model] shapes the checkpoint was trained with and its train.optimizer (the optimizer
    state it holds fits only that optimizer)."""
    saved_config = checkpoint.read_meta().get("config", {})
    if saved_config.get("model") is not None:
        check_resume_shapes(saved_config["model"], config)
    saved_optimizer = saved_config.get("train", {}).get("optimizer", "adamw")
    if saved_optimizer != optimizer:
        raise UserError(f"--resume: {checkpoint} was trained with train.optimizer = "
                        f"\"{saved_optimizer}\" and its optimizer state fits only that; resume with "
                        f"--set train.optimizer=\"{saved_optimizer}\"")


def check_inputs(run: RunDir, corpus: PreparedCorpus, model: ModelConfig, train: TrainConfig, resume: bool) -> None:
    """Before anything is written: the corpus's tokenizer fits model.vocab_size, the corpus holds a batch and a
    validation window, and without --resume the run folder holds no checkpoint yet."""
    tokenizer = corpus.tokenizer()
    if tokenizer.vocab_size > model.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size = {model.vocab_size}; add "
            f"--set model.vocab_size={tokenizer.vocab_size} or prepare the corpus with --vocab-size {model.vocab_size}"
        )
    check_corpus(len(corpus.tokens("train")), len(corpus.tokens("val")), model.context_length, train.batch_size)
    if not resume and run.latest_checkpoint() is not None:
        raise UserError(f"{run.path} already holds checkpoints; pass --resume to continue it or choose another --out")


def pick_checkpoint(run: RunDir, dist: Distributed, resume: bool, model: ModelConfig,
                    train: TrainConfig) -> CheckpointDir | None:
    """The checkpoint this session continues from (None: from scratch). Rank 0 checks the folder, clears what
    killed runs left and picks the newest intact checkpoint (setting damaged ones aside); the other ranks then
    take the newest one left. It must fit this config, and the disk must have room for two more checkpoints."""
    picked = None
    if dist.is_main:
        check_writable(run)
        remove_stale_temporaries(run)
        if resume:
            picked = intact_checkpoint(run)
    dist.barrier()
    if resume and not dist.is_main:
        picked = run.latest_checkpoint()
    if resume and picked is None and dist.is_main:
        log.warning("--resume: no checkpoint in %s yet, starting from scratch", run.path)
    if picked is not None:
        check_resume_config(picked, model, train.optimizer)
    if dist.is_main:
        check_free_space(run, model)
    return picked
