"""Mixture-of-Experts feed-forward: router, stacked SwiGLU experts, balancing losses.

Data flow of one MoE layer (tokens flattened to N x d_model):

    x ──► gate (float32 router) ──► softmax ──► top-k (+ bias when balance="bias")
      │                                            │ renormalised weights, expert ids
      └──► experts (grouped_mm or loop) ◄──────────┘
              sum_k weight_k * SwiGLU_{e_k}(x)   (+ shared experts, every token)

Dropless: every token reaches all of its top-k experts, whatever the load.
Expert weights are stacked tensors (n_experts, out, in), the nn.Linear layout
of each expert, so that exporting to Mixtral is a plain copy per expert.

Which expert path runs ("grouped" GEMMs or the per-expert "loop") is resolved
by an `ExpertPathChoice`, one per `GPT` shared by its MoE layers, which logs
each new choice once. Decoding runs this same code: few rows on CPU take
`Experts.forward_few_tokens`, a compiled step `Experts.forward_gathered`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from gtransformer.model.feed_forward import FeedForwardOutput, SwiGLU
from gtransformer.model.primitives import swiglu, swiglu_fused

logger = logging.getLogger(__name__)

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
# A CPU step of at most this many tokens (rows) is matrix-vector work: too small for grouped GEMMs'
# sort/scatter bookkeeping. The threshold of Experts.forward_few_tokens in a model as trained (a model
# prepared for decoding by `inference.decode_model` takes that path for every step).
FEW_TOKENS = 4
# oneDNN builds a bfloat16 CPU matmul kernel for each new shape (~2 ms, more than the product itself), and
# the rows per expert change every step; padding each expert's rows to a multiple of this keeps the shapes
# few and their kernels cached (benchmarks/RESULTS.md, "bfloat16 on CPU").
CPU_BF16_ROWS = 64


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.nn.functional.grouped_mm runs for this device and dtype.

    CPU kernels exist from PyTorch 2.9 for float32 and bfloat16; CUDA kernels
    need compute capability >= 8.0 and bfloat16 (float32 is not supported there).
    """
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        return _TORCH_VERSION >= (2, 9) and dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8 and dtype == torch.bfloat16
    return False


class ExpertPathChoice:
    """Resolves `expert_impl` to the path that runs ("grouped" | "loop"), logging each new choice once.

    A `GPT` owns one and hands it to all of its MoE layers (a lone `MoE` makes its
    own), so a model logs its path once per (request, device, dtype), not once per layer.
    """

    def __init__(self):
        # (requested, device type, device index, dtype) -> path; a plain dict so torch.compile guards on it cheaply.
        self.chosen: dict[tuple, str] = {}

    def resolve(self, requested: str, device: torch.device, dtype: torch.dtype) -> str:
        key = (requested, device.type, device.index, dtype)
        impl = self.chosen.get(key)
        if impl is None:
            supported = grouped_mm_supported(device, dtype)
            impl = "grouped" if requested in ("auto", "grouped") and supported else "loop"
            if torch.compiler.is_compiling():
                return impl  # logging would break the graph; the next eager call logs and records the choice
            if requested == "grouped" and not supported:
                logger.warning("expert_impl = \"grouped\" needs grouped_mm, unavailable on %s for %s; using the loop",
                               device.type, dtype)
            logger.info("MoE experts use the %s path on %s (%s, torch %s)", impl, device.type, dtype, torch.__version__)
            self.chosen[key] = impl
        return impl


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: the autocast dtype inside autocast, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def select_experts(logits: torch.Tensor, top_k: int, expert_bias: torch.Tensor | None = None):
    """Router logits (N, E) float32 -> (renormalised top-k softmax weights (N, k), expert ids (N, k)).

    With expert_bias the bias moves only the choice of experts; the weights stay
    the unbiased probabilities. The softmax renormalised over the chosen experts is
    the softmax of their logits alone, so that is what is computed: two ops without
    a bias, where softmax, top-k, sum and divide take four.
    """
    if expert_bias is None:
        top_logits, top_ids = torch.topk(logits, top_k, dim=-1)
    else:
        top_ids = torch.topk(logits.softmax(dim=-1) + expert_bias, top_k, dim=-1).indices
        top_logits = logits.gather(-1, top_ids)
    return top_logits.softmax(dim=-1), top_ids


def expert_counts(top_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (n_experts,) int64: scatter_add, not bincount, so the size is static and
    nothing syncs with the host."""
    flat = top_ids.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=top_ids.device).scatter_add_(0, flat, torch.ones_like(flat))


class Router(nn.Module):
    """Top-k softmax router computed in float32, as Mixtral does.

    With balance="bias" (DeepSeek-V3's auxiliary-loss-free balancing) a
    per-expert bias is added to the scores *for choosing* the experts only;
    the mixing weights stay the unbiased softmax probabilities. The bias is a
    buffer moved by `update_bias()` after each optimizer step, from the load
    counted since the previous update.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, use_bias: bool):
        super().__init__()
        self.top_k = top_k
        self.n_experts = n_experts
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.use_bias = use_bias
        if use_bias:
            self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))
            # Tokens routed to each expert since the last bias update; summed on device, no host sync.
            self.register_buffer("load_since_update", torch.zeros(n_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, d_model) -> (router logits (N, E) float32, top-k weights (N, k) float32, top-k ids (N, k))."""
        weight = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        logits = F.linear(x if x.dtype == torch.float32 else x.float(), weight)
        top_weights, top_ids = select_experts(logits, self.top_k, self.expert_bias if self.use_bias else None)
        return logits, top_weights, top_ids

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """DeepSeek-V3: b_e += rate * sign(mean load - load_e); underloaded experts become more attractive.

        Under torchrun the caller sums `load_since_update` over the ranks first (`GPT.router_loads`), or
        the ranks' biases would drift apart."""
        if not self.use_bias:
            return
        load = self.load_since_update
        self.expert_bias.add_(rate * torch.sign(load.mean() - load))
        load.zero_()

    @torch.no_grad()
    def discard_load(self) -> None:
        """Forget the load counted since the last update (a skipped training step's), without moving the bias."""
        if self.use_bias:
            self.load_since_update.zero_()


class Experts(nn.Module):
    """n_experts SwiGLU experts with stacked weights; several execution paths of one math (`expert`).

    Paths: grouped GEMMs (training, prefill), one expert at a time (the reference loop), each chosen
    expert once over its few rows (CPU decoding), and the weights gathered by expert id (a compiled
    decoding step). A decoding transform may give each expert fused gate+up and down modules in a
    faster layout (`expert_linears`, see `inference.decode_model`); `expert` then reads those.
    """

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, d_model))  # gate projection
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, d_model))  # up projection
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # down projection
        # Per expert (gate and up rows in one module, down): set by a decoding transform, else None. A plain
        # tuple: picking an expert is a lookup (a ModuleList's indexing costs microseconds a call).
        self.expert_linears: tuple[tuple[nn.Module, nn.Module], ...] | None = None

    def expert(self, h: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's SwiGLU over the rows h: the one statement of an expert's math for the eager paths."""
        if self.expert_linears is not None:
            w13, w2 = self.expert_linears[e]
            return w2(swiglu_fused(w13(h)))
        return F.linear(swiglu(F.linear(h, self.w1[e]), F.linear(h, self.w3[e])), self.w2[e])

    def forward(
        self, x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor, counts: torch.Tensor | None, impl: str
    ) -> torch.Tensor:
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return self.forward_gathered(x, top_ids, top_weights)  # a compiled decoding step
        if self.expert_linears is not None or (impl == "grouped" and x.device.type == "cpu"
                                               and x.shape[0] <= FEW_TOKENS):
            return self.forward_few_tokens(x, top_ids, top_weights)
        if impl == "grouped" and torch.compiler.is_compiling() and _compute_dtype(x) != torch.bfloat16:
            # torch.compile's shape rules for grouped_mm accept bfloat16 only (torch 2.13), eager runs float32.
            impl = "loop"
        if impl == "grouped":
            if counts is None:
                counts = expert_counts(top_ids, self.n_experts)
            return self.forward_grouped(x, top_ids, top_weights, counts)
        return self.forward_loop(x, top_ids, top_weights)

    def forward_few_tokens(self, x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        """Decoding on CPU: each chosen expert once over the rows that chose it, matrix-vector products.

        Reading the expert ids on the host costs nothing on CPU, and skipping the sort/scatter
        bookkeeping matters when a step has a few tokens; rows that share an expert read its
        weights once, which is what lets a batched step cost less than its rows one by one.
        """
        if x.shape[0] == 1:
            out = None
            if torch.is_grad_enabled():  # differentiable in the router's weights
                for slot, e in enumerate(top_ids[0].tolist()):
                    part = self.expert(x, e) * top_weights[0, slot].to(x.dtype)
                    out = part if out is None else out + part
                return out
            for e, weight in zip(top_ids[0].tolist(), top_weights[0].tolist()):
                part = self.expert(x, e)  # a new tensor: scaled and summed in place
                out = part.mul_(weight) if out is None else out.add_(part, alpha=weight)
            return out
        pairs_of: dict[int, tuple[list[int], list[int]]] = {}  # expert -> (rows, slots) that chose it
        for row, ids in enumerate(top_ids.tolist()):
            for slot, e in enumerate(ids):
                rows, slots = pairs_of.setdefault(e, ([], []))
                rows.append(row)
                slots.append(slot)
        out = torch.zeros_like(x)
        for e, (rows, slots) in pairs_of.items():
            index = torch.tensor(rows, device=x.device)
            h = self.expert(x.index_select(0, index), e)
            weight = top_weights[index, torch.tensor(slots, device=x.device)].to(h.dtype)[:, None]
            out = out.index_add(0, index, (h * weight).to(out.dtype))
        return out

    def forward_gathered(self, x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        """Each token's top-k experts as reductions over their weights gathered by id, in float32.

        Static shapes and no host sync: under torch.compile the gather fuses into the reductions, so a
        step reads only the chosen experts' weights (the compiled decoding step).
        """
        x_N11M = x.to(self.w1.dtype).float()[:, None, None, :]
        gate_NkF = (self.w1[top_ids].float() * x_N11M).sum(-1)
        up_NkF = (self.w3[top_ids].float() * x_N11M).sum(-1)
        act_Nk1F = swiglu(gate_NkF, up_NkF).to(self.w2.dtype).float()[:, :, None, :]
        out_NkM = (self.w2[top_ids].float() * act_Nk1F).sum(-1)
        return (out_NkM * top_weights[..., None]).sum(1).to(x.dtype)

    def forward_loop(self, x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        """Reference path: one expert at a time (syncs with the host; works everywhere)."""
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            token_idx, slot = torch.where(top_ids == e)
            if token_idx.numel() == 0:
                continue
            h = self.expert(x[token_idx], e)
            out.index_add_(0, token_idx, (h * top_weights[token_idx, slot, None].to(h.dtype)).to(out.dtype))
        return out

    def forward_grouped(
        self, x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """(token, slot) pairs sorted by expert, two grouped GEMMs (gate+up, down), unsorted; no host sync.

        Rows move by permutation (gathers both ways) instead of index_add, whose
        scatter-add is slow on CPU; each token's k results are mixed by one bmm.
        On CPU in bfloat16 each expert's rows are padded with zero rows to a
        multiple of CPU_BF16_ROWS (see there); the padding rows add nothing.
        """
        n_tokens, top_k = top_ids.shape
        # grouped_mm is not autocast-aware: cast explicitly to the autocast dtype.
        dtype = _compute_dtype(x)
        expert_of_pair = top_ids.reshape(-1)
        order = torch.argsort(expert_of_pair)  # sorted row -> (token, slot) pair
        row_of_sorted = torch.arange(order.numel(), device=order.device)
        group_sizes, pair_of_row = counts, order  # each GEMM row's (token, slot) pair
        if x.device.type == "cpu" and dtype == torch.bfloat16 and not torch.compiler.is_compiling():
            group_sizes = (counts + CPU_BF16_ROWS - 1) // CPU_BF16_ROWS * CPU_BF16_ROWS
            # Expert e's rows start at its padded offset: shift each sorted row by the padding before it.
            shift = (torch.cumsum(group_sizes, 0) - group_sizes) - (torch.cumsum(counts, 0) - counts)
            row_of_sorted = row_of_sorted + shift[expert_of_pair[order]]
            # Padding rows name pair n_pairs: a zero row that the gathers below append. (CPU: .item() is free.)
            pair_of_row = torch.full((int(group_sizes.sum()),), order.numel(), dtype=order.dtype)
            pair_of_row[row_of_sorted] = order
        row_of_pair = torch.empty_like(order).scatter_(0, order, row_of_sorted)
        offsets = torch.cumsum(group_sizes, dim=0).to(torch.int32)
        # One GEMM for gate and up projections together (measured ~30% faster fwd+bwd on CPU than two).
        w13 = torch.cat((self.w1, self.w3), dim=1).to(dtype).transpose(1, 2)
        w2 = self.w2.to(dtype).transpose(1, 2)
        h = GatherTokens.apply(x.to(dtype), pair_of_row, row_of_pair, top_k)
        gate, up = F.grouped_mm(h, w13, offs=offsets).chunk(2, dim=-1)
        h = F.grouped_mm(swiglu(gate, up), w2, offs=offsets)
        h = PermuteRows.apply(h, row_of_pair, pair_of_row).view(n_tokens, top_k, -1)
        return torch.bmm(top_weights.to(h.dtype)[:, None, :], h).squeeze(1)


def _with_zero_row(x: torch.Tensor) -> torch.Tensor:
    """x with one row of zeros appended: the source of the padding rows' gathers."""
    return torch.cat((x, x.new_zeros(1, x.shape[-1])))


class GatherTokens(torch.autograd.Function):
    """rows = x[pair_of_row // top_k]: each token once per chosen expert, sorted by expert, in one gather.

    Padding rows (pair_of_row = n_pairs) read a zero row. The gradient sums each
    token's top_k rows: a gather by `row_of_pair` and a sum over k, where
    autograd would scatter-add (slow on CPU).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pair_of_row: torch.Tensor, row_of_pair: torch.Tensor, top_k: int):
        ctx.save_for_backward(row_of_pair)
        ctx.top_k = top_k
        source = x if pair_of_row.numel() == row_of_pair.numel() else _with_zero_row(x)
        return source[torch.div(pair_of_row, top_k, rounding_mode="floor")]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (row_of_pair,) = ctx.saved_tensors
        return grad[row_of_pair].view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None, None


class PermuteRows(torch.autograd.Function):
    """pairs = rows[row_of_pair], whose gradient is a gather by pair_of_row (zero for padding rows),
    where autograd would scatter-add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, row_of_pair: torch.Tensor, pair_of_row: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pair_of_row)
        ctx.padded = pair_of_row.numel() != row_of_pair.numel()
        return x[row_of_pair]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (pair_of_row,) = ctx.saved_tensors
        return (_with_zero_row(grad) if ctx.padded else grad)[pair_of_row], None, None


class MoE(nn.Module):
    """Router + experts (+ optional shared experts); returns output, weighted balancing loss, stats."""

    def __init__(self, config, expert_path: ExpertPathChoice | None = None):
        super().__init__()
        self.config = config
        self.expert_path = expert_path if expert_path is not None else ExpertPathChoice()
        self.gate = Router(config.d_model, config.n_experts, config.top_k, use_bias=config.balance == "bias")
        self.experts = Experts(config.n_experts, config.d_model, config.expert_hidden)
        self.shared_experts = (
            SwiGLU(config.d_model, config.expert_hidden * config.n_shared_experts) if config.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor, need_losses: bool = False) -> FeedForwardOutput:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, top_weights, top_ids = self.gate(x)
        n_experts = self.config.n_experts
        # A decoding copy's experts take their own path (`Experts.forward`): no path to resolve.
        impl = "few" if self.experts.expert_linears is not None else self.expert_path.resolve(
            self.config.expert_impl, x.device, _compute_dtype(x))
        counts = None
        if need_losses or (self.training and self.gate.use_bias):
            counts = expert_counts(top_ids, n_experts)
        out = self.experts(x, top_ids, top_weights, counts, impl)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        out = out.reshape(shape)

        if self.training and self.gate.use_bias:
            self.gate.load_since_update.add_(counts.float())
        if not need_losses:
            return FeedForwardOutput(out, None, None)

        n_tokens = x.shape[0]
        probs = logits.softmax(dim=-1)
        load_fraction = counts.float() / (n_tokens * self.config.top_k)
        # Switch Transformer: E * sum_e f_e * P_e, equal to 1 under perfect balance.
        aux = n_experts * torch.sum(load_fraction * probs.mean(dim=0))
        z = torch.logsumexp(logits, dim=-1).square().mean()
        entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(dim=-1).mean()
        weighted = self.config.aux_loss_coef * aux + self.config.z_loss_coef * z
        stats = {
            "tokens_per_expert": counts.detach(),
            "router_entropy": entropy.detach(),
            "aux_loss": aux.detach(),
            "z_loss": z.detach(),
        }
        return FeedForwardOutput(out, weighted, stats)


def init_moe_weights(module: MoE, std: float, out_std: float) -> None:
    nn.init.normal_(module.gate.weight, std=std)
    nn.init.normal_(module.experts.w1, std=std)
    nn.init.normal_(module.experts.w3, std=std)
    nn.init.normal_(module.experts.w2, std=out_std)


def expert_params(config) -> int:
    return 3 * config.d_model * config.expert_hidden


