"""Bits per byte of a run's GGUF exports (f32, f16, q8_0) from llama.cpp's own logits, beside ours.

Each type is exported with `export_gguf` and loaded in llama.cpp (llama-cpp-python).
The split is cut into the same windows `gtransformer eval` uses (context_length
tokens, each predicting the next) and scored by `evaluate_split`, with llama.cpp
supplying the logits: the numbers differ only by the runtime and the weights' type.

    python benchmarks/bench_gguf.py runs/demo                       # whole val split
    python benchmarks/bench_gguf.py runs/laptop --max-tokens 50000 --types f16,q8_0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import UserError  # noqa: E402

from gtransformer.data.corpus import PreparedCorpus  # noqa: E402
from gtransformer.interop.gguf import DTYPES, export_gguf  # noqa: E402
from gtransformer.training.checkpoint import load_for_inference  # noqa: E402
from gtransformer.training.evaluate import evaluate_split, token_byte_lengths  # noqa: E402
from gtransformer.training.run_dir import CheckpointDir, RunDir  # noqa: E402


class LlamaCppLogits:
    """llama.cpp in the place of the model `evaluate_tokens` calls: each row's logits from an empty KV cache."""

    training = False

    def __init__(self, path: Path, context: int, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context,
                                   n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, batch: torch.Tensor) -> SimpleNamespace:
        rows = []
        for ids in batch.tolist():
            self.llm.reset()
            self.llm.eval(ids)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32)))
        return SimpleNamespace(logits=torch.stack(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--data", default=None, help="prepared corpus (default: the one the run was trained on)")
    p.add_argument("--split", default="val")
    p.add_argument("--types", default=",".join(DTYPES), help=f"GGUF types, comma-separated ({', '.join(DTYPES)})")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N predictions (default: all)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: torch's)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"bench_gguf: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    threads = common.set_threads(args.threads)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if not types or any(t not in DTYPES for t in types):
        raise UserError(f"--types {args.types!r}: choose among {', '.join(DTYPES)}")
    model, tokenizer, meta = load_for_inference(args.run)
    recorded = RunDir(meta["run_dir"]).recorded_data(CheckpointDir(meta["checkpoint"]))
    corpus = PreparedCorpus(args.data or recorded or "")
    if not corpus.shard_path(args.split).is_file():
        raise UserError(f"{corpus.shard_path(args.split)} not found; pass --data with the prepared corpus")
    tokens = corpus.tokens(args.split)
    context = model.config.context_length
    lengths = token_byte_lengths(tokenizer)

    def score(evaluator) -> dict:
        started = time.perf_counter()
        result = evaluate_split(evaluator, tokens, context, lengths, split_bytes=corpus.split_bytes(args.split),
                                max_targets=args.max_tokens)
        return {**result, "seconds": time.perf_counter() - started}

    env = common.environment("cpu")
    print(f"# bench_gguf  {env['date']}  commit {env['commit']}  {env['cpu']}  threads {threads}  "
          f"run {args.run} (step {meta.get('step')})  split {args.split}  context {context}")
    rows = [{"model": "ours (PyTorch, float32)", **score(model)}]
    with tempfile.TemporaryDirectory(prefix="bench_gguf-") as folder:
        for dtype in types:
            path, _ = export_gguf(model, tokenizer, Path(folder) / f"{dtype}.gguf", dtype=dtype)
            rows.append({"model": f"llama.cpp {dtype}", "file_mib": path.stat().st_size / 2**20,
                         **score(LlamaCppLogits(path, context, threads))})
    ours = rows[0]["bits_per_byte"]
    for row in rows:
        row["change"] = (row["bits_per_byte"] - ours) / ours
    print(f"# {rows[0]['tokens']:,} predicted tokens, {rows[0]['bytes']:,} bytes")
    common.print_table(rows, [("model", "model", ""), ("file_mib", "file MiB", ".2f"),
                              ("bits_per_byte", "bits/byte", ".5f"), ("change", "vs ours", "+.3%"),
                              ("seconds", "seconds", ".1f")])
    common.write_json(args.json, {"benchmark": "gguf", "env": env, "args": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
