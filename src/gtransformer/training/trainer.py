"""The `Trainer`: wires config, corpus windows, model, parallel strategy, optimizer, checkpoints, evaluation,
samples and logs. Each component lives in its own file; this one only connects them.

    Trainer(config, out_dir, resume)   take the checked RunConfig (or check raw tables once: config.check_tables),
                                       join torchrun, write the run folder, build model + optimizer
                                       (parallel.Parallel) + windows (data.windows)
      .restore()                       newest intact checkpoint of the run -> weights, optimizer, scaler, data
                                       position, RNG states, step/tokens/time (bit-identical resume on CPU)
      .step()                          one optimizer step over all micro-batches -> the train row on log steps
                                       (and on skipped steps: a non-finite loss / gradient norm applies nothing)
      .evaluate_and_sample()           validation bits per byte (evaluate.py) + fixed-prompt samples (samples.py)
      .save(epoch_end)                 checkpoint.save_checkpoint into the RunDir (full state dicts under FSDP)
      .fit(stop_at_step)               the loop: step, log, evaluate, save until max_steps / max_minutes / epochs,
                                       or SIGTERM / SIGINT (then: a checkpoint of the current step, exit 0)
      .close()                         close the loggers, wait for the other ranks

Before the first step `Trainer.__init__` runs the preflight (preflight.py: the tokenizer fits the model, corpus
sizes, a writable run folder with room for two checkpoints, unchanged parameter shapes and optimizer on
--resume), removes the temporary folders of checkpoint writes a killed run left, and picks the newest intact
checkpoint (preflight.pick_checkpoint, checkpoint.intact_checkpoint: damaged newer ones are set aside as
step-XXXXXXX.corrupt with a warning). The run's counters and length live in progress.py, the stop signals in
signals.py.

A step whose loss or gradient norm is not finite is skipped: no optimizer step (AdamW's own step count and
moments stay), no router-bias update, gradients dropped. It still counts as a step: its batch is consumed and
the step counter, tokens and LR schedule move on, so the data order and every later step are what they would
have been, and a resumed run takes the same decisions. `skipped_steps` in each train row counts them (a
skipped step always writes its row, with "skipped": true); `train.max_bad_steps` in a row end the run with
one line. Under float16 the GradScaler skips overflowing steps itself: only a non-finite *loss* counts there.

Under `torchrun` the model runs under DistributedDataParallel (or FSDP2 with `train.fsdp = true`), each rank
reading its own slice of every global batch; only rank 0 writes. The data order is a function of (seed,
epoch) and a checkpoint stores everything else, so a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from gtransformer.data.corpus import PreparedCorpus
from gtransformer.data.windows import WindowLoader
from gtransformer.errors import UserError
from gtransformer.files import write_bytes_atomic
from gtransformer.inference import chat
from gtransformer.model.model import GPT
from gtransformer.runtime import (
    auto_precision,
    autocast_context,
    device_name,
    device_peak_flops,
    init_distributed,
    memory_stats,
    resolve_compile,
    resolve_precision,
)
from gtransformer.training.checkpoint import (
    TRAIN_STATE_KEYS,
    load_model_state,
    load_train_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gtransformer.training.config import RunConfig, check_tables
from gtransformer.training.evaluate import evaluate_split, token_byte_lengths
from gtransformer.training.metrics import MetricsLogger, summarise_moe_stats
from gtransformer.training.optim import build_optimizer, lr_multiplier
from gtransformer.training.parallel import Parallel
from gtransformer.training.preflight import check_inputs, pick_checkpoint
from gtransformer.training.progress import RunLength, RunState
from gtransformer.training.run_dir import RunDir
from gtransformer.training.samples import generate_samples
from gtransformer.training.signals import StopSignals

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, config: RunConfig | dict[str, dict[str, Any]], out_dir: str | Path, resume: bool = False,
                 device: str = "auto", progress_bar: bool = True, timer: Callable[[], float] = time.perf_counter):
        """`config`: a `RunConfig` is taken as it is (checked when built); raw tables are checked here, once."""
        checked = config if isinstance(config, RunConfig) else check_tables(config)
        self.model_config, self.config, self.data_config = checked
        self.timer = timer  # seconds; everything timed (budget, LR schedule, tokens/s) reads it
        self.run = RunDir(out_dir)
        self.corpus = PreparedCorpus(self.data_config.path).require("train", "val")
        self.tokenizer = self.corpus.tokenizer()
        check_inputs(self.run, self.corpus, self.model_config, self.config, resume)
        self.dist, self.device = init_distributed(device)
        self.resume_from = pick_checkpoint(self.run, self.dist, resume, self.model_config, self.config)
        self._plan()
        if self.dist.is_main:
            self._write_run_folder()
        self._build_model()
        self._start_logs(progress_bar)

    def _plan(self) -> None:
        """Precision, this rank's windows, the run's length (steps and / or minutes) and whether to compile."""
        config = self.config
        self.precision = resolve_precision(config.precision, self.device)
        if config.precision == "auto" and self.dist.is_main:
            log.info("precision auto -> %s: %s", self.precision, auto_precision(self.device)[1])
        self.loader = WindowLoader(
            self.corpus.tokens("train"), self.model_config.context_length, config.batch_size,
            config.micro_batch_size or max(config.batch_size // self.dist.world_size, 1), config.seed,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )
        self.length = RunLength.of(config, self.loader.batches_per_epoch)
        self.compile, why = resolve_compile(config.compile, self.device, self.precision,
                                            self.model_config.n_experts > 0, config.max_minutes, self.length.max_steps)
        if why and self.dist.is_main:
            log.info("compile auto -> %s: %s", "on" if self.compile else "off", why)

    def _write_run_folder(self) -> None:
        """The resolved config.toml, the tokenizer and chat template; the log rows of an unsaved earlier attempt go."""
        self.run.write_config(self.resolved_tables())
        write_bytes_atomic(self.run.tokenizer_path, self.corpus.tokenizer_path.read_bytes())
        if not self.run.chat_template_path.is_file():  # a resumed run keeps the template it was given
            chat.DEFAULT.save(self.run.chat_template_path)
        if self.resume_from is None:  # rows of an earlier attempt that never reached a checkpoint are redone
            self.run.truncate_logs(0)

    def _build_model(self) -> None:
        """The model and its optimizer under the parallel strategy, and the float16 GradScaler."""
        torch.manual_seed(self.config.seed)
        self.parallel = Parallel(self.dist, self.device, fsdp=self.config.fsdp, compile=self.compile)
        self.parallel.wrap(GPT(self.model_config).to(self.device),
                           lambda model: build_optimizer(model, self.config, self.device))
        self.model = self.parallel.model
        self.peak_lrs = [group["lr"] for group in self.parallel.optimizer.param_groups]  # lr, or muon_lr
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "float16")

    def _start_logs(self, progress_bar: bool) -> None:
        """Evaluation inputs, the run's counters and clocks, the metrics logger and the progress bar."""
        self.val_tokens = self.corpus.tokens("val")
        self.byte_lengths = token_byte_lengths(self.tokenizer)
        self.state = RunState()
        self.tokens_per_step = self.config.batch_size * self.model_config.context_length
        self.peak_flops = device_peak_flops(self.device)
        self.flops_per_token = self.model.flops_per_token()
        self.metrics = MetricsLogger(self.run, self.config, self.resolved_tables(), enabled=self.dist.is_main)
        self.bar = None
        if self.dist.is_main and progress_bar:
            self.bar = tqdm(total=self.length.max_steps or None, unit="step", dynamic_ncols=True, leave=True)
        self._session_start: float | None = None  # timer() at this session's first step
        self.elapsed = 0.0  # training wall time of the run after the last step, earlier sessions included
        self._window_start, self._window_tokens = self.timer(), 0  # tokens/s since the last log row
        self.signals = StopSignals()  # installed by fit()
        self.stop_requested: str | None = None  # the signal every rank agreed to stop on, after a step

    def resolved_tables(self) -> dict[str, dict[str, Any]]:
        """Every value of the run's [model], [train] and [data] tables (config.toml, checkpoints' meta.json)."""
        return RunConfig(self.model_config, self.config, self.data_config).tables()

    # --- progress ---------------------------------------------------------------------------

    def _clock(self) -> float:
        """Training wall time of the whole run now, earlier sessions included (read once per step)."""
        if self._session_start is None:
            return self.state.elapsed_s
        return self.state.elapsed_s + self.timer() - self._session_start

    @property
    def finished(self) -> bool:
        return self.length.finished(self.state.step, self.elapsed)

    # --- the five verbs -----------------------------------------------------------------------

    def restore(self) -> bool:
        """Load the run's newest checkpoint (when resuming); False when there was none."""
        checkpoint = self.resume_from
        if checkpoint is None:
            return False
        # Rank 0 verified the files when it picked the checkpoint (intact_checkpoint): no second hashing.
        self.parallel.load_model_state(load_model_state(checkpoint, verify=False))
        saved = load_train_state(checkpoint, verify=False, required=TRAIN_STATE_KEYS)
        self.parallel.load_optimizer_state(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self.loader.load_state_dict(saved["data"])
        self.state = RunState(**saved["run"])
        self.elapsed = self.state.elapsed_s
        set_rng_state(saved["rng"])
        if self.dist.is_main:
            self.run.truncate_logs(self.state.step)
        if self.bar is not None:
            self.bar.update(self.state.step)
        log.info("resumed from %s (step %d, epoch %d)", checkpoint, self.state.step,
                 checkpoint.read_meta().get("epoch", 0))
        return True

    def step(self) -> dict[str, Any] | None:
        """One optimizer step over this rank's micro-batches; returns the train row on log steps."""
        config, device, optimizer = self.config, self.device, self.parallel.optimizer
        if self._session_start is None:
            self._session_start = self.timer()
        multiplier = lr_multiplier(config, self.state.step, self.length.progress(self.state.step, self.elapsed))
        lr = config.lr * multiplier
        for group, peak in zip(optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * multiplier
        want_stats = (self.state.step + 1) % config.log_every == 0
        micro_batches = self.loader.next_batch()
        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        step_stats = None
        for index, (inputs, targets) in enumerate(micro_batches):
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            last = index == len(micro_batches) - 1
            with self.parallel.sync_context(last), autocast_context(device, self.precision):
                output = self.parallel.runner(inputs, targets=targets, return_stats=want_stats and last)
            self.scaler.scale((output.loss + output.aux_loss) / len(micro_batches)).backward()
            loss_sum += output.loss.detach().float()
            aux_sum += output.aux_loss.detach().float()
            if want_stats and last:
                step_stats = output.stats
        self.scaler.unscale_(optimizer)
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        loss_bad, grad_bad, self.stop_requested = self._agree(loss_sum, grad_norm)
        # float16: the GradScaler skips steps with non-finite gradients itself (and lowers its scale); only a
        # non-finite loss is ours to skip. Elsewhere either one is.
        skip = loss_bad or (grad_bad and not self.scaler.is_enabled())
        if skip:
            self.scaler.update()  # float16: the scaler saw the non-finite gradients; its usual scale update
            self.model.discard_router_loads()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()
            if grad_bad:  # the scaler skipped the step: the biases stay too
                self.model.discard_router_loads()
            else:
                self.dist.sum_in_place(self.model.router_loads())  # every layer's loads, one all-reduce
                self.model.update_router_biases()
        optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        self._window_tokens += self.tokens_per_step
        self.elapsed = self._clock()
        if self.bar is not None:
            self.bar.update(1)
        loss, aux = loss_sum / len(micro_batches), aux_sum / len(micro_batches)
        if skip:
            return self._skipped(lr, loss, aux, grad_norm, step_stats)
        self.state.bad_streak = 0
        if self.state.step % config.log_every and not self.finished:
            return None
        return self.log_row(lr, loss, aux, grad_norm, step_stats)

    def _agree(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool, str | None]:
        """(loss not finite, gradient norm not finite, stop signal) as every rank sees them: one host sync per
        step, and under torchrun one all-reduce of three numbers (any rank's flag counts for all)."""
        stop = self.signals.received
        flags = torch.stack([~torch.isfinite(loss.float()), ~torch.isfinite(grad_norm.float()),
                             torch.tensor(stop is not None, device=loss.device)]).float()
        loss_bad, grad_bad, stopping = (value > 0 for value in self.dist.all_reduce_mean(flags).tolist())
        return loss_bad, grad_bad, (stop or "a signal on another rank") if stopping else None

    def _skipped(self, lr: float, loss: torch.Tensor, aux_loss: torch.Tensor, grad_norm: torch.Tensor,
                 stats: list[dict[str, Any]] | None) -> dict[str, Any]:
        """Count a skipped step, write its row, and end the run after train.max_bad_steps in a row."""
        self.state.skipped_steps += 1
        self.state.bad_streak += 1
        limit = self.config.max_bad_steps
        row = self.log_row(lr, loss, aux_loss, grad_norm, stats, skipped=True)
        if self.dist.is_main:
            log.warning("step %d: loss %s, gradient norm %s: update skipped (%d in a row; train.max_bad_steps = %d)",
                        self.state.step, row["loss"], row["grad_norm"], self.state.bad_streak, limit)
        if limit and self.state.bad_streak >= limit:
            first = self.state.step - self.state.bad_streak + 1
            newest = self.run.latest_checkpoint()
            kept = (f"the newest checkpoint, {newest.path}, holds the last good weights" if newest
                    else "no checkpoint was written")
            raise UserError(
                f"the loss or gradient norm was not finite at {self.state.bad_streak} steps in a row (steps "
                f"{first}-{self.state.step}; train.max_bad_steps = {limit}), so training stopped; {kept}; lower "
                f"train.lr or use train.precision=float32, then `gtransformer train --out {self.run.path} --resume "
                f"--set train.lr=...`"
            )
        return row

    def log_row(self, lr: float, loss: torch.Tensor, aux_loss: torch.Tensor, grad_norm: torch.Tensor,
                stats: list[dict[str, Any]] | None, skipped: bool = False) -> dict[str, Any]:
        """Write (rank 0) and return the train row of this step."""
        loss_value = float(self.dist.all_reduce_mean(loss))
        now = self.timer()
        tokens_per_s = self._window_tokens / max(now - self._window_start, 1e-9)
        self._window_start, self._window_tokens = now, 0
        position = self.loader.position
        row = {
            "kind": "train",
            "step": self.state.step,
            "epoch": position.epoch + position.batch_in_epoch / self.loader.batches_per_epoch,
            "tokens": self.state.tokens_seen,
            "loss": loss_value,
            "aux_loss": float(self.dist.all_reduce_mean(aux_loss)),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "elapsed_s": self.elapsed,
            "skipped_steps": self.state.skipped_steps,
            **memory_stats(self.device),
        }
        if skipped:
            row["skipped"] = True
        if self.precision == "float16":
            row["grad_scale"] = float(self.scaler.get_scale())
        if self.peak_flops:
            row["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.dist.world_size)
        if stats is not None:
            row.update(summarise_moe_stats(stats))
        self.metrics.write(row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")
        return row

    def evaluate_and_sample(self) -> dict[str, Any]:
        """Validation loss / bits per byte, then the fixed-prompt samples; returns the eval row."""
        result = evaluate_split(
            self.model, self.val_tokens, self.model_config.context_length, self.byte_lengths,
            split_bytes=self.corpus.split_bytes("val"), max_targets=self.config.eval_tokens or None,
            batch_size=self.config.eval_batch_size, device=self.device,
            autocast=autocast_context(self.device, self.precision),
        )
        row = {"kind": "eval", "step": self.state.step, "tokens": self.state.tokens_seen, "elapsed_s": self.elapsed,
               **{f"val_{k}": v for k, v in result.items()}}
        self.metrics.write(row)
        sampler = self.parallel.sampling_model() if self.config.sample_prompts else None
        if sampler is not None:  # the main process only
            samples = generate_samples(sampler, self.tokenizer, self.config, self.model_config.context_length)
            self.run.append_samples([{"step": self.state.step, "tokens": self.state.tokens_seen, **sample}
                                     for sample in samples])
            for sample in samples:
                text = (sample["prompt"] + sample["text"]).replace("\n", " ⏎ ")
                log.info("sample @%d | %s", self.state.step, text)
        if self.dist.is_main:
            log.info("eval @%d: val loss %.4f, bits/byte %.4f", self.state.step, result["loss"],
                     result["bits_per_byte"])
        return row

    def save(self, epoch_end: bool = False) -> None:
        """A checkpoint of this step (every rank calls it: gathering FSDP state is collective; rank 0 writes)."""
        weights, optimizer = self.parallel.model_state(), self.parallel.optimizer_state()
        if not self.dist.is_main:
            return
        train_state = {
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict(),
            "data": self.loader.state_dict(),
            "run": {**dataclasses.asdict(self.state), "elapsed_s": self.elapsed},
            "rng": rng_state(),
        }
        meta = {"epoch": self.loader.position.epoch, "tokens_seen": self.state.tokens_seen, "keep": epoch_end,
                "config": self.resolved_tables(),
                # What this session ran on (the model card's hardware and precision).
                "hardware": {"device": device_name(self.device), "processes": self.dist.world_size,
                             "parallel": self.parallel.name, "precision": self.precision}}
        try:
            self.run.sync_logs()  # the rows up to this step reach the disk before the checkpoint that vouches for them
            path = save_checkpoint(self.run, self.state.step, weights, train_state, meta,
                                   keep_last=self.config.keep_last)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            latest = self.run.latest_checkpoint()
            kept = f"{latest.path.name} is the newest intact checkpoint" if latest else "no checkpoint was written yet"
            raise UserError(f"the disk of {self.run.path} is full while writing step {self.state.step} ({kept}); "
                            f"free some space, then continue with gtransformer train --out {self.run.path} "
                            f"--resume") from None
        log.info("saved %s", path)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        self.dist.barrier()

    # --- the loop -----------------------------------------------------------------------------

    def fit(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train until the run is finished (or this session reaches `stop_at_step`); returns the last rows merged.

        `stop_at_step` ends the session with a checkpoint without changing the schedule, for time-limited
        sessions that continue later with `resume`. So does SIGTERM / SIGINT, after the current step. The final
        evaluation runs before the final checkpoint: a run resumed from that checkpoint has nothing left to do.
        """
        config = self.config
        if self.dist.is_main:
            log.info("model: %.2fM parameters (%.2fM active), %d processes (%s), grad accumulation %d, "
                     "precision %s, device %s", self.model.num_params() / 1e6, self.model.num_active_params() / 1e6,
                     self.dist.world_size, self.parallel.name, self.loader.grad_accum_steps, self.precision,
                     self.device)
        self._window_start, self._window_tokens = self.timer(), 0
        last_row: dict[str, Any] = {}
        session_over = stop_at_step is not None and self.state.step >= stop_at_step
        if self.finished and self.dist.is_main:
            log.info("%s is already finished at step %d (evaluated before its last checkpoint); extend it with "
                     "--max-steps or --max-minutes", self.run.path, self.state.step)
        self.parallel.runner.train()
        with self.signals:
            while not self.finished and not session_over and not self.stop_requested:
                last_row = self.step() or last_row
                epoch_ended = self.loader.epoch_just_ended
                session_over = stop_at_step is not None and self.state.step >= stop_at_step
                done = self.finished or session_over or bool(self.stop_requested)
                evaluate = self.finished or (bool(config.eval_every) and self.state.step % config.eval_every == 0
                                             and not done)
                save = epoch_ended or (config.checkpoint_every and self.state.step % config.checkpoint_every == 0) or done
                if evaluate or save:
                    paused = self.timer()
                    if evaluate:
                        row = self.evaluate_and_sample()
                        if self.finished:
                            last_row = {**last_row, **row}
                    if save:
                        self.save(epoch_end=epoch_ended)
                    self._window_start += self.timer() - paused  # tokens/s counts training time only
        if self.stop_requested and not self.finished and self.dist.is_main:
            log.warning("stopped by %s at step %d with checkpoint %s; continue with `gtransformer train --out %s "
                        "--resume`", self.stop_requested, self.state.step, self.run.checkpoint(self.state.step).path,
                        self.run.path)
        return last_row if self.dist.is_main else {}


def train(config: RunConfig | dict[str, dict[str, Any]], out_dir: str | Path, resume: bool = False,
          device: str = "auto", stop_at_step: int | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Train (or continue, with `resume`) the run in `out_dir`; the final row on the main process, {} elsewhere.

    `config`: a checked `RunConfig` (`gtransformer train`), or raw [model]/[train]/[data] tables to check."""
    trainer = Trainer(config, out_dir, resume=resume, device=device, progress_bar=progress_bar)
    try:
        trainer.restore()
        return trainer.fit(stop_at_step)
    finally:
        trainer.close()
