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

Inside DIR/checkpoints/ other names are transient or set aside, never a checkpoint:

    .tmp-step-XXXXXXX-PID/   a checkpoint being written; renamed to step-XXXXXXX once complete (a killed
                             write leaves it behind: the next `train` removes it)
    .old-step-XXXXXXX-PID/   a checkpoint of the same step being replaced (removed right after)
    step-XXXXXXX.corrupt/    a checkpoint that failed verification when `train --resume` looked for one to
                             resume; set aside (not deleted) so that nothing picks it again

A checkpoint's meta.json records the size and SHA-256 of each of its files (`files`); `CheckpointDir.verify`
checks them and names the damaged file (`CorruptCheckpoint`). Checkpoints written before those records
existed are loaded unverified.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from gtransformer.config import load_toml, to_toml
from gtransformer.errors import UserError
from gtransformer.files import file_sha256, read_jsonl, sync_path, write_text_atomic

log = logging.getLogger(__name__)

STEP_PATTERN = re.compile(r"^step-(\d{7,})$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
HASHED_FILES = (MODEL_FILE, STATE_FILE)  # recorded in meta.json["files"]: {"bytes", "sha256"} each
TEMPORARY_PREFIXES = (".tmp-step-", ".old-step-")
CORRUPT_SUFFIX = ".corrupt"


def one_line(text: object, limit: int = 160) -> str:
    """An exception's text squeezed onto one line (the CLI prints errors as one line)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class CorruptCheckpoint(UserError):
    """A checkpoint file is missing, truncated, unreadable or changed since it was written.

    `checkpoint` and `file` (e.g. "model.safetensors") say which; `problem` says what. The message names the
    file, and the way out: an older checkpoint of the same run, or `train --resume` (which falls back itself).
    """

    def __init__(self, checkpoint: "CheckpointDir", file: str, problem: str):
        self.checkpoint, self.file, self.problem = checkpoint, file, problem
        super().__init__(f"{checkpoint.path / file} is damaged: {problem}; {checkpoint.way_out()}")


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
    def step(self) -> int | None:
        match = STEP_PATTERN.match(self.path.name)
        return int(match.group(1)) if match else None

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"  # only in checkpoints copied out of their run

    def read_meta(self) -> dict[str, Any]:
        """meta.json as a dict; `CorruptCheckpoint` when it is missing or not a JSON object."""
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CorruptCheckpoint(self, META_FILE, "the file is missing") from None
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CorruptCheckpoint(self, META_FILE, f"not valid JSON ({one_line(exc)})") from None
        if not isinstance(meta, dict):
            raise CorruptCheckpoint(self, META_FILE, "not a JSON object")
        return meta

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Write meta.json and flush it to the disk (it is written last: its presence marks a complete folder)."""
        self.meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
        sync_path(self.meta_path)

    # -- integrity ----------------------------------------------------------------------

    def describe_files(self, names: Iterable[str] = HASHED_FILES) -> dict[str, dict[str, Any]]:
        """{name: {"bytes", "sha256"}} of the files present, for meta.json (the files are hashed in parallel)."""
        paths = [self.path / name for name in names if (self.path / name).is_file()]
        with ThreadPoolExecutor(max_workers=max(len(paths), 1)) as pool:
            digests = list(pool.map(file_sha256, paths))
        return {p.name: {"bytes": p.stat().st_size, "sha256": d} for p, d in zip(paths, digests)}

    def verify(self, names: Iterable[str] = HASHED_FILES) -> dict[str, Any]:
        """meta.json, after checking that the named files exist and match its size and SHA-256 records.

        Raises `CorruptCheckpoint` naming the first damaged file. A checkpoint written before the records
        existed (no "files" in meta.json) is only checked for the files' presence.
        """
        meta = self.read_meta()
        names = list(names)
        for name in names:
            if not (self.path / name).is_file():
                raise CorruptCheckpoint(self, name, "the file is missing")
        records = meta.get("files")
        if records is None:
            log.debug("%s has no file hashes in meta.json (written by an older version); not verified", self)
            return meta
        if not isinstance(records, dict):
            raise CorruptCheckpoint(self, META_FILE, "its \"files\" entry is not a JSON object")
        for name in names:
            record = records.get(name)
            if not isinstance(record, dict) or not {"bytes", "sha256"} <= record.keys():
                raise CorruptCheckpoint(self, META_FILE, f"it records no size and SHA-256 for {name}")
            size = (self.path / name).stat().st_size
            if size != record["bytes"]:
                raise CorruptCheckpoint(self, name, f"{size} bytes where {record['bytes']} were written "
                                                    f"({'truncated' if size < record['bytes'] else 'grown'})")
        paths = [self.path / name for name in names]
        with ThreadPoolExecutor(max_workers=max(len(paths), 1)) as pool:
            digests = list(pool.map(file_sha256, paths))
        for name, digest in zip(names, digests):
            if digest != records[name]["sha256"]:
                raise CorruptCheckpoint(self, name, "its SHA-256 differs from the one meta.json recorded "
                                                    "(the file changed after it was written)")
        return meta

    def way_out(self) -> str:
        """What to do about this checkpoint being damaged (the second half of `CorruptCheckpoint`'s line)."""
        parent = self.path.parent
        run = parent.parent
        older = []
        if parent.name == "checkpoints" and self.step is not None and parent.is_dir():
            older = sorted(p.name for p in parent.iterdir()
                           if (m := STEP_PATTERN.match(p.name)) and int(m.group(1)) < self.step)
        if older:
            return (f"use an older checkpoint (e.g. {parent / older[-1]}), or continue training with "
                    f"`gtransformer train --out {run} --resume`, which falls back to the newest intact one")
        if parent.name == "checkpoints":
            return f"no older checkpoint exists in {parent}; train again"
        return "restore it from a copy or train again"


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

    def trained_tables(self, checkpoint: CheckpointDir | None) -> dict[str, dict[str, Any]]:
        """The tables a checkpoint was trained with (its meta.json), over the run's config.toml, else {}."""
        tables = dict(self.read_config()) if self.has_config() else {}
        if checkpoint is not None:
            tables.update(checkpoint.read_meta().get("config", {}))
        return tables

    def recorded_data(self, checkpoint: CheckpointDir | None) -> Path | None:
        """The prepared corpus folder the run recorded ([data] path), None when it recorded none.

        A relative path is taken from the working directory, else from the run folder when it exists there.
        """
        path = self.trained_tables(checkpoint).get("data", {}).get("path")
        if not path:
            return None
        path = Path(path)
        if not path.is_absolute() and not path.exists() and (self.path / path).exists():
            return self.path / path
        return path

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
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with path.open("a+b") as f:
            if f.tell() > 0:  # a line cut short by a killed writer: start on a line of our own
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    text = "\n" + text
            f.write(text.encode("utf-8"))

    def truncate_logs(self, after_step: int) -> None:
        """Drop log rows after `after_step`: work after the checkpoint a run resumes from is redone.

        A line cut short by a killed run is dropped too (`read_jsonl` skips it)."""
        for path in self.log_paths():
            if path.is_file():
                kept = [row for row in read_jsonl(path) if row.get("step", 0) <= after_step]
                write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))

    def log_paths(self) -> tuple[Path, ...]:
        return self.metrics_path, self.samples_path, self.evals_path

    def sync_logs(self) -> None:
        """Flush the JSON-lines logs to the disk (before a checkpoint is published: its rows must outlive it)."""
        for path in self.log_paths():
            if path.is_file():
                sync_path(path)

    # -- checkpoints ------------------------------------------------------------------

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.checkpoints_dir / CheckpointDir.name(step))

    def temporary_checkpoint(self, step: int) -> CheckpointDir:
        """Where this process writes the checkpoint of `step` before publishing it by a rename."""
        return CheckpointDir(self.checkpoints_dir / f".tmp-{CheckpointDir.name(step)}-{os.getpid()}")

    def set_aside_path(self, step: int) -> Path:
        """Where an existing checkpoint of `step` goes while a new one of the same step replaces it."""
        return self.checkpoints_dir / f".old-{CheckpointDir.name(step)}-{os.getpid()}"

    def stale_temporaries(self) -> list[Path]:
        """Folders of checkpoint writes that never finished (the process was killed mid-write)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.iterdir() if p.name.startswith(TEMPORARY_PREFIXES))

    def set_aside_corrupt(self, checkpoint: CheckpointDir) -> Path:
        """Rename a damaged checkpoint to step-XXXXXXX.corrupt (.corrupt-2, ...): kept for inspection, never
        picked again as a checkpoint. Returns the new path."""
        target = checkpoint.path.with_name(checkpoint.path.name + CORRUPT_SUFFIX)
        n = 1
        while target.exists():
            n += 1
            target = checkpoint.path.with_name(f"{checkpoint.path.name}{CORRUPT_SUFFIX}-{n}")
        os.replace(checkpoint.path, target)
        sync_path(self.checkpoints_dir)
        return target

    def corrupt_checkpoints(self) -> list[Path]:
        """Checkpoints set aside as damaged (`set_aside_corrupt`)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoints_dir.iterdir() if CORRUPT_SUFFIX in p.name)

    def write_probe_path(self) -> Path:
        """A scratch file the preflight writes and removes to learn that the folder is writable."""
        return self.path / f".write-probe-{os.getpid()}"

    def checkpoints(self) -> list[CheckpointDir]:
        """The step-XXXXXXX folders, oldest first.

        Only a complete checkpoint is ever renamed to that name, so each one is a checkpoint, intact or damaged
        since (even without its meta.json): loading tells which (`CheckpointDir.verify`)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [
            (int(m.group(1)), CheckpointDir(p))
            for p in self.checkpoints_dir.iterdir()
            if (m := STEP_PATTERN.match(p.name)) and p.is_dir()
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
    if CheckpointDir(path).meta_path.is_file() or STEP_PATTERN.match(path.name):  # a checkpoint folder
        return CheckpointDir(path), RunDir(path.parent.parent)  # (its files are verified on loading)
    run = RunDir(path)
    newest = run.latest_checkpoint()
    if newest is None:
        raise UserError(
            f"{path} has no checkpoints (looked for {run.checkpoints_dir}/step-*); "
            f"train first with `gtransformer train --out {path}`"
        )
    return newest, run
