"""Where the MoE routers send tokens: one sentence token by token, and expert loads over a split.

The routers are read through forward hooks on each MoE layer's `Router` (`block.mlp.gate`), whose
output is what the model itself used: (logits, renormalised top-k weights, expert ids). Nothing in
the model changes.

    capture_routing         input ids -> each MoE layer's router logits, top-k weights and expert ids
    route_sentence          a text -> tidy rows, one per (token, MoE layer): `RoutedToken`
    routing_html            those rows as an HTML table, one colour per expert (for the notebook)
    routing_figure          the same as a matplotlib Figure (the README's picture)
    routing_stats           expert loads, router entropy and token-expert counts over a split (batched)
    expert_load_figure      the loads as a heatmap Figure (MoE layer x expert)
    top_tokens_per_expert   the tokens one layer sends most often to each expert (top_tokens_html: as a table)

Shapes: B rows, T tokens, N = B * T tokens flattened, E experts, K = top_k, L MoE layers, V vocabulary.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from gtransformer.analysis.capture import StopForward, encode_sentence, run_until, visible
from gtransformer.analysis.tokens import token_text
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.model.model import GPT


class LayerRouting(NamedTuple):
    """One MoE layer's router output for N = B * T tokens (row-major over B, T)."""

    layer: int  # index of the block in model.layers
    logits_NE: torch.Tensor  # float32 router logits
    weights_NK: torch.Tensor  # renormalised top-k weights (the mixing weights)
    ids_NK: torch.Tensor  # chosen experts, highest weight first (with balance="bias": biased choice)


def moe_layers(model: GPT) -> list[int]:
    """Indices of the model's MoE blocks."""
    return [i for i, block in enumerate(model.layers) if block.is_moe]


def capture_routing(model: GPT, input_ids_BT: torch.Tensor) -> list[LayerRouting]:
    """Run the model on input_ids_BT and return what each MoE layer's router produced, in layer order.

    The forward stops at the last router (its experts and lm_head are not needed). Use a model in eval mode.
    """
    layers = moe_layers(model)
    captured: dict[int, LayerRouting] = {}
    handles = []
    for i in layers:
        def hook(module, inputs, output, layer=i):
            logits_NE, weights_NK, ids_NK = output
            captured[layer] = LayerRouting(layer, logits_NE.detach(), weights_NK.detach(), ids_NK.detach())
            if layer == layers[-1]:
                raise StopForward
        handles.append(model.layers[i].mlp.gate.register_forward_hook(hook))
    try:
        run_until(model, input_ids_BT)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in layers]


@dataclass(frozen=True)
class RoutedToken:
    """One row of the routing table: a token of the sentence in one MoE layer."""

    position: int  # index of the token in the sentence
    token_id: int
    token: str  # token_text: the token's exact bytes as text
    layer: int  # index of the block in model.layers
    experts: tuple[int, ...]  # top-k experts, highest weight first
    weights: tuple[float, ...]  # their mixing weights (sum to 1)


def route_sentence(model: GPT, tokenizer: Tokenizer, text: str) -> list[RoutedToken]:
    """Each token's top-k experts and weights in every MoE layer; rows ordered by layer, then position."""
    ids = encode_sentence(model, tokenizer, text)
    routing = capture_routing(model, torch.tensor([ids]))
    rows = []
    for layer in routing:
        for position, (experts, weights) in enumerate(zip(layer.ids_NK.tolist(), layer.weights_NK.tolist())):
            rows.append(RoutedToken(position, ids[position], token_text(tokenizer, ids[position]), layer.layer,
                                    tuple(experts), tuple(weights)))
    return rows


def expert_colours(n_experts: int) -> list[str]:
    """One light hex colour per expert (tab10 / tab20, or a sampled rainbow beyond 20), readable under black text."""
    if n_experts <= 10:
        base = [colormaps["tab10"](i) for i in range(n_experts)]
    elif n_experts <= 20:
        base = [colormaps["tab20"](i) for i in range(n_experts)]
    else:
        base = [colormaps["turbo"](i / (n_experts - 1)) for i in range(n_experts)]
    return [to_hex(0.45 * np.array(to_rgb(c)) + 0.55) for c in base]


def _table(rows: list[RoutedToken]) -> tuple[list[int], list[int], dict[tuple[int, int], RoutedToken]]:
    positions = sorted({r.position for r in rows})
    layers = sorted({r.layer for r in rows})
    return positions, layers, {(r.position, r.layer): r for r in rows}


def routing_html(rows: list[RoutedToken], n_experts: int) -> str:
    """An HTML table: one row per token, one column per MoE layer holding "e{expert} {weight}" chips, coloured per expert."""
    colours = expert_colours(n_experts)
    positions, layers, cell = _table(rows)
    chip = ('<span style="background:{c};padding:1px 4px;margin-right:2px;border-radius:3px;'
            'font-family:monospace">e{e} {w:.2f}</span>')
    header = "<tr><th>#</th><th>token</th>" + "".join(f"<th>layer {l}</th>" for l in layers) + "</tr>"
    body = []
    for p in positions:
        first = cell[(p, layers[0])]
        chips = ["".join(chip.format(c=colours[e], e=e, w=w) for e, w in zip(cell[(p, l)].experts, cell[(p, l)].weights))
                 for l in layers]
        body.append(f"<tr><td>{p}</td><td style=\"font-family:monospace;white-space:pre\">"
                    f"{html.escape(visible(first.token))}</td>" + "".join(f"<td>{c}</td>" for c in chips) + "</tr>")
    legend = " ".join(chip.format(c=c, e=e, w=1.0).replace(" 1.00", "") for e, c in enumerate(colours))
    return (f'<div><table style="border-collapse:collapse;text-align:left">{header}{"".join(body)}</table>'
            f"<p>experts: {legend}</p></div>")


def routing_figure(rows: list[RoutedToken], n_experts: int, title: str | None = None) -> Figure:
    """Tokens left to right; per MoE layer, K rows of cells coloured by the chosen expert and labelled with its weight."""
    colours = expert_colours(n_experts)
    positions, layers, cell = _table(rows)
    top_k = len(rows[0].experts)
    n_rows = len(layers) * top_k
    fig = Figure(figsize=(max(6.0, 0.62 * len(positions) + 1.6), 0.42 * n_rows + 2.2))
    ax = fig.subplots()
    for x, p in enumerate(positions):
        for li, layer in enumerate(layers):
            r = cell[(p, layer)]
            for slot, (e, w) in enumerate(zip(r.experts, r.weights)):
                y = li * top_k + slot
                ax.add_patch(Rectangle((x, y), 1, 1, facecolor=colours[e], edgecolor="white", linewidth=1.5))
                ax.text(x + 0.5, y + 0.5, f"e{e}\n{w:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlim(0, len(positions))
    ax.set_ylim(n_rows, 0)
    ax.set_xticks([x + 0.5 for x in range(len(positions))])
    ax.set_xticklabels([visible(cell[(p, layers[0])].token) for p in positions], rotation=45, ha="right",
                       fontsize=8, fontfamily="monospace")
    ax.set_yticks([li * top_k + s + 0.5 for li in range(len(layers)) for s in range(top_k)])
    ax.set_yticklabels([f"layer {l} · #{s + 1}" for l in layers for s in range(top_k)], fontsize=8)
    for li in range(1, len(layers)):
        ax.axhline(li * top_k, color="black", linewidth=1)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    handles = [Patch(facecolor=c, label=f"expert {e}") for e, c in enumerate(colours)]
    legend_rows = math.ceil(n_experts / 8)
    fig.legend(handles=handles, loc="lower center", ncol=min(n_experts, 8), fontsize=7, frameon=False)
    ax.set_title(title or "top-k experts of each token (weight under the expert id)", fontsize=9)
    fig.tight_layout(rect=(0, 0.05 * legend_rows + 0.02, 1, 1))
    return fig


@dataclass
class RoutingStats:
    """Routing over many tokens: what `routing_stats` counted, per MoE layer."""

    layers: list[int]  # indices of the MoE blocks, the rows of the arrays below
    n_tokens: int  # tokens routed by every layer
    top_k: int
    counts_LE: np.ndarray  # routed token-slots per expert (each token fills top_k slots)
    entropy_sum_L: np.ndarray  # sum over tokens of the router softmax's entropy (nats)
    token_counts_LEV: np.ndarray  # times each token id was sent to each expert
    token_totals_V: np.ndarray  # occurrences of each token id

    @property
    def load_LE(self) -> np.ndarray:
        """Fraction of routed token-slots per expert (each row sums to 1)."""
        return self.counts_LE / max(self.n_tokens * self.top_k, 1)

    @property
    def entropy_L(self) -> np.ndarray:
        """Mean entropy of the router softmax per layer (nats)."""
        return self.entropy_sum_L / max(self.n_tokens, 1)

    @property
    def max_entropy(self) -> float:
        """log(E): the entropy of a uniform router, the upper bound of entropy_L."""
        return math.log(self.counts_LE.shape[1])


def windows(tokens_N: np.ndarray, max_tokens: int, context: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The first min(max_tokens, N) tokens as consecutive windows of `context` tokens, batch_size per (B, T) batch.

    A shorter last window (the remainder) comes alone in a batch of its own.
    """
    total = min(max_tokens, len(tokens_N))
    full = total // context
    ids_N = torch.from_numpy(np.asarray(tokens_N[:total], dtype=np.int64))
    for start in range(0, full, batch_size):
        stop = min(start + batch_size, full)
        yield ids_N[start * context : stop * context].view(stop - start, context)
    if total > full * context:
        yield ids_N[full * context :].view(1, -1)


def routing_stats(model: GPT, tokens_N: np.ndarray, max_tokens: int = 20000, batch_size: int = 8,
                  context: int | None = None) -> RoutingStats:
    """Count expert loads, router entropy and token-expert pairs over the first `max_tokens` tokens of a split.

    The tokens are cut into consecutive windows of `context` tokens (default: the model's context_length).
    """
    config = model.config
    context = context or config.context_length
    layers = moe_layers(model)
    E, V = config.n_experts, config.vocab_size
    counts_LE = np.zeros((len(layers), E), dtype=np.int64)
    entropy_sum_L = np.zeros(len(layers), dtype=np.float64)
    token_counts_LEV = np.zeros((len(layers), E, V), dtype=np.int64)
    token_totals_V = np.zeros(V, dtype=np.int64)
    n_tokens = 0
    for input_ids_BT in windows(tokens_N, max_tokens, context, batch_size):
        flat_N = input_ids_BT.reshape(-1)
        n_tokens += flat_N.numel()
        token_totals_V += np.bincount(flat_N.numpy(), minlength=V)
        for li, layer in enumerate(capture_routing(model, input_ids_BT)):
            ids_NK = layer.ids_NK.cpu()
            counts_LE[li] += np.bincount(ids_NK.reshape(-1).numpy(), minlength=E)
            probs_NE = layer.logits_NE.float().softmax(dim=-1)
            entropy_sum_L[li] += float(-(probs_NE * probs_NE.clamp_min(1e-20).log()).sum())
            pairs = (ids_NK * V + flat_N[:, None]).reshape(-1).numpy()
            token_counts_LEV[li] += np.bincount(pairs, minlength=E * V).reshape(E, V)
    return RoutingStats(layers, n_tokens, config.top_k, counts_LE, entropy_sum_L, token_counts_LEV, token_totals_V)


def expert_load_figure(stats: RoutingStats) -> Figure:
    """Heatmap of the fraction of routed token-slots per expert (columns) in each MoE layer (rows)."""
    load_LE = stats.load_LE
    L, E = load_LE.shape
    fig = Figure(figsize=(max(5.0, 0.6 * E + 2.5), 0.5 * L + 2))
    ax = fig.subplots()
    image = ax.imshow(load_LE, cmap="viridis", aspect="auto", vmin=0)
    for l in range(L):
        for e in range(E):
            ax.text(e, l, f"{load_LE[l, e]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if load_LE[l, e] < 0.6 * load_LE.max() else "black")
    ax.set_xticks(range(E))
    ax.set_yticks(range(L))
    ax.set_yticklabels([str(l) for l in stats.layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"expert load over {stats.n_tokens} tokens (uniform = {1 / E:.3f})", fontsize=10)
    fig.colorbar(image, ax=ax, label="fraction of token-slots")
    fig.tight_layout()
    return fig


def top_tokens_per_expert(stats: RoutingStats, tokenizer: Tokenizer, layer: int, n: int = 8, by: str = "count",
                          min_count: int = 5) -> dict[int, list[tuple[str, int, float]]]:
    """expert -> its n top tokens in MoE block `layer`, as (token text, times sent there, share of the token's occurrences).

    by="count": the tokens the expert receives most often (frequent tokens dominate).
    by="share": the tokens most specific to the expert, among tokens seen at least `min_count` times.
    """
    if layer not in stats.layers:
        raise UserError(f"layer {layer} is not a MoE layer; MoE layers: {stats.layers}")
    if by not in ("count", "share"):
        raise ValueError(f'by={by!r} must be "count" or "share"')
    counts_EV = stats.token_counts_LEV[stats.layers.index(layer)]
    share_EV = counts_EV / np.maximum(stats.token_totals_V, 1)[None, :]
    result = {}
    for e in range(counts_EV.shape[0]):
        if by == "count":
            order = np.lexsort((np.arange(counts_EV.shape[1]), -counts_EV[e]))
        else:
            eligible = stats.token_totals_V >= min_count
            order = np.lexsort((np.arange(counts_EV.shape[1]), -counts_EV[e], -np.where(eligible, share_EV[e], -1.0)))
        order = [v for v in order[:n] if counts_EV[e, v] > 0]
        result[e] = [(token_text(tokenizer, v), int(counts_EV[e, v]), float(share_EV[e, v])) for v in order]
    return result


def top_tokens_html(top: dict[int, list[tuple[str, int, float]]], n_experts: int) -> str:
    """`top_tokens_per_expert`'s result as an HTML table: one row per expert (in its colour), its tokens with counts."""
    colours = expert_colours(n_experts)
    rows = []
    for e, entries in top.items():
        cells = ", ".join(f'<code style="white-space:pre">{html.escape(visible(text))}</code> {count} ({share:.0%})'
                          for text, count, share in entries)
        rows.append(f'<tr><td style="background:{colours[e]}">e{e}</td><td style="text-align:left">{cells}</td></tr>')
    header = "<tr><th>expert</th><th>tokens: times sent there (share of the token's occurrences)</th></tr>"
    return f'<table style="border-collapse:collapse">{header}{"".join(rows)}</table>'
