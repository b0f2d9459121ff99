"""download: catalog parsing, the four file layouts, local and loopback HTTP mirrors, resuming, 404s, retries."""

import http.server
import json

import pytest

from gtransformer.data.catalog import CATALOG_PATH, parse_catalog, select_books
from gtransformer.data.download import download
from gtransformer.data.fetch import LocalMirror, is_loopback, open_mirror
from gtransformer.errors import UserError


def test_parse_catalog_and_select(small_mirror):
    entries = parse_catalog((small_mirror / CATALOG_PATH).read_text(encoding="utf-8"))
    titles = {e.id: e.title for e in entries}
    assert titles[998] == "A title with a newline"  # quoted newline inside a field
    chosen = select_books(entries, ["pt"])
    assert [e.id for e in chosen] == [101, 102, 103, 104, 105, 106, 107, 108]  # no Sound row, no English
    assert [e.id for e in select_books(entries, ["en"])] == [105, 200, 998]  # "pt; en" counts for both
    assert [e.id for e in select_books(entries, ["pt"], ids=[106, 101, 555])] == [106, 101]
    assert len(select_books(entries, ["pt"], limit=3)) == 3


def test_local_mirror_every_layout_and_missing_book(small_mirror, tmp_path):
    out = tmp_path / "raw"
    summary = download(str(small_mirror), out, progress=False)
    assert (summary.ok, summary.missing, summary.failed) == (7, [108], [])
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    books = manifest["books"]
    assert books["108"]["status"] == "missing"
    assert books["102"]["source_url"].endswith("files/102/102-0.txt")
    assert books["103"]["source_url"].endswith("files/103/103-8.txt")
    assert books["104"]["source_url"].endswith("files/104/104.txt")
    assert books["101"]["title"] == "Livro Um" and books["101"]["author"] == "Autor, Um"
    assert (out / "102.txt").read_bytes() == (small_mirror / "files/102/102-0.txt").read_bytes()
    assert books["102"]["bytes"] == (out / "102.txt").stat().st_size


def test_rerun_skips_valid_books_and_refetches_damaged_ones(small_mirror, tmp_path):
    out = tmp_path / "raw"
    download(str(small_mirror), out, progress=False)
    (out / "101.txt").write_bytes(b"damaged")
    (out / "102.txt").unlink()
    summary = download(str(small_mirror), out, progress=False)
    assert (summary.ok, summary.skipped) == (2, 5)
    assert (out / "101.txt").read_bytes() == (small_mirror / "cache/epub/101/pg101.txt").read_bytes()


def test_interrupted_download_resumes_from_the_manifest(small_mirror, tmp_path, monkeypatch):
    out = tmp_path / "raw"
    calls = {"n": 0}
    real_fetch = LocalMirror.fetch

    def flaky_fetch(self, relative):
        calls["n"] += 1
        if calls["n"] == 5:  # catalog, 101, 102 (second layout tried), then "Ctrl-C"
            raise KeyboardInterrupt
        return real_fetch(self, relative)

    monkeypatch.setattr(LocalMirror, "fetch", flaky_fetch)
    with pytest.raises(KeyboardInterrupt):
        download(str(small_mirror), out, progress=False)
    saved = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["books"]
    assert sorted(k for k, v in saved.items() if v["status"] == "ok") == ["101", "102"]
    monkeypatch.setattr(LocalMirror, "fetch", real_fetch)
    summary = download(str(small_mirror), out, progress=False)
    assert (summary.skipped, summary.ok) == (2, 5)
    assert not list(out.glob(".*.tmp"))


def test_http_mirror_with_404_and_user_agent(small_mirror, tmp_path, serve_folder):
    seen_agents = []

    class Recording(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen_agents.append(self.headers.get("User-Agent"))
            super().do_GET()

    url = serve_folder(small_mirror, Recording)
    source = open_mirror(url)
    assert source.default_delay == 0.0  # loopback mirrors need no politeness delay
    summary = download(url, tmp_path / "raw", progress=False)
    assert (summary.ok, summary.missing) == (7, [108])
    assert all(agent.startswith("gtransformer/") for agent in seen_agents)
    manifest = json.loads((tmp_path / "raw/manifest.json").read_text(encoding="utf-8"))
    assert manifest["books"]["101"]["source_url"] == f"{url}/cache/epub/101/pg101.txt"
    assert (tmp_path / "raw/103.txt").read_bytes() == (small_mirror / "files/103/103-8.txt").read_bytes()


def test_http_retries_5xx_then_succeeds(small_mirror, tmp_path, serve_folder):
    failures = {"left": 2}

    class Flaky(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if "pg101" in self.path and failures["left"] > 0:
                failures["left"] -= 1
                self.send_error(503)
                return
            super().do_GET()

    url = serve_folder(small_mirror, Flaky)
    summary = download(url, tmp_path / "raw", ids=[101], backoff=0.01, progress=False)
    assert summary.ok == 1 and failures["left"] == 0


def test_delay_defaults_and_user_errors(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("www.gutenberg.org")
    assert open_mirror("https://www.gutenberg.org").default_delay == 2.0
    with pytest.raises(UserError, match="neither an http"):
        open_mirror(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not found"):
        download(str(tmp_path / "empty"), tmp_path / "raw", progress=False)
