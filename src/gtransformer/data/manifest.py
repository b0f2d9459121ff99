"""The raw folder a download fills: `{id}.txt` files and `manifest.json`, which records each book's size and
SHA-256 so that a rerun fetches only what is missing or damaged and `saved_books` refuses a changed file."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

from gtransformer.errors import UserError
from gtransformer.files import file_sha256

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# What `files.write_bytes_atomic` leaves behind when a download is killed mid-write.
_LEFTOVER = re.compile(r"\.(?:\d+\.txt|manifest\.json)\.\d+\.tmp")


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
