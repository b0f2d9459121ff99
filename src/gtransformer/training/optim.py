"""The optimizer (AdamW, or Muon for the hidden matrices with AdamW for the rest) and the learning-rate
schedule (warm-up, then cosine, WSD or constant).

`train.optimizer = "muon"` hands every hidden weight matrix (attention q/k/v/o, dense and shared SwiGLU,
each expert's w1/w3/w2) to PyTorch's own `torch.optim.Muon`: momentum, then Newton-Schulz orthogonalisation
of the update. Embeddings, lm_head, norms and the routers stay with AdamW, as in the public small-GPT
speed-runs. `torch.optim.Muon` takes 2-D parameters only, so each expert of a (E, F, D) stack enters it as
its own (F, D) slice: a Parameter sharing the stack's storage, whose gradient is the matching slice of the
stack's gradient, pointed at again whenever the optimizer's groups are read (`ExpertSlices`), so that a
GradScaler unscaling them unscales the stack's gradient too.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gtransformer.errors import UserError
from gtransformer.model.moe import Router
from gtransformer.training.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig,
                    device: torch.device) -> torch.optim.Optimizer | MuonAdamW:
    """AdamW over everything (`train.optimizer = "adamw"`) or `MuonAdamW` (`"muon"`)."""
    if config.optimizer == "muon":
        return MuonAdamW(model, config, device)
    return adamw(list(model.named_parameters()), config, device)


def adamw(named: list[tuple[str, torch.nn.Parameter]], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms / biases / embeddings do not (decaying them only hurts)."""
    decay, no_decay = [], []
    for name, param in named:
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
        [g for g in groups if g["params"]],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=device.type in ("cuda", "cpu"),  # CPU fused AdamW: 12 vs 56 ms a step on the tiny preset
    )


def hidden_matrices(model: torch.nn.Module, experts: bool = True) -> set[int]:
    """ids of the parameters Muon takes: 2-D weights and 3-D expert stacks outside embed_tokens, lm_head and
    the routers (their rows are per-token / per-expert scores, not a hidden linear map); without the (E, F, D)
    expert stacks when `experts` is false."""
    excluded = {id(p) for m in model.modules() if isinstance(m, (Router, torch.nn.Embedding)) for p in m.parameters()}
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        excluded |= {id(p) for p in lm_head.parameters()}
    return {id(p) for p in model.parameters()
            if p.requires_grad and (p.dim() == 2 or p.dim() == 3 and experts) and id(p) not in excluded}


class ExpertSlices:
    """Each (E, F, D) parameter as E Parameters of shape (F, D) sharing its storage; `link_grads` points each
    slice's .grad at the matching slice of the stack's .grad (a view: unscaling it unscales the stack's)."""

    def __init__(self, stacks: list[torch.nn.Parameter]):
        self.stacks = stacks
        self.slices = [[torch.nn.Parameter(stack.data[e]) for e in range(stack.shape[0])] for stack in stacks]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [s for slices in self.slices for s in slices]

    def link_grads(self) -> None:
        for stack, slices in zip(self.stacks, self.slices):
            for e, piece in enumerate(slices):
                piece.grad = None if stack.grad is None else stack.grad[e]

    def clear_grads(self) -> None:
        for stack in self.stacks:
            stack.grad = None
        self.link_grads()


class MuonAdamW:
    """`torch.optim.Muon` for the hidden matrices and `torch.optim.AdamW` for the rest, stepped together.

    `param_groups` lists Muon's groups first, then AdamW's (the trainer scales each group's own peak LR);
    `state_dict()` holds both optimizers' state dicts."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, device: torch.device):
        hidden = hidden_matrices(model, experts=config.muon_experts)
        matrices = [p for p in model.parameters() if id(p) in hidden and p.dim() == 2]
        self.experts = ExpertSlices([p for p in model.parameters() if id(p) in hidden and p.dim() == 3])
        rest = [(n, p) for n, p in model.named_parameters() if id(p) not in hidden]
        self.muon = torch.optim.Muon(matrices + self.experts.parameters(), lr=config.muon_lr,
                                     weight_decay=config.muon_weight_decay, momentum=config.muon_momentum,
                                     nesterov=True)
        self.adamw = adamw(rest, config, device)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Muon's groups, then AdamW's; the expert slices' gradients point at the stacks' current ones."""
        self.experts.link_grads()
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.experts.link_grads()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)
        self.experts.clear_grads()

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise UserError("the checkpoint's optimizer state is not Muon + AdamW; resume with the "
                            "train.optimizer it was trained with")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


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
