"""`gtransformer prepare`: raw books -> a prepared corpus folder (cleaned, split by book, tokenised)."""

from __future__ import annotations

import argparse
import math
import os
import time

from gtransformer.data.prepare import prepare
from gtransformer.errors import UserError


MIN_VOCAB = 257  # byte-level BPE: 256 byte tokens + <|endoftext|>
MAX_VOCAB = 2**32 - 1


def parse_split(text: str) -> tuple[float, float, float]:
    """'90/5/5', '0.9,0.05,0.05' or '90 5 5' -> fractions summing to 1."""
    try:
        parts = [float(p) for p in text.replace("/", " ").replace(",", " ").split()]
    except ValueError:
        parts = []
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or sum(parts) <= 0 or parts[0] <= 0:
        raise argparse.ArgumentTypeError(f"--split {text!r}: expected three non-negative ratios with train > 0, e.g. 90/5/5")
    total = sum(parts)
    return tuple(p / total for p in parts)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="clean, filter, split and tokenise downloaded books into training shards",
        description="Decode and clean every book in RAW, drop non-Portuguese and duplicate books, split by book id, "
        "train a byte-level BPE tokenizer on the train split (or use a tiktoken encoding) and write "
        "OUT/{train,val,test}.bin, tokenizer.json, stats.json and manifest.json.",
    )
    parser.add_argument("--raw", default="data/raw", help="folder written by `gtransformer download` (default data/raw)")
    parser.add_argument("--out", default="data/prepared", help="output folder (default data/prepared)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="BPE vocabulary size incl. <|endoftext|> (default 32768)")
    parser.add_argument("--min-words", type=int, default=5,
                        help="drop paragraphs with fewer words, except dialogue lines and short sentences (default 5)")
    parser.add_argument("--split", type=parse_split, default=(0.9, 0.05, 0.05),
                        help="train/val/test ratios by book, e.g. 90/5/5 (default)")
    parser.add_argument("--salt", "--seed", dest="salt", default="gtransformer", metavar="TEXT",
                        help="salt string of the book-id hash that picks each book's split: another salt, another "
                        "split (default gtransformer; --seed is the older name of this option)")
    parser.add_argument("--tiktoken", metavar="ENCODING",
                        help="use this tiktoken encoding (e.g. o200k_base) instead of training BPE; must be available offline")
    parser.add_argument("--min-portuguese", type=float, default=0.5,
                        help="drop books with a smaller share of words in Portuguese passages (default 0.5)")
    parser.add_argument("--tokenizer-sample-mb", type=float, default=48,
                        help="train BPE on about this many MB of the train split, in hashed ~16 KB blocks of every book "
                        "(default 48: val bytes/token within ~0.15%% of using all of it, in under half the time); "
                        "0 uses the whole train split")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes for cleaning (default min(2, CPUs))")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for option, folder in (("--raw", args.raw), ("--out", args.out)):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"{option} {folder} is a file; pass a folder")
    if args.tiktoken is None and args.vocab_size < MIN_VOCAB:
        raise UserError(f"--vocab-size {args.vocab_size} is too small; byte-level BPE needs at least {MIN_VOCAB} "
                        f"(256 bytes + <|endoftext|>)")
    if args.vocab_size > MAX_VOCAB:
        raise UserError(f"--vocab-size {args.vocab_size} is above {MAX_VOCAB} (token ids are stored as uint32)")
    if args.min_words < 0:
        raise UserError(f"--min-words {args.min_words} must not be negative")
    if args.workers < 1:
        raise UserError(f"--workers {args.workers} must be at least 1")
    if args.tokenizer_sample_mb < 0:
        raise UserError(f"--tokenizer-sample-mb {args.tokenizer_sample_mb} must not be negative (0 uses the whole train split)")
    if not 0 <= args.min_portuguese <= 1:
        raise UserError(f"--min-portuguese {args.min_portuguese} must lie between 0 and 1")
    started = time.perf_counter()
    stats = prepare(
        args.raw, args.out, vocab_size=args.vocab_size, min_words=args.min_words, ratios=args.split,
        salt=args.salt, tiktoken_encoding=args.tiktoken, workers=args.workers, min_portuguese=args.min_portuguese,
        tokenizer_sample_mb=args.tokenizer_sample_mb, progress=not args.no_progress,
    )
    books = stats["books"]
    print(f"prepare: {books['kept']} of {books['raw']} books kept, {books['dropped']} dropped ({time.perf_counter() - started:.1f}s)")
    for split, s in stats["splits"].items():
        print(f"  {split:5s} {s['books']:4d} books {s['bytes'] / 1e6:8.2f} MB {s['tokens']:>11,d} tokens")
    print(f"  val: {stats['val']['tokens_per_word']} tokens/word, {stats['val']['bytes_per_token']} bytes/token")
    for book_id, reason in stats["dropped"].items():
        print(f"  dropped {book_id}: {reason}")
    print(f"wrote {args.out}/{{train,val,test}}.bin, tokenizer.json, stats.json, manifest.json")
    return 0
