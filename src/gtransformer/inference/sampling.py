"""Sampling rules: which token comes next, given the logits (`SamplingConfig`, `sample_next`).

    logits (B, V) float32 ─► repetition penalty (tokens seen) ─► / temperature
                          ─► top-k / top-p filter ─► multinomial (seeded generator)   [temperature 0: argmax]

`SamplingState` is what sampling remembers about each row (generator, tokens seen, stopped rows): one
for a batch of prompts in `generate`, one per request in the serving engine. How the logits are
computed (dtype, compiled step) is `decode.DecodeOptions`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from gtransformer.errors import UserError

SEED_LIMIT = 2**63  # seeds are in [0, 2**63): what torch.Generator.manual_seed takes as a non-negative int64


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200  # upper bound on generated tokens per prompt
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep only the k most likely tokens (None/0 = all)
    top_p: float | None = None  # keep the smallest set whose probability reaches p (None/1 = all)
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output (CTRL / HF rule)
    stop_token_ids: Sequence[int] = ()  # generation of a row ends at any of these (not included in output)
    stop_strings: Sequence[str] = field(default_factory=tuple)  # text generation ends before any of these
    seed: int | None = None  # same seed, same model, same prompt -> same text
    # Ids >= this are never produced: the tokenizer's size, when the model's vocab_size is larger.
    vocab_limit: int | None = None

    def problem(self, names: Mapping[str, str] | None = None) -> tuple[str, str] | None:
        """(field, one-line message) of the first rule this config breaks, or None. The one statement of the
        sampling rules: the generate CLI, the server's requests and the trainer's samples all check them here.

        `names` shows fields under the caller's names ({"temperature": "--temperature"} in a CLI,
        {"max_new_tokens": "max_tokens"} in the HTTP API, "train.sample_*" in a config)."""
        names = names or {}

        def shown(field: str) -> str:
            name = names.get(field, field)
            value = getattr(self, field)
            return f"{name} {value!r}" if name.startswith("-") else f"{name} = {value!r}"

        def number(value, integer: bool = False) -> bool:
            if isinstance(value, bool):
                return False
            if isinstance(value, int):
                return True
            return not integer and isinstance(value, float) and math.isfinite(value)

        if not number(self.max_new_tokens, integer=True) or self.max_new_tokens < 0:
            return "max_new_tokens", f"{shown('max_new_tokens')} must be an integer >= 0"
        if not number(self.temperature) or self.temperature < 0:
            return "temperature", f"{shown('temperature')} must be a finite number >= 0 (0 = greedy)"
        if self.top_k is not None and (not number(self.top_k, integer=True) or self.top_k < 0):
            return "top_k", f"{shown('top_k')} must be an integer >= 0 (0 = no top-k filter)"
        if self.top_p is not None and (not number(self.top_p) or not 0 < self.top_p <= 1):
            return "top_p", f"{shown('top_p')} must be a number in (0, 1] (1 = no nucleus filter)"
        if not number(self.repetition_penalty) or self.repetition_penalty <= 0:
            return "repetition_penalty", f"{shown('repetition_penalty')} must be a finite number > 0 (1 = off)"
        if self.seed is not None and (not number(self.seed, integer=True) or not 0 <= self.seed < SEED_LIMIT):
            return "seed", f"{shown('seed')} must be an integer in [0, 2**63)"
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            return "stop_strings", f"{names.get('stop_strings', 'stop strings')} must not be empty"
        return None

    def validate(self, names: Mapping[str, str] | None = None) -> None:
        """Raise a UserError naming the first broken rule (see `problem`)."""
        found = self.problem(names)
        if found is not None:
            raise UserError(found[1])


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of already-seen tokens (so they always get less likely)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first one always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None, seen: torch.Tensor | None
) -> torch.Tensor:
    """logits (B, V) float32 -> next token ids (B,)."""
    if sampling.vocab_limit is not None and sampling.vocab_limit < logits.shape[-1]:
        logits = logits[:, : sampling.vocab_limit]  # a prefix: ids keep their meaning
        seen = None if seen is None else seen[:, : sampling.vocab_limit]
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class SamplingState:
    """What sampling remembers about each row of a batch: its generator, the tokens it has seen, whether it stopped.

    The rows share one seeded generator (the same seed, prompts and model give the same tokens). A row
    stops at one of `sampling.stop_token_ids`; from then on its token is -1.
    """

    def __init__(self, sampling: SamplingConfig, prompts: Sequence[Sequence[int]], vocab_size: int, device):
        self.sampling = sampling
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
        self.seen = None  # (B, V) bool, for the repetition penalty: prompt and generated tokens
        if sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                self.seen[row, list(prompt)] = True
        stops = sorted(set(sampling.stop_token_ids))
        self.stop_ids = torch.tensor(stops, device=device) if stops else None
        self.finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)

    @property
    def greedy(self) -> bool:
        """Whether the next token is the plain argmax of the logits (over the first vocab_limit ids)."""
        return self.sampling.temperature == 0 and self.seen is None

    def next_tokens(self, logits_BV: torch.Tensor, chosen_B: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B, V) float32 -> the next token of each row (B,), -1 for rows that have stopped.

        chosen: the tokens already picked by the caller (a batched argmax of `greedy` rows)."""
        token = chosen_B if chosen_B is not None else sample_next(logits_BV, self.sampling, self.generator, self.seen)
        if self.stop_ids is not None:
            self.finished |= torch.isin(token, self.stop_ids)
            token = token.masked_fill(self.finished, -1)
        return token

    def feed(self, token_B: torch.Tensor) -> torch.Tensor:
        """The tokens the next step reads (stopped rows read a dummy 0), noted as seen."""
        feed = token_B.clamp(min=0)
        if self.seen is not None:
            self.seen.scatter_(1, feed[:, None], ~self.finished[:, None])
        return feed
