"""`gtransformer serve` under load: N concurrent streaming clients for a fixed time each.

Starts the server in a subprocess on a free loopback port (as a user would), then for
each client count runs that many threads, each sending streamed /v1/completions requests
back to back for --seconds. Reports aggregate tokens/s (streamed text chunks), time to
first token (median, p95), errors, and the server's resident memory before and after
(it must stay flat). The ratio that matters: aggregate tokens/s at 8 clients over 1 client.

    .venv/bin/python benchmarks/bench_serve.py --run runs/demo --clients 1,4,8,16 --seconds 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from gtransformer.testing import start_serve  # noqa: E402

PROMPTS = ["Era uma vez", "O amor é", "Naquella manhã, a cidade", "Portugal e o Brasil", "A casa de meu pae"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client_loop(url: str, until: float, max_tokens: int, seed: int, out: dict) -> None:
    with httpx.Client(timeout=120) as http:
        n = 0
        while time.monotonic() < until:
            body = {"prompt": PROMPTS[(seed + n) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
                    "stream": True, "seed": seed * 1000 + n}
            n += 1
            started, first = time.monotonic(), None
            try:
                with http.stream("POST", url + "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        out["errors"] += 1
                        continue
                    for line in response.iter_lines():
                        if line.startswith("data: {") and '"text": ""' not in line:
                            first = first or time.monotonic()
                            out["tokens"] += 1
            except httpx.HTTPError:
                out["errors"] += 1
                continue
            if first is not None:
                out["ttft"].append(first - started)
            out["requests"] += 1


def measure(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    results = [{"tokens": 0, "errors": 0, "requests": 0, "ttft": []} for _ in range(clients)]
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(url, until, max_tokens, i, results[i])) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    ttft = sorted(t for r in results for t in r["ttft"])
    return {
        "clients": clients,
        "tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
        "requests": sum(r["requests"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "ttft_median_s": statistics.median(ttft) if ttft else None,
        "ttft_p95_s": ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] if ttft else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="run folder to serve (default runs/demo, from `make demo`)")
    p.add_argument("--clients", default="1,4,8,16", help="comma-separated client counts (default 1,4,8,16)")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds of load per client count (default 30)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    p.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default 16)")
    p.add_argument("--threads", type=int, help="the server's OMP_NUM_THREADS (default: all cores)")
    p.add_argument("--compile", action="store_true", help="serve with --compile")
    p.add_argument("--decode-dtype", help="the server's --decode-dtype")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    extra = (["--compile"] if args.compile else []) + (["--decode-dtype", args.decode_dtype] if args.decode_dtype else [])
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    try:  # a long wait: --compile compiles every padded batch size first
        process, url = start_serve(args.run, "--max-batch", str(args.max_batch), "--max-queue", "256",
                                   "--device", "cpu", *extra, env=env, timeout=600)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    try:
        measure(url, 1, min(3.0, args.seconds), args.max_tokens)  # warm-up: first allocations, caches
        memory_start = rss_mb(process.pid)
        rows = [measure(url, c, args.seconds, args.max_tokens) for c in counts]
        memory_end = rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(60)
    single = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), None)
    for row in rows:
        row["x_one_client"] = row["tokens_per_s"] / single if single else None
    common.print_table(rows, [("clients", "clients", ""), ("tokens_per_s", "tokens/s", ",.1f"),
                              ("x_one_client", "x 1 client", ".2f"), ("requests", "requests", ""),
                              ("errors", "errors", ""), ("ttft_median_s", "TTFT median s", ".3f"),
                              ("ttft_p95_s", "TTFT p95 s", ".3f")])
    print(f"server RSS: {memory_start:.0f} MiB after warm-up, {memory_end:.0f} MiB at the end")
    common.write_json(args.json, {"environment": common.environment("cpu"), "args": vars(args), "results": rows,
                                  "rss_mb": {"start": memory_start, "end": memory_end}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
