"""Validation loss, perplexity and bits per byte; the `eval` command.

Bits per byte = (sum of the token losses in nats) / (ln 2 * UTF-8 bytes of the text
those tokens encode). Unlike loss per token it does not depend on the tokenizer,
so runs with different vocabularies compare directly.

Every token of the split except the first is predicted exactly once: the split is
cut into consecutive chunks of `context` targets, each conditioned on the tokens
of its own chunk only (the standard non-overlapping evaluation).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gtransformer.errors import UserError


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


# --- command -------------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a trained model on val or test",
        description="Evaluate a run (newest checkpoint) or a checkpoint folder; prints JSON.",
    )
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="run folder (train --out) or checkpoints/step-* folder")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="which held-out split (default val)")
    parser.add_argument("--data", help="prepared corpus folder (default: the one the run was trained on)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N predictions (default: whole split)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default auto)")
    parser.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from gtransformer.checkpoint import load_for_inference
    from gtransformer.shards import read_shard
    from gtransformer.train import pick_device

    device = pick_device(args.device)
    model, tokenizer, meta = load_for_inference(args.run, device=device)
    data_dir = Path(args.data) if args.data else Path(meta.get("config", {}).get("data", {}).get("path", ""))
    shard = data_dir / f"{args.split}.bin"
    if not shard.is_file():
        raise UserError(f"{shard} not found; pass --data with the prepared corpus folder (the one given to train --data)")
    split_bytes = None
    stats_path = data_dir / "stats.json"
    if stats_path.is_file():
        split_bytes = json.loads(stats_path.read_text(encoding="utf-8")).get("splits", {}).get(args.split, {}).get("bytes")
    result = evaluate_split(
        model,
        read_shard(shard),
        model.config.context_length,
        token_byte_lengths(tokenizer),
        split_bytes=split_bytes,
        max_targets=args.max_tokens,
        batch_size=args.batch_size,
        device=device,
    )
    print(json.dumps({"checkpoint": meta["checkpoint"], "step": meta.get("step"), "split": args.split, **result}, indent=2))
    return 0
