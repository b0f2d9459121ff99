"""GGUF export, checked with llama.cpp itself (llama-cpp-python): the file loads, cuts text into our token ids,
continues prompts greedily as `generate` does, and its quantised variants stay near our bits per byte."""

import json
import math
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest
import torch

from conftest import REAL_MIRROR
from gtransformer.cli import main
from gtransformer.data.clean import decode, normalise, strip_boilerplate
from gtransformer.data.shards import read_shard
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.inference.chat import DEFAULT
from gtransformer.interop import gguf as gguf_export
from gtransformer.training.checkpoint import load_for_inference
from gtransformer.training.trainer import train

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[test]')")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPTS = ["Era uma vez", "O amor é", "Naquela manhã, a cidade", "Ela não"]
CONTEXT = 128  # the presets' 256 halved: the windows below fit, and training is twice as fast
# Tokenizer edge cases beside the val text: accents, digits, punctuation runs, spaces, blank lines, CRLF,
# contractions, symbols and characters outside the tokenizer's merges.
TRICKY = [
    "Não, não há razão: ótimo, avó, maçã, pão — «coração»!", "Em 1889, 12.345,67 réis; 3ª edição (2.º vol.)",
    "  dois  espaços\t\ttab\n\n\nParágrafo\r\nCRLF  \n  ", "It's the dog's; don't we'll I'd",
    "ÁÉÍÓÚ ÂÊÔ ÃÕ Ç à ü ñ €½ 🙂 ‘aspas’ “duplas” ...!?", "", " ", "a", "\n",
]


def llama(path: Path, **options):
    return llama_cpp.Llama(model_path=str(path), n_ctx=CONTEXT, n_threads=1, n_batch=CONTEXT, verbose=False, **options)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_corpus):
    return make_corpus(tmp_path_factory.mktemp("corpus"), vocab_size=512, sentences=1500)


@pytest.fixture(scope="module", params=["tiny", "laptop"])
def trained(request, corpus, tiny_tables, tmp_path_factory):
    """(preset, run folder, f32 GGUF): the preset's architecture (tiny: MoE, laptop: dense with a tied head) with
    the toy corpus' vocabulary, trained 60 steps, exported with `gtransformer export --format gguf`."""
    preset = request.param
    tables = tiny_tables(corpus, max_steps=60, batch_size=4, lr=3e-3)
    model_table = tomllib.loads((CONFIGS / f"{preset}.toml").read_text())["model"]
    tables["model"] = model_table | {"vocab_size": Tokenizer.from_file(corpus).vocab_size, "context_length": CONTEXT}
    run = tmp_path_factory.mktemp(preset) / "run"
    train(tables, run, progress_bar=False)
    out = run.parent / f"{preset}.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 0
    return preset, run, out


def val_text(corpus: Path, tokenizer: Tokenizer, chars: int = 6000) -> str:
    return tokenizer.decode(read_shard(corpus / "val.bin")[: chars // 3].tolist())[:chars]


def test_llama_cpp_loads_the_export_with_our_architecture(trained):
    preset, run, path = trained
    model, tokenizer, _ = load_for_inference(run)
    config = model.config
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count"] == config.n_heads == 8
    assert fields["llama.attention.head_count_kv"] == config.n_kv_heads == 2
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    names = {tensor.name for tensor in reader.tensors}
    if preset == "tiny":  # MoE: Mixtral's layout in llama.cpp
        assert fields["llama.expert_count"] == 8 and fields["llama.expert_used_count"] == 2
        assert {"blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.weight", "output.weight"} <= names
    else:  # dense, tied head: no output.weight, llama.cpp reads token_embd
        assert "llama.expert_count" not in fields and "output.weight" not in names
        assert {"blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"} <= names
    runtime = llama(path, vocab_only=False)
    assert runtime.n_vocab() == config.vocab_size and runtime.n_embd() == config.d_model
    assert runtime.metadata["llama.context_length"] == str(CONTEXT)
    assert runtime.token_eos() == tokenizer.eot_id


def test_llama_cpp_cuts_val_text_into_our_token_ids(trained, corpus):
    _, run, path = trained
    _, tokenizer, _ = load_for_inference(run)
    runtime = llama(path, vocab_only=True)
    text = val_text(corpus, tokenizer)
    for sample in [text, *TRICKY]:
        ours = tokenizer.encode(sample)
        theirs = runtime.tokenize(sample.encode("utf-8"), add_bos=False, special=False)
        assert theirs == ours, sample[:80]
        assert runtime.detokenize(theirs).decode("utf-8") == sample


@pytest.mark.skipif(not REAL_MIRROR.is_dir(), reason=f"{REAL_MIRROR} not present")
def test_llama_cpp_cuts_real_books_into_our_token_ids(tmp_path, make_model):
    """A 4096-token BPE trained on real Portuguese books (as `prepare --vocab-size 4096` does) against llama.cpp,
    on other books of the mirror: old spelling, dialogue dashes, verse, numbers."""
    books = sorted((REAL_MIRROR / "cache" / "epub").glob("*/pg*.txt"))[:14]
    texts = [normalise(strip_boilerplate(decode(book.read_bytes())[0])) for book in books]
    tokenizer = Tokenizer.train_bpe(texts[:10], vocab_size=4096)
    path = tmp_path / "vocab.gguf"
    gguf_export.export_gguf(make_model(tokenizer.vocab_size), tokenizer, path)
    runtime = llama(path, vocab_only=True)
    for text in texts[10:]:
        sample = text[:200_000]
        assert runtime.tokenize(sample.encode("utf-8"), add_bos=False, special=False) == tokenizer.encode(sample)


def test_greedy_continuation_equals_generate(trained, capsys):
    _, run, path = trained
    _, tokenizer, _ = load_for_inference(run)
    runtime = llama(path)
    for prompt in PROMPTS:
        assert main(["generate", str(run), "--prompt", prompt, "--max-new-tokens", "32", "--temperature", "0",
                     "--repetition-penalty", "1", "--no-stream", "--device", "cpu"]) == 0
        ours = capsys.readouterr().out
        completion = runtime.create_completion(prompt, max_tokens=32, temperature=0.0, repeat_penalty=1.0,
                                               top_k=1, top_p=1.0, min_p=0.0)
        theirs = completion["choices"][0]["text"]
        assert ours == prompt + theirs + "\n", prompt
        new_tokens = len(tokenizer.encode(prompt + theirs)) - len(tokenizer.encode(prompt))
        assert new_tokens >= 32 or completion["choices"][0]["finish_reason"] == "stop", (prompt, new_tokens)


def bits_per_byte(logits_per_window, windows, tokenizer) -> float:
    nats, nbytes = 0.0, 0
    for logits, ids in zip(logits_per_window, windows):
        logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1)
        targets = torch.tensor(ids[1:])
        nats -= float(logp[torch.arange(len(ids) - 1), targets].sum())
        nbytes += sum(len(tokenizer.token_bytes(i)) for i in ids[1:])
    return nats / math.log(2) / nbytes


def windows_of_val(corpus: Path, count: int = 6) -> list[list[int]]:
    ids = read_shard(corpus / "val.bin").tolist()
    return [ids[start : start + CONTEXT] for start in range(0, count * CONTEXT, CONTEXT)]


def llama_logits(path: Path, windows) -> list[np.ndarray]:
    runtime = llama(path, logits_all=True)
    out = []
    for ids in windows:
        runtime.reset()
        runtime.eval(ids)
        out.append(np.array(runtime.scores[: len(ids) - 1]))
    return out


# Relative change of bits per byte, measured on these models (RESULTS.md, "GGUF export"): f32 4e-8, f16 1e-6,
# q8_0 7e-5; on 5-minute demo runs over the whole val split, at most 6e-6. The tolerances leave 15-25x room.
TOLERANCE = {"f32": 1e-6, "f16": 2e-5, "q8_0": 1e-3}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_bits_per_byte_from_llama_cpp_logits_stay_near_ours(trained, corpus, dtype, tmp_path):
    _, run, f32_path = trained
    model, tokenizer, _ = load_for_inference(run)
    path = f32_path if dtype == "f32" else tmp_path / f"{dtype}.gguf"
    if dtype != "f32":
        assert main(["export", str(run), "--format", "gguf", "--dtype", dtype, "--out", str(path)]) == 0
        assert path.stat().st_size < f32_path.stat().st_size * (0.55 if dtype == "f16" else 0.4)
    windows = windows_of_val(corpus)
    with torch.no_grad():
        ours = bits_per_byte([model(torch.tensor([w[:-1]])).logits[0] for w in windows], windows, tokenizer)
    theirs = bits_per_byte(llama_logits(path, windows), windows, tokenizer)
    assert abs(theirs - ours) / ours < TOLERANCE[dtype], (dtype, ours, theirs)


def test_the_chat_template_in_the_file_renders_our_dialogue(trained):
    _, _, path = trained
    reader = gguf.GGUFReader(path)
    template = reader.fields["tokenizer.chat_template"].contents()
    messages = [("system", "Responda em português."), ("user", " Olá! "), ("assistant", "Olá."),
                ("user", "Quem escreveu Dom Casmurro?")]
    rendered = jinja2.Environment().from_string(template).render(
        messages=[{"role": role, "content": content} for role, content in messages], add_generation_prompt=True)
    assert rendered == DEFAULT.render(messages)


MODELFILE_COMMAND = re.compile(
    r'^(?:(?P<command>FROM|TEMPLATE)|PARAMETER (?P<parameter>\w+)) '
    r'(?:"""(?P<triple>.*?)"""|"(?P<quoted>[^"\n]*)"|(?P<bare>[^\s"]\S*))$', re.M | re.S)


def modelfile_commands(text: str) -> list[tuple[str, str]]:
    """(command or parameter name, value) as Ollama's parser reads them: quotes removed, nothing unescaped,
    a triple-quoted value may span lines; lines starting with # are comments."""
    body = "\n".join(line for line in text.split("\n") if not line.startswith("#"))
    commands = [(m["command"] or m["parameter"], next(v for v in (m["triple"], m["quoted"], m["bare"]) if v is not None))
                for m in MODELFILE_COMMAND.finditer(body)]
    assert len(commands) == len([line for line in body.split("\n") if re.match(r"FROM|TEMPLATE|PARAMETER", line)])
    return commands


def test_the_modelfile_names_the_file_template_stops_and_sampling(trained):
    _, run, path = trained
    text = gguf_export.modelfile_path(path).read_text(encoding="utf-8")
    assert "\r" not in text
    commands = modelfile_commands(text)
    assert commands[:2] == [("FROM", f"./{path.name}"), ("TEMPLATE", DEFAULT.to_go_template())]
    assert [value for name, value in commands if name == "stop"] == [*DEFAULT.stop, "<|endoftext|>"]
    assert {name: value for name, value in commands[2:] if name != "stop"} == {
        "temperature": "0.8", "top_k": "50", "top_p": "0.95", "repeat_penalty": "1.1", "num_ctx": str(CONTEXT)}


def test_interleaved_rope_rows_give_pairwise_rope_the_same_scores():
    """What llama.cpp's llama computes (rotation of adjacent pairs) on the permuted rows equals our rotation of
    halves on the original ones: q.k per head is unchanged."""
    torch.manual_seed(0)
    n_heads, head_dim, d_model, T = 2, 8, 16, 5
    w = torch.randn(n_heads * head_dim, d_model)
    x = torch.randn(T, d_model)
    angle = torch.arange(T)[:, None] * (10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim))[None]
    cos, sin = angle.cos(), angle.sin()

    def halves(v):  # ours: (x1, x2) halves
        a, b = v[..., : head_dim // 2], v[..., head_dim // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    def pairs(v):  # llama.cpp's llama: adjacent pairs
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    ours = halves((x @ w.T).view(T, n_heads, head_dim).transpose(0, 1))
    theirs = pairs((x @ gguf_export.interleave_rope_rows(w, n_heads).T).view(T, n_heads, head_dim).transpose(0, 1))
    torch.testing.assert_close(ours @ ours.transpose(1, 2), theirs @ theirs.transpose(1, 2))


# --- bad inputs: one line, exit 2, nothing written --------------------------------------------------------


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_bad_exports_end_in_one_line_and_leave_nothing(tmp_path, make_run, capsys):
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        (["--dtype", "q4_k"], "--dtype q4_k is not available for --format gguf; choose one of f32, f16, q8_0"),
        (["--dtype", "q8_0", "--format", "hf"], "--dtype q8_0 is not available for --format hf"),
    ]
    for extra, message in cases:
        assert main(["export", str(run), "--format", "gguf", "--out", str(out / "m.gguf"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["export", str(tmp_path / "empty"), "--format", "gguf", "--out", str(out / "m.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "no-checkpoints").mkdir()
    assert main(["export", str(tmp_path / "no-checkpoints"), "--format", "gguf", "--out", str(out / "m.gguf")]) == 2
    assert "has no checkpoints" in capsys.readouterr().err
    assert files_in(out) == set()


@pytest.mark.parametrize("overrides, option", [
    ({"qk_norm": True}, "qk_norm"), ({"n_shared_experts": 1}, "n_shared_experts"), ({"moe_every": 2}, "moe_every"),
])
def test_options_llama_cpp_cannot_express_are_named(tmp_path, make_run, capsys, overrides, option):
    run = make_run(tmp_path / "run", **overrides)
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert f"cannot be exported to GGUF: {option}" in err and err.count("\n") == 1
    assert not any(p.suffix in (".gguf", ".Modelfile", ".partial") for p in tmp_path.iterdir())


def test_a_bytes_only_tokenizer_is_refused_before_anything_is_written(tmp_path, make_model):
    tokenizer = Tokenizer.train_bpe(["abc"], vocab_size=257, min_frequency=1)
    with pytest.raises(UserError, match="no merges"):
        gguf_export.export_gguf(make_model(tokenizer.vocab_size), tokenizer, tmp_path / "m.gguf")
    assert files_in(tmp_path) == set()


def test_an_existing_export_is_kept_without_force(tmp_path, make_run, capsys):
    run = make_run(tmp_path / "run")
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 0
    before = out.read_bytes(), gguf_export.modelfile_path(out).read_bytes()
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), "--dtype", "f16"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert (out.read_bytes(), gguf_export.modelfile_path(out).read_bytes()) == before
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), "--dtype", "f16", "--force"]) == 0
    assert out.stat().st_size < len(before[0])


def test_a_failed_write_leaves_no_file(tmp_path, make_run, monkeypatch):
    run = make_run(tmp_path / "run")
    model, tokenizer, _ = load_for_inference(run)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "modelfile", fail)
    with pytest.raises(OSError):
        gguf_export.export_gguf(model, tokenizer, tmp_path / "out" / "m.gguf")
    assert files_in(tmp_path / "out") == set()


GO_RENDER = """package main

import (
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	source, _ := os.ReadFile(os.Args[1])
	var conversations [][]Message
	if err := json.NewDecoder(os.Stdin).Decode(&conversations); err != nil { panic(err) }
	tmpl := template.Must(template.New("ollama").Parse(string(source)))
	var out []string
	for _, messages := range conversations {
		var text stringsBuilder
		if err := tmpl.Execute(&text, map[string]any{"Messages": messages}); err != nil { panic(err) }
		out = append(out, string(text))
	}
	json.NewEncoder(os.Stdout).Encode(out)
	fmt.Fprint(os.Stderr, "")
}

type stringsBuilder []byte

func (b *stringsBuilder) Write(p []byte) (int, error) { *b = append(*b, p...); return len(p), nil }
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (apt-get install golang-go)")
def test_the_ollama_template_renders_our_dialogue_under_go_text_template(tmp_path):
    """Ollama executes TEMPLATE with Go's text/template over .Messages (system messages included)."""
    conversations = [
        [("user", "Olá")],
        [("system", "Seja breve."), ("user", "Oi"), ("assistant", "Olá!"), ("user", "Tudo bem?")],
        [("system", "S1"), ("user", "Oi"), ("system", "S3"), ("user", "E aí")],
    ]
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "template").write_text(DEFAULT.to_go_template(), encoding="utf-8")
    result = subprocess.run(
        ["go", "run", "render.go", "template"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        input=json.dumps([[{"Role": role, "Content": content} for role, content in c] for c in conversations]),
        env={**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "off"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [DEFAULT.render(c) for c in conversations]
