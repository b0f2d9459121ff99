"""How far a run is: its counters (`RunState`, saved in every checkpoint) and its length (`RunLength`: a step
limit and / or a wall-clock budget, the fraction of it done, which drives the LR schedule, and when it ends)."""

from __future__ import annotations

from dataclasses import dataclass

from gtransformer.training.config import TrainConfig


@dataclass
class RunState:
    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training wall time before this session (for --max-minutes across resumes)
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss or gradient norm), whole run
    bad_streak: int = 0  # of those, how many in a row up to now


@dataclass(frozen=True)
class RunLength:
    max_steps: int  # 0 = no step limit
    budget_s: float  # 0 = no time limit

    @classmethod
    def of(cls, config: TrainConfig, batches_per_epoch: int) -> "RunLength":
        """train.max_steps and train.max_minutes; neither set: train.epochs passes over the train windows."""
        max_steps, budget_s = config.max_steps, config.max_minutes * 60.0
        if not max_steps and not budget_s:
            max_steps = config.epochs * batches_per_epoch
        return cls(max_steps, budget_s)

    def progress(self, step: int, elapsed_s: float) -> float:
        """The larger of the step fraction and the time fraction of the run done (drives the LR schedule)."""
        parts = []
        if self.max_steps:
            parts.append(step / self.max_steps)
        if self.budget_s:
            parts.append(elapsed_s / self.budget_s)
        return max(parts)

    def finished(self, step: int, elapsed_s: float) -> bool:
        return ((bool(self.max_steps) and step >= self.max_steps)
                or (bool(self.budget_s) and elapsed_s >= self.budget_s))
