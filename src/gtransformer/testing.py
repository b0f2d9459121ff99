"""What the test suite and the benchmarks share that is no fixture: starting `gtransformer serve` as a user
would, in a subprocess on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def start_serve(run: str | Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """`python -m gtransformer serve RUN --port 0 ARGS...` (stdout and stderr piped, text), once it has said where
    it listens: (the process, its base URL). RuntimeError when it exits first, or when it has not said so within
    `timeout` seconds (it is then killed)."""
    command = [sys.executable, "-m", "gtransformer", "serve", str(run), "--port", "0", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if "listening on" in line:
            return process, line.split("listening on ")[1].split()[0]
        if process.poll() is not None:
            raise RuntimeError(f"serve exited: {process.stderr.read()[-2000:]}")
    process.kill()
    raise RuntimeError(f"serve did not say where it listens within {timeout:g} s")
