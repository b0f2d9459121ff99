"""Tokenizer wrapper: exact round trips on arbitrary Unicode, token bytes, HF loading, tiktoken paths."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtransformer.errors import UserError
from gtransformer.inference.stream import TextStream
from gtransformer.data.tokenizer import EOT, Tokenizer, _pieces
from conftest import portuguese_text

TRAINING = [portuguese_text(20, seed) for seed in range(3)] + ["números 1234 e símbolos → ☃ 😀 ção"] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe(TRAINING, vocab_size=400)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_arbitrary_unicode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")
    text_stream = TextStream(tokenizer)  # the incremental decoder generation streams through
    assert "".join(text_stream.feed(i) for i in ids) + text_stream.finish() == text


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab \n\tç—")), max_size=60), max_size=40))
def test_encode_batch_pieces_match_whole_encode(tokenizer, paragraphs):
    text = "\n\n".join(paragraphs) * 40  # long enough to be cut into pieces
    assert "".join(_pieces(text, target_chars=64)) == text
    assert tokenizer.encode_batch([text, "x"]) == [tokenizer.encode(text), tokenizer.encode("x")]


def test_eot_and_vocab(tokenizer):
    assert tokenizer.eot_id == 0 and tokenizer.token_bytes(0) == EOT.encode()
    assert 257 <= tokenizer.vocab_size <= 400
    assert len(tokenizer.encode("O homem não sabia")) < len("O homem não sabia".encode())  # merges were learned


def test_save_load_and_transformers(tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    path = tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(path)
    text = "Ella disse: — Não! 😀\n\nFim."
    assert again.encode(text) == tokenizer.encode(text) and again.vocab_size == tokenizer.vocab_size
    assert Tokenizer.from_file(tmp_path).encode(text) == tokenizer.encode(text)  # a folder works too
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert hf.decode(tokenizer.encode(text)) == text


def test_too_small_vocab_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="vocab-size"):
        Tokenizer.train_bpe(["abc"], vocab_size=100)
    with pytest.raises(UserError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a tokenizer"):
        Tokenizer.from_file(tmp_path / "bad.json")


def test_tiktoken_unavailable_offline_is_one_clear_error(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="not available offline"):
        Tokenizer.from_tiktoken("o200k_base")


def test_tiktoken_available_round_trip_and_marker_file(monkeypatch, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ao"] = 256
    encoding = tiktoken.Encoding(
        name="tiny_test", pat_str=r"""\s+|\S+""", mergeable_ranks=ranks, special_tokens={EOT: 257}
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)
    tok = Tokenizer.from_tiktoken("tiny_test")
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("tiktoken", 258, 257)
    text = "não ao ção 😀"
    ids = tok.encode(text)
    assert 256 in ids and tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    path = tok.save(tmp_path / "tokenizer.json")
    assert json.loads(path.read_text())["encoding"] == "tiny_test"
    assert Tokenizer.from_file(path).encode(text) == ids
    assert tok.encode_batch([text]) == [ids]
