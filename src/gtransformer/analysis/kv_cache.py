"""KV-cache memory as the context grows: this model (GQA) against the same model with full multi-head attention.

    kv_cache_bytes           the formula: 2 (K and V) * n_layers * n_kv_heads * head_dim * tokens * dtype size * batch
    allocated_kv_cache_bytes the bytes of the tensors a real `model.attention.KVCache` allocates
    multi_head_config        the same config with n_kv_heads = n_heads
    kv_cache_curve           both, for a list of context lengths (`KVCacheCurve`)
    kv_cache_figure          the two curves (MiB against tokens) as a matplotlib Figure
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from gtransformer.model.attention import KVCache
from gtransformer.model.config import ModelConfig

MIB = 2**20


def kv_cache_bytes(config: ModelConfig, tokens: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the keys and values of `tokens` positions in every layer, by the formula."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layers * config.n_kv_heads * config.resolved_head_dim * tokens * size * batch_size


def allocated_kv_cache_bytes(config: ModelConfig, tokens: int, batch_size: int = 1,
                             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> int:
    """Bytes of the key and value tensors of a `KVCache` allocated for `tokens` positions (at most context_length)."""
    cache = KVCache(config, batch_size, tokens, device=device, dtype=dtype)
    return cache.k.nbytes + cache.v.nbytes


def multi_head_config(config: ModelConfig) -> ModelConfig:
    """The same model with one key/value head per query head (plain multi-head attention)."""
    return dataclasses.replace(config, n_kv_heads=config.n_heads)


@dataclass
class KVCacheCurve:
    """Cache bytes of this model (GQA) and its multi-head twin at each context length."""

    tokens: list[int]
    gqa_bytes: list[int]  # formula, this model's n_kv_heads
    mha_bytes: list[int]  # formula, n_kv_heads = n_heads
    gqa_allocated: list[int] | None  # bytes of real KVCache tensors (None when not measured)
    mha_allocated: list[int] | None
    n_heads: int
    n_kv_heads: int
    dtype: str
    batch_size: int

    @property
    def ratio(self) -> float:
        """How many times smaller this model's cache is than the multi-head one (n_heads / n_kv_heads)."""
        return self.mha_bytes[-1] / self.gqa_bytes[-1]


def kv_cache_curve(config: ModelConfig, tokens: list[int] | None = None, batch_size: int = 1,
                   dtype: torch.dtype = torch.float32, measure: bool = True) -> KVCacheCurve:
    """Formula (and, with measure=True, allocated) cache bytes at each length; default lengths: 8 steps up to context_length."""
    if tokens is None:
        tokens = sorted({max(1, round(config.context_length * i / 8)) for i in range(1, 9)})
    mha = multi_head_config(config)
    return KVCacheCurve(
        tokens=list(tokens),
        gqa_bytes=[kv_cache_bytes(config, t, batch_size, dtype) for t in tokens],
        mha_bytes=[kv_cache_bytes(mha, t, batch_size, dtype) for t in tokens],
        gqa_allocated=[allocated_kv_cache_bytes(config, t, batch_size, dtype) for t in tokens] if measure else None,
        mha_allocated=[allocated_kv_cache_bytes(mha, t, batch_size, dtype) for t in tokens] if measure else None,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
        dtype=str(dtype).removeprefix("torch."),
        batch_size=batch_size,
    )


def kv_cache_figure(curve: KVCacheCurve) -> Figure:
    """Cache MiB against context length: lines from the formula, dots where real KVCache tensors were measured."""
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    for label, formula, allocated, colour in (
        (f"GQA ({curve.n_kv_heads} K/V heads)", curve.gqa_bytes, curve.gqa_allocated, "#4c72b0"),
        (f"multi-head ({curve.n_heads} K/V heads)", curve.mha_bytes, curve.mha_allocated, "#dd8452"),
    ):
        ax.plot(curve.tokens, [b / MIB for b in formula], "-", color=colour, label=f"{label}, formula")
        if allocated is not None:
            ax.plot(curve.tokens, [b / MIB for b in allocated], "o", color=colour, label=f"{label}, allocated KVCache")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV cache (MiB)")
    ax.set_title(f"KV cache, batch {curve.batch_size}, {curve.dtype}: multi-head needs {curve.ratio:g}x more",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
