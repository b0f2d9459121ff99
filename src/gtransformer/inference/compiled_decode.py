"""Single-token decoding compiled by torch.compile: one fused graph per step, nothing read back to the host.

Why it is fast: at batch 1 a step is ~50 matrix-vector products among ~150 small
ops. Eager PyTorch pays a dispatch for each op, and its matrix-vector kernels read
the weights at 7-19 GB/s on this project's CPU. Here every product is written as a
multiply-and-sum over the contiguous `in` axis of an nn.Linear-layout weight, which
inductor turns into one vectorised loop over that weight (~22 GB/s, float32), and the
norms, RoPE, attention, routing and SwiGLU around them fuse into the same loops.
Measured on the tiny preset with two threads: 0.8-0.9 ms a step against 2.2-2.8 ms for
the eager `decode.Decoder`; larger presets are bound by reading their weights and gain
less (benchmarks/RESULTS.md).

It reads the same `decode_weights.fold_for_decoding` output as the eager decoder, in
its nn.Linear layout, and computes through the same primitives (`folded_rms_norm`,
`model.primitives`, `moe.select_experts`), so both decoders do `GPT.forward`'s math.

Static shapes make one graph serve every step: the KV cache spans the whole context,
and attention masks the slots not written yet (and each row's left padding). Each row
writes into its own slot (`slots_B`): the same slot for a batch of prompts decoded
together, each request's own for the serving engine's continuous batching. The
router's expert ids index the stacked expert weights on the device, so no step waits
on the host, which also keeps the graph free of breaks.

Legend of the shape suffixes: B batch rows, H query heads, K key/value heads,
G = H / K query heads per key/value head, D head dim, S cache slots (context
length), M d_model, E experts, k experts per token, F expert hidden size, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gtransformer.errors import UserError
from gtransformer.inference.decode_weights import (
    DecodeWeights,
    LayerDecodeWeights,
    RoutedExpertsDecodeWeights,
    cached_for_weights,
    fold_for_decoding,
    folded_rms_norm,
)
from gtransformer.model.attention import decode_attention, visible_keys
from gtransformer.model.moe import select_experts
from gtransformer.model.primitives import apply_rope, rms_norm, swiglu
from gtransformer.runtime import require_cpp_compiler

COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RECOMPILE_LIMIT = 256  # graphs of the decoding step per process (see `CompiledDecoder.step`)


def _require_compiled_dtype(dtype: torch.dtype) -> None:
    if dtype not in COMPILED_DTYPES:
        raise UserError(f"compiled decoding takes float32, bfloat16 or float16 weights, not {dtype}; "
                        f"drop --compile or choose another --decode-dtype")


def _matvec(weight_OI: torch.Tensor, h_BI: torch.Tensor) -> torch.Tensor:
    """h @ weight.T accumulated in float32, as a reduction inductor vectorises along `in`."""
    return (weight_OI.float() * h_BI.float()[:, None, :]).sum(-1)


class CompiledDecoder:
    """Compiled decoding steps over a context-long `KVCache`, reading `fold_for_decoding`'s weights.

    The matrices keep the folded weights' dtype (`DecodeWeights.dtype`); products
    accumulate in float32 and the residual stream keeps the model's dtype, as in
    `GPT.forward`.
    """

    def __init__(self, weights: DecodeWeights):
        _require_compiled_dtype(weights.dtype)
        require_cpp_compiler(weights.embed.device, "run without --compile")
        self.w = weights
        # RoPE in float32, as the model's own tables are built.
        self.rope_cos, self.rope_sin = weights.rope_cos.float(), weights.rope_sin.float()
        # On CPU a C++ wrapper (no Python per buffer, no size asserts) saves ~15% of a tiny-preset step.
        options = {"cpp_wrapper": True, "size_asserts": False} if weights.embed.device.type == "cpu" else None
        self._compiled = torch.compile(self._step, fullgraph=True, dynamic=False, options=options)
        self._warm: set[tuple] = set()  # (batch, cache shape, strides, dtype, device) already compiled
        self._buffers: dict[tuple, tuple[torch.Tensor, ...]] = {}

    # ------------------------------------------------------------------ the compiled step

    def _swiglu(self, w13_OI: torch.Tensor, w2_OI: torch.Tensor, h_BM: torch.Tensor) -> torch.Tensor:
        gate, up = _matvec(w13_OI, h_BM.to(w13_OI.dtype)).chunk(2, dim=-1)
        return _matvec(w2_OI, swiglu(gate, up).to(w2_OI.dtype))

    def _experts(self, experts: RoutedExpertsDecodeWeights, h_BM: torch.Tensor) -> torch.Tensor:
        weights_Bk, ids_Bk = select_experts(_matvec(experts.router, h_BM), experts.top_k, experts.expert_bias)
        w13_EOI, w2_EOI = experts.w13, experts.w2
        h_BM = h_BM.to(w13_EOI.dtype).float()
        # Indexing the stacked weights by the ids fuses into the reduction: only the chosen experts are read.
        gate_up_BkO = (w13_EOI[ids_Bk].float() * h_BM[:, None, None, :]).sum(-1)
        gate_BkF, up_BkF = gate_up_BkO.chunk(2, dim=-1)
        act_BkF = swiglu(gate_BkF, up_BkF).to(w13_EOI.dtype).float()
        out_BkM = (w2_EOI[ids_Bk].float() * act_BkF[:, :, None, :]).sum(-1)
        return (out_BkM * weights_Bk[..., None]).sum(1)

    def _attention(self, layer: LayerDecodeWeights, x_BM, cos_B1D, sin_B1D, visible_B11S, slots_BK1D, keys_BKSD,
                   values_BKSD) -> torch.Tensor:
        """Writes this step's key/value into each row's cache slot; returns the attention output (B, H D)."""
        w = self.w
        H, K, D = w.n_heads, w.n_kv_heads, w.head_dim
        B, G = x_BM.shape[0], H // K
        qkv = _matvec(layer.qkv, folded_rms_norm(x_BM, w.norm_eps).to(layer.qkv.dtype))
        q_BHD = qkv[:, : H * D].view(B, H, D)
        k_BKD = qkv[:, H * D : (H + K) * D].view(B, K, D)
        v_BKD = qkv[:, (H + K) * D :].view(B, K, D)
        if layer.q_norm is not None:
            q_BHD, k_BKD = rms_norm(q_BHD, layer.q_norm, w.norm_eps), rms_norm(k_BKD, layer.k_norm, w.norm_eps)
        q_BHD, k_BKD = apply_rope(q_BHD, cos_B1D, sin_B1D), apply_rope(k_BKD, cos_B1D, sin_B1D)
        # The model's attention reads keys/values at the cache dtype; round q the same way.
        q_BHD = q_BHD.to(keys_BKSD.dtype).float()
        keys_BKSD.scatter_(2, slots_BK1D, k_BKD[:, :, None, :].to(keys_BKSD.dtype))
        values_BKSD.scatter_(2, slots_BK1D, v_BKD[:, :, None, :].to(values_BKSD.dtype))
        y_BKGD = decode_attention(q_BHD.view(B, K, G, D), keys_BKSD, values_BKSD, visible_B11S, D**-0.5, fused=True)
        return y_BKGD.reshape(B, H * D)

    def _step(self, tokens_B, slots_B, positions_B, pad_B, cache_k, cache_v):
        w = self.w
        B, K, D = tokens_B.shape[0], w.n_kv_heads, w.head_dim
        x_BM = F.embedding(tokens_B, w.embed)
        cos_B1D = self.rope_cos.index_select(0, positions_B)[:, None, :]
        sin_B1D = self.rope_sin.index_select(0, positions_B)[:, None, :]
        visible_B11S = visible_keys(torch.arange(cache_k.shape[3], device=tokens_B.device), slots_B[:, None], pad_B)
        slots_BK1D = slots_B.view(B, 1, 1, 1).expand(B, K, 1, D)
        for i, layer in enumerate(w.layers):
            y_BHD = self._attention(layer, x_BM, cos_B1D, sin_B1D, visible_B11S, slots_BK1D, cache_k[i], cache_v[i])
            x_BM = (x_BM.float() + _matvec(layer.o, y_BHD.to(layer.o.dtype))).to(x_BM.dtype)
            h_BM = folded_rms_norm(x_BM, w.norm_eps)
            delta_BM = torch.zeros_like(h_BM, dtype=torch.float32)
            if layer.routed_experts is not None:
                delta_BM = delta_BM + self._experts(layer.routed_experts, h_BM)
            mlp = layer.unrouted_mlp
            if mlp is not None:
                delta_BM = delta_BM + self._swiglu(mlp.w13, mlp.w2, h_BM)
            x_BM = (x_BM.float() + delta_BM).to(x_BM.dtype)
        return _matvec(w.lm_head, folded_rms_norm(x_BM, w.norm_eps).to(w.lm_head.dtype))

    # ------------------------------------------------------------------ driving it

    def step(self, tokens: torch.Tensor, cache, positions: torch.Tensor | None, pad: torch.Tensor | None) -> torch.Tensor:
        """tokens (B,) go into slot `cache.length` of a context-long cache -> logits (B, vocab) float32.

        positions (B,): each row's RoPE position (None: every row at `cache.length`); pad (B,): each
        row's count of left-padding slots (None: no padding). A view from `KVCache.rows(..., next_slots)`
        (the engine's continuous batching) takes row b's token into its own slot next_slots[b], which is
        also its position; pass positions=None and pad=None then.
        """
        batch, device = tokens.shape[0], tokens.device
        # Strides too: a view of some rows of a bigger cache (the engine's) is another graph than a whole cache.
        key = (batch, tuple(cache.k.shape), cache.k.stride(), cache.k.dtype, device)
        buffers = self._buffers.get(key)
        if buffers is None:
            # Reused every step (a fill, not an allocation); positions stay contiguous so that ragged
            # and plain batches share one compiled graph.
            buffers = self._buffers[key] = tuple(torch.zeros(batch, dtype=torch.long, device=device) for _ in range(3))
        shared_slots, position_buffer, no_pad = buffers
        slots = cache.next_slots if cache.next_slots is not None else shared_slots.fill_(cache.length)
        # Always a buffer of its own: an argument aliasing another would be a different graph to torch.compile.
        positions = position_buffer.copy_(slots if positions is None else positions)
        args = (tokens, slots, positions, no_pad if pad is None else pad, cache.k, cache.v)
        try:
            if key in self._warm:
                logits = self._compiled(*args)
            else:
                # torch.compile keeps the graphs of `_step` per code object, shared by every CompiledDecoder of
                # the process (each model, dtype and batch size is one): its default limit of 8 would refuse a
                # server's padded batch sizes next to generate's. Raised only while a new shape compiles.
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    logits = self._compiled(*args)
        except Exception as exc:  # compiling failed: a missing C++ compiler, an unsupported device, ...
            if key in self._warm:
                raise  # this shape ran before: not a compilation problem
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"compiling the decoding step failed ({type(exc).__name__}: {first_line[:200]}); "
                            f"torch.compile needs a working C++ compiler on CPU; run without --compile") from None
        self._warm.add(key)
        cache.length += 1
        return logits

    @classmethod
    def for_model(cls, model, dtype: torch.dtype | None = None) -> "CompiledDecoder":
        """The model's compiled decoder, rebuilt (and recompiled) only when its weights or dtype changed."""
        dtype = dtype or model.embed_tokens.weight.dtype
        _require_compiled_dtype(dtype)
        return cached_for_weights(model, "compiled", dtype, lambda: cls(fold_for_decoding(model, dtype)))
