"""`gtransformer download`: Portuguese books from Project Gutenberg's catalog (or a mirror) into a raw folder."""

from __future__ import annotations

import argparse
import time

from gtransformer.data.download import DEFAULT_MIRROR, download, open_mirror
from gtransformer.errors import UserError


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        ids = []
    if not ids or any(i < 1 for i in ids):
        raise argparse.ArgumentTypeError(f"--ids {text!r}: expected positive book ids like 2837,3333")
    return ids


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "download",
        help="download Portuguese books from Project Gutenberg (or a mirror)",
        description="Read the Project Gutenberg catalog, keep Text books in the requested language(s) and "
        "save each as OUT/{id}.txt with a resumable OUT/manifest.json. Rerunning skips valid books.",
    )
    parser.add_argument("--mirror", default=DEFAULT_MIRROR,
                        help=f"https URL or local folder with Gutenberg's layout (default {DEFAULT_MIRROR})")
    parser.add_argument("--out", default="data/raw", help="folder for the books and manifest.json (default data/raw)")
    parser.add_argument("--language", action="append", dest="languages", metavar="CODE",
                        help="catalog language code to keep; repeat for several (default pt)")
    parser.add_argument("--ids", type=parse_ids, help="only these book ids, comma separated, e.g. 2837,3333")
    parser.add_argument("--limit", type=int, help="at most N books (the lowest ids first)")
    parser.add_argument("--delay", type=float,
                        help="seconds between HTTP requests (default 2 for remote mirrors, 0 for local or loopback)")
    parser.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout per request in seconds (default 30)")
    parser.add_argument("--retries", type=int, default=4, help="retries on 5xx and connection errors (default 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit} must be at least 1")
    if args.delay is not None and args.delay < 0:
        raise UserError(f"--delay {args.delay} must not be negative")
    if not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout} must be > 0 seconds")
    if args.retries < 0:
        raise UserError(f"--retries {args.retries} must not be negative")
    if any(not code.strip() for code in args.languages or []):
        raise UserError("--language needs a catalog language code such as pt")
    open_mirror(args.mirror, timeout=args.timeout, retries=args.retries).close()  # a wrong --mirror: before --out exists
    started = time.perf_counter()
    summary = download(
        mirror=args.mirror, out=args.out, languages=args.languages or ["pt"], ids=args.ids, limit=args.limit,
        delay=args.delay, timeout=args.timeout, retries=args.retries, progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - started
    print(
        f"download: {summary.ok} new, {summary.skipped} already there, {len(summary.missing)} missing, "
        f"{len(summary.failed)} failed; {summary.bytes / 1e6:.1f} MB in {args.out} ({elapsed:.1f}s)"
    )
    if summary.missing:
        print(f"missing on the mirror: {', '.join(map(str, summary.missing))}")
    if summary.failed:
        print(f"failed (network), rerun to retry: {', '.join(map(str, summary.failed))}")
        return 1
    return 0
