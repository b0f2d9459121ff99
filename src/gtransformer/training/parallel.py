"""`Parallel`: the one owner of how the model runs across processes (none, DDP or FSDP2) and under torch.compile.

Every question that depends on the strategy is answered here, once:
- `wrap(model, optimizer)`: FSDP2 shards each block and the root (and rebuilds the optimizer over the
  sharded parameters), DDP wraps the model, `train.compile` compiles whatever runs the steps;
- `sync_context(last)`: DDP skips the gradient all-reduce of every micro-batch but the last (`no_sync`);
- `model_state()` / `optimizer_state()`: full, unsharded state dicts for a checkpoint (collectives under
  FSDP: every rank calls them);
- `load_model_state(state)` / `load_optimizer_state(state)`: full state dicts into the (sharded) model;
- `sampling_model()`: the model the main process samples with (under FSDP an unsharded copy of the
  gathered weights: the decoders read whole weights, outside any forward hook).

FSDP is active only under torchrun (`Distributed.enabled`) with `train.fsdp = true`; alone, a run with
`train.fsdp = true` trains (and samples) as a plain single-process run.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from gtransformer.model.model import GPT
from gtransformer.runtime import Distributed

log = logging.getLogger(__name__)

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
# DDP's switch for "no buffer sync before each forward": `broadcast_buffers`, renamed in torch 2.13.
NO_BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else "broadcast_buffers")


class Parallel:
    def __init__(self, dist_info: Distributed, device: torch.device, fsdp: bool, compile: bool):
        self.dist = dist_info
        self.device = device
        self.fsdp = dist_info.enabled and fsdp
        self.ddp = dist_info.enabled and not fsdp
        self.compile = compile
        self.model: GPT | None = None  # the model itself: parameters, evaluation, samples, helpers
        self.runner: torch.nn.Module | None = None  # what the training steps call (DDP / compiled wrapper)
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def name(self) -> str:
        return "FSDP2" if self.fsdp else "DDP" if self.ddp else "single process"

    def sampling_model(self) -> GPT | None:
        """The model to sample with on the main process; None on the others (collective under FSDP)."""
        if not self.fsdp:
            return self.model if self.dist.is_main else None
        weights = self.model_state()  # every rank takes part in gathering
        if not self.dist.is_main:
            return None
        with torch.random.fork_rng(devices=[]):  # building the copy must not move the run's RNG
            copy = GPT(self.model.config)
        missing, unexpected = copy.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:  # tied weights appear once
            raise RuntimeError(f"gathered weights do not fit the model: missing {missing}, unexpected {unexpected}")
        return copy.to(self.device)

    def wrap(self, model: GPT, build_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]) -> None:
        """Apply the strategy to `model` and build its optimizer (over the sharded parameters under FSDP)."""
        self.model = model
        runner: torch.nn.Module = model
        if self.fsdp:
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        elif self.ddp:
            # Buffers are not broadcast: router biases stay equal through identical updates, and
            # broadcasting would overwrite each rank's own expert-load counts.
            runner = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **{NO_BUFFER_SYNC: False},
            )
        if self.compile:
            runner = torch.compile(runner)
        self.runner = runner
        self.optimizer = build_optimizer(model)

    def sync_context(self, last_micro_batch: bool):
        """DDP all-reduces gradients only after the last micro-batch of a step."""
        if self.ddp and not last_micro_batch:
            return self.runner.no_sync()
        return contextlib.nullcontext()

    def model_state(self) -> dict[str, torch.Tensor]:
        if self.fsdp:
            return get_model_state_dict(self.model, options=FULL_STATE)
        return self.model.state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        if self.fsdp:
            return get_optimizer_state_dict(self.model, self.optimizer, options=FULL_STATE)
        return self.optimizer.state_dict()

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.fsdp:
            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(state)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if self.fsdp:
            set_optimizer_state_dict(self.model, self.optimizer, state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state)
