"""Training logs: metrics rows into the run folder (and TensorBoard / Weights & Biases when enabled), MoE stats."""

from __future__ import annotations

import logging
import os
from typing import Any

from gtransformer.training.config import TrainConfig
from gtransformer.training.run_dir import RunDir

log = logging.getLogger(__name__)


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
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

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
