"""Dense SwiGLU feed-forwards, and the one output type every feed-forward of a `Block` returns.

A `Block`'s `mlp` is either a `DenseFeedForward` or a `moe.MoE`; both take
(x, need_losses) and return a `FeedForwardOutput`, so the block treats them
alike. `SwiGLU` alone (a plain tensor out) also serves as the MoE's shared experts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from gtransformer.model.primitives import swiglu, swiglu_fused


class FeedForwardOutput(NamedTuple):
    output: torch.Tensor  # same shape and dtype as the input
    aux_loss: torch.Tensor | None  # already-weighted balancing losses (MoE with need_losses), else None
    stats: dict[str, Any] | None  # routing statistics (MoE with need_losses), else None


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), nn.Linear weights named as Mixtral's experts (w1 gate, w3 up, w2 down)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.w13: nn.Module | None = None  # w1's rows then w3's in one matrix, after `fuse_projections`

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """w1 and w3 become one `w13` (gate rows, then up rows): one product a token instead of two.

        A decoding transform (`inference.decode_model`); the trained model keeps Mixtral's names.
        """
        weight = torch.cat((self.w1.weight, self.w3.weight))
        self.w13 = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        self.w13.weight.copy_(weight)
        self.w1 = self.w3 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            return self.w2(swiglu_fused(self.w13(x)))
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class DenseFeedForward(SwiGLU):
    """The feed-forward of a dense layer: a SwiGLU with the `Block` interface (no losses, no stats).

    A subclass, not a wrapper, so that its weights keep the names `layers.i.mlp.w1.weight`, ...
    """

    def forward(self, x: torch.Tensor, need_losses: bool = False) -> FeedForwardOutput:
        return FeedForwardOutput(super().forward(x), None, None)
