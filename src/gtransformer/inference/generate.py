"""Text generation: the loop around the decoding step (`iter_tokens`, `generate`, `generate_text`, `stream`).

    prompts ─► left-pad to one batch ─► Decoder.prefill (GPT.forward, fills a preallocated KVCache)
            ─► loop: SamplingState picks each row's next token ─► Decoder.step (decode.py)
    tokens ─► TextStream (stream.py) ─► text

What is sampled is `SamplingConfig` (sampling.py); how the logits are computed (decoding dtype,
compiled step) is `DecodeOptions` (decode.py), passed separately. Left padding keeps every row's
newest token in the same cache slot; each row's RoPE positions start at 0 at its first real token,
and padding slots are masked, so a batched row produces the same logits as that prompt alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from gtransformer.errors import UserError
from gtransformer.inference.decode import DecodeOptions, Decoder
from gtransformer.inference.sampling import SamplingConfig, SamplingState
from gtransformer.inference.stream import TextStream
from gtransformer.model.attention import check_context


def check_prompts(config, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Every prompt has a token, and the longest prompt + max_new_tokens fits the model's context."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("a prompt has no tokens; pass some text or start from the end-of-text token")
    longest = max(len(p) for p in prompts)
    check_context(config, longest + max_new_tokens, f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens})")


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
    check_prompts(model.config, prompts, sampling.max_new_tokens)
    if sampling.max_new_tokens == 0:
        return
    was_training = model.training
    decoder = Decoder(model, options, keep=not was_training)
    model.eval()
    try:
        device = model.embed_tokens.weight.device
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        pad = torch.tensor([longest - n for n in lengths], device=device)
        padded = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
        ragged = any(n != longest for n in lengths)
        cache = decoder.cache(len(prompts), longest + sampling.max_new_tokens, pad if ragged else None)
        rows = SamplingState(sampling, prompts, model.config.vocab_size, device)
        positions = torch.arange(longest, device=device)[None, :] - pad[:, None] if ragged else None
        logits = decoder.prefill(padded, cache, positions)
        next_positions = torch.tensor(lengths, device=device) if ragged else None
        for i in range(sampling.max_new_tokens):
            token = rows.next_tokens(logits)
            ids = token.tolist()
            yield ids
            if all(t == -1 for t in ids) or i == sampling.max_new_tokens - 1:
                return
            logits = decoder.step(rows.feed(token), cache, next_positions)
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
