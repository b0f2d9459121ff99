"""Single-token decoding compiled by torch.compile: one fused graph per step, nothing read back to the host.

Why it is fast: at batch 1 a step is ~50 matrix-vector products among ~150 small
ops. Eager PyTorch pays a dispatch for each op, and its matrix-vector kernels read
the weights at 7-19 GB/s on this project's CPU. Here every product is written as a
multiply-and-sum over the contiguous `in` axis of an nn.Linear-layout weight, which
inductor turns into one vectorised loop over that weight (~22 GB/s, float32), and the
norms, RoPE, attention, routing and SwiGLU around them fuse into the same loops.
Measured on the tiny preset with two threads: 0.8-0.9 ms a step against 2.2-2.8 ms for
the eager `generate.Decoder`; larger presets are bound by reading their weights and gain
less (benchmarks/RESULTS.md).

Static shapes make one graph serve every step: the KV cache spans the whole context,
and attention masks the slots not written yet (and each row's left padding). The
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
from gtransformer.model.moe import select_experts
from gtransformer.runtime import require_cpp_compiler


def _matvec(weight_OI: torch.Tensor, h_BI: torch.Tensor) -> torch.Tensor:
    """h @ weight.T accumulated in float32, as a reduction inductor vectorises along `in`."""
    return (weight_OI.float() * h_BI.float()[:, None, :]).sum(-1)


class CompiledDecoder:
    """A `GPT`'s weights prepared once for compiled decoding steps over a context-long `KVCache`.

    `dtype` is the weights' dtype during decoding (None: the model's); products
    accumulate in float32 and the residual stream keeps the model's dtype, as in
    `GPT.forward`. RMSNorm weights (times sqrt(d_model)) are folded into the
    matrices that read the normalised vector, as `generate.DecodeWeights` does.
    """

    def __init__(self, model, dtype: torch.dtype | None = None):
        config = model.config
        embed = model.embed_tokens.weight
        self.model_dtype = embed.dtype
        dtype = dtype or self.model_dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise UserError(f"compiled decoding takes float32, bfloat16 or float16 weights, not {dtype}; "
                            f"drop --compile or choose another --decode-dtype")
        require_cpp_compiler(embed.device, "run without --compile")
        self.config = config
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.resolved_head_dim
        self.eps = config.norm_eps
        self.embed = embed
        root_d = config.d_model**0.5

        def fold(weight: torch.Tensor, norm_weight: torch.Tensor | None = None, to=dtype) -> torch.Tensor:
            weight = weight.float()
            if norm_weight is not None:
                weight = weight * (norm_weight.float() * root_d)
            return weight.to(to).contiguous()

        self.rope_cos, self.rope_sin = model.rope_cos.float(), model.rope_sin.float()
        self.layers = []
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            attn_norm, ffn_norm = block.input_layernorm.weight, block.post_attention_layernorm.weight
            layer = {
                "qkv": fold(torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)), attn_norm),
                "o": fold(attn.o_proj.weight),
                "q_norm": attn.q_norm.weight.float() if attn.q_norm is not None else None,
                "k_norm": attn.k_norm.weight.float() if attn.k_norm is not None else None,
            }
            if block.is_moe:
                layer["router"] = fold(mlp.gate.weight, ffn_norm, torch.float32)  # the router stays float32
                layer["expert_bias"] = mlp.gate.expert_bias.float() if mlp.gate.use_bias else None
                layer["top_k"] = mlp.gate.top_k
                layer["w13_EOI"] = fold(torch.cat((mlp.experts.w1, mlp.experts.w3), dim=1), ffn_norm)
                layer["w2_EOI"] = fold(mlp.experts.w2)
            dense = mlp.shared_experts if block.is_moe else mlp
            if dense is not None:
                layer["dense_w13"] = fold(torch.cat((dense.w1.weight, dense.w3.weight)), ffn_norm)
                layer["dense_w2"] = fold(dense.w2.weight)
            self.layers.append(layer)
        self.lm_head = fold(model.lm_head.weight, model.norm.weight)
        # On CPU a C++ wrapper (no Python per buffer, no size asserts) saves ~15% of a tiny-preset step.
        options = {"cpp_wrapper": True, "size_asserts": False} if embed.device.type == "cpu" else None
        self._compiled = torch.compile(self._step, fullgraph=True, dynamic=False, options=options)
        self._warm: set[tuple] = set()  # (batch, cache shape, dtype, device) already compiled
        self._buffers: dict[tuple, tuple[torch.Tensor, ...]] = {}

    # ------------------------------------------------------------------ the compiled step

    def _normalize(self, x_BM: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight (folded into the next matrix): x / sqrt(sum(x^2) + d * eps)."""
        x = x_BM.float()
        return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + x.shape[-1] * self.eps)

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps=self.eps)

    def _swiglu(self, w13_OI: torch.Tensor, w2_OI: torch.Tensor, h_BM: torch.Tensor) -> torch.Tensor:
        gate_up = _matvec(w13_OI, h_BM.to(w13_OI.dtype))
        gate, up = gate_up.chunk(2, dim=-1)
        return _matvec(w2_OI, (F.silu(gate) * up).to(w2_OI.dtype))

    def _experts(self, layer: dict, h_BM: torch.Tensor) -> torch.Tensor:
        weights_Bk, ids_Bk = select_experts(_matvec(layer["router"], h_BM), layer["top_k"], layer["expert_bias"])
        w13 = layer["w13_EOI"]
        h_BM = h_BM.to(w13.dtype).float()
        # Indexing the stacked weights by the ids fuses into the reduction: only the chosen experts are read.
        gate_up_BkO = (w13[ids_Bk].float() * h_BM[:, None, None, :]).sum(-1)
        gate_BkF, up_BkF = gate_up_BkO.chunk(2, dim=-1)
        act_BkF = (F.silu(gate_BkF) * up_BkF).to(w13.dtype).float()
        out_BkM = (layer["w2_EOI"][ids_Bk].float() * act_BkF[:, :, None, :]).sum(-1)
        return (out_BkM * weights_Bk[..., None]).sum(1)

    def _step(self, tokens_B, slot_1, positions_B, pad_B, cache_k, cache_v):
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        B, G, S = tokens_B.shape[0], H // K, cache_k.shape[3]
        x_BM = F.embedding(tokens_B, self.embed)
        cos_B1D = self.rope_cos.index_select(0, positions_B)[:, None, :]
        sin_B1D = self.rope_sin.index_select(0, positions_B)[:, None, :]
        slots_S = torch.arange(S, device=tokens_B.device)
        visible_B11S = ((slots_S <= slot_1) & (slots_S >= pad_B[:, None]))[:, None, None, :]
        for i, layer in enumerate(self.layers):
            qkv = _matvec(layer["qkv"], self._normalize(x_BM).to(layer["qkv"].dtype))
            q_BHD = qkv[:, : H * D].view(B, H, D)
            k_BKD = qkv[:, H * D : (H + K) * D].view(B, K, D)
            v_BKD = qkv[:, (H + K) * D :].view(B, K, D)
            if layer["q_norm"] is not None:
                q_BHD, k_BKD = self._head_norm(q_BHD, layer["q_norm"]), self._head_norm(k_BKD, layer["k_norm"])
            # RoPE in HF's rotate_half layout, in float32 as the model's tables are.
            half = D // 2
            q_BHD = q_BHD * cos_B1D + torch.cat((-q_BHD[..., half:], q_BHD[..., :half]), -1) * sin_B1D
            k_BKD = k_BKD * cos_B1D + torch.cat((-k_BKD[..., half:], k_BKD[..., :half]), -1) * sin_B1D
            # The model's attention reads keys/values at the cache dtype; round q the same way.
            q_BHD = q_BHD.to(cache_k.dtype).float()
            keys_BKSD, values_BKSD = cache_k[i], cache_v[i]
            keys_BKSD.index_copy_(2, slot_1, k_BKD[:, :, None, :].to(cache_k.dtype))
            values_BKSD.index_copy_(2, slot_1, v_BKD[:, :, None, :].to(cache_v.dtype))
            q_BKGD = q_BHD.view(B, K, G, D) * D**-0.5
            scores_BKGS = (q_BKGD[:, :, :, None, :] * keys_BKSD[:, :, None, :, :].float()).sum(-1)
            probs_BKGS = scores_BKGS.masked_fill(~visible_B11S, float("-inf")).softmax(-1)
            y_BKGD = (probs_BKGS[..., None] * values_BKSD[:, :, None, :, :].float()).sum(-2)
            y_BHD = y_BKGD.reshape(B, H * D).to(layer["o"].dtype)
            x_BM = (x_BM.float() + _matvec(layer["o"], y_BHD)).to(x_BM.dtype)
            h_BM = self._normalize(x_BM).to(x_BM.dtype)
            delta_BM = torch.zeros_like(h_BM, dtype=torch.float32)
            if "w13_EOI" in layer:
                delta_BM = delta_BM + self._experts(layer, h_BM)
            if "dense_w13" in layer:
                delta_BM = delta_BM + self._swiglu(layer["dense_w13"], layer["dense_w2"], h_BM)
            x_BM = (x_BM.float() + delta_BM).to(x_BM.dtype)
        return _matvec(self.lm_head, self._normalize(x_BM).to(x_BM.dtype).to(self.lm_head.dtype))

    # ------------------------------------------------------------------ driving it

    def step(self, tokens: torch.Tensor, cache, positions: torch.Tensor | None, pad: torch.Tensor | None) -> torch.Tensor:
        """tokens (B,) go into slot `cache.length` of a context-long cache -> logits (B, vocab) float32.

        positions (B,): each row's RoPE position (None: every row at `cache.length`); pad (B,): each
        row's count of left-padding slots (None: no padding).
        """
        batch, device = tokens.shape[0], tokens.device
        key = (batch, tuple(cache.k.shape), cache.k.dtype, device)
        buffers = self._buffers.get(key)
        if buffers is None:
            # Reused every step (a fill, not an allocation); positions stay contiguous so that ragged
            # and plain batches share one compiled graph.
            buffers = self._buffers[key] = (torch.zeros(1, dtype=torch.long, device=device),
                                            torch.zeros(batch, dtype=torch.long, device=device),
                                            torch.zeros(batch, dtype=torch.long, device=device))
        slot, default_positions, no_pad = buffers
        slot.fill_(cache.length)
        if positions is None:
            positions = default_positions.fill_(cache.length)
        args = (tokens, slot, positions, no_pad if pad is None else pad, cache.k, cache.v)
        try:
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
        return cached_for_weights(model, "_compiled_decoder", dtype, lambda: cls(model, dtype))


def cached_for_weights(model, attribute: str, dtype, build, keep: bool = True):
    """build() cached on the model under `attribute`, rebuilt only when a weight (or dtype) changed.

    The key changes whenever a weight is replaced or modified in place (an optimizer step bumps
    `_version`). keep=False returns a matching cached value but keeps nothing on the model.
    """
    tensors = [*model.parameters(), *model.buffers()]
    signature = (dtype, *((t.data_ptr(), t._version) for t in tensors))
    cached = model.__dict__.get(attribute)
    if not keep or cached is None or cached[0] != signature:
        model.__dict__.pop(attribute, None)  # free the old copies before building new ones
    if cached is not None and cached[0] == signature:
        return cached[1]
    value = build()
    if keep:
        model.__dict__[attribute] = (signature, value)
    return value
