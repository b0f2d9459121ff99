"""`TrainConfig`: the `[train]` table (every key settable from the TOML file or `--set train.KEY=VALUE`), and
`check_tables`: the whole [model] / [train] / [data] config checked in one place before a run starts, into a
`RunConfig` that the `Trainer` takes as it is.

Each field's range is checked when a `TrainConfig` is built (`validate`), so a bad value is one clear line
before step 0, never a ZeroDivisionError or an optimizer's ValueError steps later. Each check runs once:
`check_sections` on the tables, then `build_config` builds each section's dataclass, whose `__post_init__`
checks types (`coerce_fields`) and ranges (`validate`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from gtransformer.config import check_names, coerce_fields, from_dict, shown_name
from gtransformer.errors import UserError
from gtransformer.inference.sampling import SEED_LIMIT, SamplingConfig
from gtransformer.model.config import ModelConfig
from gtransformer.runtime import PRECISIONS

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")
# How SamplingConfig's fields are called in [train] (its rules check the training samples' settings).
SAMPLE_NAMES = {"max_new_tokens": "train.sample_tokens", "temperature": "train.sample_temperature",
                "top_k": "train.sample_top_k", "top_p": "train.sample_top_p",
                "repetition_penalty": "train.sample_repetition_penalty", "seed": "train.sample_seed"}

DEFAULT_PROMPTS = ["Era uma vez", "O amor é", "Naquella manhã, a cidade", "Portugal e o Brasil"]


@dataclass
class TrainConfig:
    """The `[train]` table."""

    seed: int = 1337
    batch_size: int = 32  # windows per optimizer step, over all processes and accumulation steps
    micro_batch_size: int = 0  # windows per forward pass per process; 0 = batch_size / processes
    max_steps: int = 0  # 0 = no step limit (then max_minutes or epochs end the run)
    max_minutes: float = 0.0  # wall-clock budget; the LR schedule runs on the time fraction too
    epochs: int = 1  # used only when neither max_steps nor max_minutes is set
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final LR as a fraction of lr
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: last fraction of the run spent decaying
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # adamw | muon (torch.optim.Muon for the hidden matrices, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's peak LR (the schedule scales it like lr)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_experts: bool = True  # false: expert stacks stay with AdamW (Muon's orthogonalisation costs O(E F D^2))
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping
    precision: str = "auto"  # auto | float32 | bfloat16 | float16
    # torch.compile the training step: true | false | "auto" (on for runs of 15+ minutes or 2000+ steps where a
    # C++ compiler (CPU) or triton (CUDA) is present; the log says why)
    compile: bool | str = "auto"
    fsdp: bool = False  # shard parameters with FSDP2 under torchrun
    log_every: int = 10
    eval_every: int = 250  # 0 = only at the end
    eval_tokens: int = 65536  # validation predictions per evaluation; 0 = whole split
    eval_batch_size: int = 8
    checkpoint_every: int = 500  # 0 = only at epoch ends and the end
    keep_last: int = 3  # periodic checkpoints kept (epoch-end checkpoints are always kept)
    max_bad_steps: int = 5  # non-finite loss / gradient norm steps in a row (skipped) before training stops; 0 = never
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sample_tokens: int = 48
    sample_temperature: float = 0.8
    sample_top_k: int = 50
    sample_top_p: float = 0.95
    sample_repetition_penalty: float = 1.1
    sample_seed: int = 1234
    tensorboard: bool = True  # when the tensorboard package is installed
    wandb: bool = False  # when also WANDB_API_KEY is set
    wandb_project: str = "gtransformer"

    def __post_init__(self) -> None:
        coerce_fields(self, "train")
        self.validate()

    def validate(self) -> None:
        """One UserError line for the first value out of its range (types are checked by `coerce_fields`)."""

        def fail(name: str, rule: str) -> None:
            raise UserError(f"train.{name} = {getattr(self, name)!r} {rule}")

        def at_least(name: str, low: float, note: str = "") -> None:
            if not getattr(self, name) >= low:
                fail(name, f"must be >= {low}{note}")

        def within(name: str, low: float, high: float, high_open: bool = False) -> None:
            value = getattr(self, name)
            if not (low <= value < high if high_open else low <= value <= high):
                fail(name, f"must lie in [{low}, {high}{')' if high_open else ']'}")

        if not 0 <= self.seed < SEED_LIMIT:
            fail("seed", "must lie in [0, 2**63)")
        at_least("batch_size", 1)
        at_least("micro_batch_size", 0, " (0 = batch_size / processes)")
        if self.micro_batch_size and (self.micro_batch_size > self.batch_size
                                      or self.batch_size % self.micro_batch_size):
            fail("micro_batch_size", f"must divide train.batch_size = {self.batch_size} (or be 0)")
        at_least("max_steps", 0, " (0 = no step limit)")
        at_least("max_minutes", 0, " (0 = no time limit)")
        at_least("epochs", 1)
        if not self.lr > 0:
            fail("lr", "must be > 0, e.g. 3e-4")
        within("min_lr_ratio", 0, 1)
        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {', '.join(SCHEDULES)}")
        at_least("warmup_steps", 0)
        within("decay_fraction", 0, 1)
        at_least("weight_decay", 0)
        if self.optimizer not in OPTIMIZERS:
            fail("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        if not self.muon_lr > 0:
            fail("muon_lr", "must be > 0, e.g. 0.02")
        within("muon_momentum", 0, 1, high_open=True)
        at_least("muon_weight_decay", 0)
        if self.optimizer == "muon" and self.fsdp:
            fail("optimizer", "cannot shard with train.fsdp = true (Muon orthogonalises whole matrices); "
                 "set train.fsdp = false or train.optimizer = \"adamw\"")
        within("beta1", 0, 1, high_open=True)
        within("beta2", 0, 1, high_open=True)
        if not self.eps > 0:
            fail("eps", "must be > 0, e.g. 1e-8")
        at_least("grad_clip", 0, " (0 = no clipping)")
        if isinstance(self.compile, str) and self.compile != "auto":
            fail("compile", 'must be true, false or "auto"')
        if self.precision not in PRECISIONS:
            fail("precision", f"must be one of {', '.join(PRECISIONS)}")
        at_least("log_every", 1)
        at_least("eval_every", 0, " (0 = only at the end)")
        at_least("eval_tokens", 0, " (0 = the whole split)")
        at_least("eval_batch_size", 1)
        at_least("checkpoint_every", 0, " (0 = only at epoch ends and the end)")
        at_least("keep_last", 0, " (0 = keep every checkpoint)")
        at_least("max_bad_steps", 0, " (0 = never stop for non-finite steps)")
        sampling = SamplingConfig(max_new_tokens=self.sample_tokens, temperature=self.sample_temperature,
                                  top_k=self.sample_top_k, top_p=self.sample_top_p,
                                  repetition_penalty=self.sample_repetition_penalty, seed=self.sample_seed)
        sampling.validate(SAMPLE_NAMES)
        if self.sample_seed + len(self.sample_prompts) > SEED_LIMIT:
            fail("sample_seed", "plus the number of sample prompts must stay below 2**63")
        if not self.wandb_project.strip():
            fail("wandb_project", "must name a Weights & Biases project")


@dataclass
class DataConfig:
    """The `[data]` table."""

    path: str = ""  # the prepared corpus folder (`prepare --out`); `train --data` sets it


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def check_sections(tables: dict[str, Any]) -> None:
    """Only [model], [train] and [data], each a table (the nearest name for a misspelt one)."""
    for name, value in tables.items():
        if name not in SECTIONS and not isinstance(value, dict):  # `lr = 1e-3` above every [table]
            home = [section for section, cls in SECTIONS.items() if name in {f.name for f in fields(cls)}]
            where = f"put it under [{home[0]}]" if home else "put each key under [model], [train] or [data]"
            raise UserError(f"{shown_name(name)} = {value!r} sits outside any table; {where}"[:300])
    check_names(tables, SECTIONS, "section", "[", "]")
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise UserError(f"[{name}] must be a table of key = value lines, not the value {table!r}"[:200])


class RunConfig(NamedTuple):
    """The checked [model], [train] and [data] tables of a run (unpacks as `model, train, data`)."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig

    def tables(self) -> dict[str, dict[str, Any]]:
        """Every field of each table, as the run folder's config.toml records them."""
        return {name: dataclasses.asdict(section) for name, section in self._asdict().items()}


def build_config(tables: dict[str, Any]) -> RunConfig:
    """The [model], [train] and [data] dataclasses of tables that `check_sections` has passed (each key and value
    is checked as its dataclass is built); raises one UserError line otherwise."""
    return RunConfig(*(from_dict(cls, dict(tables.get(name, {})), name) for name, cls in SECTIONS.items()))


def check_tables(tables: dict[str, Any]) -> RunConfig:
    """The whole config checked in one place: sections, keys (nearest valid name), types, ranges.

    Returns the [model], [train] and [data] tables as dataclasses; raises one UserError line otherwise."""
    check_sections(tables)
    return build_config(tables)
