"""AdamW with weight-decay groups, and the learning-rate schedule (warm-up, then cosine, WSD or constant)."""

from __future__ import annotations

import math

import torch

from gtransformer.errors import UserError
from gtransformer.training.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms / biases / embeddings do not (decaying them only hurts)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2 or "norm" in name or "embed_tokens" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=device.type in ("cuda", "cpu"),  # CPU fused AdamW: 12 vs 56 ms a step on the tiny preset
    )


def lr_multiplier(config: TrainConfig, step: int, progress: float) -> float:
    """LR factor at `step` (0-based) when `progress` in [0, 1] of the run is done.

    Warmup is counted in steps; after it the shape follows `progress`, which is
    the larger of the step fraction and the time fraction, so a time-limited run
    still ends its decay when its time is up.
    """
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    floor = config.min_lr_ratio
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "wsd":
        decay_start = 1.0 - config.decay_fraction
        if progress < decay_start:
            return 1.0
        return 1.0 - (1 - floor) * (progress - decay_start) / max(config.decay_fraction, 1e-9)
    raise UserError(f"train.schedule = {config.schedule!r}; use cosine, wsd or constant")
