"""`PreparedCorpus`: the one owner of a prepared folder's file names (`prepare --out DIR`).

    DIR/train.bin val.bin test.bin   token shards (shards.py), <|endoftext|> before every book
    DIR/tokenizer.json               the tokenizer the shards were encoded with
    DIR/stats.json                   splits.{train,val,test}.{books,bytes,tokens,words}, settings, timings
    DIR/manifest.json                one record per book: split, dropped reason, what cleaning measured

`prepare` writes it; `train` and `eval` read it. Nothing else spells these names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gtransformer.data.shards import ShardWriter, read_shard
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.files import write_json_atomic

SPLITS = ("train", "val", "test")


class PreparedCorpus:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"PreparedCorpus({str(self.path)!r})"

    # -- names ------------------------------------------------------------------------

    def shard_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        return self.path / f"{split}.bin"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def stats_path(self) -> Path:
        return self.path / "stats.json"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    # -- reading ----------------------------------------------------------------------

    def require(self, *splits: str) -> "PreparedCorpus":
        """Raise one UserError naming the first missing file among the given splits' shards and the tokenizer."""
        for path in [*(self.shard_path(s) for s in splits), self.tokenizer_path]:
            if not path.is_file():
                raise UserError(f"{path} not found; run `gtransformer prepare --out {self.path}` first "
                                f"(or pass --data with a prepared corpus folder)")
        return self

    def tokens(self, split: str) -> np.memmap:
        return read_shard(self.shard_path(split))

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.tokenizer_path)

    def stats(self) -> dict[str, Any]:
        """stats.json, or {} for a folder prepared by hand without one."""
        if not self.stats_path.is_file():
            return {}
        try:
            return json.loads(self.stats_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{self.stats_path} is unreadable ({exc}); rerun `gtransformer prepare`") from None

    def manifest(self) -> dict[str, Any]:
        """manifest.json (`books.{id}.{title,author,split,dropped,raw_bytes,clean_bytes,...}`), or {} without one."""
        if not self.manifest_path.is_file():
            return {}
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{self.manifest_path} is unreadable ({exc}); rerun `gtransformer prepare`") from None

    def split_bytes(self, split: str) -> int | None:
        """UTF-8 bytes of the text a split's shard encodes (what bits per byte divides by), when recorded."""
        return self.stats().get("splits", {}).get(split, {}).get("bytes")

    # -- writing (prepare) ----------------------------------------------------------------

    def shard_writer(self, split: str, vocab_size: int) -> ShardWriter:
        return ShardWriter(self.shard_path(split), vocab_size)

    def write_tokenizer(self, tokenizer: Tokenizer) -> None:
        tokenizer.save(self.tokenizer_path)

    def write_stats(self, stats: dict[str, Any]) -> None:
        write_json_atomic(self.stats_path, stats, indent=2)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.manifest_path, manifest, indent=2)
