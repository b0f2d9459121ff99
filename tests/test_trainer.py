"""The `Trainer`'s verbs one by one, samples with `train.fsdp = true` alone, the collectives of one step, skipped
non-finite steps (`train.max_bad_steps`), a signal ending `fit` with a checkpoint, and the preflight checks."""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gtransformer.cli import main
from gtransformer.data.shards import write_shard
from gtransformer.errors import UserError
from gtransformer.model.config import ModelConfig
from gtransformer.runtime import Distributed
from gtransformer.training.checkpoint import load_model_state
from gtransformer.training.preflight import checkpoint_bytes
from gtransformer.training.run_dir import RunDir
from gtransformer.training.trainer import Trainer, train

pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_corpus) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), sentences=150)


def test_trainer_verbs_used_one_by_one(corpus, tmp_path, tiny_tables):
    tables = tiny_tables(corpus, max_steps=6, log_every=2, sample_prompts=["Era uma vez"], sample_tokens=4)
    trainer = Trainer(tables, tmp_path / "run", progress_bar=False)
    assert trainer.restore() is False  # nothing to resume
    rows = [trainer.step() for _ in range(3)]
    assert rows[0] is None and rows[2] is None  # steps 1 and 3 are not log steps
    assert rows[1]["kind"] == "train" and rows[1]["step"] == 2 and rows[1]["loss"] > 0
    evaluation = trainer.evaluate_and_sample()
    assert evaluation["kind"] == "eval" and evaluation["step"] == 3 and evaluation["val_bits_per_byte"] > 0
    trainer.save()
    trainer.close()
    run = RunDir(tmp_path / "run")
    assert [c.path.name for c in run.checkpoints()] == ["step-0000003"]
    assert [row["step"] for row in run.samples()] == [3]
    assert [row["kind"] for row in run.metrics()] == ["train", "eval"]

    resumed = Trainer(tables, tmp_path / "run", resume=True, progress_bar=False)
    assert resumed.restore() is True
    assert resumed.state.step == 3 and resumed.state.tokens_seen == 3 * 8 * 32
    final = resumed.fit()
    resumed.close()
    assert final["step"] == 6 and "val_loss" in final


def test_the_budget_schedule_and_tokens_per_s_read_the_trainers_timer(corpus, tmp_path, tiny_tables):
    """`Trainer(timer=...)` is the one clock: a fake one that moves 5 s a step ends a 1-minute run in 12 steps."""
    trainer = None

    def timer() -> float:  # each step takes 5 s, whatever the host does
        return 5.0 * (trainer.state.step if trainer else 0)

    tables = tiny_tables(corpus, max_minutes=1.0, schedule="wsd", warmup_steps=1, decay_fraction=0.5)
    trainer = Trainer(tables, tmp_path / "run", progress_bar=False, timer=timer)
    rows = []
    while not trainer.finished:
        rows.append(trainer.step())
    trainer.close()
    assert trainer.state.step == 12 and trainer.elapsed == 60.0
    assert [row["elapsed_s"] for row in rows] == [5.0 * k for k in range(1, 13)]
    lrs = [row["lr"] for row in rows]
    assert lrs[:6] == [lrs[1]] * 6 and lrs[6] > lrs[-1]  # stable for half of the minute, then decaying
    assert all(row["tokens_per_s"] == pytest.approx(8 * 32 / 5.0) for row in rows[1:])


def test_a_single_process_run_with_fsdp_set_still_writes_samples(corpus, tmp_path, tiny_tables):
    """train.fsdp only shards under torchrun; alone, the run is a plain one and samples as usual."""
    tables = tiny_tables(corpus, max_steps=2, fsdp=True, sample_prompts=["Era uma vez", "O amor"], sample_tokens=4)
    train(tables, tmp_path / "run", progress_bar=False)
    samples = RunDir(tmp_path / "run").samples()
    assert [(s["step"], s["prompt"]) for s in samples] == [(2, "Era uma vez"), (2, "O amor")]


@pytest.fixture
def one_process_group(tmp_path):
    """A real gloo process group of one rank, so collectives run (and can be counted) inside this process."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_step_all_reduces_every_layers_router_loads_in_one_collective(corpus, tmp_path, tiny_tables, monkeypatch,
                                                              one_process_group):
    tables = tiny_tables(corpus, max_steps=4, log_every=2)
    tables["model"]["balance"] = "bias"  # the router's bias update needs the loads of every rank
    trainer = Trainer(tables, tmp_path / "run", progress_bar=False)
    trainer.dist = Distributed(rank=0, world_size=1, enabled=True)  # as under torchrun: loss rows reduce too
    moe_layers = sum(block.is_moe for block in trainer.model.layers)
    assert moe_layers == 2

    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting_all_reduce)
    assert trainer.step() is None
    n_experts = tables["model"]["n_experts"]
    # The step's health and stop flags (loss, gradient norm, signal) in one reduction, then every MoE layer's
    # expert loads stacked into one (torchtitan's way; no collective in model code).
    assert calls == [(3,), (moe_layers, n_experts)]
    calls.clear()
    assert trainer.step() is not None  # a log step: the loss and the aux loss are averaged over ranks too
    assert calls == [(3,), (moe_layers, n_experts)] + [()] * 2
    trainer.close()
    biases = [block.mlp.gate.expert_bias for block in trainer.model.layers if block.is_moe]
    assert all(bool(bias.abs().sum() > 0) for bias in biases)  # the update itself still ran


# --- numerical health: a non-finite step applies nothing, is counted, and too many in a row stop the run ----


class BadOnSteps(torch.nn.Module):
    """Wraps what the Trainer's steps call: on the chosen steps the loss becomes NaN ("loss") or stays finite
    while the gradients become infinite ("grad": + sqrt(w - w), whose value is 0 and whose gradient is inf)."""

    def __init__(self, trainer: Trainer, steps: set[int], kind: str = "loss"):
        super().__init__()
        self.model = trainer.model
        self.trainer, self.steps, self.kind = trainer, steps, kind

    def forward(self, *args, **kwargs):
        output = self.model(*args, **kwargs)
        if self.trainer.state.step + 1 not in self.steps:
            return output
        if self.kind == "loss":
            return output._replace(loss=output.loss * float("nan"))
        weight = self.model.embed_tokens.weight.sum()
        return output._replace(loss=output.loss + torch.sqrt(weight - weight.detach()))


def snapshot(trainer: Trainer) -> tuple[dict, dict]:
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(trainer.parallel.optimizer.state.values())}
    return weights, moments


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else same(a[k], b[k])
                                        for k in a)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on(corpus, tmp_path, tiny_tables, kind):
    tables = tiny_tables(corpus, max_steps=6, log_every=2)
    tables["model"]["balance"] = "bias"  # the router biases must not move on a skipped step either
    trainer = Trainer(tables, tmp_path / "run", progress_bar=False)
    trainer.parallel.runner = BadOnSteps(trainer, {3}, kind)
    for _ in range(2):
        trainer.step()
    before = snapshot(trainer)
    row = trainer.step()  # step 3: not a log step, but a skipped step always writes its row
    assert row["step"] == 3 and row["skipped"] is True and row["skipped_steps"] == 1
    assert same(snapshot(trainer)[0], before[0]) and same(snapshot(trainer)[1], before[1])  # nothing applied
    assert trainer.state.step == 3 and trainer.loader.position.batch_in_epoch == 3  # its batch is consumed
    final = trainer.fit()
    trainer.close()
    assert final["step"] == 6 and final["skipped_steps"] == 1 and final["loss"] == final["loss"]
    rows = [r for r in RunDir(tmp_path / "run").metrics() if r["kind"] == "train"]
    assert [(r["step"], r.get("skipped", False)) for r in rows] == [(2, False), (3, True), (4, False), (6, False)]


def test_max_bad_steps_in_a_row_stop_the_run_and_leave_the_last_good_checkpoint(corpus, tmp_path, tiny_tables):
    tables = tiny_tables(corpus, max_steps=20, checkpoint_every=2, max_bad_steps=3)
    trainer = Trainer(tables, tmp_path / "run", progress_bar=False)
    trainer.parallel.runner = BadOnSteps(trainer, set(range(3, 21)))
    with pytest.raises(UserError, match=r"not finite at 3 steps in a row \(steps 3-5; train.max_bad_steps = 3\)") as caught:
        trainer.fit()
    trainer.close()
    assert "step-0000004" in str(caught.value) and "--resume" in str(caught.value) and "\n" not in str(caught.value)
    run = RunDir(tmp_path / "run")
    assert [c.step for c in run.checkpoints()] == [2, 4]  # step 4's weights are step 2's: nothing was applied
    from_2, from_4 = (load_model_state(run.checkpoint(step)) for step in (2, 4))
    assert same(from_2, from_4)
    assert [r["skipped_steps"] for r in run.metrics() if r["kind"] == "train"] == [0, 0, 1, 2, 3]


def test_float16_counts_a_non_finite_loss_but_leaves_overflows_to_the_grad_scaler(corpus, tmp_path, tiny_tables):
    trainer = Trainer(tiny_tables(corpus, max_steps=5, precision="float16"), tmp_path / "run", progress_bar=False)
    rows = [trainer.step() for _ in range(3)]
    trainer.parallel.runner = BadOnSteps(trainer, {4}, "grad")
    before = snapshot(trainer)[0]
    overflow = trainer.step()  # infinite gradients, finite loss: the GradScaler skips it and lowers its scale
    assert same(snapshot(trainer)[0], before)
    assert overflow["skipped_steps"] == 0 and "skipped" not in overflow
    assert overflow["grad_scale"] < rows[-1]["grad_scale"]
    trainer.parallel.runner = BadOnSteps(trainer, {5}, "loss")
    nan_loss = trainer.step()  # a non-finite loss is a bad step under float16 too
    assert nan_loss["skipped"] is True and nan_loss["skipped_steps"] == 1
    trainer.close()


def test_a_signal_stops_fit_after_the_step_with_a_checkpoint(corpus, tmp_path, tiny_tables, caplog):
    trainer = Trainer(tiny_tables(corpus, max_steps=50), tmp_path / "run", progress_bar=False)

    class SignalAtStep3(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = trainer.model

        def forward(self, *args, **kwargs):
            if trainer.state.step + 1 == 3:
                signal.raise_signal(signal.SIGINT)  # mid-step: the step still completes
            return self.model(*args, **kwargs)

    trainer.parallel.runner = SignalAtStep3()
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    trainer.close()
    assert trainer.state.step == 3 and [c.step for c in RunDir(tmp_path / "run").checkpoints()] == [3]
    assert f"gtransformer train --out {tmp_path / 'run'} --resume" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after fit


# --- preflight: one line before step 0, nothing written --------------------------------------------------


def test_preflight_refuses_a_disk_without_room_for_two_checkpoints(corpus, tmp_path, tiny_tables, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    with pytest.raises(UserError, match=r"has 100.0 kB free, but 2 checkpoints of this model need .* MB"):
        Trainer(tiny_tables(corpus, max_steps=2), tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run" / "config.toml").exists()
    monkeypatch.undo()
    one = checkpoint_bytes(ModelConfig(**tiny_tables(corpus)["model"]))
    train(tiny_tables(corpus, max_steps=1), tmp_path / "real", progress_bar=False)
    written = sum(f.stat().st_size for f in (tmp_path / "real" / "checkpoints" / "step-0000001").iterdir())
    assert one <= written < one * 1.1  # the estimate is what a checkpoint takes (plus pickling overhead)


def test_preflight_refuses_an_unwritable_folder_and_a_corpus_too_small(corpus, tmp_path, tiny_tables, make_corpus):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="cannot write to the run folder"):
        Trainer(tiny_tables(corpus, max_steps=2), tmp_path / "a-file" / "run", progress_bar=False)
    with pytest.raises(UserError, match="train split .* fewer than one batch of train.batch_size = 100000"):
        Trainer(tiny_tables(corpus, max_steps=2, batch_size=100000), tmp_path / "run", progress_bar=False)
    short = tmp_path / "short"
    shutil.copytree(corpus, short)
    write_shard(short / "val.bin", [1, 2, 3], vocab_size=384)
    with pytest.raises(UserError, match="val split has 3 tokens, fewer than one window of 33"):
        Trainer(tiny_tables(short, max_steps=2), tmp_path / "run", progress_bar=False)
    small_vocab = tiny_tables(corpus, max_steps=2)
    small_vocab["model"]["vocab_size"] = 100
    with pytest.raises(UserError, match="tokenizer has 384 tokens but model.vocab_size = 100"):
        Trainer(small_vocab, tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_changed_shape_key_and_names_it(corpus, tmp_path, tiny_tables, capsys):
    run = tmp_path / "run"
    train(tiny_tables(corpus, max_steps=2), run, progress_bar=False)
    config = (run / "config.toml").read_text()
    assert main(["train", "--out", str(run), "--resume", "--set", "model.n_layers=3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.n_layers is 3 but the checkpoint was trained with 2" in err and len(err.strip().splitlines()) == 1
    assert (run / "config.toml").read_text() == config  # nothing written
    changed = tiny_tables(corpus, max_steps=2)
    changed["model"]["n_kv_heads"] = 4
    with pytest.raises(UserError, match="model.n_kv_heads"):
        Trainer(changed, run, resume=True, progress_bar=False)
    harmless = tiny_tables(corpus, max_steps=3)
    harmless["model"]["aux_loss_coef"] = 0.05  # no tensor changes shape: allowed
    assert train(harmless, run, resume=True, progress_bar=False)["step"] == 3
