"""`PreparedCorpus`: the one owner of a prepared folder's file names (`prepare --out DIR`).

    DIR/train.bin val.bin test.bin   token shards (shards.py), <|endoftext|> before every book
    DIR/tokenizer.json               the tokenizer the shards were encoded with
    DIR/manifest.json                one record per book: split, dropped reason, what cleaning measured
    DIR/stats.json                   splits.{train,val,test}.{books,bytes,tokens,words}, settings, timings,
                                     files.{name}.{bytes,sha256} of the five files above (what belongs together)
    DIR/.staging/                    a prepare in progress; .staging/READY once every file in it is complete

`prepare` writes the new corpus into `.staging` (`staging()`), then `publish` marks it READY and
moves its files up, stats.json last. Every reader first finishes a READY publish that a killed
`prepare` left half done and ignores a `.staging` without READY, so DIR always holds one whole
corpus: the old one or the new one. Readers check each file against stats.json's size and SHA-256
(~1 ms per MB) and each shard's ids against the tokenizer's vocabulary, once per `PreparedCorpus`.
`prepare` writes it; `train` and `eval` read it. Nothing else spells these names.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gtransformer.data.shards import ShardWriter, read_shard
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.files import file_sha256, sync_path, write_bytes_atomic, write_json_atomic

SPLITS = ("train", "val", "test")
RECORDED = ("tokenizer.json", "manifest.json", "train.bin", "val.bin", "test.bin")  # stats.json's `files`
STAGING = ".staging"
READY = "READY"


class PreparedCorpus:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._checked: set[str] = set()  # names already checked against stats.json
        self._tokenizer: Tokenizer | None = None

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

    @property
    def staging_path(self) -> Path:
        return self.path / STAGING

    # -- reading ----------------------------------------------------------------------

    def require(self, *splits: str) -> "PreparedCorpus":
        """Raise one UserError naming the first missing or mismatched file among the given splits' shards and the tokenizer."""
        self.settle()
        paths = [*(self.shard_path(s) for s in splits), self.tokenizer_path]
        for path in paths:
            if not path.is_file():
                raise UserError(f"{path} not found; run `gtransformer prepare --out {self.path}` first "
                                f"(or pass --data with a prepared corpus folder)")
        for path in paths:
            self._check(path)
        return self

    def tokens(self, split: str) -> np.memmap:
        """The split's tokens (read-only memmap), checked against stats.json and the tokenizer's vocabulary."""
        self.settle()
        path = self.shard_path(split)
        self._check(path)
        return read_shard(path, self.vocab_size())

    def tokenizer(self) -> Tokenizer:
        self.settle()
        if self._tokenizer is None:
            self._check(self.tokenizer_path)
            self._tokenizer = Tokenizer.from_file(self.tokenizer_path)
        return self._tokenizer

    def vocab_size(self) -> int | None:
        """The tokenizer's vocabulary size (None without tokenizer.json)."""
        return self.tokenizer().vocab_size if self.tokenizer_path.is_file() else None

    def stats(self) -> dict[str, Any]:
        """stats.json, or {} for a folder prepared by hand without one."""
        self.settle()
        return self._read_json(self.stats_path)

    def manifest(self) -> dict[str, Any]:
        """manifest.json (`books.{id}.{title,author,split,dropped,raw_bytes,clean_bytes,...}`), or {} without one."""
        self.settle()
        self._check(self.manifest_path)
        return self._read_json(self.manifest_path)

    def split_bytes(self, split: str) -> int | None:
        """UTF-8 bytes of the text a split's shard encodes (what bits per byte divides by), when recorded."""
        return self.stats().get("splits", {}).get(split, {}).get("bytes")

    def _read_json(self, path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); rerun `gtransformer prepare --out {self.path}`") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object; "
                            f"rerun `gtransformer prepare --out {self.path}`")
        return data

    def _check(self, path: Path) -> None:
        """Raise a UserError when an existing file differs from stats.json's record of it (size, then SHA-256)."""
        if path.name in self._checked or not path.is_file():
            return
        files = self.stats().get("files", {})
        record = files.get(path.name) if isinstance(files, dict) else files
        if record is not None:
            fix = f"rerun `gtransformer prepare --out {self.path}`"
            if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
                    and isinstance(record.get("sha256"), str)):
                raise UserError(f"{self.stats_path}: files.{path.name} is not {{bytes, sha256}}; {fix}")
            size = path.stat().st_size
            if size != record["bytes"]:
                raise UserError(f"{path} is {size} bytes but {self.stats_path} records {record['bytes']}: the file "
                                f"is truncated or belongs to another prepare; {fix}")
            if file_sha256(path) != record["sha256"]:
                raise UserError(f"{path} differs from the SHA-256 {self.stats_path} records: the file was changed or "
                                f"belongs to another prepare; {fix}")
        self._checked.add(path.name)

    # -- writing (prepare) ----------------------------------------------------------------

    def settle(self) -> None:
        """Finish a publish that a killed `prepare` left half done (a READY staging folder); else do nothing."""
        staging = self.staging_path
        if not (staging / READY).is_file():
            return
        try:
            for name in (*RECORDED, "stats.json"):
                try:
                    os.replace(staging / name, self.path / name)
                except FileNotFoundError:  # moved already (by the killed run, or a concurrent reader)
                    pass
            sync_path(self.path)
            shutil.rmtree(staging, ignore_errors=True)
        except OSError as exc:
            raise UserError(f"{staging} holds a complete prepare that cannot be moved into {self.path} ({exc}); "
                            f"make the folder writable, or rerun `gtransformer prepare --out {self.path}`") from None
        self._checked.clear()
        self._tokenizer = None

    def staging(self) -> "PreparedCorpus":
        """An empty `.staging` corpus to write a new prepare into (an unfinished one from a killed run is removed)."""
        self.settle()
        shutil.rmtree(self.staging_path, ignore_errors=True)
        self.staging_path.mkdir(parents=True)
        return PreparedCorpus(self.staging_path)

    def publish(self, staged: "PreparedCorpus", stats: dict[str, Any]) -> dict[str, Any]:
        """Write stats.json (with each staged file's size and SHA-256) into `staged`, then move it all here."""
        files = {}
        for name in RECORDED:
            path = staged.path / name
            sync_path(path)
            files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        stats = {**stats, "files": files}
        staged.write_stats(stats)
        write_bytes_atomic(staged.path / READY, b"")
        self.settle()
        return stats

    def shard_writer(self, split: str, vocab_size: int) -> ShardWriter:
        return ShardWriter(self.shard_path(split), vocab_size)

    def write_tokenizer(self, tokenizer: Tokenizer) -> None:
        tokenizer.save(self.tokenizer_path)

    def write_stats(self, stats: dict[str, Any]) -> None:
        write_json_atomic(self.stats_path, stats, indent=2)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.manifest_path, manifest, indent=2)
