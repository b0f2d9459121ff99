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
"""

from __future__ import annotations

import csv
import email.utils
import hashlib
import io
import ipaddress
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3
from tqdm import tqdm

from gtransformer import __version__
from gtransformer.errors import UserError
from gtransformer.files import file_sha256, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_MIRROR = "https://www.gutenberg.org"
CATALOG_PATH = "cache/epub/feeds/pg_catalog.csv"
USER_AGENT = f"gtransformer/{__version__} (+https://github.com/gtransformer/gtransformer)"
MANIFEST_NAME = "manifest.json"
# What `files.write_bytes_atomic` leaves behind when a download is killed mid-write.
_LEFTOVER = re.compile(r"\.(?:\d+\.txt|manifest\.json)\.\d+\.tmp")


def candidate_paths(book_id: int) -> list[str]:
    """Where a mirror may keep a book's plain text, most likely first."""
    return [
        f"cache/epub/{book_id}/pg{book_id}.txt",
        f"files/{book_id}/{book_id}-0.txt",
        f"files/{book_id}/{book_id}-8.txt",
        f"files/{book_id}/{book_id}.txt",
    ]


# ----------------------------------------------------------------------------------------
# Catalog


@dataclass(frozen=True)
class CatalogEntry:
    id: int
    type: str
    title: str
    languages: tuple[str, ...]
    authors: str


def parse_catalog(text: str) -> list[CatalogEntry]:
    """Rows of Gutenberg's CSV catalog (quoted fields may hold newlines); rows without a positive id are skipped."""
    try:
        return _parse_catalog(text)
    except csv.Error as exc:
        raise UserError(f"the catalog is not valid CSV ({exc}); is --mirror a Project Gutenberg mirror?") from None


def _parse_catalog(text: str) -> list[CatalogEntry]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    required = {"Text#", "Type", "Title", "Language", "Authors"}
    if not reader.fieldnames or not required <= set(reader.fieldnames):
        raise UserError(
            f"the catalog's header is {reader.fieldnames!r}, expected columns {sorted(required)}; "
            "is --mirror a Project Gutenberg mirror?"
        )
    entries = []
    for row in reader:
        book_id = (row["Text#"] or "").strip()
        if not is_book_id(book_id):
            continue
        book_id = int(book_id)
        languages = tuple(part.strip() for part in (row["Language"] or "").split(";") if part.strip())
        entries.append(
            CatalogEntry(
                id=book_id,
                type=(row["Type"] or "").strip(),
                title=" ".join((row["Title"] or "").split()),
                languages=languages,
                authors=" ".join((row["Authors"] or "").split()),
            )
        )
    return entries


def select_books(
    entries: list[CatalogEntry], languages: list[str], ids: list[int] | None = None, limit: int | None = None
) -> list[CatalogEntry]:
    """Text books in any of `languages`, optionally only `ids`, in id order, at most `limit`."""
    wanted = {lang.lower() for lang in languages}
    chosen = [e for e in entries if e.type == "Text" and wanted & {lang.lower() for lang in e.languages}]
    if ids:
        by_id = {e.id: e for e in chosen}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            log.warning("ids not in the catalog as %s text books, skipped: %s", "/".join(languages), unknown)
        chosen = [by_id[i] for i in ids if i in by_id]
    else:
        chosen.sort(key=lambda e: e.id)
    return chosen[:limit] if limit is not None else chosen


# ----------------------------------------------------------------------------------------
# Mirrors


class NotFound(Exception):
    """The mirror has no file at that path (HTTP 404/410 or a missing local file)."""


class Transient(Exception):
    """A failure worth another try: no connection, a timeout, HTTP 429/5xx, a short body, an HTML page."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait  # what Retry-After asked for, in seconds


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError, OverflowError):
        return None


class LocalMirror:
    """A folder with Gutenberg's layout, read directly."""

    def __init__(self, root: Path):
        self.root = root
        self.default_delay = 0.0

    def url(self, relative: str) -> str:
        return str(self.root / relative)

    def fetch(self, relative: str) -> bytes:
        path = self.root / relative
        if not path.is_file():
            raise NotFound(relative)
        return path.read_bytes()

    def close(self) -> None:
        pass


class HttpMirror:
    """Polite HTTP: one session, a User-Agent naming the project, timeouts, bounded retries with backoff.

    A response counts only when it is a 200 whose whole body arrived: as long as its Content-Length,
    within `timeout` seconds of silence per read and `BODY_TIMEOUTS * timeout` in all, and not an
    HTML page. Anything else is retried `retries` times, after `backoff * 2**attempt` seconds or what
    Retry-After asks for, each wait at most `max_wait`; 404/410 mean "not here" at once.
    """

    BODY_TIMEOUTS = 20

    def __init__(self, base_url: str, timeout: float = 30.0, retries: int = 4, backoff: float = 1.0,
                 max_wait: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.default_delay = 0.0 if is_loopback(urlsplit(base_url).hostname) else 2.0
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT

    def url(self, relative: str) -> str:
        return f"{self.base_url}/{relative}"

    def fetch(self, relative: str) -> bytes:
        url = self.url(relative)
        for attempt in range(self.retries + 1):
            try:
                return self._get(url)
            except Transient as exc:
                error = exc
                log.debug("%s: %s (attempt %d of %d)", url, exc, attempt + 1, self.retries + 1)
                if attempt < self.retries:
                    time.sleep(min(self.backoff * 2**attempt if exc.wait is None else exc.wait, self.max_wait))
        raise ConnectionError(f"{url}: {error} ({self.retries + 1} attempts)")

    def _get(self, url: str) -> bytes:
        try:
            with self.session.get(url, timeout=self.timeout, stream=True) as response:
                status = response.status_code
                if status in (404, 410):
                    raise NotFound(url)
                if status == 429 or status >= 500:
                    raise Transient(f"HTTP {status}", retry_after(response.headers.get("Retry-After")))
                if status != 200:
                    raise ConnectionError(f"{url}: HTTP {status}")
                if "html" in response.headers.get("Content-Type", "").lower():
                    raise Transient("an HTML page, not a plain-text file")
                deadline = time.monotonic() + self.BODY_TIMEOUTS * self.timeout
                chunks = []
                # read1: one socket read per chunk, so a trickle cannot hold a chunk open past the deadline.
                while chunk := response.raw.read1(1 << 16, decode_content=True):
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise Transient(f"the body took over {self.BODY_TIMEOUTS * self.timeout:g} s")
                body = b"".join(chunks)
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and not response.headers.get("Content-Encoding") and len(body) != int(declared):
                    raise Transient(f"{len(body)} bytes of the {declared} announced")
                if body[:256].lstrip().lower().startswith((b"<!doctype html", b"<html")):
                    raise Transient("an HTML page, not a plain-text file")
                return body
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        self.session.close()


def open_mirror(mirror: str, timeout: float = 30.0, retries: int = 4, backoff: float = 1.0, max_wait: float = 60.0):
    scheme = urlsplit(mirror).scheme.lower()
    if scheme in ("http", "https"):
        return HttpMirror(mirror, timeout=timeout, retries=retries, backoff=backoff, max_wait=max_wait)
    root = Path(mirror[7:] if scheme == "file" else mirror).expanduser()
    if not root.is_dir():
        raise UserError(f"--mirror {mirror} is neither an http(s) URL nor an existing folder; pass a URL or a mirror folder")
    return LocalMirror(root)


# ----------------------------------------------------------------------------------------
# The raw folder: {id}.txt and manifest.json


class UnreadableManifest(UserError):
    """manifest.json is not JSON (e.g. cut short by a crash of an older version)."""


def is_book_id(text: str) -> bool:
    """A positive decimal integer in ASCII digits: the only ids that name files in the raw folder."""
    return text.isascii() and text.isdigit() and int(text) > 0


def book_filename(book_id: int) -> str:
    return f"{int(book_id)}.txt"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_problem(manifest) -> str | None:
    """What makes `manifest` not a download manifest, or None."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("books"), dict):
        return "no `books` object"
    for key, record in manifest["books"].items():
        if not is_book_id(key) or str(int(key)) != key:
            return f"book id {key!r} is not a positive integer"
        if not isinstance(record, dict) or record.get("status") not in ("ok", "missing", "error"):
            return f"book {key}: not a record with status ok, missing or error"
        if record["status"] == "ok":
            size, digest = record.get("bytes"), record.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                return f"book {key}: `bytes` is not a byte count"
            if not isinstance(digest, str) or len(digest) != 64:
                return f"book {key}: `sha256` is not a SHA-256"
            if record.get("file") != book_filename(int(key)):
                return f"book {key}: `file` is not {book_filename(int(key))}"
    return None


def read_manifest(path: Path) -> dict:
    """The download manifest at `path`, checked by `manifest_problem`."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnreadableManifest(f"{path} is unreadable ({exc}); rerun `gtransformer download --out {path.parent}`") from None
    problem = manifest_problem(manifest)
    if problem:
        raise UserError(f"{path} is not a download manifest ({problem}); move it away, or pick another --out, "
                        f"and rerun `gtransformer download`")
    return manifest


def load_manifest(path: Path) -> dict:
    """The manifest to continue from: {"books": {}} when there is none or it is unreadable."""
    if not path.is_file():
        return {"books": {}}
    try:
        return read_manifest(path)
    except UnreadableManifest as exc:
        # Never throw the user's data away: keep the damaged file next to the new one.
        backup = path.with_name(path.name + f".corrupt-{int(time.time())}")
        path.replace(backup)
        log.warning("%s; moved to %s and rebuilding", exc, backup)
        return {"books": {}}


def file_problem(path: Path, record: dict) -> str | None:
    """How the file differs from its manifest record (size, then SHA-256), or None."""
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{size} bytes, the manifest records {record['bytes']}"
    if file_sha256(path) != record["sha256"]:
        return "its SHA-256 differs from the manifest's"
    return None


def saved_books(raw: Path) -> list[tuple[int, Path, dict]]:
    """(id, file, manifest record) of every book a download saved in `raw`, in id order: the manifest's entries
    with status ok (UserError when a file differs from its record; a warning when it is gone), or, in a folder
    filled by hand without a manifest, every `{id}.txt`."""
    manifest_path = raw / MANIFEST_NAME
    if not manifest_path.is_file():
        return sorted((int(p.stem), p, {}) for p in raw.glob("*.txt") if is_book_id(p.stem))
    saved, gone, damaged = [], [], []
    for key, record in read_manifest(manifest_path)["books"].items():
        path = raw / book_filename(int(key))
        if record["status"] != "ok":
            continue
        if not path.is_file():
            gone.append(key)
        elif problem := file_problem(path, record):
            damaged.append(f"{path.name} ({problem})")
        else:
            saved.append((int(key), path, record))
    if gone:
        log.warning("%d book(s) of %s are gone from %s, skipped: %s", len(gone), manifest_path, raw, ", ".join(gone))
    if damaged:
        more = f" and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        raise UserError(f"{len(damaged)} book file(s) in {raw} differ from {manifest_path}, truncated or changed since "
                        f"the download: {'; '.join(damaged[:3])}{more}; rerun `gtransformer download --out {raw}` "
                        "to fetch them again")
    return sorted(saved, key=lambda item: item[0])


def is_valid(record: dict | None, out: Path) -> bool:
    """The manifest says the book is there, and the file on disk still has that size and hash."""
    if not record or record.get("status") != "ok":
        return False
    path = out / record["file"]
    return path.is_file() and file_problem(path, record) is None


def remove_leftovers(out: Path) -> None:
    """Delete the temporary files a killed download left (`.{id}.txt.{pid}.tmp`, `.manifest.json.{pid}.tmp`)."""
    for path in out.glob(".*.tmp"):
        if _LEFTOVER.fullmatch(path.name):
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------
# Download


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


# ----------------------------------------------------------------------------------------
# CLI
