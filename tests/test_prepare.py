"""prepare: split determinism and disjointness, filters with reasons, the whole pipeline on a fixture mirror."""

import json

import pytest

from gtransformer.commands import prepare as prepare_command
from gtransformer.data import prepare as prep
from gtransformer.data.download import download
from gtransformer.errors import UserError
from gtransformer.data.shards import read_shard
from gtransformer.data.tokenizer import Tokenizer


def test_split_is_a_function_of_id_and_salt():
    ratios = (0.9, 0.05, 0.05)
    first = {i: prep.split_of(i, ratios, "s") for i in range(2000)}
    assert first == {i: prep.split_of(i, ratios, "s") for i in reversed(range(2000))}
    counts = {s: sum(v == s for v in first.values()) for s in prep.SPLITS}
    assert 1650 < counts["train"] < 1950 and 50 < counts["val"] < 150 and 50 < counts["test"] < 150
    other = {i: prep.split_of(i, ratios, "other") for i in range(2000)}
    assert other != first


def test_assign_splits_disjoint_stable_and_never_empty():
    books = [prep.Book(i, None) for i in range(1, 13)]
    prep.assign_splits(books, (0.9, 0.05, 0.05), "gtransformer")
    splits = {b.id: b.split for b in books}
    assert all(any(s == name for s in splits.values()) for name in prep.SPLITS)  # tiny corpus: none empty
    again = [prep.Book(i, None) for i in range(1, 13)]
    prep.assign_splits(again, (0.9, 0.05, 0.05), "gtransformer")
    assert splits == {b.id: b.split for b in again}
    # Adding books to a large corpus never moves the books already there.
    big = [prep.Book(i, None) for i in range(500)]
    prep.assign_splits(big, (0.9, 0.05, 0.05), "x")
    bigger = [prep.Book(i, None) for i in range(800)]
    prep.assign_splits(bigger, (0.9, 0.05, 0.05), "x")
    assert all(a.split == b.split for a, b in zip(big, bigger))


def test_filter_reasons():
    books = [
        prep.Book(1, None, text="a", info={"words": 500, "portuguese_share": 0.9}),
        prep.Book(2, None, text="b", info={"words": 500, "portuguese_share": 0.1, "language": "es"}),
        prep.Book(3, None, text="a", info={"words": 500, "portuguese_share": 0.9}),
        prep.Book(4, None, text="c", info={"words": 3, "portuguese_share": 1.0}),
    ]
    prep.filter_books(books)
    assert books[0].dropped is None
    assert "not mostly Portuguese" in books[1].dropped and "es" in books[1].dropped
    assert books[2].dropped == "exact duplicate of book 1"
    assert "too short" in books[3].dropped


def test_parse_split():
    assert prepare_command.parse_split("90/5/5") == pytest.approx((0.9, 0.05, 0.05))
    assert prepare_command.parse_split("0.8,0.1,0.1") == pytest.approx((0.8, 0.1, 0.1))
    for bad in ("90/10", "a/b/c", "0/50/50", "-1/1/1"):
        with pytest.raises(Exception):
            prepare_command.parse_split(bad)


def test_prepare_pipeline_on_fixture_mirror(small_mirror, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    download(str(small_mirror), raw, progress=False)
    stats = prep.prepare(raw, out, vocab_size=300, workers=1, ratios=(0.5, 0.25, 0.25))
    assert {p.name for p in out.iterdir()} >= {"train.bin", "val.bin", "test.bin", "tokenizer.json", "stats.json", "manifest.json"}
    assert stats["books"] == {"raw": 7, "kept": 6, "dropped": 1}
    assert "not mostly Portuguese" in stats["dropped"]["107"]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["books"]
    splits = {k: v["split"] for k, v in manifest.items() if not v["dropped"]}
    assert set(splits.values()) == {"train", "val", "test"}
    tokenizer = Tokenizer.from_file(out / "tokenizer.json")
    for split in prep.SPLITS:
        tokens = read_shard(out / f"{split}.bin")
        s = stats["splits"][split]
        assert len(tokens) == s["tokens"] and s["books"] == sum(v == split for v in splits.values())
        assert int((tokens == tokenizer.eot_id).sum()) == s["books"] and tokens[0] == tokenizer.eot_id
        text = tokenizer.decode(tokens[1:])  # every book comes back exactly, separated by <|endoftext|>
        assert len(text.replace("<|endoftext|>", "").encode("utf-8")) == s["bytes"]
        assert "Project Gutenberg" not in text and "Produced by" not in text and "\r" not in text
    val = stats["splits"]["val"]
    assert stats["val"]["bytes_per_token"] == pytest.approx(val["bytes"] / val["tokens"], rel=1e-3)


def test_duplicates_across_ids_and_user_errors(small_mirror, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    data = (small_mirror / "cache/epub/101/pg101.txt").read_bytes()
    for book_id in (5, 6, 7, 8):
        (raw / f"{book_id}.txt").write_bytes(data if book_id != 8 else data.replace(b"Capitulo", b"Parte"))
    stats = prep.prepare(raw, tmp_path / "out", vocab_size=300, workers=2)
    assert stats["dropped"] == {"6": "exact duplicate of book 5", "7": "exact duplicate of book 5"}
    with pytest.raises(UserError, match="does not exist"):
        prep.prepare(tmp_path / "nowhere", tmp_path / "o2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no books"):
        prep.prepare(tmp_path / "empty", tmp_path / "o3")
    with pytest.raises(UserError, match="is the --raw folder"):
        prep.prepare(raw, raw / ".", vocab_size=300)


def test_tokenizer_sample_is_a_deterministic_spread_of_train_blocks():
    def book(book_id, split="train", dropped=None):
        paragraphs = [f"Livro {book_id} paragrafo {i} " + "palavra " * 20 for i in range(200)]
        return prep.Book(book_id, None, text="\n\n".join(paragraphs), split=split, dropped=dropped)

    books = [book(i) for i in range(1, 21)] + [book(21, "val"), book(22, dropped="duplicate")]
    train_bytes = sum(len(b.text.encode()) for b in books[:20])
    assert prep.tokenizer_sample(books, None) == [b.text for b in books[:20]]
    assert prep.tokenizer_sample(books, train_bytes / 1e6 + 1) == [b.text for b in books[:20]]
    sample = prep.tokenizer_sample(books, train_bytes / 4e6, block_chars=2000)
    assert sample == prep.tokenizer_sample(list(reversed(books)), train_bytes / 4e6, block_chars=2000)
    assert sample != prep.tokenizer_sample(books, train_bytes / 4e6, salt="other", block_chars=2000)
    assert 0.15 < sum(len(s.encode()) for s in sample) / train_bytes < 0.35
    # Blocks are runs of whole paragraphs of train books, taken from most of them.
    sources = set()
    for block in sample:
        owner = next(b for b in books[:20] if block in b.text)
        assert block.startswith("Livro") and block.endswith("palavra ")
        sources.add(owner.id)
    assert len(sources) >= 15 and not any("Livro 21 " in s or "Livro 22 " in s for s in sample)
