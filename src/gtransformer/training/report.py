"""Plots, `report.md` and `MODEL_CARD.md` for a run folder (`gtransformer report`).

The plots and report.md read only what training wrote (metrics, samples, config of a `RunDir`), so they
work while a run is still going and on a copied run folder. The model card (model_card.py) also wants
bits per byte on the held-out splits: `measure_held_out` evaluates the newest checkpoint on val and test
(`evaluate_checkpoint`, recorded in evals.jsonl) unless evals.jsonl already holds those measurements,
over the whole split up to `EVAL_TOKENS` predictions, when the run's prepared corpus is reachable.
Figures use matplotlib's object API (`Figure`), which draws without pyplot's global state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from gtransformer.errors import UserError
from gtransformer.files import write_text_atomic
from gtransformer.runtime import pick_device
from gtransformer.training.card_facts import corpus_of
from gtransformer.training.evaluate import evaluate_checkpoint
from gtransformer.training.model_card import write_model_card
from gtransformer.training.run_dir import RunDir

log = logging.getLogger(__name__)


def split_metrics(rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    return train, evals


def plot(run: RunDir, train: list[dict], evals: list[dict]) -> list[Path]:
    written = []

    def save(fig: Figure, name: str) -> None:
        path = run.plot_path(name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        written.append(path)

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", alpha=0.8)
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss")

    for key, label, name in (("lr", "learning rate", "lr"), ("tokens_per_s", "tokens / s", "throughput")):
        fig = Figure(figsize=(7, 3))
        ax = fig.subplots()
        ax.plot([r["step"] for r in train], [r[key] for r in train])
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        save(fig, name)

    loads = [np.asarray(r["expert_load"]) for r in train if r.get("expert_load")]
    if loads and len({l.shape for l in loads}) == 1:
        stacked = np.stack(loads)  # (logged steps, layers, experts)
        panels = [("mean over training", stacked.mean(axis=0)), ("last logged step", stacked[-1])]
        fig = Figure(figsize=(10, 0.6 * stacked.shape[1] + 2))
        axes = fig.subplots(1, 2)
        for ax, (title, grid) in zip(axes, panels):
            image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0)
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
            ax.set_title(f"expert load, {title}")
            ax.set_xticks(range(grid.shape[1]))
            ax.set_yticks(range(grid.shape[0]))
            fig.colorbar(image, ax=ax, label="fraction of routed tokens")
        save(fig, "expert_load")
    return written


def write_markdown(run: RunDir, train: list[dict], evals: list[dict], samples: list[dict], plots: list[Path]) -> Path:
    lines = [f"# Training report: {run.path.name}", ""]
    if run.has_config():
        model = run.read_config().get("model", {})
        lines += [
            "Model: " + ", ".join(f"{k}={model[k]}" for k in ("d_model", "n_layers", "n_heads", "n_kv_heads",
                                                            "n_experts", "top_k", "context_length", "vocab_size")
                                   if k in model),
            "",
        ]
    lines += ["## Final numbers", "", "| metric | value |", "|---|---|"]
    if train:
        last = train[-1]
        speeds = sorted(r["tokens_per_s"] for r in train)
        lines += [
            f"| steps | {last['step']} |",
            f"| tokens seen | {last['tokens']:,} |",
            f"| epochs | {last.get('epoch', 0):.3f} |",
            f"| training time | {last.get('elapsed_s', 0) / 60:.1f} min |",
            f"| last train loss | {last['loss']:.4f} |",
            f"| median tokens/s | {speeds[len(speeds) // 2]:,.0f} |",
        ]
        if "mfu" in last:
            lines.append(f"| MFU (last) | {100 * last['mfu']:.1f}% |")
    if evals:
        last_eval = evals[-1]
        lines += [
            f"| val loss (step {last_eval['step']}) | {last_eval['val_loss']:.4f} |",
            f"| val perplexity | {last_eval['val_perplexity']:.2f} |",
            f"| val bits per byte | {last_eval['val_bits_per_byte']:.4f} |",
        ]
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if evals:
        lines += ["## Validation over training", "", "| step | tokens | val loss | bits per byte |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_bits_per_byte']:.4f} |" for r in evals]
        lines.append("")
    if samples:
        lines += ["## Samples across training", ""]
        prompts = list(dict.fromkeys(s["prompt"] for s in samples))
        for prompt in prompts:
            lines += [f"### “{prompt}”", ""]
            for sample in (s for s in samples if s["prompt"] == prompt):
                text = (prompt + sample["text"]).replace("\n", " ⏎ ").replace("|", "\\|")
                lines.append(f"- step {sample['step']}: {text}")
            lines.append("")
    write_text_atomic(run.report_path, "\n".join(lines))
    return run.report_path


EVAL_TOKENS = 1_000_000  # predictions per split `report` evaluates at most (the first ones); 0 = no bound


def measure_held_out(run: RunDir, max_tokens: int = EVAL_TOKENS, device: str = "auto") -> list[dict[str, Any]]:
    """The newest checkpoint's val and test rows of evals.jsonl, each measured now when it is missing.

    A recorded row counts when it covers the whole split or at least `max_tokens` predictions (0 = whole
    split). Nothing is measured without a checkpoint or where the run's prepared split is not reachable.
    """
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        return []
    tables = run.trained_tables(checkpoint)
    corpus = corpus_of(run, checkpoint)
    step = checkpoint.read_meta().get("step")
    rows = []
    for split in ("val", "test"):
        if corpus is None or not corpus.shard_path(split).is_file():
            log.info("the %s split is not reachable (data.path = %s): the model card will say it was not measured",
                     split, run.recorded_data(checkpoint))
            continue
        here = str(corpus.path.resolve())
        recorded = [r for r in run.evals() if (r.get("step"), r.get("split"), r.get("data")) == (step, split, here)
                    and (r.get("whole_split") or (max_tokens and r.get("tokens", 0) >= max_tokens))]
        if recorded:
            rows.append(recorded[-1])
            continue
        log.info("measuring bits per byte of step %s on the %s split (%s)", step, split,
                 f"at most {max_tokens:,} predictions" if max_tokens else "whole split")
        rows.append(evaluate_checkpoint(checkpoint.path, split, max_tokens=max_tokens or None,
                                        batch_size=tables.get("train", {}).get("eval_batch_size", 8),
                                        device=pick_device(device)))
    return rows


def make_report(run_dir: str | Path, measure: bool = True, eval_tokens: int = EVAL_TOKENS,
                device: str = "auto") -> Path:
    """Plots, report.md and MODEL_CARD.md; with `measure`, val and test are evaluated first (`measure_held_out`)."""
    if eval_tokens < 0:
        raise UserError(f"--eval-tokens {eval_tokens} must be >= 0 (0 = whole splits)")
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"run folder {run.path} does not exist; pass the folder given to `gtransformer train --out`")
    train, evals = split_metrics(run.metrics())
    if not train:
        raise UserError(f"{run.metrics_path} has no training rows yet; train first (or wait for the first log step)")
    plots = plot(run, train, evals)
    report = write_markdown(run, train, evals, run.samples(), plots)
    if measure:
        measure_held_out(run, eval_tokens, device)
    write_model_card(run)
    return report
