"""The `Trainer`'s verbs one by one, samples with `train.fsdp = true` alone, and the collectives of one step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from gtransformer.runtime import Distributed
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


def test_one_step_all_reduces_router_loads_once_per_moe_layer(corpus, tmp_path, tiny_tables, monkeypatch,
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
    # The step's health and stop flags (loss, gradient norm, signal) in one reduction, then one per MoE layer.
    assert calls == [(3,)] + [(n_experts,)] * moe_layers
    calls.clear()
    assert trainer.step() is not None  # a log step: the loss and the aux loss are averaged over ranks too
    assert calls == [(3,)] + [(n_experts,)] * moe_layers + [()] * 2
    trainer.close()
    biases = [block.mlp.gate.expert_bias for block in trainer.model.layers if block.is_moe]
    assert all(bool(bias.abs().sum() > 0) for bias in biases)  # the update itself still ran
