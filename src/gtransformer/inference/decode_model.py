"""A `GPT` prepared for decoding steps: the same modules and forward, its matrices in a faster layout.

    GPT ──decoding_model(model, dtype, layout)──► GPT (a copy, inference only)
          q/k/v_proj ─► qkv_proj      SwiGLU w1, w3 ─► w13      (`fuse_projections` of the modules)
          RMSNorm weights ─► into the matrices that read them   (`RMSNorm.fold_into`)
          each expert ─► its own fused gate+up and down products (`Experts.expert_linears`; eager layouts)
          every nn.Linear ─► DecodeLinear in `dtype` and `layout`

These are weight transforms, not a second model: decoding runs `GPT.forward` of the copy, so every
piece of math stays in `gtransformer.model`. Layouts (`DecodeLinear`):

    "matvec"  eager CPU steps: a wide weight as a contiguous (in, out) matrix (matrix-vector products
              read it faster); the experts run on the few-token path, each chosen expert once
    "int8"    eager CPU steps with weight-only int8 matrices (approximate logits)
    "linear"  a compiled step: nn.Linear's (out, in) layout, whose product torch.compile sees as a
              multiply-and-sum that it fuses with the ops around it

`cached_for_weights` keeps what decoding prepared from a model (a copy, a compiled step) on that model
until a weight changes; see its docstring.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from gtransformer.inference.int8 import int8_matmul, quantize_int8
from gtransformer.model.model import GPT

LAYOUTS = ("matvec", "int8", "linear")
T = TypeVar("T")


class DecodeLinear:
    """`F.linear(x, weight)` of an nn.Linear weight (out, in), stored the way its layout reads fastest.

    A plain callable, not an nn.Module: a decoding copy is inference-only and built on its device, and
    nn.Module's call machinery costs ~1.2 us a call (a step makes ~25 products).

    The output has x's dtype; products accumulate in float32 (or the kernel's own precision).
    "matvec": a wide weight (out > in) in another dtype than float16 becomes a contiguous (in, out)
    matrix: measured on this project's CPU with the weights not in cache, 1.1-2.7x faster for
    matrix-vector products (benchmarks/RESULTS.md); other weights keep (out, in), as "linear" does.
    "int8": int8 with a scale per output channel (`int8.quantize_int8`). "linear": (out, in); under
    torch.compile the product is a float32 multiply-and-sum over `in`, which inductor turns into one
    vectorised loop over the weight (the compiled step's matrix-vector products).
    """

    def __init__(self, weight_OI: torch.Tensor, dtype: torch.dtype, layout: str):
        weight_OI = weight_OI.detach()
        self.scales = None
        if layout == "int8":
            self.weight, self.scales = quantize_int8(weight_OI)
        elif layout == "matvec" and weight_OI.shape[0] > weight_OI.shape[1] and dtype != torch.float16:
            layout = "transposed"
            self.weight = weight_OI.to(dtype).t().contiguous()  # (in, out)
        else:
            layout = "linear"
            self.weight = weight_OI.to(dtype).contiguous()
        self.layout = layout

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.layout == "transposed":
            if x.dtype == weight.dtype:  # the common case, without two no-op casts (a step has ~30 products)
                return x @ weight
            return (x.to(weight.dtype) @ weight).to(x.dtype)
        if self.layout == "int8":
            return int8_matmul(x, weight, self.scales).to(x.dtype)
        if torch.compiler.is_compiling():
            return (weight.float() * x.to(weight.dtype).float()[..., None, :]).sum(-1).to(x.dtype)
        if x.dtype == weight.dtype:
            return F.linear(x, weight)
        return F.linear(x.to(weight.dtype), weight).to(x.dtype)


def _swap_linears(module: nn.Module, dtype: torch.dtype, layout: str) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            delattr(module, name)  # a plain attribute from here on, no longer a registered submodule
            setattr(module, name, DecodeLinear(child.weight, dtype, layout))
        else:
            _swap_linears(child, dtype, layout)


def decoding_model(model: GPT, dtype: torch.dtype | None, layout: str) -> GPT:
    """A copy of `model` for decoding: projections fused, matrices as `DecodeLinear(dtype, layout)`.

    dtype: the matrices' dtype (None: the model's; ignored by "int8"). The embedding, norms, router,
    KV cache and residual stream keep the model's dtype. The copy computes `model`'s function (up to
    the rounding of `dtype`), through the same `GPT.forward`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    dtype = dtype or model.embed_tokens.weight.dtype
    kept = model.__dict__.pop(CACHE_ATTRIBUTE, None)  # not copied: what decoding kept on the model
    try:
        with torch.inference_mode(False), torch.no_grad():
            decoding = copy.deepcopy(model).eval().requires_grad_(False)
            for module in decoding.modules():  # hooks on the model (a test's, a profiler's) stay on the model
                module._forward_hooks.clear()
                module._forward_pre_hooks.clear()
            _fuse_and_fold(decoding)
            for block in decoding.layers:
                if block.is_moe:
                    _lay_out_experts(block.mlp.experts, dtype, layout)
            _swap_linears(decoding, dtype, layout)
            for module in decoding.modules():
                # Submodules, parameters and buffers as plain attributes too: a step reads ~80 of them, and
                # nn.Module.__getattr__ (its fallback for registered names) costs a Python call each.
                for name, value in (*module._modules.items(), *module._parameters.items(), *module._buffers.items()):
                    object.__setattr__(module, name, value)
    finally:
        if kept is not None:
            model.__dict__[CACHE_ATTRIBUTE] = kept
    return decoding


def _fuse_and_fold(model: GPT) -> None:
    """q/k/v and each SwiGLU's gate/up into one matrix each; every RMSNorm's weight into the matrices that
    read it (QK-norm stays: RoPE comes between it and any matrix)."""
    if model.config.tie_embeddings:  # the head gets the final norm folded in; the embedding stays as it is
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone(), requires_grad=False)
    model.norm.fold_into(model.lm_head.weight)
    for block in model.layers:
        attention, mlp = block.self_attn, block.mlp
        attention.fuse_projections()
        block.input_layernorm.fold_into(attention.qkv_proj.weight)
        if not block.is_moe:
            mlp.fuse_projections()
            block.post_attention_layernorm.fold_into(mlp.w13.weight)
            continue
        readers = [mlp.gate.weight, mlp.experts.w1, mlp.experts.w3]
        if mlp.shared_experts is not None:
            mlp.shared_experts.fuse_projections()
            readers.append(mlp.shared_experts.w13.weight)
        block.post_attention_layernorm.fold_into(*readers)


def _lay_out_experts(experts: nn.Module, dtype: torch.dtype, layout: str) -> None:
    if layout == "linear":  # the compiled step gathers the stacked weights by expert id
        for name in ("w1", "w3", "w2"):
            setattr(experts, name, nn.Parameter(getattr(experts, name).to(dtype), requires_grad=False))
        return
    # The eager steps read each chosen expert on its own: its gate and up rows as one matrix, and down.
    experts.expert_linears = tuple(
        (DecodeLinear(torch.cat((experts.w1[e], experts.w3[e])), dtype, layout),
         DecodeLinear(experts.w2[e], dtype, layout))
        for e in range(experts.n_experts)
    )
    experts.w1 = experts.w3 = experts.w2 = None


# --- the cache -----------------------------------------------------------------------------------

# What decoding prepared from a model lives in this attribute of the model: {kind: (signature, value)}.
# A plain attribute (not a parameter, buffer or submodule), so state_dict, .to() and optimizers never see it;
# `cached_for_weights` is its only reader and writer (`decoding_model` leaves it out of its copy).
CACHE_ATTRIBUTE = "_decode_cache"


def cached_for_weights(model, kind: str, dtype, build: Callable[[], T], keep: bool = True) -> T:
    """build() for this model and `kind` ("eager", "compiled"), kept on the model and reused.

    Rebuilt only when a weight changed or another dtype is asked: the signature holds every parameter's
    and buffer's storage and `_version` (which an optimizer step or any in-place change bumps).
    keep=False (a model in training mode: its weights change between samples, and copies would only add
    to the training memory) drops the kept value and keeps nothing, returning a still-matching one.
    One value per kind: building for another dtype replaces the old one, freeing it first.
    """
    tensors = [*model.parameters(), *model.buffers()]
    # (Inference tensors keep no version counter: a model built under inference_mode counts as unchanged.)
    signature = (dtype, *((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors))
    cache = model.__dict__.setdefault(CACHE_ATTRIBUTE, {})
    entry = cache.get(kind)
    if not keep or entry is None or entry[0] != signature:
        cache.pop(kind, None)
    value = entry[1] if entry is not None and entry[0] == signature else None
    entry = None  # a stale value is freed before its replacement is built
    if value is None:
        value = build()
    if keep:
        cache[kind] = (signature, value)
    if not cache:
        del model.__dict__[CACHE_ATTRIBUTE]
    return value
