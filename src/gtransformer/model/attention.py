"""Grouped Query Attention: the one file that holds attention's math, for training, prefill and decoding.

    Attention (module)      q/k/v projections (or one fused qkv_proj, see `fuse_projections`), optional
                            QK-norm, RoPE, then: training and prefill, SDPA over n_kv_heads keys/values
                            (enable_gqa: never repeated in memory); one new token per row, `decode_attention`
    KVCache                 preallocated keys/values of every layer, written in place as tokens arrive;
                            `KVCache.rows` gives some rows of it, optionally with each row's next token at
                            its own slot (continuous batching) and, for a compiled step, static shapes
    visible_keys            which cache slots a query may attend to: causal, after each row's first slot
                            (left padding); the prefill's mask and every decoding step's
    decode_attention        one new query per row against the cache: each K/V head's G query heads as a
                            short query sequence (SDPA eagerly, fusible reductions under torch.compile)

`GPT.forward` is the only caller of `Attention`: training, prefill, eager and compiled decoding steps
all run this code, so a new attention variant (a sliding window, ALiBi, another score function) is
written here, once, and its option added to `config.ModelConfig`.

Shapes: B rows, T new tokens, H query heads, K key/value heads, G = H / K query heads per key/value head,
D head dim, S cache slots.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from gtransformer.errors import UserError
from gtransformer.model.config import ModelConfig
from gtransformer.model.primitives import RMSNorm, apply_rope


def visible_keys(key_slots_S: torch.Tensor, query_slots: torch.Tensor, first_slot_B: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, Q, S) mask: a query at slot q of row b sees key slot s when first_slot[b] <= s <= q.

    query_slots: (Q,) slots shared by every row, or (B, Q) each row's own. first_slot_B: (B,) each row's
    first real slot (after its left padding), or (1,) for every row. A padding query (q < first_slot)
    sees itself only: an all-masked row would be NaN, and NaN leaks through 0-weights.
    """
    queries = query_slots[None, None, :, None] if query_slots.dim() == 1 else query_slots[:, None, :, None]
    keys = key_slots_S[None, None, None, :]
    return ((keys <= queries) & (keys >= first_slot_B[:, None, None, None])) | (keys == queries)


def check_context(config: ModelConfig, total: int, what: str = "the input") -> None:
    """The one check of a length against the model's context: an input, prompt + new tokens, a cache's size."""
    if total > config.context_length:
        size = f"{what} = {total} tokens" if "+" in what else f"{what} of {total} tokens"
        raise UserError(f"{size} exceeds the model's context_length ({config.context_length}); "
                        f"shorten the prompt or lower max_new_tokens")


def decode_attention(q_BKGD: torch.Tensor, keys_BKSD: torch.Tensor, values_BKSD: torch.Tensor,
                     visible_B11S: torch.Tensor | None, scale: float, fused: bool = False) -> torch.Tensor:
    """One query per row and head against the cached keys/values -> (B, K, G, D) in q's dtype (float32 when fused).

    Each K/V head's group of G query heads attends as a short query sequence, so GQA needs no repeated
    keys/values. visible_B11S: boolean mask (True = attend), or None (all visible). fused=True spells
    the same math as broadcast multiply-and-sum reductions in float32 (q rounded to the cache's dtype
    first), which torch.compile fuses with the ops around them; eagerly one SDPA call is fastest.
    """
    if not fused:
        return F.scaled_dot_product_attention(q_BKGD, keys_BKSD, values_BKSD, attn_mask=visible_B11S, scale=scale)
    q_BKGD = q_BKGD.to(keys_BKSD.dtype).float() * scale
    scores_BKGS = (q_BKGD[:, :, :, None, :] * keys_BKSD[:, :, None, :, :].float()).sum(-1)
    if visible_B11S is not None:
        scores_BKGS = scores_BKGS.masked_fill(~visible_B11S, float("-inf"))
    probs_BKGS = scores_BKGS.softmax(-1)
    return (probs_BKGS[..., None] * values_BKSD[:, :, None, :, :].float()).sum(-2)


class KVCache:
    """Preallocated keys/values for all layers: (n_layers, B, n_kv_heads, max_len, head_dim) each.

    Written in place as tokens arrive; `length` is a host-side int (no sync to know it). `pad` holds
    the number of left-padding slots of each row, for batches of prompts of different lengths.

    Per-row slots (continuous batching): `rows(start, stop, next_slots)` is a view of some rows whose
    next token goes into each row's own slot, `next_slots[b]`, at RoPE position `next_slots[b]`. Such a
    step writes one token per row (`write`) and row b's query sees its keys [pad[b], next_slots[b]].
    Eagerly `length` is then the longest row's slot, and keys are read up to it. With static=True (a
    compiled step: the same shapes every step) keys are read over all max_len slots, masked, and the
    view's `length` stays 0: the caller has checked the slots and advances its own cache.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype, pad: torch.Tensor | None = None):
        check_context(config, max_len, "a KV cache")
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.resolved_head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.pad = pad.to(device) if pad is not None else None
        self.slots = torch.arange(max_len, device=device)
        self.next_slots: torch.Tensor | None = None  # (B,) per-row slots of the next token, see `rows`
        self.row_mask: torch.Tensor | None = None  # (B, 1, 1, length + 1): what each row's query sees (eager)
        self.static = False

    def rows(self, start: int, stop: int, next_slots: list[int] | torch.Tensor | None = None,
             static: bool = False) -> KVCache:
        """Rows [start, stop) of this cache, sharing its memory (writes land in this cache).

        next_slots None: an empty view (length 0) to prefill a request into its own rows with
        `GPT.forward`. Otherwise one slot per row: the next step writes row b's token into slot
        next_slots[b] and masks its keys beyond it (pass `next_slots` as the position_ids too, less
        any left padding). static: read every slot (see the class docstring).
        """
        view = copy.copy(self)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.pad = None if self.pad is None else self.pad[start:stop]
        view.length, view.next_slots, view.row_mask, view.static = 0, None, None, False
        if next_slots is not None:
            highest = max(next_slots) if isinstance(next_slots, list) else int(next_slots.max())
            view.next_slots = torch.as_tensor(next_slots, device=self.slots.device)
            if highest >= self.max_len:
                raise UserError(f"KV cache holds {self.max_len} positions, {highest + 1} requested; "
                                f"allocate a larger cache")
            if view.pad is None:  # a tensor either way: a compiled step sees one kind of view
                view.pad = torch.zeros(stop - start, dtype=torch.long, device=self.slots.device)
            if static:
                view.static = True
            else:
                view.length = highest
                view.row_mask = visible_keys(self.slots[: highest + 1], view.next_slots[:, None], view.pad)
        return view

    def write(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor):
        """Store T new keys/values of `layer` -> (keys (B, K, S, D), values, mask or None) to attend over.

        Slots [length, length + T) of every row, or, after `rows(..., next_slots)`, one token per
        row at its own slot. `GPT.forward` advances `length` once all layers are written.
        """
        T = k_BKTD.shape[2]
        if self.next_slots is None:
            start, end = self.length, self.length + T
            keys_BKSD, values_BKSD = self.k[layer], self.v[layer]
            keys_BKSD.narrow(2, start, T).copy_(k_BKTD)
            values_BKSD.narrow(2, start, T).copy_(v_BKTD)
            return keys_BKSD.narrow(2, 0, end), values_BKSD.narrow(2, 0, end), self.mask(start, T)
        if T != 1:
            raise ValueError(f"a step at per-row slots writes one token per row, got {T}")
        B, K, _, D = k_BKTD.shape
        index_BK1D = self.next_slots.view(B, 1, 1, 1).expand(B, K, 1, D)
        self.k[layer].scatter_(2, index_BK1D, k_BKTD.to(self.k.dtype))
        self.v[layer].scatter_(2, index_BK1D, v_BKTD.to(self.v.dtype))
        if self.static:
            return self.k[layer], self.v[layer], visible_keys(self.slots, self.next_slots[:, None], self.pad)
        end = self.length + 1
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], self.row_mask

    def mask(self, start: int, n_new: int) -> torch.Tensor | None:
        """Boolean (B, 1, n_new, start + n_new) mask, or None when plain causal attention is exact."""
        if self.pad is None and (n_new == 1 or start == 0):
            return None
        end = start + n_new
        first = self.pad if self.pad is not None else torch.zeros(1, dtype=torch.long, device=self.slots.device)
        return visible_keys(self.slots[:end], self.slots[start:end], first)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.resolved_head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v rows in one matrix, after `fuse_projections`
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.d_model, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """q/k/v_proj become one `qkv_proj` (their rows stacked): one product a token instead of three.

        A decoding transform (`inference.decode_model`); the trained model keeps Hugging Face's names.
        """
        weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        self.qkv_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                  dtype=weight.dtype)
        self.qkv_proj.weight.copy_(weight)
        self.q_proj = self.k_proj = self.v_proj = None

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, d_model) -> q (B, H, T, D), k (B, K, T, D), v (B, K, T, D): projections, QK-norm, RoPE."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, T, H + 2 * K, D).transpose(1, 2)
            if cos.dtype != qkv.dtype:
                cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
            if self.q_norm is None:  # one rotation for the query and key heads together
                qk = apply_rope(qkv[:, : H + K], cos, sin)
                return qk[:, :H], qk[:, H:], qkv[:, H + K :]
            q, k, v = qkv.split((H, K, K), dim=1)
        else:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
            k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)
            v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos.dtype != q.dtype:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x, cos, sin)

        if cache is None:
            # Keys/values keep n_kv_heads; enable_gqa shares them without repeating in memory.
            if q.device.type == "cpu" and q.dtype == torch.bfloat16 and self.training:
                # CPU's flash attention trains ~3x faster in float32 than in bfloat16 (benchmarks/RESULTS.md,
                # "bfloat16 on CPU"); the projections stay bfloat16. Autocast would cast q, k, v back: off here.
                with torch.autocast("cpu", enabled=False):
                    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                       enable_gqa=K != H).to(q.dtype)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)
        else:
            k_all, v_all, mask = cache.write(self.layer, k, v)
            if T == 1:  # a decoding step: each K/V head's G query heads attend as one short sequence
                y = decode_attention(q.reshape(B, K, H // K, D), k_all, v_all, mask, D**-0.5,
                                     fused=torch.compiler.is_compiling())
                return self.o_proj(y.reshape(B, 1, H * D).to(x.dtype))
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=K != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
