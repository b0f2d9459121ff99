"""`RunDir` and `CheckpointDir`: the one owner of a run folder's file names (`train --out DIR`).

    DIR/config.toml          the resolved [model], [train] and [data] tables
    DIR/tokenizer.json       a copy of the corpus's tokenizer
    DIR/metrics.jsonl        one JSON row per log step ("kind": "train") and evaluation ("kind": "eval")
    DIR/samples.jsonl        one JSON row per sample: step, tokens, prompt, text
    DIR/evals.jsonl          one JSON row per evaluation of a checkpoint by `eval` or `report` (split, step, bpb...)
    DIR/chat_template.json   how chat messages become a prompt when the run is served (inference/chat.py)
    DIR/tensorboard/         TensorBoard events (when tensorboard is installed)
    DIR/checkpoints/step-XXXXXXX/{model.safetensors, state.pt, meta.json}
    DIR/report.md, *.png     written by `gtransformer report`
    DIR/MODEL_CARD.md        written by `gtransformer report` (training/model_card.py)

`train` writes it; `eval`, `generate`, `report` and `export` read it (`eval` and `report` add evals.jsonl rows).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gtransformer.config import load_toml, to_toml
from gtransformer.errors import UserError
from gtransformer.files import read_jsonl, write_text_atomic

STEP_PATTERN = re.compile(r"^step-(\d{7,})$")


class CheckpointDir:
    """One `checkpoints/step-XXXXXXX` folder: safetensors weights, `weights_only` state, JSON meta."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"CheckpointDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:07d}"

    @property
    def model_path(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def state_path(self) -> Path:
        return self.path / "state.pt"

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"  # only in checkpoints copied out of their run

    def is_complete(self) -> bool:
        return self.meta_path.is_file() and self.model_path.is_file()

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta_path.read_text(encoding="utf-8"))

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- names ------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples_path(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def evals_path(self) -> Path:
        return self.path / "evals.jsonl"

    @property
    def chat_template_path(self) -> Path:
        return self.path / "chat_template.json"  # how `serve` renders chat messages (inference/chat.py)

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def report_path(self) -> Path:
        return self.path / "report.md"

    @property
    def model_card_path(self) -> Path:
        return self.path / "MODEL_CARD.md"

    def plot_path(self, name: str) -> Path:
        return self.path / f"{name}.png"

    # -- config -----------------------------------------------------------------------

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> dict[str, Any]:
        return load_toml(self.config_path)

    def write_config(self, tables: dict[str, dict[str, Any]]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config_path, to_toml(tables))

    # -- logs -------------------------------------------------------------------------

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def samples(self) -> list[dict[str, Any]]:
        return read_jsonl(self.samples_path)

    def evals(self) -> list[dict[str, Any]]:
        return read_jsonl(self.evals_path)

    def append_metrics(self, row: dict[str, Any]) -> None:
        self._append(self.metrics_path, [row])

    def append_samples(self, rows: list[dict[str, Any]]) -> None:
        self._append(self.samples_path, rows)

    def append_eval(self, row: dict[str, Any]) -> None:
        self._append(self.evals_path, [row])

    @staticmethod
    def _append(path: Path, rows: list[dict[str, Any]]) -> None:
        with path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def truncate_logs(self, after_step: int) -> None:
        """Drop log rows after `after_step`: work after the checkpoint a run resumes from is redone."""
        for path in (self.metrics_path, self.samples_path, self.evals_path):
            if path.is_file():
                kept = [row for row in read_jsonl(path) if row.get("step", 0) <= after_step]
                write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))

    # -- checkpoints ------------------------------------------------------------------

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.checkpoints_dir / CheckpointDir.name(step))

    def checkpoints(self) -> list[CheckpointDir]:
        """Complete checkpoints, oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [
            (int(m.group(1)), CheckpointDir(p))
            for p in self.checkpoints_dir.iterdir()
            if (m := STEP_PATTERN.match(p.name)) and (p / "meta.json").is_file()
        ]
        return [c for _, c in sorted(found, key=lambda pair: pair[0])]

    def latest_checkpoint(self) -> CheckpointDir | None:
        found = self.checkpoints()
        return found[-1] if found else None


def resolve_checkpoint(run_or_checkpoint: str | Path) -> tuple[CheckpointDir, RunDir]:
    """(checkpoint, run) for a run folder (its newest checkpoint) or a checkpoint folder."""
    path = Path(run_or_checkpoint)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run folder (train --out) or one of its checkpoints/step-* folders")
    if CheckpointDir(path).is_complete():
        return CheckpointDir(path), RunDir(path.parent.parent)
    run = RunDir(path)
    newest = run.latest_checkpoint()
    if newest is None:
        raise UserError(
            f"{path} has no checkpoints (looked for {run.checkpoints_dir}/step-*); "
            f"train first with `gtransformer train --out {path}`"
        )
    return newest, run
