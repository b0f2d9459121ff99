"""Reading files from a Project Gutenberg mirror: a local folder (`LocalMirror`) or polite HTTP with bounded
retries that keeps a response only once its whole body arrived (`HttpMirror`)."""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import math
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3

from gtransformer import __version__
from gtransformer.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MIRROR = "https://www.gutenberg.org"
USER_AGENT = f"gtransformer/{__version__} (+https://github.com/gtransformer/gtransformer)"


def candidate_paths(book_id: int) -> list[str]:
    """Where a mirror may keep a book's plain text, most likely first."""
    return [
        f"cache/epub/{book_id}/pg{book_id}.txt",
        f"files/{book_id}/{book_id}-0.txt",
        f"files/{book_id}/{book_id}-8.txt",
        f"files/{book_id}/{book_id}.txt",
    ]


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
