"""The eager decoder: single-token steps of a `GPT` over a filled `KVCache`, for a few rows on CPU.

    fold_for_decoding ─► matvec_layout (matvec operands, int8, RoPE tables scaled for attention)
      ─► Decoder.step, per layer: qkv matvec ─► RoPE ─► cache write ─► attention ─► o (+x)
                                  router ─► each row's top-k experts (+x) ─► shared/dense SwiGLU (+x)

The math is `GPT.forward`'s, through the same primitives (`model.primitives`,
`moe.select_experts`) and the same folded weights as `CompiledDecoder`; what is
particular here is only the layout of the matrices and the op count. Few ops
per layer matter: at batch 1 a step is ~200 tiny ops around ~50 matrix-vector
products, so rows run through their experts one by one (ids read on the host,
free on CPU) and residual adds fuse into the products (addmm).

Shapes: B rows, H query heads, K key/value heads, D head dim, S cache slots.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from gtransformer.inference.decode_weights import (
    DecodeWeights,
    cached_for_weights,
    fold_for_decoding,
    folded_rms_norm,
    map_matrices,
)
from gtransformer.inference.int8 import Int8Matrix
from gtransformer.model.attention import KVCache, decode_attention, step_mask
from gtransformer.model.model import GPT
from gtransformer.model.moe import FEW_TOKENS, select_experts
from gtransformer.model.primitives import apply_rope, rms_norm, swiglu

MatvecOperand = torch.Tensor | Int8Matrix  # R in h @ R


def matvec_operand(weight: torch.Tensor, int8: bool = False):
    """nn.Linear weight (out, in) -> R with h @ R == F.linear(h, weight), in its fastest layout.

    Measured on this project's CPU (one thread, weights not in cache): a wide float32 weight
    (out > in) is read 1.1-2.7x faster as a contiguous (in, out) matrix (w13: 68 vs 137 us,
    lm_head: 409 vs 1090 us); narrow ones and float16 (whose kernel wants (out, in)) keep their
    layout. int8: an `Int8Matrix`. A stack (E, out, in) becomes a tuple of E operands, so that
    picking an expert is a tuple lookup, not an indexing op.
    """
    if int8:
        operand = Int8Matrix(weight)
    elif weight.shape[-2] > weight.shape[-1] and weight.dtype != torch.float16:
        operand = weight.transpose(-1, -2).contiguous()
    else:
        operand = weight.transpose(-1, -2)
    return tuple(operand[e] for e in range(weight.shape[0])) if weight.dim() == 3 else operand


def matvec_layout(weights: DecodeWeights, int8: bool = False) -> DecodeWeights:
    """`fold_for_decoding`'s weights as the eager `Decoder` reads them: the only transform after folding.

    Every matrix becomes its `matvec_operand` (int8-quantised with int8=True); the RoPE tables
    become (S, H + K, D) in the model's dtype with the attention scale 1/sqrt(D) folded into the
    query heads' rows (with QK-norm the scale cannot go into the weights).
    """
    H, K, D = weights.n_heads, weights.n_kv_heads, weights.head_dim
    head_scale = torch.ones(H + K, 1, device=weights.embed.device)
    head_scale[:H] = D**-0.5
    return replace(
        map_matrices(weights, lambda w: matvec_operand(w, int8)),
        dtype=torch.int8 if int8 else weights.dtype,
        rope_cos=(weights.rope_cos.float()[:, None, :] * head_scale).to(weights.model_dtype),
        rope_sin=(weights.rope_sin.float()[:, None, :] * head_scale).to(weights.model_dtype),
    )


def _matmul(h: torch.Tensor, right: MatvecOperand) -> torch.Tensor:
    if isinstance(right, Int8Matrix):
        return right.matmul(h)
    return h.to(right.dtype) @ right


def _add_matmul_(out: torch.Tensor, h: torch.Tensor, right: MatvecOperand, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha * h @ right, in place, in one addmm when the dtypes allow it."""
    if isinstance(right, torch.Tensor) and out.dtype == right.dtype:
        return out.addmm_(h.to(right.dtype), right, alpha=alpha)
    return out.add_(_matmul(h, right), alpha=alpha)


def _swiglu_(out: torch.Tensor, h: torch.Tensor, w13: MatvecOperand, w2: MatvecOperand, alpha: float = 1.0):
    """out += alpha * w2(swiglu(w13 h)), in place."""
    gate_up = _matmul(h, w13)
    hidden = gate_up.shape[-1] // 2
    _add_matmul_(out, swiglu(gate_up[:, :hidden], gate_up[:, hidden:]), w2, alpha)


def _grouped_experts_(x_BM: torch.Tensor, h_BM: torch.Tensor, experts, top_ids_Bk: torch.Tensor,
                      top_weights_Bk: torch.Tensor) -> None:
    """x += each row's weighted top-k SwiGLU experts, one product per chosen expert over its rows.

    Several rows often share an expert; reading its weights once for all of them, instead of
    once per row, is what lets a batched step cost less than its rows one by one.
    """
    rows_of: dict[int, list[int]] = {}
    weights_of: dict[int, list[float]] = {}
    for row, (ids, weights) in enumerate(zip(top_ids_Bk.tolist(), top_weights_Bk.tolist())):
        for e, weight in zip(ids, weights):
            rows_of.setdefault(e, []).append(row)
            weights_of.setdefault(e, []).append(weight)
    for e, rows in rows_of.items():
        if len(rows) == 1:
            row = rows[0]
            _swiglu_(x_BM[row : row + 1], h_BM[row : row + 1], experts.w13[e], experts.w2[e], weights_of[e][0])
            continue
        index = torch.tensor(rows, device=x_BM.device)
        out = torch.zeros(len(rows), x_BM.shape[1], dtype=x_BM.dtype, device=x_BM.device)
        _swiglu_(out, h_BM.index_select(0, index), experts.w13[e], experts.w2[e])
        x_BM.index_add_(0, index, out.mul_(torch.tensor(weights_of[e], dtype=out.dtype, device=out.device)[:, None]))


def supports_fast_decode(model, batch: int) -> bool:
    """Whether `Decoder` runs this model's steps: a CPU `GPT` and at most FEW_TOKENS rows.

    It beats the grouped GEMMs of the model's forward only while rows are few, and it reads the
    chosen experts on the host, free on CPU but a sync per layer on CUDA (which decodes through
    the model's own forward).
    """
    on_cpu = isinstance(model, GPT) and model.embed_tokens.weight.device.type == "cpu"
    return on_cpu and batch <= FEW_TOKENS


class Decoder:
    """Single-token decoding steps of a `GPT` over a filled `KVCache`: `GPT.forward`'s math, inference only."""

    def __init__(self, weights: DecodeWeights, cache: KVCache, pad: torch.Tensor | None):
        """weights: from `prepared_weights` (or `matvec_layout`); pad (B,): each row's left-padding slots."""
        self.w = weights
        self.cache = cache
        self.k_layers, self.v_layers = cache.k.unbind(0), cache.v.unbind(0)  # (B, K, S, D) views
        self.matmul_dtype = Int8Matrix.input_dtype if weights.dtype == torch.int8 else weights.dtype
        self.pad = pad
        self.slots = torch.arange(cache.max_len, device=cache.k.device)

    @classmethod
    def prepared_weights(cls, model, dtype: torch.dtype | None = None, keep: bool = True) -> DecodeWeights:
        """The model's weights in `matvec_layout`, rebuilt only when the weights (or dtype) changed.

        dtype: the matrices' dtype (None: the model's; torch.int8: weight-only int8). keep=False builds
        them without keeping them on the model (a model in training mode); see `cached_for_weights`.
        """
        int8 = dtype == torch.int8
        fold_dtype = torch.float32 if int8 else dtype
        return cached_for_weights(model, "eager", dtype or model.embed_tokens.weight.dtype,
                                  lambda: matvec_layout(fold_for_decoding(model, fold_dtype), int8), keep)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """tokens (B,) go into cache slot `cache.length` -> logits (B, vocab) float32; the cache advances by one.

        positions (B,): each row's RoPE position, or None when every row is at `cache.length`.
        A cache from `KVCache.rows(..., next_slots)` (the engine's continuous batching) takes row b's
        token into its own slot next_slots[b] instead, with its own mask; pass next_slots as positions.
        """
        w, cache = self.w, self.cache
        slot = cache.length
        B = tokens.shape[0]
        H, K, D = w.n_heads, w.n_kv_heads, w.head_dim
        where = slot if positions is None else positions
        cos, sin = w.rope_cos[where], w.rope_sin[where]  # (H + K, D) or (B, H + K, D), q rows scaled
        x = F.embedding(tokens, w.embed)
        per_row = cache.next_slots is not None
        # (B, 1, 1, slot + 1) or None: keys are read up to `slot` (per row: up to the longest row's slot)
        mask = cache.row_mask if per_row else step_mask(self.slots, slot, self.pad)
        for i, layer in enumerate(w.layers):
            qkv = _matmul(folded_rms_norm(x, w.norm_eps), layer.qkv).to(x.dtype)
            qk = qkv[:, : (H + K) * D].view(B, H + K, D)
            if layer.q_norm is not None:
                qk = torch.cat((rms_norm(qk[:, :H], layer.q_norm, w.norm_eps),
                                rms_norm(qk[:, H:], layer.k_norm, w.norm_eps)), 1)
            qk = apply_rope(qk, cos, sin)
            if per_row:
                keys, values, _ = cache.write(i, qk[:, H:, None], qkv[:, (H + K) * D :].view(B, K, 1, D))
            else:
                k_layer, v_layer = self.k_layers[i], self.v_layers[i]
                k_layer.select(2, slot).copy_(qk[:, H:])
                v_layer.select(2, slot).copy_(qkv[:, (H + K) * D :].view(B, K, D))
                keys, values = k_layer.narrow(2, 0, slot + 1), v_layer.narrow(2, 0, slot + 1)
            q = qk[:, :H].reshape(B, K, H // K, D)
            y = decode_attention(q, keys, values, mask, scale=1.0).reshape(B, H * D)  # the scale is already in q
            x = _add_matmul_(x, y, layer.o)
            h = folded_rms_norm(x, w.norm_eps)
            h_matmul = h.to(self.matmul_dtype)  # once per layer, not once per expert
            experts = layer.routed_experts
            if experts is not None:
                top_weights, top_ids = select_experts(F.linear(h.float(), experts.router), experts.top_k,
                                                      experts.expert_bias)
                if B == 1:
                    for e, weight in zip(top_ids[0].tolist(), top_weights[0].tolist()):
                        _swiglu_(x, h_matmul, experts.w13[e], experts.w2[e], weight)
                else:
                    _grouped_experts_(x, h_matmul, experts, top_ids, top_weights)
            mlp = layer.unrouted_mlp
            if mlp is not None:
                _swiglu_(x, h_matmul, mlp.w13, mlp.w2)
        cache.length += 1
        return _matmul(folded_rms_norm(x, w.norm_eps), w.lm_head).float()
