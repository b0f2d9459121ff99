"""The model's math primitives, each written once: RMSNorm (and its module), RoPE, SwiGLU.

`attention.py`, `feed_forward.py`, `moe.py` and `model.py` build the modules from
them; training, prefill and every decoding step run those modules (`GPT.forward`),
so changing a function here changes all of them alike.

Shapes: `...` any leading axes; D the last axis (model width or head dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last axis; weight None: a weight of ones.

    float32 input and weight: one fused kernel (forward and backward). Otherwise
    normalise in float32, cast to the input dtype, then scale, exactly as Hugging
    Face's MixtralRMSNorm does (the result takes the promoted dtype of the two).
    A decoding model folds the weight into the matrices that read the norm
    (`RMSNorm.fold_into`), which leaves weight None.
    """
    if x.dtype == torch.float32 and not torch.is_grad_enabled():
        # Outside autograd F.rms_norm runs as a composite of ~8 ops; this is 5 (a weight folded away) or 6,
        # faster in a decoding step (benchmarks/RESULTS.md, "One forward"). Same math, in float32.
        normed = x * x.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        return normed if weight is None else normed.mul_(weight)
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return normed if weight is None else weight * normed


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (length, head_dim) in HF's layout (frequencies repeated over both halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis: HF's RoPE pairing of i with i + D/2.

    Eagerly a roll and an in-place negation (3 ops; HF's cat of a negated half takes 4). Under
    torch.compile HF's form, which inductor fuses better (the compiled decoding step measured 1.2x
    slower with the roll).
    """
    half = x.shape[-1] // 2
    if torch.compiler.is_compiling():
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    rotated = x.roll(half, dims=-1)
    rotated[..., :half].neg_()
    return rotated


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) by the angles in cos/sin: HF's convention, so weights export unchanged."""
    return torch.addcmul(x * cos, rotate_half(x), sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU activation silu(gate) * up; the down projection follows."""
    return F.silu(gate) * up


def swiglu_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """`swiglu` of one product whose last axis holds the gate's outputs, then the up projection's (a fused w13)."""
    hidden = gate_up.shape[-1] // 2
    return swiglu(gate_up[..., :hidden], gate_up[..., hidden:])


class RMSNorm(nn.Module):
    """`rms_norm` as a module with its learnt weight (HF's name: `weight`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    @torch.no_grad()
    def fold_into(self, *readers: torch.Tensor) -> None:
        """Move the weight into the matrices (..., out, in) that read this norm's output, in place: W @ (g * n)
        == (W * g) @ n. The norm is then weightless (one op fewer a call; a decoding transform)."""
        for weight in readers:
            weight.mul_(self.weight.to(weight.dtype))
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
