"""Decoder-only transformer with Grouped Query Attention and Mixture-of-Experts feed-forwards.

    input_ids (B, T)
      └► embed_tokens ─► n_layers x Block ─► norm ─► lm_head ─► logits (B, T, vocab)
    Block (pre-norm, residual):
      x = x + Attention(input_layernorm(x))        GQA, RoPE, optional QK-norm, KV cache
      x = x + mlp(post_attention_layernorm(x))      MoE (moe.py) or DenseFeedForward (feed_forward.py)

Names follow Hugging Face (q_proj, k_proj, v_proj, o_proj, embed_tokens,
lm_head, norm, gate, experts) and RoPE uses HF's rotate_half layout, so
exporting to Mixtral (interop/hf.py) is a plain copy of tensors. RMSNorm,
RoPE and SwiGLU are the functions of primitives.py. This forward is the only
statement of the model's math: training, the prefill and every decoding step of
gtransformer.inference (eager or compiled, a copy laid out for decoding) run it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gtransformer.errors import UserError
from gtransformer.model.attention import Attention, KVCache, check_context
from gtransformer.model.config import ModelConfig
from gtransformer.model.feed_forward import DenseFeedForward
from gtransformer.model.moe import ExpertPathChoice, MoE, expert_params, init_moe_weights
from gtransformer.model.primitives import RMSNorm, rope_tables


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, vocab), or (B, 1, vocab) with last_logits_only; None when targets are given
    loss: torch.Tensor | None  # mean cross entropy over targets != -1, when targets are given
    aux_loss: torch.Tensor | None  # already-weighted MoE balancing losses (with targets or return_stats), else None
    stats: list[dict[str, Any]] | None  # per MoE layer: layer, tokens_per_expert, router_entropy, aux_loss, z_loss


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross entropy of `x @ weight.T` against `targets` (-1 ignored), chunk by chunk.

    The logits of a chunk of rows live only while that chunk is processed, and
    their gradient (softmax - one_hot) is turned into the gradients of x and
    weight right there, in the forward pass: no (N, vocab) logits, log-softmax
    or gradient tensors are kept, which is most of a small model's activation
    memory and several full passes over them. Same matmul FLOPs as the plain
    lm_head + cross_entropy. Under autocast the matmuls run in the autocast
    dtype and the softmax in float32, as autocast would do.
    """

    CHUNK_ROWS = 256  # 256 x vocab float32 logits stay in cache between the softmax passes

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            valid = targets != -1
            count = valid.sum().clamp(min=1).float()
            total = torch.zeros((), device=x.device, dtype=torch.float32)
            grad_x = torch.empty_like(x) if need_grad else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
            for start in range(0, x.shape[0], LinearCrossEntropy.CHUNK_ROWS):
                end = start + LinearCrossEntropy.CHUNK_ROWS
                xc, keep = x[start:end].to(dtype), valid[start:end]
                target = targets[start:end].clamp(min=0)[:, None]
                logits = (xc @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += ((lse - logits.gather(1, target).squeeze(1)) * keep).sum()
                if need_grad:
                    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    grad.scatter_add_(1, target, -keep[:, None].float())
                    grad.mul_(keep[:, None])
                    grad = grad.to(dtype)
                    grad_x[start:end] = grad @ w
                    grad_w += (grad.T @ xc).float()
        ctx.save_for_backward(grad_x, grad_w, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        gx = (grad_x * scale.to(grad_x.dtype)) if ctx.needs_input_grad[0] else None
        gw = (grad_w * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gx, gw, None


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, expert_path: ExpertPathChoice | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        # Both return a FeedForwardOutput (output, weighted aux loss or None, stats or None).
        if self.is_moe:
            self.mlp = MoE(config, expert_path)
        else:
            self.mlp = DenseFeedForward(config.d_model, config.resolved_dense_hidden)

    def forward(self, x, cos, sin, cache: KVCache | None, need_losses: bool):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        h, aux, stats = self.mlp(self.post_attention_layernorm(x), need_losses)
        return x + h, aux, stats


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config  # validated when built (ModelConfig.__post_init__)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        # One resolver of the expert path for all MoE layers: the choice is logged once per model.
        self.expert_path = ExpertPathChoice()
        self.layers = nn.ModuleList(Block(config, i, self.expert_path) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.resolved_head_dim, config.context_length, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                init_moe_weights(module, std, out_std)
        for block in self.layers:
            nn.init.normal_(block.self_attn.o_proj.weight, std=out_std)
            if not block.is_moe:
                nn.init.normal_(block.mlp.w2.weight, std=out_std)
            elif block.mlp.shared_experts is not None:
                nn.init.normal_(block.mlp.shared_experts.w2.weight, std=out_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        return_stats: bool = False,
        *,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        last_logits_only: bool = False,
    ) -> ModelOutput:
        """input_ids (B, T) -> ModelOutput.

        targets (B, T): next-token ids, -1 to ignore. With `cache`, the tokens
        are appended at `cache.length` (which advances) and `position_ids`
        (B, T) give each row's RoPE positions (left padding shifts them).
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        check_context(self.config, start + T)
        if cache is not None and start + T > cache.max_len:
            raise UserError(f"KV cache holds {cache.max_len} positions, {start + T} requested; allocate a larger cache")
        if position_ids is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        else:
            positions = position_ids.clamp(min=0)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

        need_losses = targets is not None or return_stats
        x = self.embed_tokens(input_ids)
        aux_total = torch.zeros((), device=x.device, dtype=torch.float32) if need_losses else None
        all_stats: list[dict[str, Any]] = []
        for i, block in enumerate(self.layers):
            x, aux, stats = block(x, cos, sin, cache, need_losses)
            if aux is not None:
                aux_total = aux_total + aux
            if stats is not None:
                all_stats.append({"layer": i, **stats})
        if cache is not None:
            cache.length += T

        x = self.norm(x)
        if last_logits_only:
            x = x[:, -1:]
        if targets is not None:
            if torch.compiler.is_compiling():
                # Inductor fuses the softmax and loss around the lm_head matmul itself, and cannot
                # trace LinearCrossEntropy's chunk loop without breaking the graph.
                logits = self.lm_head(x).float()
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
                return ModelOutput(None, loss, aux_total, all_stats if return_stats else None)
            # The (B, T, vocab) logits are never materialised: see LinearCrossEntropy.
            loss = LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1))
            return ModelOutput(None, loss, aux_total, all_stats if return_stats else None)
        logits = self.lm_head(x)
        return ModelOutput(logits, None, aux_total, all_stats if return_stats else None)

    def router_loads(self) -> list[torch.Tensor]:
        """The expert loads counted since the last bias update, one (n_experts,) buffer per MoE layer (balance =
        "bias"; else empty). Under torchrun the trainer sums them over the ranks in place, all layers in one
        collective, before `update_router_biases`."""
        if self.config.balance != "bias":
            return []
        return [block.mlp.gate.load_since_update for block in self.layers if block.is_moe]

    def update_router_biases(self) -> None:
        """Call after each optimizer step: moves the balance="bias" router biases (no-op otherwise)."""
        if self.config.balance != "bias":
            return
        for block in self.layers:
            if block.is_moe:
                block.mlp.gate.update_bias(self.config.bias_update_rate)

    def discard_router_loads(self) -> None:
        """Call instead of `update_router_biases` when a step's update is skipped: its expert loads are dropped."""
        if self.config.balance != "bias":
            return
        for block in self.layers:
            if block.is_moe:
                block.mlp.gate.discard_load()

    # ---- size and cost helpers -------------------------------------------------------------

    def num_params(self) -> int:
        """Total parameters, tied embeddings counted once."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self, include_embedding: bool = True) -> int:
        """Parameters a single token touches: unused routed experts excluded."""
        c = self.config
        inactive = sum(block.is_moe for block in self.layers) * (c.n_experts - c.top_k) * expert_params(c)
        active = self.num_params() - inactive
        if not include_embedding:
            active -= self.embed_tokens.weight.numel()
            if not c.tie_embeddings:
                active -= self.lm_head.weight.numel()
        return active

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 N_active + 6 head + attention.

        N_active excludes embedding and lm_head; the attention term is
        12 * n_layers * n_heads * head_dim * seq_len (PaLM / nanoGPT convention).
        """
        c = self.config
        seq_len = seq_len or c.context_length
        head = c.d_model * c.vocab_size
        attention = 12 * c.n_layers * c.n_heads * c.resolved_head_dim * seq_len
        return 6 * self.num_active_params(include_embedding=False) + 6 * head + attention

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        c = self.config
        return 2 * c.n_layers * c.n_kv_heads * c.resolved_head_dim * torch.empty((), dtype=dtype).element_size()
