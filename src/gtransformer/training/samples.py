"""Samples from fixed prompts during training: the qualitative evaluation written to samples.jsonl."""

from __future__ import annotations

import torch

from gtransformer.data.tokenizer import Tokenizer
from gtransformer.inference.generate import generate_text
from gtransformer.inference.sampling import SamplingConfig
from gtransformer.training.config import TrainConfig


def generate_samples(model: torch.nn.Module, tokenizer: Tokenizer, config: TrainConfig,
                     context: int) -> list[dict[str, str]]:
    """Continue each prompt with its own fixed seed (its own generator: the run's RNG is untouched)."""
    samples = []
    for index, prompt in enumerate(config.sample_prompts):
        room = context - max(len(tokenizer.encode(prompt)), 1)
        sampling = SamplingConfig(
            max_new_tokens=max(min(config.sample_tokens, room), 0),
            temperature=config.sample_temperature,
            top_k=config.sample_top_k or None,
            top_p=config.sample_top_p,
            repetition_penalty=config.sample_repetition_penalty,
            seed=config.sample_seed + index,
        )
        (text,) = generate_text(model, tokenizer, [prompt], sampling)
        samples.append({"prompt": prompt, "text": text})
    return samples
