"""`ModelConfig`: the `[model]` table, saved with every checkpoint; enough to rebuild the model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gtransformer.config import coerce_fields, from_dict
from gtransformer.errors import UserError


@dataclass
class ModelConfig:
    """The `[model]` table. Saved with every checkpoint; enough to rebuild the model."""

    vocab_size: int = 8192  # tokenizer vocabulary (embedding and lm_head rows)
    context_length: int = 256  # longest sequence the model accepts (RoPE table, KV cache cap)
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # query heads
    n_kv_heads: int = 2  # key/value heads shared by n_heads // n_kv_heads query heads (1 = MQA)
    head_dim: int | None = None  # per-head width; None -> d_model // n_heads
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # lm_head shares embed_tokens' weight
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE (Qwen3/OLMo2 style)
    n_experts: int = 8  # routed experts per MoE layer; 0 = dense SwiGLU model
    top_k: int = 2  # experts each token is routed to
    expert_hidden: int = 512  # hidden width of each SwiGLU expert (and of each shared expert)
    dense_hidden: int | None = None  # hidden width of dense SwiGLU layers; None -> top_k * expert_hidden (FLOP-matched)
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0; others are dense
    n_shared_experts: int = 0  # always-on experts added to every MoE layer (DeepSeek style)
    balance: str = "aux"  # "aux": Switch auxiliary loss; "bias": DeepSeek-V3 auxiliary-loss-free bias
    aux_loss_coef: float = 0.01  # weight of the Switch load-balancing loss (0 disables)
    z_loss_coef: float = 0.001  # weight of the router z-loss (0 disables)
    bias_update_rate: float = 0.001  # step of the balancing bias per update (balance = "bias")
    expert_impl: str = "auto"  # "auto" | "grouped" (grouped_mm) | "loop" (reference per-expert loop)
    init_std: float = 0.02  # std of the normal init; residual output projections get std / sqrt(2 n_layers)

    def __post_init__(self) -> None:
        coerce_fields(self, "model")  # types first: an int where a list is, a string where a number is, NaN
        self.validate()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_dense_hidden(self) -> int:
        if self.dense_hidden is not None:
            return self.dense_hidden
        return max(self.top_k, 1) * self.expert_hidden

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and (layer + 1) % self.moe_every == 0

    def validate(self) -> None:
        def fail(message: str) -> None:
            raise UserError(f"[model] {message}")

        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "moe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{name} = {value!r} must be a positive integer")
        for name in ("n_experts", "n_shared_experts", "top_k", "expert_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(f"{name} = {value!r} must be a non-negative integer")
        if self.n_heads % self.n_kv_heads != 0:
            fail(
                f"n_heads = {self.n_heads} is not a multiple of n_kv_heads = {self.n_kv_heads}; "
                f"choose n_kv_heads among the divisors of n_heads (1 = MQA, n_heads = plain multi-head)"
            )
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            fail(f"d_model = {self.d_model} is not divisible by n_heads = {self.n_heads}; set head_dim explicitly")
        if self.resolved_head_dim % 2 != 0 or self.resolved_head_dim < 2:
            fail(f"head_dim = {self.resolved_head_dim} must be even for rotary embeddings")
        if self.n_experts > 0:
            if not 1 <= self.top_k <= self.n_experts:
                fail(f"top_k = {self.top_k} must be between 1 and n_experts = {self.n_experts}")
            if self.expert_hidden < 1:
                fail("expert_hidden must be positive when n_experts > 0")
        if self.n_experts == 0 and self.dense_hidden is None and self.top_k * self.expert_hidden < 1:
            fail("a dense model (n_experts = 0) needs dense_hidden (or top_k * expert_hidden) > 0")
        if self.dense_hidden is not None and self.dense_hidden < 1:
            fail(f"dense_hidden = {self.dense_hidden} must be positive (or omitted)")
        if self.balance not in ("aux", "bias"):
            fail(f'balance = {self.balance!r} must be "aux" (auxiliary loss) or "bias" (auxiliary-loss-free)')
        if self.expert_impl not in ("auto", "grouped", "loop"):
            fail(f'expert_impl = {self.expert_impl!r} must be "auto", "grouped" or "loop"')
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                fail(f"{name} = {getattr(self, name)!r} must be positive")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if not getattr(self, name) >= 0:
                fail(f"{name} = {getattr(self, name)!r} must be >= 0 (0 disables)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, dict(values), "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
