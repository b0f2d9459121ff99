"""Text generation: a preallocated KV cache, sampling, and streaming text; the `generate` command.

    prompts ─► left-pad to one batch ─► prefill (one forward, fills the cache)
            ─► loop: sample next token ─► forward 1 token per row (cache grows in place)
    tokens ─► TextStream: bytes of each token -> incremental UTF-8 decoder -> stop strings -> text

Left padding keeps every row's newest token in the same cache slot; each
row's RoPE positions start at 0 at its first real token, and padding slots
are masked, so a batched row produces the same logits as that prompt alone.
"""

from __future__ import annotations

import codecs
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gtransformer.errors import UserError
from gtransformer.inference.compiled_decode import CompiledDecoder, cached_for_weights
from gtransformer.model.model import GPT, KVCache
from gtransformer.model.moe import select_experts
from gtransformer.runtime import intra_op_threads


# "int8": int8 weights with a bfloat16 scale per output channel, bfloat16 matmul inputs (weight-only quantisation).
DECODE_DTYPES = {
    None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
}


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200  # upper bound on generated tokens per prompt
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep only the k most likely tokens (None/0 = all)
    top_p: float | None = None  # keep the smallest set whose probability reaches p (None/1 = all)
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output (CTRL / HF rule)
    stop_token_ids: Sequence[int] = ()  # generation of a row ends at any of these (not included in output)
    stop_strings: Sequence[str] = field(default_factory=tuple)  # text generation ends before any of these
    seed: int | None = None  # same seed, same model, same prompt -> same text
    # CPU decoding weights in this dtype ("float16", "bfloat16", "int8"); None = the model's. float16 halves
    # the bytes each step reads, int8 quarters them (measured ~1.5x and ~2x faster here), at the cost of
    # approximate logits (float16 rounding; int8 per-channel weights and bfloat16 matmul inputs).
    dtype: str | None = None
    # Decode through `compiled_decode.CompiledDecoder`: the step as one torch.compile graph (needs a C++
    # compiler on CPU; 15-25 s to compile once per process; tiny preset 2.2x, small 1.1x the eager decoder here).
    compile: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens = {self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise UserError(f"temperature = {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k = {self.top_k} must be >= 0 (0 = no top-k filter)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p = {self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty = {self.repetition_penalty} must be > 0 (1 = off)")
        if any(not s for s in self.stop_strings):
            raise UserError("stop strings must not be empty")
        if self.dtype not in DECODE_DTYPES:
            raise UserError(f"dtype = {self.dtype!r} must be one of {', '.join(map(str, DECODE_DTYPES))}")
        if self.dtype == "int8" and not int8_decode_available():
            raise UserError(f"dtype = \"int8\" needs torch.ops.aten._weight_int8pack_mm, missing in torch "
                            f"{torch.__version__}; use \"float16\"")
        if self.compile and self.dtype == "int8":
            raise UserError("compiled decoding takes float32, bfloat16 or float16 weights, not int8; "
                            "drop --compile or choose another --decode-dtype")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of already-seen tokens (so they always get less likely)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first one always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None, seen: torch.Tensor | None
) -> torch.Tensor:
    """logits (B, V) float32 -> next token ids (B,)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# CPU decoding steps of up to this many rows run on one intra-op thread: their matrix-vector
# products are too small to split, and on a busy machine waiting for a second thread costs
# more than the work (measured 4x slower with 2 threads on the shared 2-core box).
SINGLE_THREAD_MAX_BATCH = 4
# Prefills of up to this many tokens (batch x prompt) run on one thread as well.
SINGLE_THREAD_MAX_PREFILL = 256


def _right_operand(weight: torch.Tensor, dtype: torch.dtype, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """nn.Linear weight (out, in) -> R with h @ R == F.linear(h * input_scale, weight), in its fastest layout.

    Measured on this project's CPU (one thread, weights not in cache): a wide float32 weight
    (out > in) is read 1.1-2.7x faster as a contiguous (in, out) matrix (w13: 68 vs 137 us,
    lm_head: 409 vs 1090 us); narrow ones and float16 (whose kernel wants (out, in)) keep their layout.
    """
    if input_scale is not None:
        weight = weight * input_scale.to(weight.dtype)
    if dtype == torch.int8:
        return Int8Matrix(weight)
    weight = weight.to(dtype)
    wide = weight.shape[-2] > weight.shape[-1]
    if wide and dtype != torch.float16:
        return weight.transpose(-1, -2).contiguous()
    return weight.transpose(-1, -2)


class Int8Matrix:
    """A weight (out, in), or a stack (E, out, in), as int8 with one bfloat16 scale per output channel.

    Its matrix-vector product (`torch.ops.aten._weight_int8pack_mm`, the CPU kernel of weight-only
    int8 quantisation) reads a quarter of float32's bytes and was measured 2-3x faster than float32
    and 1.2-2x faster than float16 here (lm_head: 141 us vs 278 us float16, 409 us float32).
    """

    dtype = torch.bfloat16  # what the inputs are converted to

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor | None = None):
        if scales is None:
            weight = weight.float()
            scales = (weight.abs().amax(dim=-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            weight = (weight / scales[..., None]).round_().clamp_(-127, 127).to(torch.int8)
            scales = scales.to(torch.bfloat16)
        self.weight, self.scales = weight, scales

    def __getitem__(self, index: int) -> "Int8Matrix":
        return Int8Matrix(self.weight[index], self.scales[index])

    def matmul(self, h: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(h.to(torch.bfloat16), self.weight, self.scales)


def int8_decode_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _matmul(h: torch.Tensor, right) -> torch.Tensor:
    if isinstance(right, Int8Matrix):
        return right.matmul(h)
    return h.to(right.dtype) @ right


def _add_matmul_(out: torch.Tensor, h: torch.Tensor, right, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha * h @ right, in place, in one addmm when the dtypes allow it."""
    if isinstance(right, torch.Tensor) and out.dtype == right.dtype:
        return out.addmm_(h.to(right.dtype), right, alpha=alpha)
    return out.add_(_matmul(h, right), alpha=alpha)


class DecodeWeights:
    """A `GPT`'s weights laid out for single-token decoding; built once, reused while the weights do not change.

    q/k/v become one matrix, each SwiGLU's gate and up projections one matrix;
    every RMSNorm weight (times sqrt(d_model), see `Decoder._normalize`) is
    folded into the matrices that read the normalised vector; the attention
    scale and RoPE's rotate_half sign move into the RoPE tables (with qk_norm
    the scale cannot go into the weights); every matrix takes the layout its
    matrix-vector product reads fastest (`_right_operand`). With `dtype`
    (e.g. float16) the matrices are converted copies; router, attention and
    the residual stream keep the model's dtype.
    """

    def __init__(self, model, dtype: torch.dtype):
        config = model.config
        self.dtype = dtype
        self.matmul_dtype = Int8Matrix.dtype if dtype == torch.int8 else dtype
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.resolved_head_dim
        self.d_model, self.eps = config.d_model, config.norm_eps
        self.embed = model.embed_tokens.weight
        model_dtype = self.embed.dtype
        half = self.head_dim // 2
        head_scale = torch.ones(self.n_heads + self.n_kv_heads, 1, device=self.embed.device)
        head_scale[: self.n_heads] = self.head_dim**-0.5
        rotate_sign = torch.ones(self.head_dim, device=self.embed.device)
        rotate_sign[:half] = -1  # rotate_half(x) == roll(x, half) * rotate_sign
        self.rope_cos = (model.rope_cos[:, None, :] * head_scale).to(model_dtype)  # (context, H + Hkv, head_dim)
        self.rope_sin = (model.rope_sin[:, None, :] * head_scale * rotate_sign).to(model_dtype)
        root_d = self.d_model**0.5
        self.layers = []
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            attn_scale = block.input_layernorm.weight.float() * root_d
            ffn_scale = block.post_attention_layernorm.weight.float() * root_d
            qkv = torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
            layer = {
                "qkv": _right_operand(qkv, dtype, attn_scale),
                "o": _right_operand(attn.o_proj.weight, dtype),
                "q_norm": attn.q_norm.weight if attn.q_norm is not None else None,
                "k_norm": attn.k_norm.weight if attn.k_norm is not None else None,
                "router": None,
            }
            if block.is_moe:
                gate = mlp.gate
                # The router stays float32, as in Router.forward.
                layer["router"] = _right_operand(gate.weight.float(), torch.float32, ffn_scale)
                layer["expert_bias"] = gate.expert_bias if gate.use_bias else None
                layer["top_k"] = gate.top_k
                w13 = _right_operand(torch.cat((mlp.experts.w1, mlp.experts.w3), dim=1), dtype, ffn_scale)
                w2 = _right_operand(mlp.experts.w2, dtype)
                # Per-expert lists: picking an expert is then a list lookup, not an indexing op.
                layer["w13"] = [w13[e] for e in range(gate.n_experts)]
                layer["w2"] = [w2[e] for e in range(gate.n_experts)]
            shared = mlp.shared_experts if block.is_moe else mlp
            if shared is not None:
                shared_w13 = torch.cat((shared.w1.weight, shared.w3.weight))
                layer["shared_w13"] = _right_operand(shared_w13, dtype, ffn_scale)
                layer["shared_w2"] = _right_operand(shared.w2.weight, dtype)
            self.layers.append(layer)
        self.lm_head = _right_operand(model.lm_head.weight, dtype, model.norm.weight.float() * root_d)

    @classmethod
    def for_model(cls, model, dtype: torch.dtype | None = None, keep: bool = True) -> "DecodeWeights":
        """The model's prepared weights, rebuilt only when the weights (or dtype) changed since the last call.

        keep=False builds them without keeping them on the model: a model being trained changes its
        weights between samples, and the copies would only add to the training memory.
        """
        dtype = dtype or model.embed_tokens.weight.dtype
        return cached_for_weights(model, "_decode_weights", dtype, lambda: cls(model, dtype), keep)


# Decoding steps of up to this many rows take `Decoder`: it runs each row through its experts one by
# one, which beats the grouped GEMMs of the model's forward only while rows are few.
FAST_DECODE_MAX_BATCH = 4


def supports_fast_decode(model, batch: int) -> bool:
    # The fast step reads the chosen experts on the host, free on CPU but a sync per layer on CUDA,
    # so CUDA decodes through the model's own forward.
    on_cpu = isinstance(model, GPT) and model.embed_tokens.weight.device.type == "cpu"
    return on_cpu and batch <= FAST_DECODE_MAX_BATCH


class Decoder:
    """Single-token decoding steps of a `GPT` over a filled `KVCache`: `GPT.forward`'s math, inference only.

    Per layer: one q/k/v matvec, RoPE from indexed tables (roll + addcmul),
    the new K/V written into the cache slot in place, attention as two small
    matmuls over the cache, the residual add fused into o_proj (addmm); MoE
    runs each row through its top-k experts only (ids read on the host, free
    on CPU), one gate+up matvec and one down matvec with the mixing weight and
    the residual add fused (addmm alpha). Few ops per layer matter: at batch 1
    a step is ~200 tiny ops around ~50 matrix-vector products.
    """

    def __init__(self, weights: DecodeWeights, cache, pad: torch.Tensor | None):
        self.w = weights
        self.cache = cache
        self.k_layers, self.v_layers = cache.k.unbind(0), cache.v.unbind(0)  # (B, Hkv, max_len, head_dim) views
        self.key_bias = None  # additive -inf on each row's left-padding slots
        if pad is not None:
            slots = torch.arange(cache.max_len, device=pad.device)
            self.key_bias = torch.zeros(pad.shape[0], 1, 1, cache.max_len, device=pad.device, dtype=cache.k.dtype)
            self.key_bias.masked_fill_(slots < pad[:, None, None, None], float("-inf"))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(sum(x^2) + d * eps): RMSNorm without its weight and sqrt(d), both folded into the next matrix.

        One norm kernel and three in-place scalar ops, where F.rms_norm takes ~8 ops on CPU.
        """
        xf = x.float()
        inv = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().add_(self.w.d_model * self.w.eps).rsqrt_()
        return (xf * inv).to(x.dtype)

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps=self.w.eps)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.w.eps).to(x.dtype)

    def _route(self, h: torch.Tensor, layer: dict) -> tuple[list[list[int]], list[list[float]]]:
        """Router.forward's choice: experts ids and renormalised weights per row, as host lists."""
        top_weights, top_ids = select_experts(h.float() @ layer["router"], layer["top_k"], layer["expert_bias"])
        return top_ids.tolist(), top_weights.tolist()

    def _swiglu_(self, out: torch.Tensor, h: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, alpha=1.0) -> None:
        """out += alpha * w2(silu(w1 h) * w3 h), in place."""
        gate_up = _matmul(h, w13)
        hidden = gate_up.shape[-1] // 2
        _add_matmul_(out, F.silu(gate_up[:, :hidden]).mul_(gate_up[:, hidden:]), w2, alpha)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """tokens (B,) go into cache slot `cache.length` -> logits (B, vocab) float32; the cache advances by one.

        positions (B,): each row's RoPE position, or None when every row is at `cache.length`.
        """
        w, cache = self.w, self.cache
        slot = cache.length
        B = tokens.shape[0]
        H, Hkv, D = w.n_heads, w.n_kv_heads, w.head_dim
        if positions is None:
            cos, sin = w.rope_cos[slot], w.rope_sin[slot]
        else:
            cos, sin = w.rope_cos[positions], w.rope_sin[positions]
        x = F.embedding(tokens, w.embed)
        for i, layer in enumerate(w.layers):
            qkv = _matmul(self._normalize(x), layer["qkv"]).to(x.dtype)
            qk = qkv[:, : (H + Hkv) * D].view(B, H + Hkv, D)
            if layer["q_norm"] is not None:
                qk = torch.cat((self._head_norm(qk[:, :H], layer["q_norm"]), self._head_norm(qk[:, H:], layer["k_norm"])), 1)
            swapped_halves = qk.view(B, H + Hkv, 2, D // 2).flip(2).view(B, H + Hkv, D)
            qk = torch.addcmul(qk * cos, swapped_halves, sin)
            k_layer, v_layer = self.k_layers[i], self.v_layers[i]
            k_layer.select(2, slot).copy_(qk[:, H:])
            v_layer.select(2, slot).copy_(qkv[:, (H + Hkv) * D :].view(B, Hkv, D))
            keys, values = k_layer.narrow(2, 0, slot + 1), v_layer.narrow(2, 0, slot + 1)
            # Each K/V head's group of query heads attends as a short query sequence (no causal mask
            # within one position), so GQA needs no repeated K/V; the scale is already in q.
            mask = self.key_bias[..., : slot + 1] if self.key_bias is not None else None
            q = qk[:, :H].reshape(B, Hkv, H // Hkv, D)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0).reshape(B, H * D)
            x = _add_matmul_(x, y, layer["o"])
            h = self._normalize(x)
            h_matmul = h.to(w.matmul_dtype)  # once per layer, not once per expert
            if layer["router"] is not None:
                top_ids, top_weights = self._route(h, layer)
                for row, (experts, weights) in enumerate(zip(top_ids, top_weights)):
                    x_row, h_row = (x, h_matmul) if B == 1 else (x[row : row + 1], h_matmul[row : row + 1])
                    for e, weight in zip(experts, weights):
                        self._swiglu_(x_row, h_row, layer["w13"][e], layer["w2"][e], weight)
            if "shared_w13" in layer:
                self._swiglu_(x, h_matmul, layer["shared_w13"], layer["shared_w2"])
        cache.length += 1
        return _matmul(self._normalize(x), w.lm_head).float()


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    weight = model.embed_tokens.weight
    return weight.device, weight.dtype


@torch.inference_mode()
def iter_tokens(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> Iterator[list[int]]:
    """Yield, step by step, the next token of every row (-1 once a row has stopped).

    A row stops at one of `sampling.stop_token_ids` (which is not yielded, -1 is)
    or after `max_new_tokens`; the iterator ends when every row has stopped.
    """
    sampling.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token; pass some text or start from the end-of-text token")
    config = model.config
    lengths = [len(p) for p in prompts]
    longest, batch = max(lengths), len(prompts)
    total = longest + sampling.max_new_tokens
    if total > config.context_length:
        raise UserError(
            f"prompt ({longest} tokens) + max_new_tokens ({sampling.max_new_tokens}) = {total} exceeds the model's "
            f"context_length ({config.context_length}); shorten the prompt or lower max_new_tokens"
        )
    if sampling.max_new_tokens == 0:
        return
    device, dtype = model_device_dtype(model)
    was_training = model.training
    model.eval()
    try:
        pad = torch.tensor([longest - n for n in lengths], device=device)
        padded = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
        ragged = any(n != longest for n in lengths)
        # The compiled step has static shapes: its cache always spans the whole context.
        cache_len = config.context_length if sampling.compile else total
        cache = KVCache(config, batch, cache_len, device, dtype, pad=pad if ragged else None)
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(batch, config.vocab_size, dtype=torch.bool, device=device)
            real = torch.arange(longest, device=device)[None, :] >= pad[:, None]
            seen.scatter_(1, padded, real)
        stop_ids = torch.tensor(sorted(set(sampling.stop_token_ids)), device=device) if sampling.stop_token_ids else None
        finished = torch.zeros(batch, dtype=torch.bool, device=device)

        positions = torch.arange(longest, device=device)[None, :] - pad[:, None] if ragged else None
        few_rows = device.type == "cpu" and batch <= SINGLE_THREAD_MAX_BATCH
        # Compiled kernels fix their OpenMP thread count when built, so they run at the process setting.
        step_threads = 1 if few_rows and not sampling.compile else None
        # A short prompt's prefill is small work too: one thread avoids waiting on a busy second core.
        prefill_threads = step_threads if batch * longest <= SINGLE_THREAD_MAX_PREFILL else None
        with intra_op_threads(prefill_threads):
            logits = model(padded, cache=cache, position_ids=positions, last_logits_only=True).logits[:, -1].float()
        next_positions = torch.tensor(lengths, device=device)[:, None] if ragged else None
        decoder = compiled = None
        if sampling.compile:
            compiled = CompiledDecoder.for_model(model, DECODE_DTYPES[sampling.dtype])
        elif supports_fast_decode(model, batch):
            weights = DecodeWeights.for_model(model, DECODE_DTYPES[sampling.dtype], keep=not was_training)
            decoder = Decoder(weights, cache, pad if ragged else None)
        for step in range(sampling.max_new_tokens):
            with intra_op_threads(step_threads):
                token = sample_next(logits, sampling, generator, seen)
                if stop_ids is not None:
                    finished |= torch.isin(token, stop_ids)
                    token = token.masked_fill(finished, -1)
                ids = token.tolist()
            yield ids
            if all(t == -1 for t in ids) or step == sampling.max_new_tokens - 1:
                return
            with intra_op_threads(step_threads):
                feed = token.clamp(min=0)[:, None]
                if seen is not None:
                    seen.scatter_(1, feed, ~finished[:, None])
                if compiled is not None:
                    logits = compiled.step(feed[:, 0], cache, next_positions[:, 0] if next_positions is not None else None,
                                           pad if ragged else None)
                elif decoder is not None:
                    logits = decoder.step(feed[:, 0], next_positions[:, 0] if next_positions is not None else None)
                else:
                    logits = model(feed, cache=cache, position_ids=next_positions).logits[:, -1].float()
                if next_positions is not None:
                    next_positions += 1
    finally:
        model.train(was_training)


def generate(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[list[int]]:
    """Token ids generated after each prompt (stop tokens excluded)."""
    out: list[list[int]] = [[] for _ in prompts]
    for ids in iter_tokens(model, prompts, sampling):
        for row, token in zip(out, ids):
            if token >= 0:
                row.append(token)
    return out


class TextStream:
    """Turns one row's tokens into text pieces that never split a UTF-8 character or cross a stop string."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded text held back because it may be the start of a stop string
        self.stopped = False

    def feed(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(self.tokenizer.token_bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.pending
        cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.pending = ""
            return text[:cut]
        keep = 0
        if not final:
            # Hold back the longest tail that is a proper prefix of some stop string.
            for stop in self.stop_strings:
                for n in range(min(len(stop) - 1, len(text)), keep, -1):
                    if text.endswith(stop[:n]):
                        keep = n
                        break
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt)
    return ids if ids else [tokenizer.eot_id]


def _with_default_stops(tokenizer, sampling: SamplingConfig) -> SamplingConfig:
    if sampling.stop_token_ids:
        return sampling
    return SamplingConfig(**{**sampling.__dict__, "stop_token_ids": (tokenizer.eot_id,)})


def stream(model, tokenizer, prompt: str, sampling: SamplingConfig) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, as soon as each is decided.

    Stops at the end-of-text token (unless other stop ids are given), at a
    stop string (which is not yielded), or after max_new_tokens.
    """
    sampling = _with_default_stops(tokenizer, sampling)
    text = TextStream(tokenizer, sampling.stop_strings)
    for (token,) in iter_tokens(model, [prompt_ids(tokenizer, prompt)], sampling):
        if token < 0:
            break
        piece = text.feed(token)
        if piece:
            yield piece
        if text.stopped:
            return
    tail = text.finish()
    if tail:
        yield tail


def generate_text(model, tokenizer, prompts: Sequence[str], sampling: SamplingConfig) -> list[str]:
    """Continuations of several prompts, generated as one batch."""
    sampling = _with_default_stops(tokenizer, sampling)
    streams = [TextStream(tokenizer, sampling.stop_strings) for _ in prompts]
    pieces: list[list[str]] = [[] for _ in prompts]
    for ids in iter_tokens(model, [prompt_ids(tokenizer, p) for p in prompts], sampling):
        for row, token in enumerate(ids):
            if token >= 0:
                pieces[row].append(streams[row].feed(token))
        if all(s.stopped or t < 0 for s, t in zip(streams, ids)):
            break
    return ["".join(p) + s.finish() for p, s in zip(pieces, streams)]
