"""The prepared folder holds one whole corpus: stats.json records each file's size and SHA-256, readers
check them and the shards' ids, a half-published prepare is finished by the next reader, and a raw
folder whose books differ from the download manifest is reported instead of prepared."""

import json
import shutil

import pytest

from gtransformer.data import corpus as corpus_module
from gtransformer.data import prepare as prep
from gtransformer.data.corpus import RECORDED, SPLITS, PreparedCorpus
from gtransformer.data.download import download
from gtransformer.data.shards import write_shard
from gtransformer.errors import UserError
from gtransformer.files import file_sha256
from gtransformer.training.trainer import Trainer


@pytest.fixture(scope="module")
def raw(tmp_path_factory, small_mirror_factory):
    root = tmp_path_factory.mktemp("integrity")
    download(str(small_mirror_factory(root / "mirror")), root / "raw", progress=False)
    return root / "raw"


def prepared(raw, out, vocab_size):
    prep.prepare(raw, out, vocab_size=vocab_size, workers=1, ratios=(0.5, 0.25, 0.25))
    return out


@pytest.fixture(scope="module")
def two_corpora(raw, tmp_path_factory):
    """The same books prepared with 300 and with 360 tokens."""
    root = tmp_path_factory.mktemp("two")
    return prepared(raw, root / "v300", 300), prepared(raw, root / "v360", 360)


def copy(folder, to):
    shutil.copytree(folder, to)
    return to


def test_stats_records_every_file_and_readers_accept_them(two_corpora):
    folder, _ = two_corpora
    stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    assert sorted(stats["files"]) == sorted(RECORDED)
    for name, record in stats["files"].items():
        assert record == {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    corpus = PreparedCorpus(folder).require(*SPLITS)
    assert corpus.tokenizer().vocab_size == 300 and corpus.manifest()["books"]
    assert all(len(corpus.tokens(s)) == stats["splits"][s]["tokens"] for s in SPLITS)
    assert not (folder / ".staging").exists()


@pytest.mark.parametrize("name", ["tokenizer.json", "train.bin", "manifest.json"])
def test_a_file_from_another_prepare_is_refused(two_corpora, tmp_path, name):
    folder = copy(two_corpora[0], tmp_path / "mixed")
    shutil.copy(two_corpora[1] / name, folder / name)
    with pytest.raises(UserError, match=f"{name} .*(bytes but|SHA-256).*rerun `gtransformer prepare"):
        corpus = PreparedCorpus(folder)
        corpus.require(*SPLITS)
        corpus.tokens("train")
        corpus.manifest()


def test_a_changed_or_truncated_shard_is_refused(two_corpora, tmp_path):
    folder = copy(two_corpora[0], tmp_path / "changed")
    raw = bytearray((folder / "val.bin").read_bytes())
    raw[-1] ^= 1
    (folder / "val.bin").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="val.bin differs from the SHA-256"):
        PreparedCorpus(folder).tokens("val")
    (folder / "val.bin").write_bytes(bytes(raw[:-2]))
    with pytest.raises(UserError, match=r"val.bin is \d+ bytes but .*stats.json records"):
        PreparedCorpus(folder).tokens("val")


def test_training_on_a_mixed_folder_fails_with_one_line_not_an_index_error(two_corpora, tmp_path, tiny_tables):
    """The issue's case: a new small-vocabulary tokenizer.json beside the old shards."""
    folder = copy(two_corpora[1], tmp_path / "mixed")
    shutil.copy(two_corpora[0] / "tokenizer.json", folder / "tokenizer.json")
    with pytest.raises(UserError, match="tokenizer.json"):
        Trainer(tiny_tables(folder), tmp_path / "run", progress_bar=False)
    # Without stats.json's records (a folder from an older version), the ids give it away.
    (folder / "stats.json").unlink()
    with pytest.raises(UserError, match=r"train.bin holds token id \d+ but its tokenizer has only 300 tokens"):
        Trainer(tiny_tables(folder), tmp_path / "run", progress_bar=False)


def test_a_shard_with_ids_beyond_the_vocabulary(tmp_path, make_corpus):
    folder = make_corpus(tmp_path / "corpus", vocab_size=300, sentences=50)
    write_shard(folder / "val.bin", [0, 906, 5], vocab_size=1024)
    with pytest.raises(UserError, match="holds token id 906 but its tokenizer has only 300 tokens"):
        PreparedCorpus(folder).tokens("val")


def test_a_half_published_prepare_is_finished_by_the_next_reader(two_corpora, raw, tmp_path, monkeypatch):
    folder = copy(two_corpora[0], tmp_path / "out")
    real_replace, moved = corpus_module.os.replace, []

    def replace_then_die(source, target):
        if target.parent == folder:
            if len(moved) == 3:
                raise KeyboardInterrupt  # "killed" after moving three of the six files up
            moved.append(target)
        real_replace(source, target)

    monkeypatch.setattr(corpus_module.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepared(raw, folder, 360)
    monkeypatch.setattr(corpus_module.os, "replace", real_replace)
    assert (folder / ".staging/READY").is_file() and len(moved) == 3
    corpus = PreparedCorpus(folder)
    assert corpus.tokenizer().vocab_size == 360  # the reader moved the rest up first
    assert all(len(corpus.tokens(s)) == corpus.stats()["splits"][s]["tokens"] for s in SPLITS)
    assert not (folder / ".staging").exists()


def test_an_unfinished_staging_folder_is_ignored_then_cleared(two_corpora, raw, tmp_path):
    folder = copy(two_corpora[0], tmp_path / "out")
    (folder / ".staging").mkdir()
    shutil.copy(two_corpora[1] / "tokenizer.json", folder / ".staging/tokenizer.json")
    (folder / ".staging/train.bin.tmp").write_bytes(b"GTSHARD\0half")
    assert PreparedCorpus(folder).require(*SPLITS).tokenizer().vocab_size == 300
    prepared(raw, folder, 360)
    assert PreparedCorpus(folder).tokenizer().vocab_size == 360 and not (folder / ".staging").exists()


def test_a_failed_prepare_leaves_the_old_corpus_and_no_staging(two_corpora, raw, tmp_path, monkeypatch):
    folder = copy(two_corpora[0], tmp_path / "out")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prep, "write_split_shards", full_disk)
    with pytest.raises(OSError):
        prepared(raw, folder, 360)
    assert PreparedCorpus(folder).require(*SPLITS).tokenizer().vocab_size == 300
    assert not (folder / ".staging").exists()


# --- the raw folder ----------------------------------------------------------------------------------


def test_a_truncated_or_changed_raw_book_is_reported(raw, tmp_path):
    damaged = copy(raw, tmp_path / "raw")
    data = (damaged / "101.txt").read_bytes()
    (damaged / "101.txt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"1 book file\(s\) in .* differ from .*manifest.json.*101.txt \(\d+ bytes, "
                                        r"the manifest records \d+\).*rerun `gtransformer download --out"):
        prep.prepare(damaged, tmp_path / "out", vocab_size=300, workers=1)
    (damaged / "101.txt").write_bytes(data.replace(b"Capitulo", b"Kapitulo"))  # same size, other bytes
    with pytest.raises(UserError, match=r"101.txt \(its SHA-256 differs"):
        prep.load_raw_books(damaged)
    assert not (tmp_path / "out").exists()


def test_a_book_gone_from_the_raw_folder_is_skipped_with_a_warning(raw, tmp_path, caplog):
    folder = copy(raw, tmp_path / "raw")
    (folder / "102.txt").unlink()
    assert [b.id for b in prep.load_raw_books(folder)] == [101, 103, 104, 105, 106, 107]
    assert "gone from" in caplog.text and "102" in caplog.text


@pytest.mark.parametrize(
    "books, problem",
    [
        ([1, 2], "no `books` object"),
        ({"../x": {"status": "ok", "file": "../x", "bytes": 1, "sha256": "0" * 64}}, "book id '../x' is not a positive integer"),
        ({"-3": {"status": "ok"}}, "book id '-3'"),
        ({"101": ["ok"]}, "book 101: not a record"),
        ({"101": {"status": "ok", "file": "101.txt", "bytes": "12", "sha256": "0" * 64}}, "book 101: `bytes` is not"),
        ({"101": {"status": "ok", "file": "101.txt", "bytes": 12}}, "book 101: `sha256` is not"),
        ({"101": {"status": "ok", "file": "../../etc/passwd", "bytes": 12, "sha256": "0" * 64}}, "book 101: `file` is not 101.txt"),
    ],
)
def test_a_raw_manifest_with_wrong_records_gives_one_line(raw, tmp_path, books, problem):
    folder = copy(raw, tmp_path / "raw")
    (folder / "manifest.json").write_text(json.dumps({"books": books}), encoding="utf-8")
    with pytest.raises(UserError, match="is not a download manifest") as error:
        prep.load_raw_books(folder)
    assert problem in str(error.value) and "\n" not in str(error.value)
