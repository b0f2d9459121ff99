"""Time download + prepare on the whole local mirror (folder and loopback HTTP) and tokenizer throughput.

    .venv/bin/python benchmarks/bench_data.py [--mirror ../shared/gutenberg-mirror] [--http] [--work /tmp/bench]

Prints wall seconds and process CPU (user+sys, children included) per stage:
the machine is shared, so CPU time is the steadier number.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path

from gtransformer.data.download import download
from gtransformer.data.prepare import prepare
from gtransformer.data.shards import read_shard
from gtransformer.data.tokenizer import Tokenizer

DEFAULT_MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "gutenberg-mirror"


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(label: str, fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn(*args, **kwargs)
    print(f"{label:28s} wall {time.perf_counter() - wall:7.1f}s   cpu(user+sys) {cpu_seconds() - cpu:7.1f}s", flush=True)
    return result


def serve(folder: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def pipeline(mirror: str, work: Path, label: str, workers: int) -> dict:
    raw, out = work / f"{label}-raw", work / f"{label}-prepared"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = time.perf_counter(), cpu_seconds()
    timed(f"[{label}] download", download, mirror, raw, progress=False)
    stats = timed(f"[{label}] prepare", prepare, raw, out, workers=workers)
    print(f"[{label}] download+prepare total: wall {time.perf_counter() - wall:.1f}s, cpu {cpu_seconds() - cpu:.1f}s; "
          f"stage timings {stats['timings']}")
    return stats


def tokenizer_throughput(prepared: Path) -> None:
    tokenizer = Tokenizer.from_file(prepared / "tokenizer.json")
    text = tokenizer.decode(read_shard(prepared / "val.bin"))
    books = [b for b in text.split("<|endoftext|>") if b]
    size = sum(len(b.encode("utf-8")) for b in books) / 1e6
    for name, fn in (("encode_batch", lambda: tokenizer.encode_batch(books)), ("encode (one thread)", lambda: [tokenizer.encode(b) for b in books])):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"tokenizer {name:20s} {size:.1f} MB: {size / wall:6.2f} MB/s wall, {size / cpu:6.2f} MB/s per CPU-second")
    ids = tokenizer.encode_batch(books)
    wall = time.perf_counter()
    for i in ids:
        tokenizer.decode(i)
    print(f"tokenizer decode               {size:.1f} MB: {size / (time.perf_counter() - wall):6.2f} MB/s wall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR, help="local mirror folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gtransformer-bench"), help="scratch folder")
    parser.add_argument("--http", action="store_true", help="also run over a loopback http.server")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="prepare workers")
    args = parser.parse_args()
    if not args.mirror.is_dir():
        raise SystemExit(f"{args.mirror} not found; pass --mirror")
    print(f"CPUs: {os.cpu_count()}, load average {os.getloadavg()}")
    stats = pipeline(str(args.mirror), args.work, "folder", args.workers)
    print(json.dumps({k: stats[k] for k in ("books", "splits", "val", "dropped")}, indent=1))
    if args.http:
        url, server = serve(args.mirror)
        try:
            pipeline(url, args.work, "http", args.workers)
        finally:
            server.shutdown()
    tokenizer_throughput(args.work / "folder-prepared")


if __name__ == "__main__":
    main()
