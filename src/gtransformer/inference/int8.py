"""Int8 weight-only quantisation for CPU decoding (`DecodeOptions(dtype="int8")`, `decode_model.DecodeLinear`)."""

from __future__ import annotations

import torch


def int8_decode_available() -> bool:
    """Whether this torch has the CPU kernel of weight-only int8 matrix products."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_int8(weight_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) -> (int8 (out, in), bfloat16 scale per output channel): symmetric per-channel rounding,
    weight ~= int8 * scale with |int8| <= 127.

    `int8_matmul` reads a quarter of float32's bytes; it was measured 2-3x faster than float32 and 1.2-2x
    faster than float16 here (lm_head: 141 us vs 278 us float16, 409 us float32).
    """
    weight = weight_OI.float()
    scales = (weight.abs().amax(dim=-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8), scales.to(torch.bfloat16)


def int8_matmul(x: torch.Tensor, weight_OI: torch.Tensor, scales_O: torch.Tensor) -> torch.Tensor:
    """x (..., in) -> x @ dequantised weight.T (..., out) in bfloat16 (the kernel's input and output dtype)."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    return torch.ops.aten._weight_int8pack_mm(rows, weight_OI, scales_O).view(*x.shape[:-1], -1)
