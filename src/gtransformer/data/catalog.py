"""Project Gutenberg's CSV catalog (`cache/epub/feeds/pg_catalog.csv`): its rows, and the books `download` picks."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass

from gtransformer.data.manifest import is_book_id
from gtransformer.errors import UserError

log = logging.getLogger(__name__)

CATALOG_PATH = "cache/epub/feeds/pg_catalog.csv"


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
