"""Token shards: header fields, dtype choice, memmap read-back, clear errors on damaged files."""

import struct

import numpy as np
import pytest

from gtransformer.errors import UserError
from gtransformer.data.shards import HEADER_SIZE, MAGIC, ShardWriter, read_header, read_shard, write_shard


def test_header_and_read_back_uint16(tmp_path):
    tokens = np.array([0, 1, 65535, 42, 7], dtype=np.int64)
    path = write_shard(tmp_path / "a.bin", tokens, vocab_size=65536)
    raw = path.read_bytes()
    magic, version, itemsize, count = struct.unpack("<8sIIQ", raw[:24])
    assert (magic, version, itemsize, count) == (MAGIC, 1, 2, 5)
    assert len(raw) == HEADER_SIZE + 5 * 2
    data = read_shard(path)
    assert isinstance(data, np.memmap) and data.dtype == np.uint16 and data.ndim == 1
    assert data.tolist() == tokens.tolist()


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    path = write_shard(tmp_path / "b.bin", [70000, 3], vocab_size=100_000)
    assert read_header(path) == (np.dtype("<u4"), 2)
    assert read_shard(path).tolist() == [70000, 3]
    assert read_shard(write_shard(tmp_path / "c.bin", [5, 6])).dtype == np.uint16  # inferred from max id


def test_writer_appends_batches_and_rejects_out_of_range(tmp_path):
    with ShardWriter(tmp_path / "d.bin", vocab_size=10) as writer:
        writer.write([1, 2])
        writer.write(np.array([3]))
        writer.write([])
    assert read_shard(tmp_path / "d.bin").tolist() == [1, 2, 3]
    with pytest.raises(ValueError), ShardWriter(tmp_path / "d.bin", vocab_size=10) as writer:
        writer.write([10])
    assert read_shard(tmp_path / "d.bin").tolist() == [1, 2, 3]  # the failed write left the old shard intact
    assert not (tmp_path / "d.bin.tmp").exists()


def test_empty_shard(tmp_path):
    assert len(read_shard(write_shard(tmp_path / "e.bin", [], vocab_size=10))) == 0


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:-2], "truncated"),
        (lambda raw: b"NOTASHRD" + raw[8:], "bad magic"),
        (lambda raw: raw[:8] + struct.pack("<I", 9) + raw[12:], "version"),
        (lambda raw: raw[:10], "too short"),
    ],
)
def test_damaged_shards_raise_user_errors(tmp_path, damage, message):
    path = write_shard(tmp_path / "f.bin", [1, 2, 3], vocab_size=10)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message):
        read_shard(path)


def test_missing_shard(tmp_path):
    with pytest.raises(UserError, match="gtransformer prepare"):
        read_shard(tmp_path / "nope.bin")


def test_ids_beyond_the_vocabulary_give_one_clear_line(tmp_path):
    path = write_shard(tmp_path / "g.bin", [0, 906, 5], vocab_size=1024)
    assert read_shard(path, vocab_size=907).tolist() == [0, 906, 5]
    with pytest.raises(UserError, match="holds token id 906 but its tokenizer has only 512 tokens"):
        read_shard(path, vocab_size=512)
    assert len(read_shard(write_shard(tmp_path / "h.bin", [], vocab_size=10), vocab_size=1)) == 0
