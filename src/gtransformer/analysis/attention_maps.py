"""Attention probabilities of one layer, recomputed from the layer's own inputs (no change to the model).

A forward hook on `model.layers[layer].self_attn` captures its input (the normed residual stream and
the RoPE cos/sin it was given) and its output. The queries and keys come from the layer's own
`Attention.qkv` (projections, optional QK-norm, RoPE: what its forward uses), and the causal mask is
`model.attention.visible_keys`; tests check that probs @ V through o_proj
gives back the layer's own output.

    causal_probs          q, k -> softmax attention probabilities, GQA (query head h reads K/V head h // G)
    capture_attention     input ids -> probabilities, values and the layer's real output (`AttentionCapture`)
    sentence_attention    a text -> `AttentionMaps` (tokens + probabilities of every query head)
    attention_figure      the G query heads sharing one K/V head, side by side (a matplotlib Figure)

Shapes: B rows, T tokens, C model width, H query heads, K key/value heads, G = H / K query heads per
key/value head, D head dim. Query head h belongs to K/V head h // G (SDPA's enable_gqa layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from matplotlib.figure import Figure

from gtransformer.analysis.capture import StopForward, encode_sentence, run_until, visible
from gtransformer.analysis.tokens import token_text
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.model.attention import visible_keys
from gtransformer.model.model import GPT


def causal_probs(q_BHTD: torch.Tensor, k_BKTD: torch.Tensor) -> torch.Tensor:
    """float32 probs_BHTT = softmax(q k^T / sqrt(D)) under the causal mask; each K/V head serves G query heads."""
    H, K, T, D = q_BHTD.shape[1], k_BKTD.shape[1], q_BHTD.shape[2], q_BHTD.shape[3]
    k_BHTD = k_BKTD.repeat_interleave(H // K, dim=1)
    scores_BHTT = (q_BHTD.float() @ k_BHTD.float().transpose(-1, -2)) / math.sqrt(D)
    slots_T = torch.arange(T, device=q_BHTD.device)
    visible_11TT = visible_keys(slots_T, slots_T, torch.zeros(1, dtype=torch.long, device=q_BHTD.device))
    return scores_BHTT.masked_fill(~visible_11TT, float("-inf")).softmax(dim=-1)


class AttentionCapture(NamedTuple):
    """One attention layer on one batch: recomputed probabilities and values, and the layer's own output."""

    probs_BHTT: torch.Tensor  # float32 attention probabilities (each row sums to 1 over visible keys)
    v_BKTD: torch.Tensor  # the values those probabilities weigh
    output_BTC: torch.Tensor  # what the layer returned in the model's forward (after o_proj)


def capture_attention(model: GPT, input_ids_BT: torch.Tensor, layer: int) -> AttentionCapture:
    """Run the model on input_ids_BT up to block `layer`'s attention; rebuild its probabilities from its captured input."""
    if not 0 <= layer < len(model.layers):
        raise UserError(f"layer {layer} does not exist; the model has layers 0..{len(model.layers) - 1}")
    attn = model.layers[layer].self_attn
    captured = {}

    def hook(module, args, output):
        x_BTC, cos, sin = args[:3]
        captured["qkv"] = module.qkv(x_BTC, cos, sin)
        captured["output"] = output
        raise StopForward  # later layers and lm_head are not needed

    handle = attn.register_forward_hook(hook)
    try:
        run_until(model, input_ids_BT)
    finally:
        handle.remove()
    q_BHTD, k_BKTD, v_BKTD = captured["qkv"]
    return AttentionCapture(causal_probs(q_BHTD, k_BKTD), v_BKTD, captured["output"])


@dataclass
class AttentionMaps:
    """Attention of one sentence in one layer."""

    layer: int
    tokens: list[str]  # token_text of each token
    probs_HTT: torch.Tensor  # float32, CPU; probs_HTT[h, query, key]
    n_kv_heads: int

    @property
    def group_size(self) -> int:
        """G: query heads per key/value head."""
        return self.probs_HTT.shape[0] // self.n_kv_heads

    def heads_of_group(self, kv_head: int) -> list[int]:
        """The query heads that read K/V head `kv_head`."""
        return list(range(kv_head * self.group_size, (kv_head + 1) * self.group_size))


def sentence_attention(model: GPT, tokenizer: Tokenizer, text: str, layer: int) -> AttentionMaps:
    """The attention probabilities of every query head of block `layer` over `text`'s tokens."""
    ids = encode_sentence(model, tokenizer, text)
    capture = capture_attention(model, torch.tensor([ids]), layer)
    return AttentionMaps(layer, [token_text(tokenizer, i) for i in ids], capture.probs_BHTT[0].cpu(),
                         model.config.n_kv_heads)


def attention_figure(maps: AttentionMaps, kv_head: int = 0, max_labels: int = 40) -> Figure:
    """The G query heads sharing K/V head `kv_head`, side by side: query tokens down, key tokens across."""
    if not 0 <= kv_head < maps.n_kv_heads:
        raise UserError(f"kv_head {kv_head} does not exist; the model has K/V heads 0..{maps.n_kv_heads - 1}")
    heads = maps.heads_of_group(kv_head)
    T = len(maps.tokens)
    side = min(max(2.6, 0.18 * T + 1.0), 6.0)
    fig = Figure(figsize=(side * len(heads) + 1.0, side + 0.8), layout="constrained")
    axes = fig.subplots(1, len(heads), squeeze=False)[0]
    labels = [visible(t) for t in maps.tokens]
    image = None
    for ax, h in zip(axes, heads):
        image = ax.imshow(maps.probs_HTT[h].numpy(), cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"query head {h}", fontsize=9)
        if T <= max_labels:
            ax.set_xticks(range(T))
            ax.set_xticklabels(labels, rotation=90, fontsize=7, fontfamily="monospace")
            ax.set_yticks(range(T))
            ax.set_yticklabels(labels if ax is axes[0] else [], fontsize=7, fontfamily="monospace")
        ax.set_xlabel("key")
    axes[0].set_ylabel("query")
    fig.suptitle(f"layer {maps.layer}, K/V head {kv_head}: its {len(heads)} query heads", fontsize=10)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="attention probability")
    return fig
