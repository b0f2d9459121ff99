"""The facts of a model card: what a run's files (and its prepared corpus's) say about one checkpoint.

    gather(run, checkpoint=None) -> CardFacts   reads files only: the checkpoint's meta.json (or the run's
                                                config.toml), metrics.jsonl, evals.jsonl, samples.jsonl, and the
                                                prepared corpus's stats.json and manifest.json (PreparedCorpus)
                                                when the folder the run was trained on is reachable
    measurements(facts) -> [Measurement]        every bits-per-byte measurement among them

Metrics, measurements and samples after the checkpoint's step are left out. model_card.py writes the card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gtransformer.config import from_dict
from gtransformer.data.corpus import PreparedCorpus
from gtransformer.errors import UserError
from gtransformer.model.config import ModelConfig
from gtransformer.model.model import GPT
from gtransformer.training.run_dir import CheckpointDir, RunDir


@dataclass
class CardFacts:
    name: str  # the run folder's name
    step: int | None  # the checkpoint the card describes; None for a run without checkpoints
    tokens_seen: int | None  # training tokens before that checkpoint (meta.json)
    tables: dict[str, dict[str, Any]]  # the [model], [train] and [data] tables the run was trained with
    params: tuple[int, int] | None  # (total, active per token), as GPT counts them
    last_train: dict[str, Any] | None  # metrics.jsonl: the last train row up to `step`
    last_eval: dict[str, Any] | None  # metrics.jsonl: the last eval row up to `step`
    tokens_per_s: list[float] = field(default_factory=list)  # every train row's throughput up to `step`
    evals: list[dict[str, Any]] = field(default_factory=list)  # evals.jsonl: `step` on the run's own corpus
    samples: list[dict[str, Any]] = field(default_factory=list)  # samples.jsonl: the last sampled step up to `step`
    hardware: dict[str, Any] = field(default_factory=dict)  # meta.json's "hardware" ({} before it was recorded)
    stats: dict[str, Any] = field(default_factory=dict)  # stats.json ({} when the corpus is not reachable)
    books: list[dict[str, Any]] = field(default_factory=list)  # manifest.json's book records, id order

    @property
    def model(self) -> dict[str, Any]:
        return self.tables.get("model", {})

    @property
    def train(self) -> dict[str, Any]:
        return self.tables.get("train", {})


# --- gathering ----------------------------------------------------------------------------------


def corpus_of(run: RunDir, checkpoint: CheckpointDir | None) -> PreparedCorpus | None:
    """The prepared corpus the run was trained on, when its folder is reachable from here."""
    path = run.recorded_data(checkpoint)
    return PreparedCorpus(path) if path is not None and path.is_dir() else None


def count_params(model_table: dict[str, Any]) -> tuple[int, int] | None:
    """(total, active per token) of the model a [model] table builds (on the meta device: no memory)."""
    try:
        config = from_dict(ModelConfig, dict(model_table), "model")
    except UserError:
        return None
    with torch.device("meta"):
        model = GPT(config)
    return model.num_params(), model.num_active_params()


def gather(run: RunDir, checkpoint: CheckpointDir | None = None) -> CardFacts:
    """What the files of `run` (and of its prepared corpus) say about `checkpoint` (default: the newest)."""
    checkpoint = checkpoint or run.latest_checkpoint()
    meta = checkpoint.read_meta() if checkpoint is not None else {}
    step = meta.get("step")
    tables = run.trained_tables(checkpoint)

    def up_to_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if step is None or r.get("step", 0) <= step]

    metrics = up_to_step(run.metrics())
    train = [r for r in metrics if r.get("kind") == "train"]
    evals = [r for r in metrics if r.get("kind") == "eval"]
    samples = up_to_step(run.samples())
    sampled = max((s.get("step", 0) for s in samples), default=None)
    corpus = corpus_of(run, checkpoint)
    measured = []
    if corpus is not None and step is not None:
        here = str(corpus.path.resolve())
        measured = [r for r in run.evals() if r.get("step") == step and r.get("data") == here]
    books = sorted(corpus.manifest().get("books", {}).values(), key=lambda b: b.get("id", 0)) if corpus else []
    return CardFacts(
        # A checkpoint copied out of its run is named by its own folder.
        name=(run.path if run.has_config() or checkpoint is None else checkpoint.path).resolve().name,
        step=step,
        tokens_seen=meta.get("tokens_seen"),
        tables=tables,
        params=count_params(tables["model"]) if "model" in tables else None,
        last_train=train[-1] if train else None,
        last_eval=evals[-1] if evals else None,
        tokens_per_s=[r["tokens_per_s"] for r in train if "tokens_per_s" in r],
        evals=measured,
        samples=[s for s in samples if s.get("step") == sampled],
        hardware=meta.get("hardware", {}),
        stats=corpus.stats() if corpus else {},
        books=books,
    )


# --- measurements ---------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One bits-per-byte measurement of a split, from metrics.jsonl (training's val) or evals.jsonl."""

    split: str
    step: int
    predictions: int
    bytes: int | None
    loss: float
    perplexity: float | None
    bits_per_byte: float
    whole_split: bool | None
    source: str


def measurements(facts: CardFacts) -> list[Measurement]:
    found = []
    row = facts.last_eval
    if row is not None and "val_bits_per_byte" in row:
        val_tokens = facts.stats.get("splits", {}).get("val", {}).get("tokens")
        predictions = row.get("val_tokens")
        whole = None if val_tokens is None or predictions is None else predictions == val_tokens - 1
        found.append(Measurement("val", row["step"], predictions, row.get("val_bytes"), row["val_loss"],
                                 row.get("val_perplexity"), row["val_bits_per_byte"], whole,
                                 "metrics.jsonl (training)"))
    for row in facts.evals:
        found.append(Measurement(row["split"], row["step"], row["tokens"], row.get("bytes"), row["loss"],
                                 row.get("perplexity"), row["bits_per_byte"], row.get("whole_split"),
                                 "evals.jsonl (`eval` / `report`)"))
    return found


def best_measurement(facts: CardFacts, split: str) -> Measurement | None:
    """The split's measurement over the most predictions (the later one on a tie)."""
    candidates = [m for m in measurements(facts) if m.split == split]
    return max(reversed(candidates), key=lambda m: m.predictions or 0) if candidates else None
