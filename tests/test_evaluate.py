"""Bits per byte against a hand computation; `eval` and the other commands on a run folder alone."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gtransformer.cli import main
from gtransformer.training.evaluate import evaluate_split, token_byte_lengths
from gtransformer.model.config import ModelConfig
from gtransformer.model.model import GPT
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.training.trainer import train


pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_corpus) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), sentences=150)


def test_bits_per_byte_matches_a_hand_computation(corpus, tiny_tables):
    tokenizer = Tokenizer.from_file(corpus / "tokenizer.json")
    text = "Era uma vez uma casa na cidade. O amor é a vida, senhora!"
    tokens = np.array(tokenizer.encode(text), dtype=np.uint16)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**tiny_tables(corpus)["model"] | {"context_length": 8})).eval()

    # By hand: every token after the first predicted once, in chunks of 8 conditioned on their own chunk.
    nll = 0.0
    for start in range(0, len(tokens) - 1, 8):
        chunk = torch.tensor(tokens[start : start + 9].astype(np.int64))
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk[None, :-1]).logits[0].double(), dim=-1)
        nll -= float(logp[torch.arange(len(chunk) - 1), chunk[1:]].sum())
    text_bytes = len(text.encode("utf-8"))
    lengths = token_byte_lengths(tokenizer)

    whole = evaluate_split(model, tokens, 8, lengths, split_bytes=text_bytes, batch_size=3)
    assert whole["tokens"] == len(tokens) - 1
    assert whole["bits_per_byte"] == pytest.approx(nll / math.log(2) / text_bytes, rel=1e-5)
    assert whole["loss"] == pytest.approx(nll / (len(tokens) - 1), rel=1e-5)
    assert whole["perplexity"] == pytest.approx(math.exp(whole["loss"]), rel=1e-9)
    # Without a byte count it uses the exact bytes of the predicted tokens: the text minus its first token.
    first_bytes = len(tokenizer.token_bytes(int(tokens[0])))
    exact = evaluate_split(model, tokens, 8, lengths, batch_size=3)
    assert exact["bytes"] == text_bytes - first_bytes
    # A prefix of the split counts only the bytes of the tokens it predicted.
    prefix = evaluate_split(model, tokens, 8, lengths, split_bytes=text_bytes, max_targets=8)
    assert prefix["tokens"] == 8
    assert prefix["bytes"] == sum(len(tokenizer.token_bytes(int(t))) for t in tokens[1:9])


def test_run_folder_alone_serves_eval_generate_report_export(corpus, tmp_path, capsys, tiny_tables):
    # The corpus is copied, trained on, and then only the val/test shards stay where the run recorded them.
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    run = tmp_path / "run"
    train(tiny_tables(data, max_steps=3, sample_prompts=["Era uma vez"], sample_tokens=6), run, progress_bar=False)
    (data / "tokenizer.json").unlink()
    (data / "train.bin").unlink()

    assert main(["eval", str(run), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["step"] == 3
    assert set(result) >= {"loss", "perplexity", "bits_per_byte", "tokens", "tokens_per_s"}
    assert 0 < result["bits_per_byte"] < 20

    assert main(["generate", str(run), "--prompt", "Era uma", "--max-new-tokens", "5", "--seed", "1", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("Era uma")
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").is_file() and (run / "loss.png").is_file()
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


def test_eval_user_errors(corpus, tmp_path, capsys, tiny_tables):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    run = tmp_path / "run"
    train(tiny_tables(corpus, max_steps=1), run, progress_bar=False)
    assert main(["eval", str(run), "--data", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
