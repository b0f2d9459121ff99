"""The tokenizer's view of Portuguese: tokens per word, the longest and most frequent tokens, and one
sentence cut by our tokenizer and by tiktoken's encodings (when their files are available offline).

    token_text          one token as display text (its exact bytes, partial UTF-8 shown as \\x..)
    sample_text         the first tokens of a split (bounded), their text (documents joined by a newline)
    token_stats         tokens per word, bytes per token, pieces per word, most frequent / longest tokens
    load_tiktoken       tiktoken encodings as our `Tokenizer`, or a note when a file cannot be had offline
    compare_tokenizers  one text as the pieces of several tokenizers (`TokenizerView`)
    tokenization_html   those pieces as coloured spans, one line per tokenizer (for the notebook)
    pieces_figure       pieces-per-word histogram as a matplotlib Figure

Arrays: N tokens of the sample (numpy).
"""

from __future__ import annotations

import html
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

from gtransformer.data.clean import word_count
from gtransformer.data.tokenizer import Tokenizer

# The word pattern behind data.clean.word_count (a test checks that both count the same words).
WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")
TIKTOKEN_ENCODINGS = ("gpt2", "o200k_base")
# Background colours of alternating pieces in `tokenization_html`.
PIECE_COLOURS = ("#fde2b3", "#c9e4f6", "#d7f0c9", "#f4cfe3")


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The token's exact bytes as text; bytes of a partial UTF-8 character are shown as \\xNN."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace")


def sample_text(tokenizer: Tokenizer, tokens_N: np.ndarray, max_tokens: int) -> tuple[np.ndarray, str]:
    """(the first `max_tokens` tokens without <|endoftext|>, their text with a newline between documents)."""
    ids_N = np.asarray(tokens_N[:max_tokens], dtype=np.int64)
    documents, start = [], 0
    for end in [*np.flatnonzero(ids_N == tokenizer.eot_id).tolist(), len(ids_N)]:
        if end > start:
            documents.append(tokenizer.decode(ids_N[start:end].tolist()))
        start = end + 1
    return ids_N[ids_N != tokenizer.eot_id], "\n".join(documents)


@dataclass
class TokenStats:
    """What `token_stats` measured on a bounded sample of a split."""

    n_tokens: int  # tokens of the sample (<|endoftext|> excluded)
    n_words: int  # words of its text (data.clean.word_count)
    n_bytes: int  # UTF-8 bytes of its text
    pieces_per_word: dict[int, float]  # n -> fraction of word occurrences encoded (after a space) as n tokens
    most_frequent: list[tuple[str, int]]  # (token text, count in the sample), most frequent first
    longest: list[tuple[str, int]]  # (token text, bytes) of the vocabulary's longest tokens

    @property
    def tokens_per_word(self) -> float:
        return self.n_tokens / max(self.n_words, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(self.n_tokens, 1)


def pieces_per_word(tokenizer: Tokenizer, text: str) -> dict[int, float]:
    """n -> fraction of the word occurrences of `text` that `tokenizer` encodes as n tokens after a space."""
    words = Counter(WORD.findall(text))
    pieces: Counter[int] = Counter()
    for word, count in words.items():
        pieces[len(tokenizer.encode(" " + word))] += count
    total = sum(pieces.values())
    return {n: pieces[n] / total for n in sorted(pieces)} if total else {}


def token_stats(tokenizer: Tokenizer, tokens_N: np.ndarray, max_tokens: int = 20000, top: int = 20) -> TokenStats:
    """Tokens per word, bytes per token, pieces per word and the top tokens over the first `max_tokens` tokens."""
    ids_N, text = sample_text(tokenizer, tokens_N, max_tokens)
    counts = np.bincount(ids_N, minlength=tokenizer.vocab_size) if len(ids_N) else np.zeros(tokenizer.vocab_size, int)
    frequent = np.argsort(-counts, kind="stable")[:top]
    lengths = [(len(tokenizer.token_bytes(i)), i) for i in range(tokenizer.vocab_size) if i != tokenizer.eot_id]
    longest = sorted(lengths, key=lambda pair: (-pair[0], pair[1]))[:top]
    return TokenStats(
        n_tokens=len(ids_N),
        n_words=word_count(text),
        n_bytes=len(text.encode("utf-8")),
        pieces_per_word=pieces_per_word(tokenizer, text),
        most_frequent=[(token_text(tokenizer, i), int(counts[i])) for i in frequent if counts[i] > 0],
        longest=[(token_text(tokenizer, i), n) for n, i in longest],
    )


def load_tiktoken(names=TIKTOKEN_ENCODINGS, timeout_s: float = 5.0) -> dict[str, Tokenizer | str]:
    """name -> tiktoken encoding as a `Tokenizer`, or a note starting "not available offline".

    tiktoken downloads an encoding's file on first use; each load runs in a daemon thread and is
    given up after `timeout_s` in all, so a network that never answers cannot hang the caller.
    """
    results: dict[str, Tokenizer | str] = {}

    def load(name: str) -> None:
        try:
            results[name] = Tokenizer.from_tiktoken(name)
        except Exception as exc:  # UserError (offline, unknown, not installed) or anything tiktoken raises
            reason = str(exc).split(";")[0]
            results[name] = "not available offline" if "offline" in reason else f"not available offline ({reason})"

    threads = {name: threading.Thread(target=load, args=(name,), daemon=True) for name in names}
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads.values():
        thread.join(max(deadline - time.monotonic(), 0.0))
    return {name: results.get(name, f"not available offline (no answer within {timeout_s:g} s)") for name in names}


@dataclass
class TokenizerView:
    """One text as one tokenizer cuts it: its pieces, or a note why it could not."""

    name: str
    pieces: list[str] = field(default_factory=list)  # token_text of each token, in order
    note: str | None = None  # set when the tokenizer is unavailable (pieces is then empty)

    @property
    def n_tokens(self) -> int:
        return len(self.pieces)


def compare_tokenizers(text: str, tokenizers: dict[str, Tokenizer | str]) -> list[TokenizerView]:
    """`text` cut by each tokenizer; a str value (a note from `load_tiktoken`) gives a view with that note."""
    views = []
    for name, tokenizer in tokenizers.items():
        if isinstance(tokenizer, str):
            views.append(TokenizerView(name, note=tokenizer))
        else:
            views.append(TokenizerView(name, [token_text(tokenizer, i) for i in tokenizer.encode(text)]))
    return views


def tokenization_html(views: list[TokenizerView]) -> str:
    """An HTML table, one row per tokenizer: its token count and its pieces as alternately coloured spans."""
    rows = []
    for view in views:
        if view.note is not None:
            cells = f"<td>—</td><td><i>{html.escape(view.note)}</i></td>"
        else:
            spans = "".join(
                f'<span style="background:{PIECE_COLOURS[i % len(PIECE_COLOURS)]};padding:1px 0;'
                f'white-space:pre;font-family:monospace">{html.escape(piece)}</span>'
                for i, piece in enumerate(view.pieces)
            )
            cells = f"<td>{view.n_tokens}</td><td>{spans}</td>"
        rows.append(f"<tr><td><b>{html.escape(view.name)}</b></td>{cells}</tr>")
    header = "<tr><th>tokenizer</th><th>tokens</th><th>pieces</th></tr>"
    return f'<table style="border-collapse:collapse;text-align:left">{header}{"".join(rows)}</table>'


def pieces_figure(stats: TokenStats, max_pieces: int = 6) -> Figure:
    """Bar chart: fraction of word occurrences encoded as 1, 2, ... tokens (the last bar: max_pieces or more)."""
    shares = [stats.pieces_per_word.get(n, 0.0) for n in range(1, max_pieces)]
    shares.append(sum(v for n, v in stats.pieces_per_word.items() if n >= max_pieces))
    labels = [str(n) for n in range(1, max_pieces)] + [f"{max_pieces}+"]
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    ax.bar(labels, shares, color="#4c72b0")
    ax.set_xlabel("tokens per word")
    ax.set_ylabel("fraction of words")
    ax.set_title(f"{stats.tokens_per_word:.2f} tokens per word, {stats.bytes_per_token:.2f} bytes per token "
                 f"({stats.n_words} words)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
