"""`gtransformer download`: Portuguese books from Project Gutenberg (or a mirror) into data/raw.

The catalog (`cache/epub/feeds/pg_catalog.csv`) picks the books; each book is
the first of four file layouts the mirror has. Files are stored byte for byte
as `{id}.txt` (decoding is `prepare`'s job) and recorded in `manifest.json`,
which is rewritten atomically every few books so an interrupted download
resumes where it stopped. A rerun re-hashes what is there and fetches only
what is missing or damaged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import ipaddress
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from gtransformer import __version__
from gtransformer.errors import UserError
from gtransformer.files import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_MIRROR = "https://www.gutenberg.org"
CATALOG_PATH = "cache/epub/feeds/pg_catalog.csv"
USER_AGENT = f"gtransformer/{__version__} (+https://github.com/gtransformer/gtransformer)"
MANIFEST_NAME = "manifest.json"


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
    """Rows of Gutenberg's CSV catalog (quoted fields may hold newlines)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    required = {"Text#", "Type", "Title", "Language", "Authors"}
    if not reader.fieldnames or not required <= set(reader.fieldnames):
        raise UserError(
            f"the catalog's header is {reader.fieldnames!r}, expected columns {sorted(required)}; "
            "is --mirror a Project Gutenberg mirror?"
        )
    entries = []
    for row in reader:
        try:
            book_id = int(row["Text#"])
        except (TypeError, ValueError):
            continue
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


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    """Polite HTTP: one session, a User-Agent naming the project, timeouts, retries with backoff."""

    def __init__(self, base_url: str, timeout: float = 30.0, retries: int = 4, backoff: float = 1.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.default_delay = 0.0 if is_loopback(urlsplit(base_url).hostname) else 2.0
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=backoff,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
            respect_retry_after_header=True,
        )
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def url(self, relative: str) -> str:
        return f"{self.base_url}/{relative}"

    def fetch(self, relative: str) -> bytes:
        url = self.url(relative)
        try:
            response = self.session.get(url, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ConnectionError(f"{url}: {exc}") from None
        if response.status_code in (404, 410):
            raise NotFound(relative)
        if response.status_code != 200:
            raise ConnectionError(f"{url}: HTTP {response.status_code}")
        return response.content

    def close(self) -> None:
        self.session.close()


def open_mirror(mirror: str, timeout: float = 30.0, retries: int = 4, backoff: float = 1.0):
    scheme = urlsplit(mirror).scheme.lower()
    if scheme in ("http", "https"):
        return HttpMirror(mirror, timeout=timeout, retries=retries, backoff=backoff)
    root = Path(mirror[7:] if scheme == "file" else mirror).expanduser()
    if not root.is_dir():
        raise UserError(f"--mirror {mirror} is neither an http(s) URL nor an existing folder; pass a URL or a mirror folder")
    return LocalMirror(root)


# ----------------------------------------------------------------------------------------
# Manifest


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_manifest(path: Path) -> dict:
    if not path.is_file():
        return {"books": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # Never throw the user's data away: keep the damaged file next to the new one.
        backup = path.with_name(path.name + f".corrupt-{int(time.time())}")
        path.replace(backup)
        log.warning("manifest %s was unreadable (%s); moved to %s and rebuilding", path, exc, backup)
        return {"books": {}}
    if not isinstance(manifest, dict) or not isinstance(manifest.get("books"), dict):
        raise UserError(f"{path} is not a download manifest; move it away or pick another --out")
    return manifest


def saved_books(raw: Path) -> list[tuple[int, Path, dict]]:
    """(id, file, manifest record) of every book a download saved in `raw`: the manifest's entries with status
    ok whose file exists, or, in a folder filled by hand without a manifest, every `{id}.txt`."""
    manifest_path = raw / MANIFEST_NAME
    if not manifest_path.is_file():
        return [(int(p.stem), p, {}) for p in raw.glob("*.txt") if p.stem.isdigit()]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{manifest_path} is unreadable ({exc}); rerun `gtransformer download`") from None
    return [
        (int(key), raw / record["file"], record)
        for key, record in manifest.get("books", {}).items()
        if record.get("status") == "ok" and (raw / record["file"]).is_file()
    ]


def is_valid(record: dict | None, out: Path) -> bool:
    """The manifest says the book is there, and the file on disk still has that hash."""
    if not record or record.get("status") != "ok":
        return False
    path = out / record.get("file", "")
    if not path.is_file() or path.stat().st_size != record.get("bytes"):
        return False
    return sha256_bytes(path.read_bytes()) == record.get("sha256")


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
    progress: bool = True,
    save_every: float = 2.0,
) -> DownloadSummary:
    """Fetch the selected books into `out`; returns counts. Safe to rerun and to interrupt."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_mirror(mirror, timeout=timeout, retries=retries, backoff=backoff)
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
        entries = select_books(parse_catalog(catalog_bytes.decode("utf-8-sig")), list(languages), ids, limit)
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
        filename = f"{book_id}.txt"
        write_bytes_atomic(out / filename, data)
        return {"status": "ok", "source_url": source.url(relative), "file": filename, "sha256": sha256_bytes(data), "bytes": len(data)}
    if errors:
        return {"status": "error", "error": errors[-1]}
    return {"status": "missing", "tried": [source.url(p) for p in candidate_paths(book_id)]}


# ----------------------------------------------------------------------------------------
# CLI
