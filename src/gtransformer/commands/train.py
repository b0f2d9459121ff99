"""`gtransformer train`: resolve and check the config once (a `RunConfig`), then run the `Trainer` on it (single
process or torchrun)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gtransformer.config import apply_overrides, load_toml
from gtransformer.errors import UserError
from gtransformer.training.config import RunConfig, build_config, check_sections
from gtransformer.training.run_dir import RunDir
from gtransformer.training.trainer import train


def resolve_config(args) -> RunConfig:
    """[model], [train], [data] from --config (or the run folder on --resume) plus --set and flags, checked
    whole (sections, then each table's keys, types and ranges) before anything runs or is written."""
    for flag, value, low in (("--max-steps", args.max_steps, 0), ("--max-minutes", args.max_minutes, 0),
                             ("--stop-at-step", args.stop_at_step, 0), ("--threads", args.threads, 1)):
        if value is not None and not value >= low:
            raise UserError(f"{flag} {value} must be >= {low}")
    most_threads = 4 * (os.cpu_count() or 1)
    if args.threads is not None and args.threads > most_threads:
        raise UserError(f"--threads {args.threads} is more than 4 x this machine's {os.cpu_count()} CPUs; "
                        f"use at most {most_threads}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the run")
    run = RunDir(args.out)
    if args.resume and run.has_config():
        tables = run.read_config()
    elif args.config:
        tables = load_toml(args.config)
    else:
        raise UserError("pass --config configs/<preset>.toml (or --resume with an existing run folder)")
    tables = {k: dict(v) if isinstance(v, dict) else v for k, v in tables.items()}
    apply_overrides(tables, args.set or [])
    check_sections(tables)
    tables.setdefault("model", {})
    tables.setdefault("train", {})
    tables.setdefault("data", {})
    if args.max_steps is not None:
        tables["train"]["max_steps"] = args.max_steps
    if args.max_minutes is not None:
        tables["train"]["max_minutes"] = float(args.max_minutes)
    if args.data:
        tables["data"]["path"] = str(Path(args.data).resolve())
    if not tables["data"].get("path"):
        raise UserError("pass --data with a prepared corpus folder (from `gtransformer prepare --out DIR`)")
    return build_config(tables)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on a prepared corpus (resumable; multi-GPU under torchrun)",
        description="Train the GQA + MoE model. Single process: `gtransformer train ...`; "
        "several GPUs / nodes: `torchrun --nproc_per_node=N -m gtransformer train ...`.",
    )
    parser.add_argument("--config", help="TOML preset with [model] and [train] tables, e.g. configs/tiny.toml")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    parser.add_argument("--data", help="prepared corpus folder (from `gtransformer prepare --out`)")
    parser.add_argument("--out", required=True, help="run folder for config, tokenizer, logs and checkpoints")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (sets train.max_steps)")
    parser.add_argument("--max-minutes", type=float,
                        help="stop after this many minutes of training; the LR schedule fits itself to it")
    parser.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --out with the run's saved config.toml (--set still applies)")
    parser.add_argument("--stop-at-step", type=int,
                        help="end this session at this step with a checkpoint, keeping the schedule "
                        "(for time-limited sessions; continue later with --resume)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default auto)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: all cores; 1 is faster when other jobs share the cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    parser.set_defaults(func=run_train)


def run_train(args) -> int:
    config = resolve_config(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    row = train(config, args.out, resume=args.resume, device=args.device, stop_at_step=args.stop_at_step,
                progress_bar=not args.no_progress)
    if row:  # only the main process returns its final row
        summary = {k: row[k] for k in ("step", "tokens", "loss", "val_loss", "val_bits_per_byte") if k in row}
        print(json.dumps(summary))
    return 0
