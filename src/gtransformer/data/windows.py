"""Training batches: non-overlapping windows of `context + 1` tokens in a seeded order.

An epoch is one pass over every window `tokens[i*(context+1) : (i+1)*(context+1)]`
in a permutation drawn from `(seed, epoch)`, so the order is reproducible from
the position alone and the position (epoch, batches done) is all a checkpoint
needs to continue exactly where it stopped.

Each optimizer step consumes one *global batch* of windows. It is cut into
chunks of `micro_batch_size` windows; chunk `k = accum_step * world_size + rank`
goes to that rank at that accumulation step. One process with 2 accumulation
steps therefore sees exactly the chunks that two processes with 1 step see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gtransformer.errors import UserError


@dataclass
class DataPosition:
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches already consumed in this epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    @classmethod
    def from_state_dict(cls, state: dict[str, int]) -> "DataPosition":
        return cls(epoch=int(state["epoch"]), batch_in_epoch=int(state["batch_in_epoch"]))


class WindowLoader:
    """Serves this rank's micro-batches of (inputs, targets) for each optimizer step."""

    def __init__(
        self,
        tokens: np.ndarray,
        context: int,
        global_batch_size: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        position: DataPosition | None = None,
    ):
        if global_batch_size % (micro_batch_size * world_size):
            raise UserError(
                f"train.batch_size={global_batch_size} is not a multiple of "
                f"micro_batch_size ({micro_batch_size}) x processes ({world_size}); "
                "pick values where it divides evenly"
            )
        self.tokens = tokens
        self.context = context
        self.window = context + 1
        self.num_windows = len(tokens) // self.window
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = global_batch_size // (micro_batch_size * world_size)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = self.num_windows // global_batch_size
        if self.batches_per_epoch == 0:
            raise UserError(
                f"the training split has {len(tokens)} tokens, {self.num_windows} windows of "
                f"{self.window}, fewer than one batch of {global_batch_size}; "
                "use more books, a smaller train.batch_size or a smaller model.context_length"
            )
        self.position = position or DataPosition()
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step; advances the position.

        Returns `grad_accum_steps` pairs of int64 tensors of shape (micro_batch, context).
        """
        position = self.position
        order = self.epoch_order(position.epoch)
        start = position.batch_in_epoch * self.global_batch_size
        global_ids = order[start : start + self.global_batch_size]
        micro_batches = []
        for accum_step in range(self.grad_accum_steps):
            chunk = accum_step * self.world_size + self.rank
            ids = np.sort(global_ids[chunk * self.micro_batch_size : (chunk + 1) * self.micro_batch_size])
            rows = np.stack([np.asarray(self.tokens[i * self.window : (i + 1) * self.window]) for i in ids])
            rows = torch.from_numpy(rows.astype(np.int64))
            micro_batches.append((rows[:, :-1], rows[:, 1:]))
        position.batch_in_epoch += 1
        if position.batch_in_epoch >= self.batches_per_epoch:
            position.epoch += 1
            position.batch_in_epoch = 0
        return micro_batches

    @property
    def epoch_just_ended(self) -> bool:
        """True right after the batch that completed an epoch was served."""
        return self.position.batch_in_epoch == 0 and self.position.epoch > 0

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = DataPosition.from_state_dict(state)
