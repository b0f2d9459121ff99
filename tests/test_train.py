"""The training loop: bit-identical resume, float16 with a scaler, schedules, CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import NEEDS_CPP_COMPILER

from gtransformer.cli import main
from gtransformer.errors import UserError
from gtransformer import runtime
from gtransformer.runtime import PEAK_FLOPS, device_peak_flops, resolve_precision
from gtransformer.training.config import TrainConfig
from gtransformer.training import model_card
from gtransformer.training.optim import build_optimizer, lr_multiplier
from gtransformer.training.run_dir import RunDir
from gtransformer.training.trainer import train


pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_corpus) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def train_losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def test_resume_is_bit_identical(corpus, tmp_path, tiny_tables):
    # balance="bias" so the router-bias buffers must survive the checkpoint too;
    # micro batches of 4 so gradient accumulation is part of what is resumed.
    tables = tiny_tables(corpus, max_steps=12, micro_batch_size=4, eval_every=4, checkpoint_every=5,
                         sample_prompts=["Era uma", "A casa"], sample_tokens=8)
    tables["model"]["balance"] = "bias"
    train(tables, tmp_path / "straight", progress_bar=False)
    train(tables, tmp_path / "resumed", stop_at_step=6, progress_bar=False)
    assert [s for s, _ in train_losses(tmp_path / "resumed")] == list(range(1, 7))
    train(tables, tmp_path / "resumed", resume=True, progress_bar=False)
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert len(straight) == 12
    assert straight == resumed  # exact float equality, not approx
    evals = [[json.loads(l)["val_loss"] for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
              if json.loads(l)["kind"] == "eval"] for run in ("straight", "resumed")]
    assert evals[0] == evals[1] and len(evals[0]) == 3  # steps 4, 8 and the final 12
    samples = [(tmp_path / run / "samples.jsonl").read_text() for run in ("straight", "resumed")]
    assert samples[0] == samples[1] and len(samples[0].splitlines()) == 6


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_float16_with_grad_scaler_stays_finite(corpus, tmp_path, tiny_tables, optimizer):
    # muon: the scaler unscales the expert slices' gradients, views of the stacks' (MuonAdamW.param_groups)
    row = train(tiny_tables(corpus, max_steps=6, precision="float16", optimizer=optimizer), tmp_path / "fp16",
                progress_bar=False)
    rows = [json.loads(line) for line in (tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 6 and all(l == l and l < 10 for l in losses)
    assert "grad_scale" in rows[0]
    norms = [r["grad_norm"] for r in rows if r["kind"] == "train" and math.isfinite(r["grad_norm"])]
    assert norms and max(norms) < 100  # unscaled (the scale starts at 65536), expert stacks included
    assert row["val_loss"] == row["val_loss"]


def test_checkpoints_keep_last_and_epoch_ends(tmp_path, make_corpus, tiny_tables):
    small = make_corpus(tmp_path / "small", sentences=80)
    tables = tiny_tables(small, max_steps=12, batch_size=16, checkpoint_every=3, keep_last=2)
    run = tmp_path / "run"
    train(tables, run, progress_bar=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    metas = {n: json.loads((run / "checkpoints" / n / "meta.json").read_text()) for n in names}
    epoch_ends = {n for n, m in metas.items() if m["keep"]}
    assert epoch_ends, "an epoch ended within 12 steps, its checkpoint must be kept"
    assert all(metas[n]["epoch"] >= 1 for n in epoch_ends)
    saved = sorted({f"step-{s:07d}" for s in (3, 6, 9, 12)} | epoch_ends)
    assert set(names) == epoch_ends | set(saved[-2:])
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    # The run folder is self-contained for later commands.
    assert (run / "config.toml").is_file() and (run / "tokenizer.json").is_file()


def test_schedules_warm_up_and_decay_to_the_floor():
    cosine = TrainConfig(warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_multiplier(cosine, 0, 0.0) == pytest.approx(0.1)
    assert lr_multiplier(cosine, 9, 0.0) == pytest.approx(1.0)
    assert lr_multiplier(cosine, 50, 0.5) == pytest.approx(0.55)
    assert lr_multiplier(cosine, 99, 1.0) == pytest.approx(0.1)
    wsd = TrainConfig(warmup_steps=0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_multiplier(wsd, 5, 0.7) == 1.0
    assert lr_multiplier(wsd, 5, 0.9) == pytest.approx(0.5)
    assert lr_multiplier(wsd, 5, 1.0) == pytest.approx(0.0)
    with pytest.raises(UserError):
        lr_multiplier(TrainConfig(schedule="linear", warmup_steps=0), 1, 0.5)


def test_time_budget_ends_the_run_with_the_schedule_finished(corpus, tmp_path, monkeypatch, tiny_tables):
    # A fake clock (each reading is 50 ms later) keeps this independent of machine load.
    import time

    clock = iter(range(10**9))
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock) * 0.05)
    tables = tiny_tables(corpus, max_minutes=0.05, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.5)
    row = train(tables, tmp_path / "timed", progress_bar=False)
    assert row["elapsed_s"] >= 0.05 * 60 and row["step"] > 10
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "timed" / "metrics.jsonl").read_text().splitlines()
           if json.loads(l)["kind"] == "train"]
    assert max(lrs) == pytest.approx(3e-3)  # the stable phase ran at the peak
    assert lrs[-1] < 0.1 * 3e-3  # and the decay reached its end when the time was up
    assert all(a >= b for a, b in zip(lrs[len(lrs) // 2 :], lrs[len(lrs) // 2 + 1 :]))


def test_mfu_needs_a_known_peak_and_precision_must_be_known():
    assert device_peak_flops(torch.device("cpu")) is None  # so MFU is left out of metrics on CPU
    assert PEAK_FLOPS["H100"] == 790e12 and PEAK_FLOPS["T4"] == 65e12
    with pytest.raises(UserError):
        resolve_precision("float8", torch.device("cpu"))


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma", "amx_bf16", "amx_tile", "avx512_bf16"}, "bfloat16"),  # Sapphire Rapids and later
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),  # Cooper Lake, Zen 4
    ({"avx2", "fma", "avx512f"}, "float32"),  # AVX-512 without BF16: bfloat16 is emulated, slower
    ({"avx2", "fma"}, "float32"),
    (set(), "float32"),  # no /proc/cpuinfo (macOS, Windows)
])
def test_precision_auto_on_cpus_uses_bfloat16_only_where_it_is_native(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("float32", torch.device("cpu")) == "float32"  # an explicit choice stays


@pytest.mark.parametrize("capability, expected", [((7, 5), "float16"), ((6, 0), "float16"), ((8, 0), "bfloat16"),
                                                  ((9, 0), "bfloat16")])
def test_auto_precision_on_gpus_uses_native_bfloat16_only(monkeypatch, capability, expected):
    # T4 (7.5) and P100 (6.0): torch.cuda.is_bf16_supported() is true through emulation; float16 + scaler is right.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_cli_user_errors(corpus, tmp_path, capsys, tiny_tables):
    config = tmp_path / "c.toml"
    from gtransformer.config import to_toml

    config.write_text(to_toml(tiny_tables(corpus, max_steps=2)))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--data", str(tmp_path / "nope")]) == 2
    assert "prepare" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--set", "train.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--no-progress", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    assert [s for s, _ in train_losses(tmp_path / "r")] == [1, 2, 3, 4]


@NEEDS_CPP_COMPILER
def test_compiled_training_on_cpu_follows_the_eager_losses(corpus, tmp_path, tiny_tables):
    # bfloat16 autocast: the compiled MoE takes the grouped_mm path (the one the benchmark measures).
    tables = tiny_tables(corpus, max_steps=3, eval_every=0, precision="bfloat16")
    train(tables, tmp_path / "eager", progress_bar=False)
    tables["train"]["compile"] = True
    train(tables, tmp_path / "compiled", progress_bar=False)
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert [s for s, _ in compiled] == [1, 2, 3]
    # Same math; fused kernels round bfloat16 differently, hence not bit-identical.
    assert [loss for _, loss in compiled] == pytest.approx([loss for _, loss in eager], abs=0.02)
    # The checkpoint holds the plain module's names (no "_orig_mod."), loadable without torch.compile.
    from gtransformer.training.checkpoint import load_for_inference

    model, _, _ = load_for_inference(tmp_path / "compiled", device="cpu")
    assert all("_orig_mod" not in name for name in model.state_dict())


def test_muon_takes_the_hidden_matrices_and_each_expert_as_a_slice(make_model):
    model = make_model(vocab_size=64)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", muon_lr=0.03), torch.device("cpu"))
    muon_params = [p for group in optimizer.muon.param_groups for p in group["params"]]
    adamw_params = {id(p) for group in optimizer.adamw.param_groups for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 for p in muon_params)
    # attention q/k/v/o of 2 layers directly, and w1/w3/w2 of 4 experts in 2 layers as (F, D) slices
    assert len(muon_params) == 2 * 4 + 2 * 3 * 4
    assert sorted(names[i] for i in adamw_params) == sorted(
        n for n, p in model.named_parameters()
        if p.dim() < 2 or n.startswith(("embed_tokens", "lm_head")) or n.endswith("mlp.gate.weight"))
    w1 = model.layers[0].mlp.experts.w1
    slices = [p for p in muon_params if p.data_ptr() in {w1[e].data_ptr() for e in range(w1.shape[0])}]
    assert len(slices) == w1.shape[0]  # each slice shares the stack's storage: Muon's update is the model's
    assert [g["lr"] for g in optimizer.param_groups] == [0.03] + [3e-4] * len(optimizer.adamw.param_groups)


def test_muon_trains_resumes_bit_identically_and_names_itself_in_the_card(corpus, tmp_path, tiny_tables):
    tables = tiny_tables(corpus, max_steps=8, checkpoint_every=4, optimizer="muon", muon_lr=0.02)
    train(tables, tmp_path / "straight", progress_bar=False)
    train(tables, tmp_path / "resumed", stop_at_step=4, progress_bar=False)
    train(tables, tmp_path / "resumed", resume=True, progress_bar=False)
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert straight == resumed and len(straight) == 8
    assert straight[-1][1] < straight[0][1] - 0.1
    card = model_card.training_section(model_card.gather(RunDir(tmp_path / "straight")))
    assert any("Muon (peak learning rate 0.02" in line for line in card)
    adamw = tiny_tables(corpus, max_steps=8, checkpoint_every=4)
    train(adamw, tmp_path / "adamw", progress_bar=False)
    assert train_losses(tmp_path / "adamw") != straight  # the option changes the optimizer, not only a label
    # resuming a Muon run as AdamW (or back) is one clear line, not a KeyError from the optimizer
    adamw["train"]["max_steps"] = 12
    with pytest.raises(UserError, match="train.optimizer"):
        train(adamw, tmp_path / "resumed", resume=True, progress_bar=False)


def test_optimizer_options_are_checked():
    with pytest.raises(UserError, match="train.optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(UserError, match="train.fsdp = false"):
        TrainConfig(optimizer="muon", fsdp=True)
    with pytest.raises(UserError, match="train.muon_lr"):
        TrainConfig(muon_lr=0)
    with pytest.raises(UserError, match='train.compile'):
        TrainConfig(compile="yes")
    assert TrainConfig().compile == "auto" and TrainConfig(compile=True).compile is True


@pytest.mark.parametrize("precision, moe, minutes, steps, compiler, expected", [
    ("bfloat16", False, 5, 0, True, False),    # the 5-minute demo: a minute of compiling would not pay back
    ("bfloat16", False, 30, 0, True, True),    # a dense model for 30 minutes in bfloat16: 1.12x
    ("bfloat16", False, 30, 0, False, False),  # no C++ compiler: eager, not an error
    ("bfloat16", True, 30, 0, True, False),    # a compiled MoE measured 0.55x eager (its rows cannot be padded)
    ("float32", True, 30, 0, True, False),     # a compiled float32 MoE leaves grouped_mm: slower on CPU
    ("float32", False, 30, 0, True, False),    # the compiled float32 step measured no faster
    ("bfloat16", False, 0, 100, True, False),  # a short step-bounded run (the tests')
    ("bfloat16", False, 0, 5000, True, True),
])
def test_compile_auto_compiles_long_runs_where_it_is_faster(monkeypatch, precision, moe, minutes, steps, compiler,
                                                            expected):
    monkeypatch.setattr(runtime, "has_cpp_compiler", lambda: compiler)
    on, why = runtime.auto_compile(torch.device("cpu"), precision, moe, minutes, steps)
    assert on is expected and why


def test_compile_auto_on_cuda_needs_triton(monkeypatch):
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)
    assert runtime.auto_compile(torch.device("cuda", 0), "bfloat16", True, 60, 0)[0] is False
    assert runtime.auto_compile(torch.device("mps"), "float32", True, 60, 0)[0] is False


def test_the_trainer_logs_what_compile_auto_chose(corpus, tmp_path, tiny_tables, caplog):
    with caplog.at_level("INFO", logger="gtransformer"):
        train(tiny_tables(corpus, max_steps=2), tmp_path / "r", progress_bar=False)
    assert "compile auto -> off: " in caplog.text
