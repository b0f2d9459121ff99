"""`gtransformer download`: Portuguese books from Project Gutenberg (or a mirror) into data/raw.

The catalog (`cache/epub/feeds/pg_catalog.csv`) picks the books (positive integer
ids only: they name the files); each book is the first of four file layouts the
mirror has. A book is kept only once its whole body arrived (`HttpMirror`), then
written to a temporary name and renamed to `{id}.txt`, byte for byte (decoding is
`prepare`'s job), and recorded in `manifest.json` with its size and SHA-256; the
manifest is rewritten atomically every few books, so a download killed at any
moment resumes where it stopped. A rerun re-hashes what is there and fetches only
what is missing or damaged; `saved_books` (how `prepare` reads the folder) refuses
a book that differs from its record.

This module runs the download; the pieces live beside it: `catalog` (the CSV and
the choice of books), `fetch` (local and HTTP mirrors, retries) and `manifest`
(the raw folder and its records, `saved_books`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gtransformer.data.catalog import CATALOG_PATH, parse_catalog, select_books
from gtransformer.data.fetch import DEFAULT_MIRROR, NotFound, candidate_paths, open_mirror
from gtransformer.data.manifest import MANIFEST_NAME, book_filename, is_valid, load_manifest, remove_leftovers, sha256_bytes
from gtransformer.errors import UserError
from gtransformer.files import write_bytes_atomic, write_json_atomic


@dataclass
class DownloadSummary:
    ok: int = 0
    skipped: int = 0
    missing: list[int] = None
    failed: list[int] = None
    bytes: int = 0

    def __post_init__(self):
        self.missing = self.missing or []
        self.failed = self.failed or []


def download(
    mirror: str = DEFAULT_MIRROR,
    out: str | Path = "data/raw",
    languages: list[str] = ("pt",),
    ids: list[int] | None = None,
    limit: int | None = None,
    delay: float | None = None,
    timeout: float = 30.0,
    retries: int = 4,
    backoff: float = 1.0,
    max_wait: float = 60.0,
    progress: bool = True,
    save_every: float = 2.0,
) -> DownloadSummary:
    """Fetch the selected books into `out`; returns counts. Safe to rerun and to interrupt (even by SIGKILL):
    each book is renamed into place whole, and the manifest only ever records books already there."""
    if not (timeout > 0 and math.isfinite(timeout)):
        raise UserError(f"--timeout {timeout} must be a positive number of seconds, e.g. 30")
    if delay is not None and not (delay >= 0 and math.isfinite(delay)):
        raise UserError(f"--delay {delay} must be a non-negative number of seconds")
    if retries < 0:
        raise UserError(f"--retries {retries} must not be negative")
    if not (backoff >= 0 and max_wait >= 0):
        raise ValueError(f"backoff {backoff} and max_wait {max_wait} must not be negative")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    source = open_mirror(mirror, timeout=timeout, retries=retries, backoff=backoff, max_wait=max_wait)
    delay = source.default_delay if delay is None else delay
    manifest_path = out / MANIFEST_NAME
    manifest = load_manifest(manifest_path)
    books: dict[str, dict] = manifest["books"]
    summary = DownloadSummary()
    last_request = 0.0

    def polite_fetch(relative: str) -> bytes:
        nonlocal last_request
        wait = last_request + delay - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            return source.fetch(relative)
        finally:
            last_request = time.monotonic()

    try:
        try:
            catalog_bytes = polite_fetch(CATALOG_PATH)
        except NotFound:
            raise UserError(f"{source.url(CATALOG_PATH)} not found; is --mirror {mirror} a Project Gutenberg mirror?") from None
        except ConnectionError as exc:
            raise UserError(f"cannot read the catalog ({exc}); check --mirror and the network") from None
        try:
            catalog = catalog_bytes.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UserError(f"the catalog {source.url(CATALOG_PATH)} is not UTF-8 text (byte {exc.start}); "
                            f"is --mirror {mirror} a Project Gutenberg mirror?") from None
        entries = select_books(parse_catalog(catalog), list(languages), ids, limit)
        if not entries:
            raise UserError(f"no Text books in language(s) {', '.join(languages)} in the catalog; check --language/--ids")
        manifest.update({"mirror": mirror, "languages": list(languages), "catalog_books": len(entries)})

        bar = tqdm(total=len(entries), unit="book", disable=not progress, dynamic_ncols=True)
        last_save = time.monotonic()
        for entry in entries:
            key = str(entry.id)
            record = {"id": entry.id, "title": entry.title, "author": entry.authors, "language": "; ".join(entry.languages)}
            if is_valid(books.get(key), out):
                books[key].update(record)
                summary.skipped += 1
                summary.bytes += books[key]["bytes"]
            else:
                books[key] = record | fetch_book(polite_fetch, source, entry.id, out)
                status = books[key]["status"]
                if status == "ok":
                    summary.ok += 1
                    summary.bytes += books[key]["bytes"]
                elif status == "missing":
                    summary.missing.append(entry.id)
                else:
                    summary.failed.append(entry.id)
            bar.update(1)
            bar.set_postfix(
                new=summary.ok, kept=summary.skipped, missing=len(summary.missing), failed=len(summary.failed),
                MB=f"{summary.bytes / 1e6:.1f}", refresh=False,
            )
            if time.monotonic() - last_save >= save_every:
                write_json_atomic(manifest_path, manifest)
                last_save = time.monotonic()
        bar.close()
    finally:
        # Also on Ctrl-C or a crash: what was fetched so far is recorded.
        if books:
            write_json_atomic(manifest_path, manifest)
        source.close()
    return summary


def fetch_book(polite_fetch, source, book_id: int, out: Path) -> dict:
    """Try each layout in turn; a book absent everywhere is 'missing', a network failure 'error'."""
    errors = []
    for relative in candidate_paths(book_id):
        try:
            data = polite_fetch(relative)
        except NotFound:
            continue
        except ConnectionError as exc:
            errors.append(str(exc))
            continue
        filename = book_filename(book_id)
        write_bytes_atomic(out / filename, data)
        return {"status": "ok", "source_url": source.url(relative), "file": filename, "sha256": sha256_bytes(data), "bytes": len(data)}
    if errors:
        return {"status": "error", "error": errors[-1]}
    return {"status": "missing", "tried": [source.url(p) for p in candidate_paths(book_id)]}
