"""A `GPT`'s weights folded for single-token decoding, the one input of both decoders; and their cache.

    GPT ──fold_for_decoding(model, dtype)──► DecodeWeights ──► CompiledDecoder (compiled_decode.py)
                                                    └──matvec_layout──► Decoder (decode.py, eager)

Folding: a matrix W that reads RMSNorm(x) = g * x / sqrt(mean(x^2) + eps) gets the
norm's weight and sqrt(d) folded in (`fold_norm`), so the decoders only normalise,
weightless (`folded_rms_norm`):

    W @ RMSNorm(x) == fold_norm(W, g) @ folded_rms_norm(x)
    fold_norm(W, g) = W * (g * sqrt(d))          folded_rms_norm(x) = x / sqrt(sum(x^2) + d * eps)

q/k/v become one matrix, each SwiGLU's gate and up projections one matrix. The
eager decoder re-lays these matrices out for its matrix-vector products
(`decode.matvec_layout`); the folding math exists here only.

`cached_for_weights` keeps what a decoder prepared from a model (its folded weights,
a compiled step) on that model until a weight changes; see its docstring.

Legend of the shapes: V vocab, M d_model, H query heads, K key/value heads, D head
dim, S positions (context length), E routed experts, F expert (or dense) hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, TypeVar

import torch

from gtransformer.model.model import GPT

# Marks the fields holding a matrix (nn.Linear layout (out, in), or a stack (E, out, in) of them) in the
# decoding dtype: the fields `map_matrices` transforms. The router is not one: it stays float32.
MATRIX = {"matrix": True}
T = TypeVar("T")


@dataclass(frozen=True)
class SwiGLUDecodeWeights:
    """A SwiGLU (a dense layer's feed-forward or an MoE layer's shared experts), its input norm folded in."""

    w13: torch.Tensor = field(metadata=MATRIX)  # (2F, M): the gate rows, then the up rows
    w2: torch.Tensor = field(metadata=MATRIX)  # (M, F)


@dataclass(frozen=True)
class RoutedExpertsDecodeWeights:
    """An MoE layer's router and routed experts, the input norm folded into the router and the experts."""

    router: torch.Tensor  # (E, M) float32, as `Router.forward` computes it
    expert_bias: torch.Tensor | None  # (E,) float32 bias that steers the choice only (balance="bias"), else None
    top_k: int
    w13: torch.Tensor = field(metadata=MATRIX)  # (E, 2F, M)
    w2: torch.Tensor = field(metadata=MATRIX)  # (E, M, F)


@dataclass(frozen=True)
class LayerDecodeWeights:
    qkv: torch.Tensor = field(metadata=MATRIX)  # ((H + 2K) D, M): q, k, v projections; input_layernorm folded
    o: torch.Tensor = field(metadata=MATRIX)  # (M, H D)
    q_norm: torch.Tensor | None = None  # (D,) QK-norm weights in the model's dtype (qk_norm), else None
    k_norm: torch.Tensor | None = None
    routed_experts: RoutedExpertsDecodeWeights | None = None  # an MoE layer's router and experts
    shared_experts: SwiGLUDecodeWeights | None = None  # an MoE layer's shared experts (every token)
    dense_mlp: SwiGLUDecodeWeights | None = None  # a dense layer's feed-forward

    @property
    def unrouted_mlp(self) -> SwiGLUDecodeWeights | None:
        """The SwiGLU every token goes through: the shared experts of an MoE layer, or a dense layer's."""
        return self.shared_experts if self.shared_experts is not None else self.dense_mlp


@dataclass(frozen=True)
class DecodeWeights:
    """Everything a decoding step reads; the matrices in `dtype`, the rest as the model has it.

    `fold_for_decoding` holds nn.Linear-layout tensors; the eager decoder's copy
    (`decode.matvec_layout`) holds each MATRIX field as its matrix-vector operand instead.
    """

    dtype: torch.dtype  # of the matrices (torch.int8 in the eager decoder's quantised layout)
    model_dtype: torch.dtype  # of the residual stream, attention and KV cache
    n_heads: int
    n_kv_heads: int
    head_dim: int
    norm_eps: float
    embed: torch.Tensor  # (V, M) the model's own embedding (not a copy)
    rope_cos: torch.Tensor  # (S, D) the model's RoPE tables
    rope_sin: torch.Tensor
    layers: tuple[LayerDecodeWeights, ...]
    lm_head: torch.Tensor = field(metadata=MATRIX)  # (V, M), the final norm folded


def fold_norm(weight: torch.Tensor, norm_weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """weight (..., out, in) with the RMSNorm weight and sqrt(in) of its input folded in, in float32, then cast."""
    weight = weight.float()
    if norm_weight is not None:
        weight = weight * (norm_weight.float() * weight.shape[-1] ** 0.5)
    return weight.to(dtype).contiguous()


def folded_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(sum(x^2) + d * eps) in float32, back in x's dtype: RMSNorm whose weight `fold_norm` moved.

    One norm kernel and three in-place scalar ops, where F.rms_norm takes ~8 ops on CPU.
    """
    xf = x.float()
    inv = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().add_(x.shape[-1] * eps).rsqrt_()
    return (xf * inv).to(x.dtype)


def _swiglu_weights(mlp, norm_weight: torch.Tensor, dtype: torch.dtype) -> SwiGLUDecodeWeights:
    w13 = torch.cat((mlp.w1.weight, mlp.w3.weight))
    return SwiGLUDecodeWeights(fold_norm(w13, norm_weight, dtype), fold_norm(mlp.w2.weight, None, dtype))


def _layer_weights(block, dtype: torch.dtype) -> LayerDecodeWeights:
    attn, mlp = block.self_attn, block.mlp
    ffn_norm = block.post_attention_layernorm.weight
    qkv = torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
    routed = shared = dense = None
    if block.is_moe:
        gate, experts = mlp.gate, mlp.experts
        routed = RoutedExpertsDecodeWeights(
            router=fold_norm(gate.weight, ffn_norm, torch.float32),
            expert_bias=gate.expert_bias.float() if gate.use_bias else None,
            top_k=gate.top_k,
            w13=fold_norm(torch.cat((experts.w1, experts.w3), dim=1), ffn_norm, dtype),
            w2=fold_norm(experts.w2, None, dtype),
        )
        if mlp.shared_experts is not None:
            shared = _swiglu_weights(mlp.shared_experts, ffn_norm, dtype)
    else:
        dense = _swiglu_weights(mlp, ffn_norm, dtype)
    return LayerDecodeWeights(
        qkv=fold_norm(qkv, block.input_layernorm.weight, dtype),
        o=fold_norm(attn.o_proj.weight, None, dtype),
        q_norm=attn.q_norm.weight if attn.q_norm is not None else None,
        k_norm=attn.k_norm.weight if attn.k_norm is not None else None,
        routed_experts=routed,
        shared_experts=shared,
        dense_mlp=dense,
    )


def fold_for_decoding(model: GPT, dtype: torch.dtype | None = None) -> DecodeWeights:
    """The model's weights for decoding, matrices folded and converted to `dtype` (None: the model's).

    dtype is a floating dtype (float32, bfloat16, float16); products still accumulate
    in float32 in both decoders, and the residual stream keeps the model's dtype.
    """
    config = model.config
    embed = model.embed_tokens.weight
    dtype = dtype or embed.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"fold_for_decoding takes a floating dtype, not {dtype}")
    return DecodeWeights(
        dtype=dtype,
        model_dtype=embed.dtype,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
        head_dim=config.resolved_head_dim,
        norm_eps=config.norm_eps,
        embed=embed,
        rope_cos=model.rope_cos,
        rope_sin=model.rope_sin,
        layers=tuple(_layer_weights(block, dtype) for block in model.layers),
        lm_head=fold_norm(model.lm_head.weight, model.norm.weight, dtype),
    )


def map_matrices(weights: T, transform: Callable[[torch.Tensor], Any]) -> T:
    """A copy of `weights` (any of the dataclasses above) with transform() applied to every MATRIX field."""
    changes = {}
    for f in fields(weights):
        value = getattr(weights, f.name)
        if f.metadata.get("matrix"):
            changes[f.name] = transform(value)
        elif is_dataclass(value):
            changes[f.name] = map_matrices(value, transform)
        elif isinstance(value, tuple) and value and is_dataclass(value[0]):
            changes[f.name] = tuple(map_matrices(v, transform) for v in value)
    return replace(weights, **changes)


# --- the cache -----------------------------------------------------------------------------------

# What the decoders prepared from a model lives in this attribute of the model: {kind: (signature, value)}.
# A plain attribute (not a parameter, buffer or submodule), so state_dict, .to() and optimizers never see it;
# `cached_for_weights` is its only reader and writer.
CACHE_ATTRIBUTE = "_decode_cache"


def cached_for_weights(model, kind: str, dtype, build: Callable[[], T], keep: bool = True) -> T:
    """build() for this model and `kind` of decoder ("eager", "compiled"), kept on the model and reused.

    Rebuilt only when a weight changed or another dtype is asked: the signature holds every parameter's
    and buffer's storage and `_version` (which an optimizer step or any in-place change bumps).
    keep=False (a model in training mode: its weights change between samples, and copies would only add
    to the training memory) drops the kept value and keeps nothing, returning a still-matching one.
    One value per kind: building for another dtype replaces the old one, freeing it first.
    """
    tensors = [*model.parameters(), *model.buffers()]
    signature = (dtype, *((t.data_ptr(), t._version) for t in tensors))
    cache = model.__dict__.setdefault(CACHE_ATTRIBUTE, {})
    entry = cache.get(kind)
    if not keep or entry is None or entry[0] != signature:
        cache.pop(kind, None)
    value = entry[1] if entry is not None and entry[0] == signature else None
    entry = None  # a stale value is freed before its replacement is built
    if value is None:
        value = build()
    if keep:
        cache[kind] = (signature, value)
    if not cache:
        del model.__dict__[CACHE_ATTRIBUTE]
    return value
