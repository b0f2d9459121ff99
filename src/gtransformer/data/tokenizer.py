"""The `Tokenizer` every stage codes against: byte-level BPE from `tokenizers`, or a tiktoken encoding.

Our own BPE is saved as a standard `tokenizer.json`, which
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)` loads as is. A
tiktoken encoding cannot be written in that format without the encoding's
rank file, so for it `tokenizer.json` holds only a small marker
(`{"gtransformer_tokenizer": "tiktoken", "encoding": "o200k_base"}`);
`Tokenizer.from_file` reads either.

Both are byte-level, so `decode(encode(text)) == text` for every string.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

try:
    import tiktoken  # optional: `prepare --tiktoken ENCODING`
except ImportError:
    tiktoken = None

from gtransformer.errors import UserError

EOT = "<|endoftext|>"
TIKTOKEN_MARKER = "gtransformer_tokenizer"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes->printable-unicode table used by byte-level BPE."""
    # ByteLevel.alphabet() is unordered; rebuild GPT-2's deterministic table.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    table = {chr(code): byte for byte, code in zip(printable, codes)}
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())
    return table


# Cut between the two newlines of a paragraph break before a non-space: byte-level BPE's
# pre-tokenizer always ends a token after the first of those newlines (`\s+(?!\S)`) and
# gives the second its own token, so encoding the pieces separately changes nothing.
_PARAGRAPH_CUT = re.compile(r"(?<=\n)(?=\n\S)")


def _pieces(text: str, target_chars: int = 4096) -> list[str]:
    """`text` as consecutive pieces of about `target_chars`, cut only at safe paragraph breaks."""
    if len(text) <= target_chars:
        return [text]
    pieces, current = [], ""
    for part in _PARAGRAPH_CUT.split(text):
        current += part
        if len(current) >= target_chars:
            pieces.append(current)
            current = ""
    if current or not pieces:
        pieces.append(current)
    return pieces


class Tokenizer:
    """A thin, uniform wrapper; construct with `train_bpe`, `from_tiktoken` or `from_file`."""

    def __init__(self, backend, kind: str, encoding_name: str | None = None):
        self._backend = backend
        self.kind = kind  # "bpe" or "tiktoken"
        self.encoding_name = encoding_name
        if kind == "bpe":
            eot = backend.token_to_id(EOT)
            if eot is None:
                raise UserError(f"tokenizer has no {EOT} token; rerun `gtransformer prepare` to build one")
            self.eot_id = eot
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        else:
            self.eot_id = backend.eot_token
            self.vocab_size = backend.n_vocab

    # -- construction ---------------------------------------------------------------

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 32768, min_frequency: int = 2) -> "Tokenizer":
        """Train byte-level BPE on `texts` (an iterable of documents) with `<|endoftext|>` as id 0."""
        if vocab_size < 257:
            raise UserError(f"--vocab-size {vocab_size} is too small; byte-level BPE needs at least 257 (256 bytes + {EOT})")
        backend = HFTokenizer(models.BPE())
        # No normaliser and no prefix space: the text is encoded byte for byte, so decoding is exact.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, "bpe")

    @classmethod
    def from_tiktoken(cls, encoding_name: str) -> "Tokenizer":
        if tiktoken is None:
            raise UserError(
                f"--tiktoken {encoding_name} needs the tiktoken package; `pip install tiktoken` or drop --tiktoken"
            )
        try:
            encoding = tiktoken.get_encoding(encoding_name)
        except ValueError as exc:
            raise UserError(f"unknown tiktoken encoding {encoding_name!r} ({exc}); try o200k_base or cl100k_base") from None
        except Exception as exc:  # network/cache failures come in many exception types
            raise UserError(
                f"tiktoken encoding {encoding_name!r} is not available offline ({type(exc).__name__}); "
                "run once with network access or set TIKTOKEN_CACHE_DIR to a folder holding its cached file, "
                "or drop --tiktoken to train our own BPE"
            ) from None
        if encoding.eot_token is None:
            raise UserError(f"tiktoken encoding {encoding_name!r} has no {EOT} token; pick another encoding")
        return cls(encoding, "tiktoken", encoding_name)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load what `save` wrote: a `tokenizers` JSON file, or the tiktoken marker file."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"tokenizer file {path} not found; run `gtransformer prepare` first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path} is not a tokenizer JSON file ({exc}); rerun `gtransformer prepare`") from None
        if isinstance(data, dict) and data.get(TIKTOKEN_MARKER) == "tiktoken":
            return cls.from_tiktoken(data["encoding"])
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise UserError(f"{path} could not be loaded as a tokenizer ({exc}); rerun `gtransformer prepare`") from None
        return cls(backend, "bpe")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        if self.kind == "bpe":
            self._backend.save(str(tmp))
        else:
            tmp.write_text(json.dumps({TIKTOKEN_MARKER: "tiktoken", "encoding": self.encoding_name}) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    # -- encoding -------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added."""
        if self.kind == "bpe":
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts, in parallel threads inside the backend.

        Long texts (whole books) are cut at paragraph breaks into pieces that the
        backend's threads share; the ids are exactly those of `encode(text)` because
        the cuts fall where the pre-tokenizer splits anyway (see `_pieces`).
        """
        if self.kind == "tiktoken":
            return self._backend.encode_ordinary_batch(list(texts))
        pieces, owners = [], []
        for index, text in enumerate(texts):
            for piece in _pieces(text):
                pieces.append(piece)
                owners.append(index)
        fast = getattr(self._backend, "encode_batch_fast", None)  # tokenizers >= 0.21 skips offsets
        encodings = (fast or self._backend.encode_batch)(pieces, add_special_tokens=False)
        results: list[list[int]] = [[] for _ in texts]
        for owner, encoding in zip(owners, encodings):
            results[owner].extend(encoding.ids)
        return results

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "bpe":
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._backend.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (may be part of a multi-byte UTF-8 character)."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside [0, {self.vocab_size})")
        if self.kind == "tiktoken":
            return self._backend.decode_single_token_bytes(token_id)
        if token_id == self.eot_id:
            return EOT.encode("utf-8")
        piece = self._backend.id_to_token(token_id)
        table = _byte_decoder()
        return bytes(table[ch] for ch in piece)

    def bpe_vocabulary(self) -> tuple[list[str], list[str]]:
        """(every token's string, by id; the merges as "left right", in rank order) of our own BPE: the
        byte-level strings `tokenizer.json` stores, which is what GGUF's "gpt2" tokenizer holds."""
        if self.kind != "bpe":
            raise UserError(f"a tiktoken encoding ({self.encoding_name}) has no BPE vocabulary file to copy")
        data = json.loads(self._backend.to_str())
        tokens: list[str | None] = [None] * self.vocab_size
        for piece, token_id in data["model"]["vocab"].items():
            tokens[token_id] = piece
        for added in data.get("added_tokens", []):
            tokens[added["id"]] = added["content"]
        if None in tokens:
            raise UserError(f"token id {tokens.index(None)} has no string in the tokenizer; rerun `gtransformer prepare`")
        merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in data["model"]["merges"]]
        return tokens, merges

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        name = f", encoding={self.encoding_name!r}" if self.encoding_name else ""
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}{name})"
