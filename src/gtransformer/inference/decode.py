"""The one decoding step of `generate` and the serving `Engine`: a `GPT`'s own forward over a `KVCache`.

    Decoder(model, DecodeOptions)
      prefill(ids (B, T), cache)     the model as trained: T tokens a row into the cache
      step(tokens (B,), cache)       one token a row, every row at the cache's next slot, or each row at
                                     its own (a `rows(...)` view: continuous batching), through:
          CPU, eager                 decode_model.decoding_model(layout "matvec" or "int8")
          GPU, eager                 the model itself (and any model that is not a `GPT`)
          options.compile            torch.compile of decoding_model(layout "linear")'s forward: one
                                     static-shape graph (whole-context cache, per-row slots and masks)

Every path runs `GPT.forward`, so the math of a step is the model's (gtransformer.model); what differs
is only the layout of the matrices and whether torch.compile traced it. Which tokens are drawn from
the logits is `sampling.SamplingState`; thread counts are the calling command's (`decode_threads`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gtransformer.errors import UserError
from gtransformer.inference.decode_model import cached_for_weights, decoding_model
from gtransformer.inference.int8 import int8_decode_available
from gtransformer.model.attention import KVCache
from gtransformer.model.model import GPT
from gtransformer.model.moe import FEW_TOKENS
from gtransformer.runtime import require_cpp_compiler

# "int8": int8 weights with a bfloat16 scale per output channel, bfloat16 matmul inputs (weight-only quantisation).
DECODE_DTYPES = {
    None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
}
COMPILED_DTYPES = (None, "float32", "bfloat16", "float16")
RECOMPILE_LIMIT = 256  # graphs of the decoding step per process (see `CompiledStep.__call__`)


@dataclass
class DecodeOptions:
    """How the logits are computed; which tokens are drawn from them is `SamplingConfig`."""

    # Decoding matrices in this dtype ("float16", "bfloat16", "int8"); None = the model's. float16 halves
    # the bytes each step reads, int8 quarters them (CPU; measured ~1.5x and ~2x faster here), at the cost
    # of approximate logits (float16 rounding; int8 per-channel weights and bfloat16 matmul inputs).
    dtype: str | None = None
    # Decode through `CompiledStep`: the step as one torch.compile graph (needs a C++ compiler on CPU;
    # 15-25 s to compile once per process; benchmarks/RESULTS.md has its speed against eager).
    compile: bool = False

    def validate(self) -> None:
        if self.dtype not in DECODE_DTYPES:
            raise UserError(f"dtype = {self.dtype!r} must be one of {', '.join(map(str, DECODE_DTYPES))}")
        if self.dtype == "int8" and not int8_decode_available():
            raise UserError(f"dtype = \"int8\" needs torch.ops.aten._weight_int8pack_mm, missing in torch "
                            f"{torch.__version__}; use \"float16\"")
        if self.compile and self.dtype not in COMPILED_DTYPES:
            raise UserError("compiled decoding takes float32, bfloat16 or float16 weights, not int8; "
                            "drop --compile or choose another --decode-dtype")


def decode_threads(device: torch.device, rows: int, compile: bool) -> int | None:
    """The intra-op thread count a decoding command sets once for its process (None: leave torch's).

    One thread for eager CPU decoding of at most moe.FEW_TOKENS rows: its matrix-vector products are too
    small to split, and on a busy machine waiting for a second thread costs more than the work (measured
    4x slower with 2 threads on the shared 2-core box). A compiled step and larger batches keep torch's.
    """
    return 1 if device.type == "cpu" and rows <= FEW_TOKENS and not compile else None


class CompiledStep:
    """torch.compile of a decoding model's forward for one token a row over a static `KVCache.rows` view.

    Static shapes make one graph serve every step: the cache spans the whole context and attention
    masks the slots not written yet (and each row's left padding); the router's expert ids index the
    stacked expert weights on the device, so no step waits on the host and the graph has no breaks.
    """

    def __init__(self, model):
        device = model.embed_tokens.weight.device
        require_cpp_compiler(device, "run without --compile")
        self.model = model
        # On CPU a C++ wrapper (no Python per buffer, no size asserts) saves ~15% of a tiny-preset step.
        options = {"cpp_wrapper": True, "size_asserts": False} if device.type == "cpu" else None
        self._compiled = torch.compile(self._forward, fullgraph=True, dynamic=False, options=options)
        self._warm: set[tuple] = set()  # (batch, cache shape, strides, dtype, device) already compiled

    def _forward(self, tokens_B: torch.Tensor, cache: KVCache, positions_B: torch.Tensor) -> torch.Tensor:
        return self.model(tokens_B[:, None], cache=cache, position_ids=positions_B[:, None]).logits[:, -1].float()

    def __call__(self, tokens_B: torch.Tensor, cache: KVCache, positions_B: torch.Tensor) -> torch.Tensor:
        # Strides too: a view of some rows of a bigger cache (the engine's) is another graph than a whole cache.
        key = (tokens_B.shape[0], tuple(cache.k.shape), cache.k.stride(), cache.k.dtype, tokens_B.device)
        args = (tokens_B, cache, positions_B.clone())  # never aliasing next_slots: one graph for every caller
        if key in self._warm:
            return self._compiled(*args)
        try:
            # torch.compile keeps the graphs of `_forward` per code object, shared by every CompiledStep of the
            # process (each model, dtype and batch size is one): its default limit of 8 would refuse a server's
            # padded batch sizes next to generate's. Raised only while a new shape compiles.
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                logits = self._compiled(*args)
        except Exception as exc:  # compiling failed: a missing C++ compiler, an unsupported device, ...
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"compiling the decoding step failed ({type(exc).__name__}: {first_line[:200]}); "
                            f"torch.compile needs a working C++ compiler on CPU; run without --compile") from None
        self._warm.add(key)
        return logits

    @classmethod
    def for_model(cls, model, dtype: torch.dtype | None = None) -> CompiledStep:
        """The model's compiled step, rebuilt (and recompiled) only when its weights or dtype changed."""
        dtype = dtype or model.embed_tokens.weight.dtype
        return cached_for_weights(model, "compiled", dtype, lambda: cls(decoding_model(model, dtype, "linear")))


class Decoder:
    """Prefill and batched decoding steps of one model, as `DecodeOptions` say; see the module docstring.

    keep=False (a model in training mode, whose weights change between calls) prepares the decoding
    copy without keeping it on the model (`decode_model.cached_for_weights`).
    """

    def __init__(self, model, options: DecodeOptions | None = None, keep: bool = True):
        options = options or DecodeOptions()
        options.validate()
        self.model = model
        self.static = options.compile  # a compiled step reads whole-context caches through static views
        dtype = DECODE_DTYPES[options.dtype]
        self.compiled: CompiledStep | None = None
        if options.compile:
            self.compiled = CompiledStep.for_model(model, dtype)
            self.step_model = self.compiled.model
        elif isinstance(model, GPT) and model.embed_tokens.weight.device.type == "cpu":
            layout = "int8" if options.dtype == "int8" else "matvec"
            self.step_model = cached_for_weights(model, "eager", dtype,
                                                 lambda: decoding_model(model, dtype, layout), keep)
        else:
            self.step_model = model

    def cache(self, batch: int, length: int, pad: torch.Tensor | None = None) -> KVCache:
        """A KV cache for `batch` rows of `length` positions (a compiled step's spans the whole context)."""
        config, weight = self.model.config, self.model.embed_tokens.weight
        length = config.context_length if self.static else length
        return KVCache(config, batch, length, weight.device, weight.dtype, pad=pad)

    def rows(self, cache: KVCache, start: int, stop: int, next_slots: list[int]) -> KVCache:
        """Rows [start, stop) of `cache`, row b's next token at its own slot next_slots[b] (continuous batching)."""
        return cache.rows(start, stop, next_slots, static=self.static)

    def prefill(self, ids_BT: torch.Tensor, cache: KVCache, positions_BT: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) into the cache's next T slots (rows of `cache.rows(start, stop)` for one request)
        -> the last position's logits (B, vocab) float32. positions: each row's RoPE positions (left padding)."""
        return self.model(ids_BT, cache=cache, position_ids=positions_BT, last_logits_only=True).logits[:, -1].float()

    def step(self, tokens_B: torch.Tensor, cache: KVCache, positions_B: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B,) -> logits (B, vocab) float32, one token a row into the cache.

        A whole cache takes every row's token at slot `cache.length` (then advances it); positions (B,)
        are each row's RoPE position (None: `cache.length`). A view from `rows(...)` takes row b's token
        into its own slot next_slots[b], also its position (pass positions=None).
        """
        if positions_B is None and cache.next_slots is not None:
            positions_B = cache.next_slots  # each row at its own slot is at that position
        if self.compiled is None:
            position_ids = None if positions_B is None else positions_B[:, None]
            return self.step_model(tokens_B[:, None], cache=cache, position_ids=position_ids).logits[:, -1].float()
        if cache.next_slots is not None:
            return self.compiled(tokens_B, cache, positions_B)
        batch = tokens_B.shape[0]
        view = cache.rows(0, batch, [cache.length] * batch, static=True)
        logits = self.compiled(tokens_B, view, view.next_slots if positions_B is None else positions_B)
        cache.length += 1
        return logits
