"""Compiled decoding (`DecodeOptions.compile`): the same forward, reuse, bfloat16, seeded sampling, errors.

Each distinct model shape compiles once (a few seconds on CPU with the C++ compiler),
so the architectures share a few compiled graphs rather than one test each.
"""

import pytest
from conftest import NEEDS_CPP_COMPILER, assert_matches_full_recompute
import torch

from gtransformer import runtime
from gtransformer.inference import decode as decode_module
from gtransformer.inference.decode import CompiledStep, DecodeOptions, Decoder
from gtransformer.errors import UserError
from gtransformer.inference.generate import generate
from gtransformer.inference.sampling import SamplingConfig


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    NEEDS_CPP_COMPILER,
]

COMPILED = DecodeOptions(compile=True)


@torch.inference_mode()
def test_eager_and_compiled_steps_run_the_same_forward(make_model):
    model = make_model(n_layers=1, qk_norm=True)
    prompt, token = [3, 4, 5], 6
    expected = model(torch.tensor([prompt + [token]])).logits[0, -1]
    for options in (DecodeOptions(), COMPILED):
        decoder = Decoder(model, options)
        cache = decoder.cache(1, len(prompt) + 1)
        decoder.prefill(torch.tensor([prompt]), cache)
        torch.testing.assert_close(decoder.step(torch.tensor([token]), cache)[0], expected, atol=1e-5, rtol=0)
        assert cache.length == len(prompt) + 1
    # The compiled step is torch.compile of a decoding copy's own GPT.forward, with a whole-context cache.
    assert decoder.compiled.model is decoder.step_model and cache.max_len == model.config.context_length


def test_compiled_bfloat16_decoding_stays_close_to_the_model_forward(make_model, record_step_logits):
    model = make_model(n_layers=1).to(torch.bfloat16)
    prompts = [[7, 8, 9, 10, 11]]
    tokens, logits = record_step_logits(model, prompts, 6, compile=True)
    assert all(t.dtype == torch.float32 for t in logits)
    # bfloat16 rounds differently in fused loops than in the eager kernels: a bfloat16-sized tolerance.
    assert_matches_full_recompute(model, prompts, tokens, logits, atol=0.05)


def test_compiled_decoder_is_reused_and_rebuilt_when_weights_change(make_model, record_step_logits):
    model = make_model(n_layers=1)
    first = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=5, temperature=0), COMPILED)
    decoder = CompiledStep.for_model(model)
    assert CompiledStep.for_model(model) is decoder
    assert generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=5, temperature=0), COMPILED) == first
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))  # as an optimizer step would
    assert CompiledStep.for_model(model) is not decoder
    tokens, logits = record_step_logits(model, [[1, 2, 3]], 5, compile=True)
    assert_matches_full_recompute(model, [[1, 2, 3]], tokens, logits, atol=1e-5)


def test_sampling_with_a_seed_is_reproducible_and_matches_the_eager_decoder(make_model):
    model = make_model(n_layers=1)
    options = dict(max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=3)
    compiled = generate(model, [[4, 5, 6]], SamplingConfig(**options), COMPILED)
    assert compiled == generate(model, [[4, 5, 6]], SamplingConfig(**options), COMPILED)
    assert compiled == generate(model, [[4, 5, 6]], SamplingConfig(**options))


def test_user_mistakes_and_missing_compiler_are_one_line_errors(monkeypatch, make_model):
    with pytest.raises(UserError, match="int8"):
        DecodeOptions(compile=True, dtype="int8").validate()
    model = make_model(n_layers=1)
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match="C.. compiler.*without --compile"):
        generate(model, [[1, 2]], SamplingConfig(max_new_tokens=2), COMPILED)


def test_a_failing_compilation_becomes_a_user_error(monkeypatch, make_model):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nlong traceback text")
        return run

    monkeypatch.setattr(decode_module.torch, "compile", broken_compile)
    model = make_model(n_layers=1)
    with pytest.raises(UserError, match="compiling the decoding step failed.*InvalidCxxCompiler.*without --compile"):
        generate(model, [[1, 2]], SamplingConfig(max_new_tokens=3), COMPILED)
