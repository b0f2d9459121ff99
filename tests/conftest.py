"""Shared fixtures: a tiny Gutenberg-layout mirror written by the tests, and a loopback HTTP server."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

REAL_MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "gutenberg-mirror"

PORTUGUESE = (
    "O homem não sabia para onde ia, mas a estrada era longa e a noite caía sobre os campos. "
    "Ella tinha dito que elle voltaria com a carta do pae, e que todos estariam em casa quando "
    "o sino da egreja tocasse as ave-marias. {n}\n"
)
SPANISH = (
    "El hombre no sabía a dónde iba, pero el camino era largo y la noche caía sobre los campos. "
    "Ella había dicho que él volvería con la carta del padre, y que todos estarían en casa. {n}\n"
)


def portuguese_text(paragraphs: int = 30, seed: int = 0) -> str:
    return "\n".join(PORTUGUESE.format(n=f"Capitulo {seed}-{i}.") for i in range(paragraphs))


def gutenberg_file(title: str, body: str, style: str = "this", charset: str | None = "ISO-8859-1") -> str:
    """A book the way Gutenberg wraps it; `style` picks the marker generation."""
    header = f"The Project Gutenberg EBook of {title}\n\nTitle: {title}\n\nLanguage: Portuguese\n\n"
    if charset:
        header += f"Character set encoding: {charset}\n\n"
    if style == "this":
        start, end = f"*** START OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***", f"*** END OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***"
    elif style == "the":
        start, end = f"*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***", f"*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***"
    elif style == "nospace":
        start, end = f"***START OF THE PROJECT GUTENBERG EBOOK {title.upper()}***", f"***END OF THE PROJECT GUTENBERG EBOOK {title.upper()}***"
    elif style == "wrapped":
        start = f"*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} E\nOUTRAS HISTORIAS ***"
        end = f"*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} E\nOUTRAS HISTORIAS ***"
    else:
        raise ValueError(style)
    return (
        header + start + "\n\n\nProduced by Fulano de Tal and the Online Distributed\nProofreading Team\n\n\n"
        + body + f"\n\n\nEnd of the Project Gutenberg EBook of {title}, by\nAlguem\n\n" + end
        + "\n\n*** START: FULL LICENSE ***\nTHE FULL PROJECT GUTENBERG LICENSE\nPlease read this.\n"
    )


def write_mirror(root: Path, books: dict[int, tuple[str, str, bytes | None, str]]) -> Path:
    """books: id -> (title, language, file bytes or None for a missing book, layout path template)."""
    (root / "cache/epub/feeds").mkdir(parents=True, exist_ok=True)
    lines = ["Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,Bookshelves"]
    for book_id, (title, language, data, layout) in books.items():
        lines.append(f'{book_id},Text,,"{title}",{language},"Autor, Um",,,')
        if data is not None:
            path = root / layout.format(id=book_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    lines.append('999,Sound,,"Audio book",pt,"Autor, Um",,,')
    lines.append('998,Text,,"A title with a\nnewline",en,"Someone",,,')
    (root / "cache/epub/feeds/pg_catalog.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def small_mirror(tmp_path: Path) -> Path:
    """Six Portuguese books in four layouts and three encodings, one Spanish book, one missing book."""
    def body(seed: int) -> str:
        return portuguese_text(30, seed)

    books = {
        101: ("Livro Um", "pt", gutenberg_file("Livro Um", body(1)).encode("latin-1"), "cache/epub/{id}/pg{id}.txt"),
        102: ("Livro Dois", "pt", ("\ufeff" + gutenberg_file("Livro Dois", body(2), "the", None)).encode("utf-8"), "files/{id}/{id}-0.txt"),
        103: ("Livro Tres", "pt", gutenberg_file("Livro Tres", body(3), "nospace", "ISO-8859-1").replace("\n", "\r\n").encode("latin-1"), "files/{id}/{id}-8.txt"),
        104: ("Livro Quatro", "pt", gutenberg_file("Livro Quatro", body(4), "wrapped", None).encode("utf-8"), "files/{id}/{id}.txt"),
        105: ("Livro Cinco", "pt; en", gutenberg_file("Livro Cinco", body(5)).encode("cp1252"), "cache/epub/{id}/pg{id}.txt"),
        106: ("Livro Seis", "pt", gutenberg_file("Livro Seis", body(6)).encode("latin-1"), "cache/epub/{id}/pg{id}.txt"),
        107: ("Libro Español", "pt", gutenberg_file("Libro", "\n".join(SPANISH.format(n=i) for i in range(30))).encode("latin-1"), "cache/epub/{id}/pg{id}.txt"),
        108: ("Livro Perdido", "pt", None, ""),
        200: ("English Book", "en", b"The end.", "cache/epub/{id}/pg{id}.txt"),
    }
    return write_mirror(tmp_path / "mirror", books)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve_folder():
    """serve_folder(path, handler_class=None) -> base URL of a 127.0.0.1 server on a free port."""
    servers = []

    def start(folder: Path, handler_class=_QuietHandler) -> str:
        handler = functools.partial(handler_class, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run much faster on one intra-op thread when other jobs share the cores (no OpenMP spin-waits)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
