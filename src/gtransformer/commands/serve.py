"""`gtransformer serve`: an OpenAI-compatible HTTP API and a web page for a trained model.

Loads a run folder, a checkpoint or an exported Hugging Face folder, starts the batching
`Engine` and serves `serving.app` with uvicorn on 127.0.0.1 by default. Prints the URL when
ready; Ctrl-C / SIGTERM stops accepting connections, lets in-flight requests finish, then exits.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import torch
import uvicorn

from gtransformer.errors import UserError
from gtransformer.inference.engine import Engine
from gtransformer.inference.decode import DecodeOptions, decode_threads
from gtransformer.interop.hf import import_hf
from gtransformer.runtime import pick_device
from gtransformer.serving.app import create_app
from gtransformer.serving.service import ServerSettings
from gtransformer.inference.chat import ChatTemplate
from gtransformer.training.checkpoint import load_for_inference
from gtransformer.training.run_dir import RunDir

GRACEFUL_SHUTDOWN_S = 30


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a trained model over an OpenAI-compatible HTTP API with a web page",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics and a web page "
        "at /. Concurrent requests are decoded together (up to --max-batch at a time).",
    )
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT_OR_HF_FOLDER",
                        help="run folder (newest checkpoint), a checkpoint folder, or a folder from `export --format hf`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default auto)")
    parser.add_argument("--decode-dtype", choices=["float32", "float16", "bfloat16", "int8"], default=None,
                        help="weights of the CPU decoder or of the --compile step in this dtype (approximate, faster; "
                        "int8 not with --compile); "
                        "default: the model's dtype")
    parser.add_argument("--compile", action="store_true",
                        help="decode through a torch.compile'd step (needs a C++ compiler on CPU); every padded "
                        "batch size (1, 2, 4, ... up to --max-batch) is compiled before the server listens, "
                        "10-20 s each on CPU")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait for a slot; more are answered 429 (default 64)")
    parser.add_argument("--max-tokens-cap", type=int, default=1024,
                        help="largest max_tokens a request may ask for (default 1024)")
    parser.add_argument("--api-key-env", metavar="NAME",
                        help="require `Authorization: Bearer KEY` on /v1/*, KEY read from this environment variable")
    parser.add_argument("--model-name", help="the model id clients see (default: the run folder's name)")
    parser.set_defaults(func=run_serve)


def load_model(path: str, device):
    """(model, tokenizer, chat template, default name) from a run, a checkpoint or a Hugging Face folder."""
    folder = Path(path)
    if (folder / "config.json").is_file() and not (folder / "meta.json").is_file():
        model, tokenizer = import_hf(folder, device=device)
        if tokenizer is None:
            raise UserError(f"{folder} has no tokenizer.json; export it with `gtransformer export` (which writes one)")
        return model, tokenizer, ChatTemplate.load(folder / "chat_template.json"), folder.name
    model, tokenizer, meta = load_for_inference(path, device=device)
    run = RunDir(meta["run_dir"])
    return model, tokenizer, ChatTemplate.load(run.chat_template_path), run.path.resolve().name


class Server(uvicorn.Server):
    """uvicorn's server that says where it listens once it does (the port may have been picked by the OS),
    and that ends a Ctrl-C or SIGTERM shutdown by returning (so the engine drains and the exit code is 0)
    instead of raising the signal again as uvicorn does."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"gtransformer serve: listening on http://{host}:{port} (web page at /, API at /v1)", flush=True)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) before the model loads: a port in use or a wrong --host is one line
    at once. uvicorn listens on this very socket (no window for another program to take the port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: no wait after a restart
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port} is already in use on {host}; stop the program that holds it or "
                            f"pick another --port (0 = any free port)") from None
        raise UserError(f"cannot listen on --host {host} --port {port} ({exc.strerror or exc}); "
                        f"pass an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    return sock


def run_serve(args: argparse.Namespace) -> int:
    for name in ("max_batch", "max_tokens_cap"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.max_queue < 0:
        raise UserError(f"--max-queue {args.max_queue} must not be negative")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} must lie in 0..65535")
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset; "
                            f"export {args.api_key_env}=... first")
    options = DecodeOptions(dtype=args.decode_dtype, compile=args.compile)
    options.validate()
    sock = bind(args.host, args.port)
    with contextlib.closing(sock):
        device = pick_device(args.device)
        threads = decode_threads(device, args.max_batch, args.compile)
        if threads is not None:  # the command owns its process: its thread count is set here, once
            torch.set_num_threads(threads)
        model, tokenizer, template, name = load_model(args.run, device)
        engine = Engine(model, tokenizer, max_batch=args.max_batch, options=options, max_queue=args.max_queue)
        settings = ServerSettings(model_name=args.model_name or name, max_tokens_cap=args.max_tokens_cap,
                                  api_key=api_key)
        app = create_app(engine, tokenizer, model.config.context_length, settings, template)
        server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                       timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        engine.start()
        try:
            server.run(sockets=[sock])
        finally:
            engine.stop(drain=True, timeout=GRACEFUL_SHUTDOWN_S)
    print("gtransformer serve: stopped", file=sys.stderr)
    return 0
