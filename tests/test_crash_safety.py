"""SIGKILL `prepare` and `download` (real subprocesses) before each rename or delete they make, and at random
moments: every folder stays usable (the old corpus or the new one; books whole or absent) and a rerun finishes."""

import http.server
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gtransformer
from gtransformer.data.corpus import SPLITS, PreparedCorpus
from gtransformer.data.download import download
from gtransformer.data.fetch import candidate_paths
from gtransformer.data.manifest import read_manifest, saved_books
from gtransformer.data.prepare import prepare
from gtransformer.training.trainer import Trainer

# argv: kill_at (0: never) and a command. Each rename / delete / fsync is counted and the process SIGKILLs
# itself just before the kill_at-th. "ready" on stderr once imported; on stdout at the end the operations
# made and the seconds they took.
RUNNER = r"""
import json, os, shutil, signal, sys, time
kill_at, command, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
operations = []

def counting(function):
    def wrapper(*a, **k):
        operations.append(function.__name__)
        if len(operations) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*a, **k)
    return wrapper

for module, name in ((os, "replace"), (os, "rename"), (os, "unlink"), (os, "remove"), (os, "fsync"), (shutil, "rmtree")):
    setattr(module, name, counting(getattr(module, name)))
from gtransformer.data.download import download
from gtransformer.data.prepare import prepare
print("ready", file=sys.stderr, flush=True)
started = time.perf_counter()
if command == "prepare":
    prepare(args[0], args[1], vocab_size=int(args[2]), workers=1, ratios=(0.5, 0.25, 0.25))
else:
    download(args[0], args[1], progress=False, save_every=0)
print(json.dumps({"operations": operations, "seconds": time.perf_counter() - started}))
"""
VISIBLE = {"replace", "rename", "unlink", "remove", "rmtree"}  # what changes what a reader sees


def run(kill_at: int, *args, kill_after: float | None = None) -> subprocess.CompletedProcess:
    """Run RUNNER; with `kill_after`, SIGKILL it that many seconds after it is ready to work."""
    env = {**os.environ, "PYTHONPATH": str(Path(gtransformer.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", RUNNER, str(kill_at), *map(str, args)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        while process.stderr.readline() not in ("ready\n", ""):
            pass
        time.sleep(kill_after)
        process.send_signal(signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def whole_run(*args) -> dict:
    """{operations, seconds} of a run that is not killed."""
    result = run(0, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def kill_points(operations: list[str]) -> list[int]:
    """The 1-based positions of the operations that change what a reader sees."""
    return [i + 1 for i, name in enumerate(operations) if name in VISIBLE]


# --- prepare ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw(tmp_path_factory, small_mirror_factory):
    root = tmp_path_factory.mktemp("crash")
    download(str(small_mirror_factory(root / "mirror")), root / "raw", progress=False)
    return root / "raw"


@pytest.fixture(scope="module")
def old_corpus(raw, tmp_path_factory):
    """A complete corpus with 300 tokens; the killed runs re-prepare its folder with 360."""
    folder = tmp_path_factory.mktemp("old") / "prepared"
    prepare(raw, folder, vocab_size=300, workers=1, ratios=(0.5, 0.25, 0.25))
    return folder


def usable_vocabulary(folder: Path) -> int:
    """Check the folder as train and eval read it; return its vocabulary size."""
    corpus = PreparedCorpus(folder).require(*SPLITS)
    tokenizer, stats = corpus.tokenizer(), corpus.stats()
    assert stats["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    for split in SPLITS:
        tokens = corpus.tokens(split)
        assert len(tokens) == stats["splits"][split]["tokens"] and tokens[0] == tokenizer.eot_id
    return tokenizer.vocab_size


def test_prepare_killed_before_each_rename_or_delete(raw, old_corpus, tmp_path):
    points = kill_points(whole_run("prepare", raw, tmp_path / "trace", 360)["operations"])
    assert len(points) >= 10
    vocabularies = []
    for point in points:
        folder = tmp_path / f"k{point}"
        shutil.copytree(old_corpus, folder)
        result = run(point, "prepare", raw, folder, 360)
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        vocabularies.append(usable_vocabulary(folder))
        prepare(raw, folder, vocab_size=360, workers=1, ratios=(0.5, 0.25, 0.25))  # a rerun finishes the job
        assert usable_vocabulary(folder) == 360 and not (folder / ".staging").exists()
    # The old corpus until the new one is complete, then the new one: never a mix, never nothing.
    switch = vocabularies.index(360)
    assert vocabularies == [300] * switch + [360] * (len(points) - switch) and 0 < switch < len(points)


def test_prepare_killed_at_random_moments_then_a_training_step(raw, old_corpus, tmp_path, tiny_tables):
    seconds = whole_run("prepare", raw, tmp_path / "trace", 360)["seconds"]
    rng = random.Random(0)
    for attempt in range(4):
        folder = tmp_path / f"r{attempt}"
        shutil.copytree(old_corpus, folder)
        result = run(0, "prepare", raw, folder, 360, kill_after=rng.uniform(0, seconds))
        assert result.returncode in (0, -signal.SIGKILL)
        assert usable_vocabulary(folder) in (300, 360)
    trainer = Trainer(tiny_tables(folder), tmp_path / "run", device="cpu", progress_bar=False)
    try:
        trainer.step()
    finally:
        trainer.close()


# --- download --------------------------------------------------------------------------------------------


def expected_books(mirror: Path) -> dict[str, bytes]:
    books = {}
    for book_id in (101, 102, 103, 104, 105, 106, 107):
        path = next(mirror / p for p in candidate_paths(book_id) if (mirror / p).is_file())
        books[f"{book_id}.txt"] = path.read_bytes()
    return books


def check_raw_folder(out: Path, books: dict[str, bytes], damaged: bytes | None = None) -> None:
    """Books are whole (or the one damaged on purpose, untouched) and the manifest is readable."""
    if (out / "manifest.json").is_file():
        read_manifest(out / "manifest.json")
    for path in out.glob("*.txt"):
        assert path.read_bytes() in (books[path.name], damaged), path


def finish_and_check(mirror: Path, out: Path, books: dict[str, bytes]) -> None:
    summary = download(str(mirror), out, progress=False)
    assert summary.ok + summary.skipped == 7 and summary.missing == [108] and summary.failed == []
    assert {path.name: path.read_bytes() for path in out.glob("*.txt")} == books
    assert [book_id for book_id, _, _ in saved_books(out)] == [101, 102, 103, 104, 105, 106, 107]
    assert not list(out.glob(".*"))


def test_download_killed_before_each_rename_or_delete(small_mirror, tmp_path):
    books = expected_books(small_mirror)
    before = tmp_path / "before"  # a finished download, then one book damaged and one deleted
    download(str(small_mirror), before, progress=False)
    damaged = books["101.txt"][:100]
    (before / "101.txt").write_bytes(damaged)
    (before / "103.txt").unlink()
    for start in (None, before):
        trace = tmp_path / f"trace-{start is None}"
        if start:
            shutil.copytree(start, trace)
        for point in kill_points(whole_run("download", small_mirror, trace)["operations"])[:10]:
            out = tmp_path / f"k{point}-{start is None}"
            if start:
                shutil.copytree(start, out)
            result = run(point, "download", small_mirror, out)
            assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
            check_raw_folder(out, books, damaged)
            finish_and_check(small_mirror, out, books)


def test_download_killed_mid_body_over_http(small_mirror, tmp_path, serve_folder):
    class Slow(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def copyfile(self, source, target):  # each book arrives in 8 pieces over ~0.25 s
            data = source.read()
            try:
                for i in range(8):
                    target.write(data[i * len(data) // 8 : (i + 1) * len(data) // 8])
                    target.flush()
                    time.sleep(0.03)
            except (BrokenPipeError, ConnectionResetError):  # the client was killed
                pass

    url = serve_folder(small_mirror, Slow)
    books = expected_books(small_mirror)
    rng = random.Random(1)
    for attempt in range(3):
        out = tmp_path / f"r{attempt}"
        run(0, "download", url, out, kill_after=rng.uniform(0, 2.0))
        check_raw_folder(out, books)
        finish_and_check(small_mirror, out, books)
