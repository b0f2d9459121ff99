"""What the analyses read: a run's model and tokenizer, and the prepared corpus it was trained on.

    load_run       a run (or checkpoint) folder -> `LoadedRun(model, tokenizer, meta, corpus)`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from gtransformer.data.corpus import PreparedCorpus
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.model.model import GPT
from gtransformer.training.checkpoint import load_for_inference
from gtransformer.training.run_dir import CheckpointDir, RunDir


class LoadedRun(NamedTuple):
    model: GPT  # in eval mode
    tokenizer: Tokenizer  # the run's copy of the corpus's tokenizer
    meta: dict[str, Any]  # the checkpoint's meta.json, plus "checkpoint" and "run_dir"
    corpus: PreparedCorpus | None  # None when no corpus was given nor recorded


def load_run(run: str | Path, data: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """The model (eval mode), tokenizer and meta of a run or checkpoint folder, and its prepared corpus.

    data: the prepared corpus folder; None takes the one the run recorded (or none when it recorded none).
    The corpus must hold a val split.
    """
    model, tokenizer, meta = load_for_inference(run, device=device)
    run_dir = RunDir(meta["run_dir"])
    folder = Path(data) if data is not None else run_dir.recorded_data(CheckpointDir(meta["checkpoint"]))
    corpus = PreparedCorpus(folder).require("val") if folder is not None else None
    if corpus is not None and corpus.tokenizer().vocab_size != tokenizer.vocab_size:
        raise UserError(f"{folder} was prepared with another tokenizer than the run {run} "
                        f"({corpus.tokenizer().vocab_size} vs {tokenizer.vocab_size} tokens); pass its own corpus")
    return LoadedRun(model, tokenizer, meta, corpus)
