"""`TrainConfig`: the `[train]` table (every key settable from the TOML file or `--set train.KEY=VALUE`)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping
    precision: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False  # torch.compile the model (CPU too: ~20% faster tiny-preset steps, needs a C++ compiler)
    fsdp: bool = False  # shard parameters with FSDP2 under torchrun
    log_every: int = 10
    eval_every: int = 250  # 0 = only at the end
    eval_tokens: int = 65536  # validation predictions per evaluation; 0 = whole split
    eval_batch_size: int = 8
    checkpoint_every: int = 500  # 0 = only at epoch ends and the end
    keep_last: int = 3  # periodic checkpoints kept (epoch-end checkpoints are always kept)
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
