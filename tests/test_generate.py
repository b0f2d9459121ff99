"""Generation: cached logits equal a full recompute, sampling, stop rules, streaming text, the CLI."""

import argparse
import json
import os
import signal
import subprocess
import dataclasses
import functools
import sys
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gtransformer.commands import generate as generate_command
from gtransformer.inference import generate as generate_module
from gtransformer.training.checkpoint import load_for_inference, save_checkpoint
from gtransformer.errors import UserError
from gtransformer.inference.decode import Decoder
from gtransformer.inference.decode_weights import (
    CACHE_ATTRIBUTE,
    DecodeWeights,
    LayerDecodeWeights,
    SwiGLUDecodeWeights,
    fold_for_decoding,
    folded_rms_norm,
)
from gtransformer.inference.generate import DecodeOptions, generate, generate_text, iter_tokens, stream
from gtransformer.inference.sampling import SamplingConfig, apply_repetition_penalty, filter_logits
from gtransformer.inference.stream import TextStream
from gtransformer.model.moe import FEW_TOKENS, select_experts
from gtransformer.model.config import ModelConfig
from gtransformer.model.primitives import RMSNorm
from gtransformer.data.tokenizer import Tokenizer

# Tiny shapes: a second intra-op thread on a shared, busy machine only adds waiting.
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = (
    "O coração da nação bateu mais forte. Ação e reação, é só o começo: ótimo, avó, maçã, pão. "
    "Não há razão para não ler Machado de Assis e Eça de Queirós à noite. "
) * 3




@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe([TEXT], vocab_size=300, min_frequency=1)


@pytest.mark.parametrize("expert_impl", ["grouped", "loop"])
def test_cached_logits_equal_full_recompute_at_every_step(expert_impl, make_model, record_step_logits):
    model = make_model(expert_impl=expert_impl)
    prompt = [5, 17, 42, 8, 99, 3]
    tokens, step_logits = record_step_logits(model, [prompt], 12)
    assert len(tokens[0]) == 12 and len(step_logits) == 12  # prefill + 11 single-token steps
    with torch.no_grad():
        for i, cached in enumerate(step_logits):
            full = model(torch.tensor([prompt + tokens[0][:i]])).logits[:, -1]
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_batch_of_unequal_prompts_matches_each_prompt_alone(make_model, record_step_logits):
    model = make_model(qk_norm=True)
    prompts = [[7, 8, 9, 10, 11, 12, 13], [200], [31, 32, 33]]
    tokens, step_logits = record_step_logits(model, prompts, 10)
    with torch.no_grad():
        for i, cached in enumerate(step_logits):
            for row, prompt in enumerate(prompts):
                full = model(torch.tensor([prompt + tokens[row][:i]])).logits[0, -1]
                torch.testing.assert_close(cached[row], full, atol=1e-5, rtol=0)
    # and batching does not change what each prompt generates
    for row, prompt in enumerate(prompts):
        assert generate(model, [prompt], SamplingConfig(max_new_tokens=10, temperature=0))[0] == tokens[row]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(moe_every=2, n_shared_experts=1, tie_embeddings=True),  # a dense layer, a shared expert, tied head
        dict(balance="bias", qk_norm=True, head_dim=6),
        dict(n_experts=0),  # dense model
    ],
)
def test_fast_decoder_matches_full_recompute_across_architectures(overrides, make_model, record_step_logits):
    model = make_model(**overrides)
    if overrides.get("balance") == "bias":
        with torch.no_grad():
            for block in model.layers:
                block.mlp.gate.expert_bias.copy_(torch.linspace(-0.3, 0.3, 4))
    prompts = [[5, 17, 42, 8], [99, 3]]
    tokens, step_logits = record_step_logits(model, prompts, 8)
    with torch.no_grad():
        for i, cached in enumerate(step_logits):
            for row, prompt in enumerate(prompts):
                full = model(torch.tensor([prompt + tokens[row][:i]])).logits[0, -1]
                torch.testing.assert_close(cached[row], full, atol=1e-5, rtol=0)


def test_batches_larger_than_the_fast_path_decode_through_the_model_forward(make_model, record_step_logits):
    model = make_model()
    prompts = [[i + 1] * (i + 1) for i in range(FEW_TOKENS + 1)]
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        tokens, step_logits = record_step_logits(model, prompts, 5)
    finally:
        handle.remove()
    assert len(calls) == 5  # prefill + 4 cached steps through GPT.forward
    with torch.no_grad():
        for i, cached in enumerate(step_logits):
            for row, prompt in enumerate(prompts):
                full = model(torch.tensor([prompt + tokens[row][:i]])).logits[0, -1]
                torch.testing.assert_close(cached[row], full, atol=1e-5, rtol=0)


def test_decoding_steps_skip_the_module_forward_and_reuse_prepared_weights(make_model, record_step_logits):
    model = make_model()
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        first = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=6, temperature=0))
    finally:
        handle.remove()
    assert len(calls) == 1  # the prefill; the 5 decoding steps run on the prepared weights
    prepared = Decoder.prepared_weights(model)
    assert Decoder.prepared_weights(model) is prepared
    assert generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=6, temperature=0)) == first
    # Changing a weight in place (as an optimizer step does) must rebuild them, or decoding would use stale copies.
    with torch.no_grad():
        model.layers[0].mlp.experts.w2.mul_(-3.0)
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    assert Decoder.prepared_weights(model) is not prepared
    # A model in training mode (samples during training) keeps no copies between calls.
    model.train()
    generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=3, temperature=0))
    assert "eager" not in model.__dict__.get(CACHE_ATTRIBUTE, {}) and model.training
    model.eval()
    tokens, step_logits = record_step_logits(model, [[1, 2, 3]], 6)
    with torch.no_grad():
        for i, cached in enumerate(step_logits):
            full = model(torch.tensor([[1, 2, 3] + tokens[0][:i]])).logits[:, -1]
            torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


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
    first_decode = approx[1]
    assert first_decode.dtype == torch.float32
    torch.testing.assert_close(first_decode, exact[1], atol=tolerance, rtol=0)
    with pytest.raises(UserError, match="dtype"):
        generate(model, [[1]], SamplingConfig(), DecodeOptions(dtype="float8"))


def test_int8_decoding_without_its_kernel_is_a_user_error(monkeypatch, make_model):
    monkeypatch.setattr(generate_module, "int8_decode_available", lambda: False)
    with pytest.raises(UserError, match="int8.*float16"):
        generate(make_model(), [[1]], SamplingConfig(), DecodeOptions(dtype="int8"))


def test_decode_options_are_validated_with_one_line_errors():
    DecodeOptions().validate()
    DecodeOptions(dtype="float16", compile=True, single_thread_steps=True).validate()
    with pytest.raises(UserError, match="dtype = 'float8' must be one of None, float32, float16, bfloat16, int8"):
        DecodeOptions(dtype="float8").validate()
    with pytest.raises(UserError, match="compiled decoding takes float32, bfloat16 or float16 weights, not int8"):
        DecodeOptions(dtype="int8", compile=True).validate()
    # Sampling rules and backend choice are separate: SamplingConfig has no backend fields.
    assert not {"dtype", "compile"} & {f.name for f in dataclasses.fields(SamplingConfig)}


def test_generate_leaves_the_thread_count_alone_unless_single_thread_steps(make_model, monkeypatch):
    model = make_model()
    set_threads = torch.set_num_threads
    calls, step_threads = [], []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), set_threads(n)))
    original_step = Decoder.step
    monkeypatch.setattr(Decoder, "step", lambda self, *a: (step_threads.append(torch.get_num_threads()),
                                                           original_step(self, *a))[1])
    handle = model.register_forward_pre_hook(lambda *args: step_threads.append(torch.get_num_threads()))
    set_threads(2)
    try:
        sampling = SamplingConfig(max_new_tokens=4, temperature=0)
        plain = generate(model, [[1, 2, 3]], sampling)
        assert calls == [] and torch.get_num_threads() == 2 and step_threads == [2] * 4  # prefill + 3 steps
        step_threads.clear()
        assert generate(model, [[1, 2, 3]], sampling, DecodeOptions(single_thread_steps=True)) == plain
        assert step_threads == [1] * 4 and torch.get_num_threads() == 2 and calls[-1] == 2
    finally:
        handle.remove()
        set_threads(1)


def assert_holds_declared_types(obj) -> None:
    """Every field of a (nested) dataclass holds a value of its annotated type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        items = [value]
        if typing.get_origin(hint) is tuple:
            assert isinstance(value, tuple), f.name
            hint, items = typing.get_args(hint)[0], list(value)
        for item in items:
            assert isinstance(item, hint), f"{type(obj).__name__}.{f.name} holds {type(item).__name__}"
            if dataclasses.is_dataclass(item):
                assert_holds_declared_types(item)


@pytest.mark.parametrize("overrides", [dict(moe_every=2, n_shared_experts=1, qk_norm=True, balance="bias"),
                                       dict(n_experts=0)])
def test_fold_for_decoding_gives_typed_weights_both_decoders_read(overrides, make_model):
    model = make_model(**overrides)
    folded = fold_for_decoding(model)
    assert_holds_declared_types(folded)
    for block, layer in zip(model.layers, folded.layers, strict=True):
        assert (layer.routed_experts is not None) == block.is_moe
        assert (layer.dense_mlp is not None) == (not block.is_moe)
        assert (layer.shared_experts is not None) == (block.is_moe and model.config.n_shared_experts > 0)
    # The eager decoder's layout is the same structure, only the matrices re-laid out.
    eager = Decoder.prepared_weights(model)
    assert type(eager) is DecodeWeights and all(type(layer) is LayerDecodeWeights for layer in eager.layers)


def test_folded_weights_reproduce_the_models_own_layer_outputs(make_model):
    model = make_model(moe_every=2, n_shared_experts=1, qk_norm=True, balance="bias")
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)  # ones would make the folding trivially right
        model.layers[1].mlp.gate.expert_bias.copy_(torch.tensor([0.2, -0.1, 0.0, 0.3]))
    folded = fold_for_decoding(model)
    x = torch.randn(5, 32)
    normalised = folded_rms_norm(x, model.config.norm_eps)

    def swiglu_out(weights, h):
        gate, up = F.linear(h, weights.w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, weights.w2)

    close = functools.partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for block, layer in zip(model.layers, folded.layers):
            attn, h = block.self_attn, block.input_layernorm(x)
            close(F.linear(normalised, layer.qkv), torch.cat((attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)), -1))
            assert layer.q_norm is attn.q_norm.weight and layer.k_norm is attn.k_norm.weight
            expected = block.mlp(block.post_attention_layernorm(x)).output
            if not block.is_moe:
                close(swiglu_out(layer.dense_mlp, normalised), expected)
                continue
            experts = layer.routed_experts
            weights, ids = select_experts(F.linear(normalised, experts.router), experts.top_k, experts.expert_bias)
            out = swiglu_out(layer.shared_experts, normalised)
            for row in range(x.shape[0]):
                for weight, e in zip(weights[row], ids[row].tolist()):
                    expert = SwiGLUDecodeWeights(experts.w13[e], experts.w2[e])
                    out[row] += weight * swiglu_out(expert, normalised[row : row + 1])[0]
            close(out, expected)
        close(F.linear(normalised, folded.lm_head), model.lm_head(model.norm(x)))


def test_bfloat16_model_decodes_like_its_own_forward(make_model, record_step_logits):
    model = make_model().to(torch.bfloat16)
    prompt = [5, 17, 42, 8]
    tokens, step_logits = record_step_logits(model, [prompt], 4)
    with torch.no_grad():
        for i, cached in enumerate(step_logits):
            full = model(torch.tensor([prompt + tokens[0][:i]])).logits[:, -1].float()
            torch.testing.assert_close(cached, full, atol=3e-2, rtol=0)  # bfloat16 rounding (measured <= 1.6e-2)


def test_seeded_sampling_is_reproducible(make_model):
    model = make_model()
    sampling = dict(max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.2)
    a = generate(model, [[1, 2, 3], [4]], SamplingConfig(seed=123, **sampling))
    b = generate(model, [[1, 2, 3], [4]], SamplingConfig(seed=123, **sampling))
    c = generate(model, [[1, 2, 3], [4]], SamplingConfig(seed=124, **sampling))
    assert a == b
    assert a != c


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=None))
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=None, top_p=0.6))
    assert kept.tolist() == [[True, True, False, False, False]]  # 0.5 < 0.6, 0.5 + 0.2 reaches it
    kept = torch.isfinite(filter_logits(logits, top_k=None, top_p=0.1))
    assert kept.tolist() == [[True, False, False, False, False]]  # the most likely token always stays
    shuffled = logits[:, [3, 0, 4, 1, 2]]
    kept = torch.isfinite(filter_logits(shuffled, top_k=None, top_p=0.6))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([[2.0, -1.0, 3.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 3.0]]


class ScriptedModel(nn.Module):
    """Stands in for GPT: emits a fixed token sequence, whatever the input."""

    def __init__(self, script, vocab_size=300):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, context_length=128, d_model=8, n_layers=1, n_heads=2,
                                  n_kv_heads=1, n_experts=0, expert_hidden=8)
        self.embed_tokens = nn.Embedding(vocab_size, 8)
        self.script = list(script)
        self.step = 0

    def forward(self, input_ids, targets=None, return_stats=False, *, cache=None, position_ids=None,
                last_logits_only=False):
        cache.length += input_ids.shape[1]
        logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), -10.0)
        logits[:, 0, self.script[min(self.step, len(self.script) - 1)]] = 10.0
        self.step += 1
        return type("Out", (), {"logits": logits})()


def byte_tokens(tokenizer, text):
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    by_bytes = {tokenizer.token_bytes(i): i for i in range(tokenizer.vocab_size)}
    return [by_bytes[bytes([b])] for b in text.encode("utf-8")]


def test_streaming_never_yields_a_broken_character(tokenizer):
    text = "ação é ótimo 😀 pão"
    script = byte_tokens(tokenizer, text) + [tokenizer.eot_id]
    pieces = list(stream(ScriptedModel(script), tokenizer, "x", SamplingConfig(max_new_tokens=60, temperature=0)))
    assert "".join(pieces) == text
    assert len(pieces) > 5
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # a lone surrogate or half character would fail here


def test_stream_of_a_real_model_decodes_like_the_tokenizer(tokenizer, make_model):
    model = make_model()
    sampling = SamplingConfig(max_new_tokens=30, temperature=1.0, seed=7, stop_token_ids=(-5,))
    pieces = list(stream(model, tokenizer, "O coração", sampling))
    ids = generate(model, [tokenizer.encode("O coração")], sampling)[0]
    expected = b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
    assert "".join(pieces) == expected


def test_stop_token_ends_generation_and_is_not_returned(tokenizer):
    script = byte_tokens(tokenizer, "olá") + [tokenizer.eot_id] + byte_tokens(tokenizer, "mais")
    tokens = generate(ScriptedModel(script), [[1]], SamplingConfig(max_new_tokens=20, temperature=0,
                                                                  stop_token_ids=(tokenizer.eot_id,)))
    assert tokens == [byte_tokens(tokenizer, "olá")]


def test_stop_strings_cut_the_text_and_hold_back_partial_matches(tokenizer):
    script = byte_tokens(tokenizer, "Capítulo um. FIM do livro")
    sampling = SamplingConfig(max_new_tokens=40, temperature=0, stop_strings=("FIM",))
    pieces = list(stream(ScriptedModel(script), tokenizer, "x", sampling))
    assert "".join(pieces) == "Capítulo um. "
    assert generate_text(ScriptedModel(script), tokenizer, ["x"], sampling) == ["Capítulo um. "]
    # "F" might start "FIM": it is held back until the next character decides
    s = TextStream(tokenizer, ["FIM"])
    assert s.feed(byte_tokens(tokenizer, "a")[0]) == "a"
    assert s.feed(byte_tokens(tokenizer, "F")[0]) == ""
    assert s.feed(byte_tokens(tokenizer, "X")[0]) == "FX"


def test_max_new_tokens_and_context_errors(make_model):
    model = make_model()
    assert [len(t) for t in generate(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=7, temperature=0))] == [7, 7]
    assert list(iter_tokens(model, [[1]], SamplingConfig(max_new_tokens=0))) == []
    with pytest.raises(UserError, match="exceeds the model's context_length \\(64\\)"):
        generate(model, [[1] * 60], SamplingConfig(max_new_tokens=10))
    with pytest.raises(UserError, match="at least one token"):
        generate(model, [[]], SamplingConfig())
    with pytest.raises(UserError, match="top_p"):
        generate(model, [[1]], SamplingConfig(top_p=1.5))


def run_command(argv):
    """Parse and run like the `gtransformer` CLI, with only this module registered."""
    parser = argparse.ArgumentParser()
    generate_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def test_generate_command_streams_text_from_a_run_folder(tokenizer, tmp_path, capsys, make_model):
    model = make_model(vocab_size=tokenizer.vocab_size)
    run = tmp_path / "run"
    save_checkpoint(run, 1, model.state_dict(), {}, {"config": {"model": model.config.to_dict()}})
    tokenizer.save(run / "tokenizer.json")
    args = ["generate", str(run), "--prompt", "O coração", "--max-new-tokens", "12", "--seed", "3"]
    assert run_command(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("O coração") and len(first) > len("O coração")
    assert run_command(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert run_command(args[:2] + ["--num-samples", "2", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2
    assert run_command(args + ["--decode-dtype", "float16"]) == 0
    assert capsys.readouterr().out.startswith("O coração")
    assert run_command(args[:2] + ["--max-new-tokens", "500"]) == 2
    assert "context_length" in capsys.readouterr().err
    assert run_command(["generate", str(tmp_path / "missing")]) == 2


def gtransformer(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gtransformer", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def test_prompt_from_standard_input_and_a_prompts_file(tmp_path, make_run):
    run = make_run(tmp_path / "run", context_length=128)
    piped = gtransformer("generate", str(run), "--max-new-tokens", "6", "--seed", "1", input="Era uma vez")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("Era uma vez") and len(piped.stdout) > len("Era uma vez\n")
    assert "tokens/s" in piped.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Era uma vez\n\nO coração\nNão há razão\n", encoding="utf-8")
    batch = gtransformer("generate", str(run), "--prompts", str(prompts), "--max-new-tokens", "5",
                         "--temperature", "0", "--repetition-penalty", "1", stdin=subprocess.DEVNULL)
    assert batch.returncode == 0, batch.stderr
    rows = [json.loads(line) for line in batch.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["Era uma vez", "O coração", "Não há razão"]
    model, tokenizer, _ = load_for_inference(run)
    alone = generate_text(model, tokenizer, ["O coração"], SamplingConfig(max_new_tokens=5, temperature=0))
    assert rows[1]["text"] == alone[0]  # the batch decodes each prompt as it would alone
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    refused = gtransformer("generate", str(run), "--prompts", str(empty), stdin=subprocess.DEVNULL)
    assert refused.returncode == 2 and "no prompt" in refused.stderr and "Traceback" not in refused.stderr


def test_interactive_loop_survives_ctrl_c_during_a_generation(tmp_path, make_run):
    # Wide enough that 400 tokens take a few seconds: Ctrl-C lands mid-generation.
    run = make_run(tmp_path / "run", context_length=512, d_model=128, n_layers=4, expert_hidden=256)
    process = subprocess.Popen([sys.executable, "-m", "gtransformer", "generate", str(run), "--interactive",
                                "--max-new-tokens", "400", "--seed", "1"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    process.stdin.write("Era uma vez\n")
    process.stdin.flush()
    assert process.stdout.read(len("> Era uma vez")) == "> Era uma vez"
    process.stdout.read(3)  # a few characters of the continuation have streamed
    process.send_signal(signal.SIGINT)
    out, err = process.communicate("O coração\n", timeout=120)
    assert process.returncode == 0, err
    assert "[interrompido]" in out and "O coração" in out
    assert err.count("tokens/s") == 2 and "Traceback" not in err


def test_a_model_vocab_larger_than_the_tokenizer_never_samples_a_missing_id(make_model):
    """model.vocab_size may exceed the tokenizer's (padding, a smaller prepared vocabulary): never sample those ids."""
    tokenizer = Tokenizer.train_bpe(["Era uma vez uma casa. O amor é fogo que arde sem se ver. " * 20],
                                    vocab_size=300, min_frequency=1)
    n = tokenizer.vocab_size
    model = make_model(vocab_size=n + 20)
    with torch.no_grad():
        model.lm_head.weight[n:] = model.lm_head.weight[:20] * 50  # the missing ids would win every step
    prompt = [tokenizer.encode("Era uma vez")]
    unlimited = generate(model, prompt, SamplingConfig(max_new_tokens=8, temperature=0))[0]
    assert any(t >= n for t in unlimited)  # the setup really prefers them
    for temperature in (0, 1.0):
        sampling = SamplingConfig(max_new_tokens=8, temperature=temperature, seed=1)
        limited = generate(model, prompt, generate_module.for_tokenizer(tokenizer, sampling))[0]
        assert limited and all(0 <= t < n for t in limited)
        (text,) = generate_text(model, tokenizer, ["Era uma vez"], sampling)  # decodes without an error
        assert isinstance(text, str)
