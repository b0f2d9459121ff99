"""Decoding: every step runs `GPT.forward` (a decoding copy's, eager or compiled), and equals a full recompute."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import NEEDS_CPP_COMPILER, assert_matches_full_recompute

from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.inference import decode as decode_module
from gtransformer.inference.decode import DecodeOptions, Decoder, decode_threads
from gtransformer.inference.decode_model import CACHE_ATTRIBUTE, DecodeLinear, decoding_model
from gtransformer.inference.engine import Engine
from gtransformer.inference.generate import generate
from gtransformer.inference.sampling import SamplingConfig
from gtransformer.model import primitives
from gtransformer.model.moe import FEW_TOKENS
from gtransformer.model.primitives import RMSNorm

# Tiny shapes: a second intra-op thread on a shared, busy machine only adds waiting.
pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src" / "gtransformer"


@pytest.mark.parametrize("expert_impl", ["grouped", "loop"])
def test_cached_logits_equal_full_recompute_at_every_step(expert_impl, make_model, record_step_logits):
    model = make_model(expert_impl=expert_impl)
    prompt = [5, 17, 42, 8, 99, 3]
    tokens, step_logits = record_step_logits(model, [prompt], 12)
    assert len(tokens[0]) == 12 and len(step_logits) == 12  # prefill + 11 single-token steps
    assert_matches_full_recompute(model, [prompt], tokens, step_logits)


def test_batch_of_unequal_prompts_matches_each_prompt_alone(make_model, record_step_logits):
    model = make_model(qk_norm=True)
    prompts = [[7, 8, 9, 10, 11, 12, 13], [200], [31, 32, 33]]
    tokens, step_logits = record_step_logits(model, prompts, 10)
    assert_matches_full_recompute(model, prompts, tokens, step_logits)
    for row, prompt in enumerate(prompts):  # batching does not change what each prompt generates
        assert generate(model, [prompt], SamplingConfig(max_new_tokens=10, temperature=0))[0] == tokens[row]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(moe_every=2, n_shared_experts=1, tie_embeddings=True),  # a dense layer, a shared expert, tied head
        dict(balance="bias", qk_norm=True, head_dim=6),
        dict(n_experts=0),  # dense model
    ],
)
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=NEEDS_CPP_COMPILER)])
def test_decoding_matches_full_recompute_across_architectures(overrides, compile, make_model, record_step_logits):
    model = make_model(**overrides)
    if overrides.get("balance") == "bias":
        with torch.no_grad():
            for block in model.layers:
                block.mlp.gate.expert_bias.copy_(torch.linspace(-0.3, 0.3, 4))
    prompts = [[5, 17, 42, 8], [99, 3]]  # left padding: masks and per-row RoPE positions
    tokens, step_logits = record_step_logits(model, prompts, 8, compile=compile)
    assert len(step_logits) == 8 and all(len(row) == 8 for row in tokens)
    assert_matches_full_recompute(model, prompts, tokens, step_logits)


def test_batches_of_more_than_few_rows_decode_right(make_model, record_step_logits):
    model = make_model()
    prompts = [[i + 1] * (i + 1) for i in range(FEW_TOKENS + 3)]
    tokens, step_logits = record_step_logits(model, prompts, 5)
    assert_matches_full_recompute(model, prompts, tokens, step_logits)


def test_steps_run_a_decoding_copys_forward_that_is_kept_until_a_weight_changes(make_model, record_step_logits):
    model = make_model()
    sampling = SamplingConfig(max_new_tokens=6, temperature=0)
    prefills = []
    handle = model.register_forward_hook(lambda *args: prefills.append(1))
    try:
        first = generate(model, [[1, 2, 3]], sampling)
    finally:
        handle.remove()
    assert len(prefills) == 1  # the prefill; the 5 steps run the decoding copy's GPT.forward
    copy = Decoder(model).step_model
    assert type(copy) is type(model) and copy is not model and Decoder(model).step_model is copy
    steps = []
    handle = copy.register_forward_hook(lambda *args: steps.append(1))
    try:
        assert generate(model, [[1, 2, 3]], sampling) == first
    finally:
        handle.remove()
    assert len(steps) == 5
    # Changing a weight in place (as an optimizer step does) must rebuild it, or decoding would use stale copies.
    with torch.no_grad():
        model.layers[0].mlp.experts.w2.mul_(-3.0)
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    assert Decoder(model).step_model is not copy
    # A model in training mode (samples during training) keeps no copies between calls.
    model.__dict__.pop(CACHE_ATTRIBUTE, None)
    model.train()
    generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=3, temperature=0))
    assert CACHE_ATTRIBUTE not in model.__dict__ and model.training
    model.eval()
    tokens, step_logits = record_step_logits(model, [[1, 2, 3]], 6)
    assert_matches_full_recompute(model, [[1, 2, 3]], tokens, step_logits)


def test_the_decoding_copy_is_the_model_with_its_matrices_laid_out(make_model):
    """Projections fused, norms folded, matrices as DecodeLinear: the same function as the model."""
    model = make_model(moe_every=2, n_shared_experts=1, qk_norm=True, balance="bias", tie_embeddings=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)  # ones would make the folding trivially right
        model.layers[1].mlp.gate.expert_bias.copy_(torch.tensor([0.2, -0.1, 0.0, 0.3]))
    embedding = model.embed_tokens.weight.clone()
    copy = decoding_model(model, None, "matvec")
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 7]])
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.embed_tokens.weight, embedding)  # folding the final norm left the tied embedding alone
    assert all(not isinstance(m, torch.nn.Linear) for m in copy.modules())
    for block in copy.layers:
        attention = block.self_attn
        assert attention.q_proj is None and isinstance(attention.qkv_proj, DecodeLinear)
        assert block.input_layernorm.weight is None and block.post_attention_layernorm.weight is None
        assert attention.q_norm.weight is not None  # QK-norm precedes RoPE: nothing to fold it into
        if block.is_moe:
            assert block.mlp.experts.w1 is None and len(block.mlp.experts.expert_linears) == 4
    assert copy.norm.weight is None and all(p.requires_grad is False for p in copy.parameters())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_reduced_precision_decode_weights_stay_close_to_float32(dtype, make_model, record_step_logits):
    model = make_model()
    prompts = [[5, 17, 42, 8, 99], [3]]
    tokens, exact = record_step_logits(model, prompts, 8)
    # Both runs share the prefill and so the first token; the first decoding step's logits are comparable.
    _, approx = record_step_logits(model, prompts, 8, dtype=dtype)
    assert len(approx) == len(exact)
    tolerance = {"float16": 5e-3, "bfloat16": 5e-2, "int8": 6e-2}[dtype]  # measured 1e-3, 1.3e-2, 2.1e-2
    torch.testing.assert_close(approx[0], exact[0], atol=1e-5, rtol=0)  # the prefill runs the model itself
    assert approx[1].dtype == torch.float32
    torch.testing.assert_close(approx[1], exact[1], atol=tolerance, rtol=0)
    with pytest.raises(UserError, match="dtype"):
        generate(model, [[1]], SamplingConfig(), DecodeOptions(dtype="float8"))


def test_int8_decoding_without_its_kernel_is_a_user_error(monkeypatch, make_model):
    monkeypatch.setattr(decode_module, "int8_decode_available", lambda: False)
    with pytest.raises(UserError, match="int8.*float16"):
        generate(make_model(), [[1]], SamplingConfig(), DecodeOptions(dtype="int8"))


def test_decode_options_are_validated_with_one_line_errors():
    DecodeOptions().validate()
    DecodeOptions(dtype="float16", compile=True).validate()
    with pytest.raises(UserError, match="dtype = 'float8' must be one of None, float32, float16, bfloat16, int8"):
        DecodeOptions(dtype="float8").validate()
    with pytest.raises(UserError, match="compiled decoding takes float32, bfloat16 or float16 weights, not int8"):
        DecodeOptions(dtype="int8", compile=True).validate()
    # Sampling rules and backend choice are separate: SamplingConfig has no backend fields.
    assert not {"dtype", "compile"} & {f.name for f in dataclasses.fields(SamplingConfig)}


def test_decoding_never_changes_the_thread_count(make_model, tokenizer_for_engine, monkeypatch):
    """Thread counts have one owner, the command (`decode_threads`, set once): never generate or the engine."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    model = make_model()
    generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=4, temperature=0))
    with Engine(model, tokenizer_for_engine, max_batch=2) as engine:
        engine.submit([1, 2, 3], SamplingConfig(max_new_tokens=4, temperature=0)).result(timeout=30)
    assert calls == []
    cpu = torch.device("cpu")
    assert decode_threads(cpu, FEW_TOKENS, compile=False) == 1
    assert decode_threads(cpu, FEW_TOKENS + 1, compile=False) is None
    assert decode_threads(cpu, 1, compile=True) is None


@pytest.fixture(name="tokenizer_for_engine", scope="module")
def tokenizer_for_engine_fixture():
    return Tokenizer.train_bpe(["O coração da nação bateu mais forte. " * 10], vocab_size=300, min_frequency=1)


def test_bfloat16_model_decodes_like_its_own_forward(make_model, record_step_logits):
    model = make_model().to(torch.bfloat16)
    prompt = [5, 17, 42, 8]
    tokens, step_logits = record_step_logits(model, [prompt], 4)
    assert_matches_full_recompute(model, [prompt], tokens, step_logits, atol=3e-2)  # bfloat16 rounding (<= 1.6e-2)


def test_no_module_outside_model_calls_the_models_math():
    """apply_rope, select_experts and swiglu are called only under model/: every decoder runs GPT.forward."""
    math = {"apply_rope", "select_experts", "swiglu", "swiglu_fused", "rotate_half", "rms_norm"}
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "model":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "name", None)
            if isinstance(node, (ast.Name, ast.Attribute, ast.alias)) and name in math:
                offenders.append(f"{path.relative_to(SRC)}: {name}")
    assert offenders == []


def centred_rms_norm(x, weight, eps, original=primitives.rms_norm):
    """A changed norm (mean-centred first, like LayerNorm without a bias): the weight stays the last factor."""
    return original(x - x.mean(-1, keepdim=True), weight, eps)


def engine_logprobs(model, tokenizer, prompt, tokens):
    """The engine's log-probabilities of the whole vocabulary at each of its steps, for a greedy request."""
    sampling = SamplingConfig(max_new_tokens=len(tokens), temperature=0, stop_token_ids=(-5,))
    with Engine(model, tokenizer, max_batch=2) as engine:
        events = list(engine.submit(prompt, sampling, logprobs=model.config.vocab_size).events(timeout=60))
    return [dict(event.top_logprobs) for event in events if event.token_id is not None]


@pytest.mark.parametrize("patched", [False, True])
def test_one_changed_function_under_model_changes_every_decoder_alike(patched, make_model, record_step_logits,
                                                                       tokenizer_for_engine, monkeypatch):
    """Patch RMSNorm's math once: training forward, eager and compiled generate and the engine still agree."""
    model = make_model(vocab_size=tokenizer_for_engine.vocab_size, n_layers=1)
    prompt, n_new = [5, 17, 42, 8], 6
    with torch.no_grad():
        before = model(torch.tensor([prompt])).logits[0, -1]
    if patched:
        monkeypatch.setattr(primitives, "rms_norm", centred_rms_norm)
    model.train()  # the training forward (no cache, no targets: its logits)
    with torch.no_grad():
        trained = model(torch.tensor([prompt])).logits[0, -1]
    model.eval()
    assert torch.allclose(trained, before, atol=1e-5) != patched  # the patch reached the model's forward
    tokens, eager = record_step_logits(model, [prompt], n_new)
    assert_matches_full_recompute(model, [prompt], tokens, eager)
    torch.testing.assert_close(eager[0][0], trained, atol=1e-5, rtol=0)
    logprobs = engine_logprobs(model, tokenizer_for_engine, prompt, tokens[0])
    assert len(logprobs) == n_new
    for step, logits in enumerate(eager):
        expected = torch.log_softmax(logits[0], -1)
        got = torch.tensor([logprobs[step][i] for i in range(model.config.vocab_size)])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    if NEEDS_CPP_COMPILER.args[0]:
        return  # no C++ compiler: compiled decoding is tested where there is one
    compiled_tokens, compiled = record_step_logits(model, [prompt], n_new, compile=True)
    assert compiled_tokens == tokens
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
