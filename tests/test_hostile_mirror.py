"""download against a loopback server that misbehaves: resets, 5xx, 429 with Retry-After, a stalled or
trickling body, a short body, HTML instead of text; and catalogs, options and manifests that are wrong."""

import http.server
import json
import socket
import struct
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from gtransformer.cli import main
from gtransformer.data.catalog import CATALOG_PATH, parse_catalog
from gtransformer.data.download import download
from gtransformer.data.fetch import retry_after
from gtransformer.data.manifest import saved_books
from gtransformer.errors import UserError

BOOK = "/cache/epub/101/pg101.txt"
FAST = dict(timeout=1.0, retries=2, backoff=0.01, max_wait=1.0, progress=False)


def hostile(plan: dict[str, list[str]]):
    """A handler class that answers each path's requests with the next action of `plan` ("ok" when none is left),
    and the list of (path, action, time) it saw."""
    seen = []

    class Hostile(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            steps = plan.get(self.path, [])
            action = steps.pop(0) if steps else "ok"
            seen.append((self.path, action, time.monotonic()))
            if action == "ok":
                return super().do_GET()
            data = Path(self.directory, self.path.lstrip("/")).read_bytes()
            try:
                self.misbehave(action, data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def misbehave(self, action, data):
            if action == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                return
            if action.isdigit():
                self.send_error(int(action))
                return
            if action.startswith("429:"):
                self.send_response(429)
                self.send_header("Retry-After", action[4:])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if action in ("html", "html-as-text"):
                data = b"<!DOCTYPE html><html><body>Are you a robot?</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if action == "html" else "text/plain")
            self.send_header("Content-Length", str(len(data) + (100 if action == "short" else 0)))
            self.end_headers()
            if action == "stall":  # half the body, then silence
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                time.sleep(3)
            elif action == "trickle":  # a byte every 20 ms: no read ever times out
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.02)
            else:
                self.wfile.write(data)
            self.close_connection = True

    return Hostile, seen


def book_bytes(mirror: Path) -> bytes:
    return (mirror / BOOK.lstrip("/")).read_bytes()


@pytest.mark.parametrize("action", ["reset", "500", "503", "429:0", "stall", "short", "html", "html-as-text"])
def test_each_failure_is_retried_then_the_book_is_saved(small_mirror, tmp_path, serve_folder, action):
    handler, seen = hostile({BOOK: [action]})
    out = tmp_path / "raw"
    summary = download(serve_folder(small_mirror, handler), out, ids=[101], **FAST)
    assert summary.ok == 1 and summary.failed == []
    assert [a for path, a, _ in seen if path == BOOK] == [action, "ok"]
    assert (out / "101.txt").read_bytes() == book_bytes(small_mirror)


@pytest.mark.parametrize(
    "action, recorded",
    [("reset", "ConnectionError"), ("503", "HTTP 503"), ("stall", "Read timed out"),
     ("short", "IncompleteRead|announced"), ("html", "HTML page")],
)
def test_a_book_that_never_arrives_whole_is_recorded_as_failed(small_mirror, tmp_path, serve_folder, action, recorded):
    handler, seen = hostile({BOOK: [action] * 10})
    out = tmp_path / "raw"
    started = time.monotonic()
    summary = download(serve_folder(small_mirror, handler), out, ids=[101], **FAST)
    assert time.monotonic() - started < 10
    assert summary.failed == [101] and summary.ok == 0
    assert [a for path, a, _ in seen if path == BOOK] == [action] * 3  # 1 try + 2 retries, then the other layouts
    record = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["books"]["101"]
    assert record["status"] == "error"
    assert any(word in record["error"] for word in recorded.split("|")) and "3 attempts" in record["error"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # no partial book under any name
    assert saved_books(out) == []


def test_retry_after_is_honoured_and_capped(small_mirror, tmp_path, serve_folder):
    handler, seen = hostile({BOOK: ["429:0.6"]})
    download(serve_folder(small_mirror, handler), tmp_path / "a", ids=[101], **{**FAST, "max_wait": 5.0})
    (_, _, first), (_, _, second) = [s for s in seen if s[0] == BOOK]
    assert second - first >= 0.55  # not the 0.01 s backoff

    handler, seen = hostile({BOOK: ["429:3600"]})
    summary = download(serve_folder(small_mirror, handler), tmp_path / "b", ids=[101], **{**FAST, "max_wait": 0.2})
    (_, _, first), (_, _, second) = [s for s in seen if s[0] == BOOK]
    assert summary.ok == 1 and 0.15 <= second - first < 2


def test_retry_after_values():
    assert retry_after("120") == 120 and retry_after("0") == 0 and retry_after("-5") == 0
    assert 50 < retry_after(formatdate(time.time() + 60, usegmt=True)) <= 61
    assert retry_after("soon") is None and retry_after(None) is None and retry_after("nan") is None


def test_a_trickling_body_ends_at_the_whole_response_deadline(small_mirror, tmp_path, serve_folder):
    handler, seen = hostile({BOOK: ["trickle"]})
    started = time.monotonic()
    summary = download(serve_folder(small_mirror, handler), tmp_path / "raw", ids=[101],
                          **{**FAST, "timeout": 0.1, "retries": 1})
    # 20 x 0.1 s for the whole body, then the retry.
    assert summary.ok == 1 and 2 <= time.monotonic() - started < 8
    assert [a for path, a, _ in seen if path == BOOK] == ["trickle", "ok"]


def test_an_html_catalog_is_one_clear_line(small_mirror, tmp_path, serve_folder):
    handler, _ = hostile({"/" + CATALOG_PATH: ["html"] * 10})
    with pytest.raises(UserError, match="cannot read the catalog .*HTML page.*check --mirror"):
        download(serve_folder(small_mirror, handler), tmp_path / "raw", **FAST)


# --- catalogs, options and manifests a user can get wrong ----------------------------------------------


def test_a_catalog_that_is_not_utf8_csv(small_mirror, tmp_path, capsys):
    catalog = small_mirror / CATALOG_PATH
    catalog.write_bytes(catalog.read_text(encoding="utf-8").replace("Livro Um", "Livro Açúcar").encode("latin-1"))
    assert main(["download", "--mirror", str(small_mirror), "--out", str(tmp_path / "raw"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "is not UTF-8 text" in error and "--mirror" in error and error.count("\n") == 1
    catalog.write_text('Text#,Type,Issued,Title,Language,Authors\n1,Text,,"' + "x" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="not valid CSV"):
        download(str(small_mirror), tmp_path / "raw", progress=False)


def test_catalog_ids_that_are_not_positive_integers_are_skipped():
    text = "Text#,Type,Issued,Title,Language,Authors\n" + "".join(
        f'{book_id},Text,,"T",pt,"A"\n' for book_id in ("../x", "-5", "0", "\u0663", "7 ", "", "12")
    )
    assert [e.id for e in parse_catalog(text)] == [7, 12]


@pytest.mark.parametrize("option, value, message", [
    ("--timeout", "0", "--timeout 0.0 must be > 0 seconds"),
    ("--timeout", "-1", "--timeout -1.0 must be > 0 seconds"),
    ("--retries", "-1", "--retries -1 must not be negative"),
])
def test_bad_options_give_one_line(small_mirror, tmp_path, capsys, option, value, message):
    code = main(["download", "--mirror", str(small_mirror), "--out", str(tmp_path / "raw"), option, value, "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1
    assert not (tmp_path / "raw").exists()


def test_a_manifest_with_a_path_for_an_id_is_refused_and_nothing_escapes(small_mirror, tmp_path, capsys):
    out = tmp_path / "deep" / "raw"
    out.mkdir(parents=True)
    manifest = {"books": {"../x": {"status": "ok", "file": "../x.txt", "bytes": 3, "sha256": "0" * 64}}}
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert main(["download", "--mirror", str(small_mirror), "--out", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "is not a download manifest (book id '../x' is not a positive integer)" in error and error.count("\n") == 1
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "deep").rglob("*")) == ["deep/raw", "deep/raw/manifest.json"]


def test_leftovers_of_a_killed_download_are_removed(small_mirror, tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    for name in (".101.txt.4242.tmp", ".manifest.json.4242.tmp", ".notes.txt.1.tmp", "notes.txt"):
        (out / name).write_bytes(b"half")
    summary = download(str(small_mirror), out, ids=[101], progress=False)
    assert summary.ok == 1
    assert sorted(p.name for p in out.iterdir()) == [".notes.txt.1.tmp", "101.txt", "manifest.json", "notes.txt"]
