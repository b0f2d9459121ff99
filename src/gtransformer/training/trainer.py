"""The training loop and the `train` command.

The loop only wires components: config -> data windows -> model -> AdamW +
LR schedule + precision -> checkpoints / evaluation / samples / logs. Under
`torchrun` it runs DistributedDataParallel (or FSDP2 with `train.fsdp = true`),
each rank reading its own slice of every global batch; only rank 0 writes.

Reproducibility: the data order is a function of (seed, epoch), and a checkpoint
stores the data position, every RNG state, optimizer, schedule, grad scaler and
the router-bias buffers, so on CPU a resumed run repeats the uninterrupted one bit
for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gtransformer.config import from_dict, to_toml
from gtransformer.data.corpus import PreparedCorpus
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.data.windows import WindowLoader
from gtransformer.data.shards import read_shard
from gtransformer.errors import UserError
from gtransformer.files import write_text_atomic
from gtransformer.inference.generate import SamplingConfig, generate_text
from gtransformer.model.config import ModelConfig
from gtransformer.model.model import GPT
from gtransformer.runtime import (
    Distributed,
    autocast_context,
    device_peak_flops,
    init_distributed,
    memory_stats,
    require_cpp_compiler,
    resolve_precision,
)
from gtransformer.training.checkpoint import (
    load_model_state,
    load_train_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gtransformer.training.evaluate import evaluate_split, token_byte_lengths
from gtransformer.training.run_dir import RunDir

log = logging.getLogger(__name__)

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


# --- optimizer and schedule -------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms / biases / embeddings do not (decaying them only hurts)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() < 2 or "norm" in name or "embed_tokens" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=device.type in ("cuda", "cpu"),  # CPU fused AdamW: 12 vs 56 ms a step on the tiny preset
    )


def lr_multiplier(config: TrainConfig, step: int, progress: float) -> float:
    """LR factor at `step` (0-based) when `progress` in [0, 1] of the run is done.

    Warmup is counted in steps; after it the shape follows `progress`, which is
    the larger of the step fraction and the time fraction, so a time-limited run
    still ends its decay when its time is up.
    """
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    floor = config.min_lr_ratio
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "wsd":
        decay_start = 1.0 - config.decay_fraction
        if progress < decay_start:
            return 1.0
        return 1.0 - (1 - floor) * (progress - decay_start) / max(config.decay_fraction, 1e-9)
    raise UserError(f"train.schedule = {config.schedule!r}; use cosine, wsd or constant")


def sync_router_loads(model: torch.nn.Module, dist_info: Distributed) -> None:
    """Sum the per-expert loads over ranks so every rank moves its router biases identically."""
    if not dist_info.enabled:
        return
    for name, buffer in model.named_buffers():
        if name.endswith("load_since_update"):
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)


# --- logging ----------------------------------------------------------------------------


class MetricsLogger:
    """metrics.jsonl always; TensorBoard and Weights & Biases when available and enabled."""

    def __init__(self, run: RunDir, config: TrainConfig, tables: dict[str, Any], enabled: bool):
        self.enabled = enabled
        self.run = run
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run.tensorboard_dir))
            except ImportError:
                pass
        if config.wandb:
            if not os.environ.get("WANDB_API_KEY"):
                log.warning("train.wandb is true but WANDB_API_KEY is not set; logging to metrics.jsonl only")
            else:
                try:
                    import wandb  # optional, heavy: imported only when train.wandb asks for it

                    self.wandb = wandb.init(project=config.wandb_project, name=run.path.name, config=tables, resume="allow")
                except ImportError:
                    log.warning("train.wandb is true but wandb is not installed (pip install wandb)")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.run.append_metrics(row)
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "kind")}
        prefix = row.get("kind", "train")
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"{prefix}/{key}", value, row["step"])
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=row["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def summarise_moe_stats(stats: Any) -> dict[str, Any]:
    """Per-layer expert load (fraction of routed tokens) and mean router aux / z losses."""
    layers = stats if isinstance(stats, (list, tuple)) else []
    loads, aux, z = [], [], []
    for layer in layers:
        if not layer:
            continue
        counts = layer["tokens_per_expert"].float()
        loads.append([round(float(c), 5) for c in (counts / counts.sum().clamp_min(1)).tolist()])
        if "aux_loss" in layer:
            aux.append(float(layer["aux_loss"]))
        if "z_loss" in layer:
            z.append(float(layer["z_loss"]))
    out: dict[str, Any] = {}
    if loads:
        out["expert_load"] = loads
    if aux:
        out["router_aux_loss"] = sum(aux) / len(aux)
    if z:
        out["router_z_loss"] = sum(z) / len(z)
    return out


# --- samples ----------------------------------------------------------------------------


def generate_samples(model: torch.nn.Module, tokenizer, config: TrainConfig, context: int) -> list[dict[str, str]]:
    """Continue each prompt with its own fixed seed (its own generator: the run's RNG is untouched)."""
    samples = []
    for index, prompt in enumerate(config.sample_prompts):
        room = context - max(len(tokenizer.encode(prompt)), 1)
        sampling = SamplingConfig(
            max_new_tokens=max(min(config.sample_tokens, room), 0),
            temperature=config.sample_temperature,
            top_k=config.sample_top_k or None,
            top_p=config.sample_top_p,
            repetition_penalty=config.sample_repetition_penalty,
            seed=config.sample_seed + index,
        )
        (text,) = generate_text(model, tokenizer, [prompt], sampling)
        samples.append({"prompt": prompt, "text": text})
    return samples


# --- the run ----------------------------------------------------------------------------


@dataclass
class RunState:
    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training wall time before this session (for --max-minutes across resumes)


def train(tables: dict[str, dict[str, Any]], out_dir: str | Path, resume: bool = False, device: str = "auto",
          stop_at_step: int | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Train (or continue) the run in `out_dir`; returns the final metrics row.

    `stop_at_step` ends this session early (with a checkpoint) without changing
    the schedule, for time-limited sessions that continue later with `resume`.
    """
    run = RunDir(out_dir)
    corpus = PreparedCorpus(tables["data"]["path"]).require("train", "val")
    model_config = from_dict(ModelConfig, dict(tables["model"]), "model")
    config = from_dict(TrainConfig, dict(tables["train"]), "train")
    tokenizer = corpus.tokenizer()
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size = {model_config.vocab_size}; "
            f"add --set model.vocab_size={tokenizer.vocab_size}"
        )
    checkpoint = run.latest_checkpoint()
    if checkpoint is not None and not resume:
        raise UserError(f"{out_dir} already holds checkpoints; pass --resume to continue it or choose another --out")
    if resume and checkpoint is None:
        log.warning("--resume: no checkpoint in %s yet, starting from scratch", out_dir)

    dist_info, device = init_distributed(device)
    precision = resolve_precision(config.precision, device)
    autocast = autocast_context(device, precision)
    if config.compile:
        require_cpp_compiler(device, "set train.compile = false")

    if dist_info.is_main:
        run.write_config({"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config),
                          "data": tables["data"]})
        shutil.copyfile(corpus.tokenizer_path, run.tokenizer_path)
        if checkpoint is None:  # rows of an earlier attempt that never reached a checkpoint would be redone
            run.truncate_logs(0)

    torch.manual_seed(config.seed)
    model = GPT(model_config).to(device)
    optimizer = build_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "float16")
    micro_batch = config.micro_batch_size or max(config.batch_size // dist_info.world_size, 1)
    loader = WindowLoader(
        corpus.tokens("train"),
        model_config.context_length,
        config.batch_size,
        micro_batch,
        config.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    val_tokens = corpus.tokens("val")
    byte_lengths = token_byte_lengths(tokenizer)
    state = RunState()

    if resume and checkpoint is not None:
        model.load_state_dict(load_model_state(checkpoint))
        saved = load_train_state(checkpoint)
        if not (dist_info.enabled and config.fsdp):  # FSDP loads it once the parameters are sharded
            optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        loader.load_state_dict(saved["data"])
        state = RunState(**saved["run"])
        set_rng_state(saved["rng"])
        if dist_info.is_main:
            run.truncate_logs(state.step)
        log.info("resumed from %s (step %d, epoch %d)", checkpoint, state.step, checkpoint.read_meta().get("epoch", 0))

    raw_model = model
    if dist_info.enabled and config.fsdp:
        for block in raw_model.layers:
            fully_shard(block)
        fully_shard(raw_model)
        optimizer = build_optimizer(raw_model, config, device)  # over the sharded parameters
        if resume and checkpoint is not None:
            set_optimizer_state_dict(raw_model, optimizer, saved["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
    elif dist_info.enabled:
        # Buffers are not broadcast: router biases stay equal through identical updates, and
        # broadcasting would overwrite each rank's own expert-load counts.
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if config.compile:
        model = torch.compile(model)

    max_steps = config.max_steps
    budget_s = config.max_minutes * 60.0
    if not max_steps and not budget_s:
        max_steps = config.epochs * loader.batches_per_epoch
    tokens_per_step = config.batch_size * model_config.context_length
    peak = device_peak_flops(device)
    flops_per_token = raw_model.flops_per_token() if hasattr(raw_model, "flops_per_token") else None
    metrics = MetricsLogger(run, config, tables, enabled=dist_info.is_main)

    def progress_fraction(elapsed: float) -> float:
        parts = []
        if max_steps:
            parts.append(state.step / max_steps)
        if budget_s:
            parts.append(elapsed / budget_s)
        return max(parts)

    def finished(elapsed: float) -> bool:
        return (bool(max_steps) and state.step >= max_steps) or (bool(budget_s) and elapsed >= budget_s)

    def model_state() -> dict[str, torch.Tensor]:
        if dist_info.enabled and config.fsdp:
            return get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return raw_model.state_dict()

    def optimizer_state() -> dict[str, Any]:
        if dist_info.enabled and config.fsdp:
            return get_optimizer_state_dict(raw_model, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def save(epoch_end: bool, elapsed: float) -> None:
        weights, optim = model_state(), optimizer_state()  # collectives under FSDP: every rank takes part
        if not dist_info.is_main:
            return
        train_state = {
            "optimizer": optim,
            "scaler": scaler.state_dict(),
            "data": loader.state_dict(),
            "run": {"step": state.step, "tokens_seen": state.tokens_seen, "elapsed_s": elapsed},
            "rng": rng_state(),
        }
        meta = {
            "epoch": loader.position.epoch,
            "tokens_seen": state.tokens_seen,
            "keep": epoch_end,
            "config": {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config), "data": tables["data"]},
        }
        path = save_checkpoint(run, state.step, weights, train_state, meta, keep_last=config.keep_last)
        log.info("saved %s", path)

    def evaluate_and_sample(elapsed: float) -> dict[str, Any]:
        eval_model = raw_model
        result = evaluate_split(
            eval_model,
            val_tokens,
            model_config.context_length,
            byte_lengths,
            split_bytes=corpus.split_bytes("val"),
            max_targets=config.eval_tokens or None,
            batch_size=config.eval_batch_size,
            device=device,
            autocast=autocast_context(device, precision),
        )
        row = {"kind": "eval", "step": state.step, "tokens": state.tokens_seen, "elapsed_s": elapsed,
               **{f"val_{k}": v for k, v in result.items()}}
        metrics.write(row)
        if config.sample_prompts and not config.fsdp:
            samples = generate_samples(raw_model, tokenizer, config, model_config.context_length)
            if dist_info.is_main:
                run.append_samples([{"step": state.step, "tokens": state.tokens_seen, **s} for s in samples])
                for sample in samples:
                    log.info("sample @%d | %s", state.step, (sample["prompt"] + sample["text"]).replace("\n", " ⏎ "))
        if dist_info.is_main:
            log.info("eval @%d: val loss %.4f, bits/byte %.4f", state.step, result["loss"], result["bits_per_byte"])
        return row

    if dist_info.is_main:
        log.info(
            "model: %.2fM parameters (%.2fM active), %d processes, grad accumulation %d, precision %s, device %s",
            raw_model.num_params() / 1e6, raw_model.num_active_params() / 1e6, dist_info.world_size,
            loader.grad_accum_steps, precision, device,
        )
    bar = None
    if dist_info.is_main and progress_bar:
        bar = tqdm(total=max_steps or None, initial=state.step, unit="step", dynamic_ncols=True, leave=True)

    session_start = time.perf_counter()
    elapsed = state.elapsed_s
    last_row: dict[str, Any] = {}
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    while not finished(elapsed) and (stop_at_step is None or state.step < stop_at_step):
        lr = config.lr * lr_multiplier(config, state.step, progress_fraction(elapsed))
        for group in optimizer.param_groups:
            group["lr"] = lr
        want_stats = (state.step + 1) % config.log_every == 0
        micro_batches = loader.next_batch()
        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        step_stats = None
        for index, (inputs, targets) in enumerate(micro_batches):
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            last = index == len(micro_batches) - 1
            sync = model.no_sync() if dist_info.enabled and not config.fsdp and not last else contextlib.nullcontext()
            with sync:
                with autocast:
                    output = model(inputs, targets=targets, return_stats=want_stats and last)
                aux = output.aux_loss if output.aux_loss is not None else torch.zeros((), device=device)
                scaler.scale((output.loss + aux) / len(micro_batches)).backward()
            loss_sum += output.loss.detach().float()
            aux_sum += aux.detach().float()
            if want_stats and last:
                step_stats = output.stats
        scaler.unscale_(optimizer)
        if config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync_router_loads(raw_model, dist_info)
        raw_model.update_router_biases()
        state.step += 1
        state.tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        elapsed = state.elapsed_s + time.perf_counter() - session_start
        epoch_ended = loader.epoch_just_ended

        if state.step % config.log_every == 0 or finished(elapsed):
            loss = float(dist_info.all_reduce_mean(loss_sum / len(micro_batches)))
            aux_loss = float(dist_info.all_reduce_mean(aux_sum / len(micro_batches)))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            window_start, window_tokens = now, 0
            row = {
                "kind": "train",
                "step": state.step,
                "epoch": loader.position.epoch + loader.position.batch_in_epoch / loader.batches_per_epoch,
                "tokens": state.tokens_seen,
                "loss": loss,
                "aux_loss": aux_loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_s,
                "elapsed_s": elapsed,
                **memory_stats(device),
            }
            if precision == "float16":
                row["grad_scale"] = float(scaler.get_scale())
            if peak and flops_per_token:
                row["mfu"] = tokens_per_s * flops_per_token / (peak * dist_info.world_size)
            if step_stats is not None:
                row.update(summarise_moe_stats(step_stats))
            metrics.write(row)
            last_row = row
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")
            if not math.isfinite(loss):
                raise UserError(
                    f"the loss became {loss} at step {state.step}; lower train.lr or use train.precision=float32"
                )
        if bar is not None:
            bar.update(1)

        done = finished(elapsed) or (stop_at_step is not None and state.step >= stop_at_step)
        if config.eval_every and state.step % config.eval_every == 0 and not done:
            evaluate_and_sample(elapsed)
        if epoch_ended or (config.checkpoint_every and state.step % config.checkpoint_every == 0) or done:
            save(epoch_end=epoch_ended, elapsed=elapsed)
        if state.step % config.log_every == 0:
            window_start, window_tokens = time.perf_counter(), 0  # tokens/s counts training only, not eval or saves

    if bar is not None:
        bar.close()
    if state.step > 0 and (stop_at_step is None or finished(elapsed)):
        last_row = {**last_row, **evaluate_and_sample(elapsed)}
    metrics.close()
    dist_info.barrier()
    return last_row if dist_info.is_main else {}
