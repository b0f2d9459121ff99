"""Generation: streaming text, stop rules, context errors, the `generate` command."""

import argparse
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from gtransformer.commands import generate as generate_command
from gtransformer.training.checkpoint import load_for_inference, save_checkpoint
from gtransformer.errors import UserError
from gtransformer.inference.generate import generate, generate_text, iter_tokens, stream
from gtransformer.inference.sampling import SamplingConfig
from gtransformer.inference.stream import TextStream
from gtransformer.model.config import ModelConfig
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
    with pytest.raises(UserError, match="a prompt has no tokens"):
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


