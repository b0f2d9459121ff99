"""Property-based tests (hypothesis): any bytes clean without a crash into valid text, and our byte-level BPE
gives back any unicode text exactly (decode, token bytes, and the paragraph pieces encode_batch cuts)."""

from functools import lru_cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import gutenberg_file
from gtransformer.data.clean import clean_book
from gtransformer.data.tokenizer import EOT, Tokenizer, _pieces
from gtransformer.data.toy import portuguese_like_text

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that reaches the cleaner's rules: paragraphs, dialogue dashes, quotes, Gutenberg words, odd whitespace.
pieces = st.sampled_from(["\n", "\n\n", "\r\n", " ", "\t", "--", "—", "«", "»", "“", "”", '"', "***", "START OF THE PROJECT GUTENBERG",
                          "END OF THIS PROJECT GUTENBERG EBOOK", "Produced by", "ção", "\ufeff", "\x00", "\u2028"])
texts = st.lists(st.one_of(st.text(max_size=40), pieces), max_size=60).map("".join)


def check_cleaned(raw: bytes) -> None:
    cleaned = clean_book(raw)
    assert isinstance(cleaned.text, str)
    cleaned.text.encode("utf-8")  # no lone surrogates: valid UTF-8 for the tokenizer and the shards
    assert "\r" not in cleaned.text and cleaned.raw_bytes == len(raw)
    assert cleaned.words >= 0 and 0.0 <= cleaned.portuguese_share <= 1.0


@SETTINGS
@given(st.binary(max_size=4000))
def test_any_bytes_clean_into_valid_text(raw):
    check_cleaned(raw)


@SETTINGS
@given(texts, st.sampled_from(["this", "the", "nospace", "wrapped"]), st.sampled_from(["utf-8", "latin-1", "cp1252"]),
       st.sampled_from([None, "ISO-8859-1", "UTF-8", "no-such-charset"]))
def test_any_book_in_gutenberg_wrapping_cleans_into_valid_text(body, style, encoding, charset):
    check_cleaned(gutenberg_file("Livro", body, style, charset).encode(encoding, errors="replace"))


@lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe([portuguese_like_text(seed, 200) for seed in range(4)], vocab_size=400)


@SETTINGS
@given(st.one_of(st.text(), texts, st.lists(st.sampled_from(["a", "ção", EOT, "\n\n", " "]), max_size=30).map("".join)))
def test_bpe_gives_back_any_text(text):
    ids = tokenizer().encode(text)
    assert tokenizer().decode(ids) == text
    assert b"".join(tokenizer().token_bytes(i) for i in ids) == text.encode("utf-8")


@SETTINGS
@given(st.lists(st.one_of(st.text(max_size=30), texts), min_size=1, max_size=12))
def test_paragraph_pieces_encode_like_the_whole_text(paragraphs):
    text = "\n\n".join(paragraphs)
    whole = tokenizer().encode(text)
    assert [i for piece in _pieces(text, target_chars=8) for i in tokenizer().encode(piece)] == whole
    assert "".join(_pieces(text, target_chars=8)) == text
