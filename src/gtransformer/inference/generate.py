"""Text generation: the loop around the decoders (`iter_tokens`, `generate`, `generate_text`, `stream`).

    prompts ─► left-pad to one batch ─► prefill (GPT.forward, fills a preallocated KVCache)
            ─► loop: sample next token (sampling.py) ─► one decoding step per token:
                   CompiledDecoder (options.compile) | Decoder (CPU, few rows) | GPT.forward (otherwise)
    tokens ─► TextStream (stream.py) ─► text

What is sampled is `SamplingConfig` (sampling.py); how the logits are computed
(decoding dtype, compiled step, threads) is `DecodeOptions`, passed separately.
Left padding keeps every row's newest token in the same cache slot; each
row's RoPE positions start at 0 at its first real token, and padding slots
are masked, so a batched row produces the same logits as that prompt alone.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from gtransformer.errors import UserError
from gtransformer.inference.compiled_decode import CompiledDecoder
from gtransformer.inference.decode import Decoder, supports_fast_decode
from gtransformer.inference.int8 import int8_decode_available
from gtransformer.inference.sampling import SamplingConfig, sample_next
from gtransformer.inference.stream import TextStream
from gtransformer.model.attention import KVCache
from gtransformer.model.moe import FEW_TOKENS
from gtransformer.runtime import intra_op_threads

# "int8": int8 weights with a bfloat16 scale per output channel, bfloat16 matmul inputs (weight-only quantisation).
DECODE_DTYPES = {
    None: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
}
# With single_thread_steps, prefills of up to this many tokens (batch x prompt) take one thread too.
SINGLE_THREAD_MAX_PREFILL = 256


@dataclass
class DecodeOptions:
    """How the logits are computed; which tokens are drawn from them is `SamplingConfig`."""

    # CPU decoding weights in this dtype ("float16", "bfloat16", "int8"); None = the model's. float16 halves
    # the bytes each step reads, int8 quarters them (measured ~1.5x and ~2x faster here), at the cost of
    # approximate logits (float16 rounding; int8 per-channel weights and bfloat16 matmul inputs).
    dtype: str | None = None
    # Decode through `compiled_decode.CompiledDecoder`: the step as one torch.compile graph (needs a C++
    # compiler on CPU; 15-25 s to compile once per process; tiny preset 2.2x, small 1.1x the eager decoder here).
    compile: bool = False
    # Run CPU decoding steps of few rows (<= moe.FEW_TOKENS) and short prefills (<= SINGLE_THREAD_MAX_PREFILL
    # tokens) on one intra-op thread, restoring the count after: their matrix-vector products are too small
    # to split, and on a busy machine waiting for a second thread costs more than the work (measured 4x
    # slower with 2 threads on the shared 2-core box). Compiled steps keep the process's count (their
    # kernels fix it when built). False: the process's thread count is left alone (training samples).
    single_thread_steps: bool = False

    def validate(self) -> None:
        if self.dtype not in DECODE_DTYPES:
            raise UserError(f"dtype = {self.dtype!r} must be one of {', '.join(map(str, DECODE_DTYPES))}")
        if self.dtype == "int8" and not int8_decode_available():
            raise UserError(f"dtype = \"int8\" needs torch.ops.aten._weight_int8pack_mm, missing in torch "
                            f"{torch.__version__}; use \"float16\"")
        if self.compile and self.dtype == "int8":
            raise UserError("compiled decoding takes float32, bfloat16 or float16 weights, not int8; "
                            "drop --compile or choose another --decode-dtype")


class _Rows:
    """What sampling remembers about each row: its generator, the tokens it has seen, whether it stopped."""

    def __init__(self, sampling: SamplingConfig, padded: torch.Tensor, pad: torch.Tensor, vocab_size: int):
        device = padded.device
        self.sampling = sampling
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        self.seen = None  # (B, V) bool, for the repetition penalty
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(padded.shape[0], vocab_size, dtype=torch.bool, device=device)
            real = torch.arange(padded.shape[1], device=device)[None, :] >= pad[:, None]
            self.seen.scatter_(1, padded, real)
        stops = sorted(set(sampling.stop_token_ids))
        self.stop_ids = torch.tensor(stops, device=device) if stops else None
        self.finished = torch.zeros(padded.shape[0], dtype=torch.bool, device=device)

    def next_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) float32 -> the next token of each row (B,), -1 for rows that have stopped."""
        token = sample_next(logits, self.sampling, self.generator, self.seen)
        if self.stop_ids is not None:
            self.finished |= torch.isin(token, self.stop_ids)
            token = token.masked_fill(self.finished, -1)
        return token

    def feed(self, token: torch.Tensor) -> torch.Tensor:
        """The tokens the next step reads (stopped rows read a dummy 0), noted as seen."""
        feed = token.clamp(min=0)
        if self.seen is not None:
            self.seen.scatter_(1, feed[:, None], ~self.finished[:, None])
        return feed


def _decoding_step(model, cache: KVCache, options: DecodeOptions, pad: torch.Tensor | None,
                   keep: bool) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """step(tokens (B,), positions (B,) or None) -> logits (B, V) float32, advancing the cache by one."""
    dtype = DECODE_DTYPES[options.dtype]
    if options.compile:
        compiled = CompiledDecoder.for_model(model, dtype)
        return lambda tokens, positions: compiled.step(tokens, cache, positions, pad)
    if supports_fast_decode(model, cache.k.shape[1]):
        return Decoder(Decoder.prepared_weights(model, dtype, keep=keep), cache, pad).step

    def forward_step(tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        position_ids = positions[:, None] if positions is not None else None
        return model(tokens[:, None], cache=cache, position_ids=position_ids).logits[:, -1].float()

    return forward_step


def _check_lengths(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[int]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token; pass some text or start from the end-of-text token")
    lengths = [len(p) for p in prompts]
    total = max(lengths) + sampling.max_new_tokens
    if total > model.config.context_length:
        raise UserError(
            f"prompt ({max(lengths)} tokens) + max_new_tokens ({sampling.max_new_tokens}) = {total} exceeds the "
            f"model's context_length ({model.config.context_length}); shorten the prompt or lower max_new_tokens"
        )
    return lengths


@torch.inference_mode()
def iter_tokens(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                options: DecodeOptions | None = None) -> Iterator[list[int]]:
    """Yield, step by step, the next token of every row (-1 once a row has stopped).

    A row stops at one of `sampling.stop_token_ids` (which is not yielded, -1 is)
    or after `max_new_tokens`; the iterator ends when every row has stopped.
    """
    options = options or DecodeOptions()
    sampling.validate()
    options.validate()
    lengths = _check_lengths(model, prompts, sampling)
    if sampling.max_new_tokens == 0:
        return
    config = model.config
    weight = model.embed_tokens.weight
    device = weight.device
    longest, batch = max(lengths), len(prompts)
    was_training = model.training
    model.eval()
    try:
        pad = torch.tensor([longest - n for n in lengths], device=device)
        padded = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
        ragged = any(n != longest for n in lengths)
        # The compiled step has static shapes: its cache always spans the whole context.
        cache_len = config.context_length if options.compile else longest + sampling.max_new_tokens
        cache = KVCache(config, batch, cache_len, device, weight.dtype, pad=pad if ragged else None)
        rows = _Rows(sampling, padded, pad, config.vocab_size)
        few_rows = options.single_thread_steps and device.type == "cpu" and batch <= FEW_TOKENS
        step_threads = 1 if few_rows and not options.compile else None
        prefill_threads = step_threads if batch * longest <= SINGLE_THREAD_MAX_PREFILL else None

        positions = torch.arange(longest, device=device)[None, :] - pad[:, None] if ragged else None
        with intra_op_threads(prefill_threads):
            logits = model(padded, cache=cache, position_ids=positions, last_logits_only=True).logits[:, -1].float()
        next_positions = torch.tensor(lengths, device=device) if ragged else None
        step = _decoding_step(model, cache, options, pad if ragged else None, keep=not was_training)
        for i in range(sampling.max_new_tokens):
            with intra_op_threads(step_threads):
                token = rows.next_tokens(logits)
                ids = token.tolist()
            yield ids
            if all(t == -1 for t in ids) or i == sampling.max_new_tokens - 1:
                return
            with intra_op_threads(step_threads):
                logits = step(rows.feed(token), next_positions)
                if next_positions is not None:
                    next_positions += 1
    finally:
        model.train(was_training)


def generate(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
             options: DecodeOptions | None = None) -> list[list[int]]:
    """Token ids generated after each prompt (stop tokens excluded)."""
    out: list[list[int]] = [[] for _ in prompts]
    for ids in iter_tokens(model, prompts, sampling, options):
        for row, token in zip(out, ids):
            if token >= 0:
                row.append(token)
    return out


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt)
    return ids if ids else [tokenizer.eot_id]


def for_tokenizer(tokenizer, sampling: SamplingConfig) -> SamplingConfig:
    """sampling that stops at the tokenizer's end-of-text (unless it names stops) and never samples an id
    the tokenizer lacks (a model whose vocab_size exceeds the tokenizer's)."""
    stops = sampling.stop_token_ids or (tokenizer.eot_id,)
    limit = tokenizer.vocab_size if sampling.vocab_limit is None else min(sampling.vocab_limit, tokenizer.vocab_size)
    return dataclasses.replace(sampling, stop_token_ids=stops, vocab_limit=limit)


@dataclass
class GenerationStats:
    """Filled in by `stream` / `generate_text` when passed one: generated tokens and the seconds they took."""

    tokens: int = 0
    seconds: float = 0.0
    _started: float = dataclasses.field(default_factory=time.perf_counter, repr=False)

    def count(self, tokens: int) -> None:
        self.tokens += tokens
        self.seconds = time.perf_counter() - self._started

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def stream(model, tokenizer, prompt: str, sampling: SamplingConfig, options: DecodeOptions | None = None,
           stats: GenerationStats | None = None) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, as soon as each is decided.

    Stops at the end-of-text token (unless other stop ids are given), at a
    stop string (which is not yielded), or after max_new_tokens.
    """
    sampling = for_tokenizer(tokenizer, sampling)
    text = TextStream(tokenizer, sampling.stop_strings)
    for (token,) in iter_tokens(model, [prompt_ids(tokenizer, prompt)], sampling, options):
        if token < 0:
            break
        if stats is not None:
            stats.count(1)
        piece = text.feed(token)
        if piece:
            yield piece
        if text.stopped:
            return
    tail = text.finish()
    if tail:
        yield tail


def generate_text(model, tokenizer, prompts: Sequence[str], sampling: SamplingConfig,
                  options: DecodeOptions | None = None, stats: GenerationStats | None = None) -> list[str]:
    """Continuations of several prompts, generated as one batch."""
    sampling = for_tokenizer(tokenizer, sampling)
    streams = [TextStream(tokenizer, sampling.stop_strings) for _ in prompts]
    pieces: list[list[str]] = [[] for _ in prompts]
    for ids in iter_tokens(model, [prompt_ids(tokenizer, p) for p in prompts], sampling, options):
        for row, token in enumerate(ids):
            if token >= 0 and not streams[row].stopped:
                pieces[row].append(streams[row].feed(token))
                if stats is not None:
                    stats.count(1)
        if all(s.stopped or t < 0 for s, t in zip(streams, ids)):
            break
    return ["".join(p) + s.finish() for p, s in zip(pieces, streams)]
