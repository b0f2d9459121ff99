"""Validation loss, perplexity and bits per byte; `evaluate_checkpoint` (the `eval` command, `report`).

Bits per byte = (sum of the token losses in nats) / (ln 2 * UTF-8 bytes of the text
those tokens encode). Unlike loss per token it does not depend on the tokenizer,
so runs with different vocabularies compare directly.

Every token of the split except the first is predicted exactly once: the split is
cut into consecutive chunks of `context` targets, each conditioned on the tokens
of its own chunk only (the standard non-overlapping evaluation).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gtransformer.data.corpus import PreparedCorpus
from gtransformer.errors import UserError
from gtransformer.training.checkpoint import load_for_inference
from gtransformer.training.run_dir import CheckpointDir, RunDir


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (special tokens such as <|endoftext|> count 0)."""
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    special = {getattr(tokenizer, "eot_id", None)}
    for token_id in range(tokenizer.vocab_size):
        if token_id not in special:
            lengths[token_id] = len(tokenizer.token_bytes(token_id))
    return lengths


def _chunks(num_tokens: int, context: int, max_targets: int | None):
    """(start, length) of each input chunk; targets are the next `length` tokens."""
    targets = num_tokens - 1
    if max_targets is not None:
        targets = min(targets, max_targets)
    start = 0
    while start < targets:
        length = min(context, targets - start)
        yield start, length
        start += length


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context: int,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    max_targets: int | None = None,
) -> dict[str, float]:
    """Summed cross entropy (nats) over the predicted tokens of `tokens`, and how many there were."""
    if len(tokens) < 2:
        raise UserError("the evaluation split has fewer than 2 tokens; prepare more text")
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_targets = 0
    started = time.perf_counter()
    chunks = list(_chunks(len(tokens), context, max_targets))
    # Full-length chunks batch together; a shorter last chunk runs on its own.
    groups: list[list[tuple[int, int]]] = []
    for start, length in chunks:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] == length:
            groups[-1].append((start, length))
        else:
            groups.append([(start, length)])
    for group in groups:
        rows = np.stack([np.asarray(tokens[s : s + n + 1]) for s, n in group]).astype(np.int64)
        batch = torch.from_numpy(rows).to(device)
        with autocast or contextlib.nullcontext():
            logits = model(batch[:, :-1]).logits
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total_nll += float(nll)
        total_targets += batch[:, 1:].numel()
    model.train(was_training)
    return {"nll": total_nll, "targets": total_targets, "seconds": time.perf_counter() - started}


def summarise(nll: float, targets: int, num_bytes: float, seconds: float) -> dict[str, float]:
    loss = nll / targets
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nll / (math.log(2) * num_bytes) if num_bytes else float("nan"),
        "tokens": targets,
        "bytes": num_bytes,
        "tokens_per_s": targets / seconds if seconds > 0 else float("nan"),
    }


def evaluate_split(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context: int,
    byte_lengths: np.ndarray,
    split_bytes: int | None = None,
    max_targets: int | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte over a split (or its first `max_targets` predictions).

    For the whole split the byte count is the split's UTF-8 bytes from stats.json
    (when given); for a prefix it is the exact bytes of the predicted tokens.
    """
    result = evaluate_tokens(model, tokens, context, max_targets=max_targets, **kwargs)
    whole_split = result["targets"] == len(tokens) - 1
    if split_bytes and whole_split:
        num_bytes = split_bytes
    else:
        targets = np.asarray(tokens[1 : 1 + result["targets"]]).astype(np.int64)
        num_bytes = int(byte_lengths[targets].sum())
    return summarise(result["nll"], result["targets"], num_bytes, result["seconds"])


def evaluate_checkpoint(
    run_or_checkpoint: str | Path,
    split: str = "val",
    data: str | Path | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    record: bool = True,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of a run's newest checkpoint (or of a checkpoint folder) on a split.

    `data` defaults to the prepared corpus the run was trained on. Returns the row: checkpoint, step, split,
    data (absolute), whole_split, and `evaluate_split`'s numbers. With `record`, the row is also appended to
    the run's evals.jsonl (when the checkpoint sits in a run folder), where the model card finds it.
    """
    model, tokenizer, meta = load_for_inference(run_or_checkpoint, device=device)
    recorded = RunDir(meta["run_dir"]).recorded_data(CheckpointDir(meta["checkpoint"]))
    corpus = PreparedCorpus(data or recorded or "")
    if not corpus.shard_path(split).is_file():
        raise UserError(f"{corpus.shard_path(split)} not found; pass --data with the prepared corpus folder "
                        f"(the one given to train --data)")
    tokens = corpus.tokens(split)
    result = evaluate_split(model, tokens, model.config.context_length, token_byte_lengths(tokenizer),
                            split_bytes=corpus.split_bytes(split), max_targets=max_tokens, batch_size=batch_size,
                            device=device)
    row = {"checkpoint": meta["checkpoint"], "step": meta.get("step"), "split": split,
           "data": str(corpus.path.resolve()), "whole_split": result["tokens"] == len(tokens) - 1, **result}
    run = RunDir(meta["run_dir"])
    if record and run.has_config():
        run.append_eval(row)
    return row
