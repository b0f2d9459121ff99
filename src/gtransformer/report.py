"""Plots and `report.md` for a run folder; the `report` command.

Reads only what training wrote (`metrics.jsonl`, `samples.jsonl`, `config.toml`),
so it works while a run is still going and on a copied run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gtransformer.errors import UserError


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return rows


def split_metrics(rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    return train, evals


def plot(run_dir: Path, train: list[dict], evals: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []

    def save(fig, name: str) -> None:
        path = run_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", alpha=0.8)
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s")
    ax.grid(alpha=0.3)
    save(fig, "throughput.png")

    loads = [np.asarray(r["expert_load"]) for r in train if r.get("expert_load")]
    if loads and len({l.shape for l in loads}) == 1:
        stacked = np.stack(loads)  # (logged steps, layers, experts)
        panels = [("mean over training", stacked.mean(axis=0)), ("last logged step", stacked[-1])]
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.6 * stacked.shape[1] + 2))
        for ax, (title, grid) in zip(axes, panels):
            image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0)
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
            ax.set_title(f"expert load, {title}")
            ax.set_xticks(range(grid.shape[1]))
            ax.set_yticks(range(grid.shape[0]))
            fig.colorbar(image, ax=ax, label="fraction of routed tokens")
        save(fig, "expert_load.png")
    return written


def write_markdown(run_dir: Path, train: list[dict], evals: list[dict], samples: list[dict], plots: list[Path]) -> Path:
    lines = [f"# Training report: {run_dir.name}", ""]
    config_path = run_dir / "config.toml"
    if config_path.is_file():
        import tomllib

        model = tomllib.loads(config_path.read_text(encoding="utf-8")).get("model", {})
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
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def make_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass the folder given to `gtransformer train --out`")
    train, evals = split_metrics(read_jsonl(run_dir / "metrics.jsonl"))
    if not train:
        raise UserError(f"{run_dir / 'metrics.jsonl'} has no training rows yet; train first (or wait for the first log step)")
    plots = plot(run_dir, train, evals)
    return write_markdown(run_dir, train, evals, read_jsonl(run_dir / "samples.jsonl"), plots)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="PNG plots and report.md for a run folder",
        description="Write loss / learning-rate / throughput / expert-load plots and report.md into the run folder.",
    )
    parser.add_argument("run", metavar="RUN", help="run folder (the one given to `train --out`)")
    parser.set_defaults(func=run_report)


def run_report(args) -> int:
    path = make_report(args.run)
    print(f"wrote {path} and plots in {path.parent}")
    return 0
