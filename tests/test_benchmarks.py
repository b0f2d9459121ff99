"""The benchmark scripts at toy size on CPU, so they cannot rot between real runs."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gtransformer.config import load_toml
from gtransformer.errors import UserError
from gtransformer.interop import hf as hf_export

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import ab  # noqa: E402
import bench_generate  # noqa: E402
import bench_step  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402

# One layer, small vocabulary: the same code paths as the tiny preset, in a fraction of the time.
SMALL = ["--preset", "tiny", "--set", "n_layers=1", "--set", "vocab_size=512", "--device", "cpu", "--threads", "1"]


def test_mixtral_config_matches_our_model_exactly():
    from gtransformer.model.model import GPT

    config = common.load_model_config("tiny", ["n_layers=2", "vocab_size=512"])
    ours = GPT(config)
    hf = common.build_hf(config, "eager", "cpu")
    assert hf.config._experts_implementation == "eager"
    assert sum(p.numel() for p in hf.parameters()) == ours.num_params()
    assert hf.config.num_key_value_heads == config.n_kv_heads
    assert hf.config.num_experts_per_tok == config.top_k
    assert hf.config.rope_parameters["rope_theta"] == config.rope_theta
    # The benchmark's reference is built from the export's own mapping: the two cannot drift apart.
    exported = hf_export.mixtral_config(config, None, torch.float32)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                "num_local_experts", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(hf.config, key) == exported[key], key


def test_benchmark_refuses_options_mixtral_cannot_represent():
    config = common.load_model_config("tiny", ["n_layers=1", "vocab_size=512", "qk_norm=true", "balance=\"bias\""])
    with pytest.raises(UserError, match="qk_norm.*balance"):
        common.mixtral_config(config)


def test_bench_train_runs_all_models(tmp_path, capsys):
    out = tmp_path / "train.json"
    code = bench_train.main([*SMALL, "--batch", "2", "--seq", "16", "--steps", "1", "--reps", "2", "--warmup", "1",
                             "--models", "ours,hf:grouped_mm,hf:eager", "--no-memory", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ours x faster" in printed
    results = {row["model"]: row for row in json.loads(out.read_text())["results"]}
    assert set(results) == {"ours", "hf:grouped_mm", "hf:eager"}
    for row in results.values():
        assert row["tokens_per_s"] > 0 and len(row["tokens_per_s_all"]) == 2
        # Untrained models at the same init scale start near uniform: log(vocab).
        assert abs(row["first_loss"] - math.log(512)) < 0.5
    assert results["ours"]["ours_speedup"] == pytest.approx(1.0)


def test_bench_generate_raises_context_and_generates_exact_lengths(tmp_path, capsys):
    out = tmp_path / "gen.json"
    code = bench_generate.main([*SMALL, "--set", "context_length=8", "--prompt-len", "4", "--new-tokens", "8",
                                "--reps", "1", "--warmup-tokens", "2", "--json", str(out)])
    assert code == 0
    assert "context_length raised to 12" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["model_config"]["context_length"] == 12
    assert {row["model"] for row in payload["results"]} == {"ours", "hf:grouped_mm"}
    assert all(row["tokens_per_s"] > 0 for row in payload["results"])


def test_bench_generate_runs_llama_cpp_on_the_same_weights(tmp_path, capsys):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    out = tmp_path / "gen.json"
    code = bench_generate.main([*SMALL, "--models", "ours,llamacpp,llamacpp:q8_0", "--prompt-len", "8",
                                "--new-tokens", "8", "--reps", "1", "--warmup-tokens", "2", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "llamacpp: inside llama_decode" in printed and "x ours" in printed
    rows = {row["model"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"ours", "llamacpp", "llamacpp:q8_0"}
    assert all(row["tokens_per_s"] > 0 and row["prompt_tokens_per_s"] > 0 for row in rows.values())
    # The runtime's own counters: the prompt in one batch, then one decode call per new token but the last.
    assert rows["llamacpp"]["llamacpp_counters"][0]["decode_tokens"] == 7
    assert bench_generate.main([*SMALL, "--models", "ours,llamacpp:q4_k"]) == 2
    assert "unknown model 'llamacpp:q4_k'" in capsys.readouterr().err


def test_bench_step_times_the_engines_batched_step_at_each_row_count(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert bench_step.main([*SMALL, "--rows", "1,3", "--steps", "2", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [row["rows"] for row in rows] == [1, 3] and rows[0]["vs_one_row"] == 1.0
    assert all(row["tokens_per_s"] > 0 and row["model"].startswith("ours x") for row in rows)
    assert bench_step.main([*SMALL, "--rows", "0"]) == 2 and "--rows" in capsys.readouterr().err


def test_ab_alternates_two_checkouts_and_reports_their_ratio(capsys):
    repo = BENCH.parent
    assert ab.main(["--old", str(repo), "--new", str(repo), "--rounds", "2", "--", "bench_step.py", *SMALL,
                    "--rows", "1", "--steps", "2", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("# round") == 4 and "| ours x1 |" in out and "x** |" in out


def test_user_mistakes_exit_2_with_one_line(capsys):
    assert bench_train.main([*SMALL, "--models", "ours,hf:nope"]) == 2
    assert "hf:nope" in capsys.readouterr().err
    assert bench_train.main([*SMALL, "--seq", "4096"]) == 2
    assert "context_length" in capsys.readouterr().err
    assert bench_generate.main([*SMALL, "--preset", "no-such-preset"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cpu_peak_memory_is_measured_in_a_fresh_process():
    """Training holds weights, gradients and two AdamW moments: the peak must exceed 4 x the weights."""
    result = common.run_isolated(BENCH / "bench_train.py",
                                 [*SMALL, "--batch", "2", "--seq", "16", "--warmup", "1", "--measure-memory", "ours"])
    from gtransformer.model.model import GPT

    weights_mb = GPT(common.load_model_config("tiny", ["n_layers=1", "vocab_size=512"])).num_params() * 4 / 2**20
    assert result["peak_rss_mb"] - result["baseline_rss_mb"] > 4 * weights_mb


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_cpu(tmp_path):
    """gpu.sh's whole path at toy size (two interpreters: train, generate)."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(BENCH / "gpu.sh"), "--device", "cpu", "--preset", "tiny", "--set", "n_layers=1",
         "--set", "vocab_size=512", "--batch", "1", "--seq", "8", "--steps", "1", "--reps", "1", "--warmup", "1",
         "--new-tokens", "2", "--no-compile", "--no-memory"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.split("# total", 1)[1]
    assert "MFU" in summary and "gen tok/s" in summary
    assert "ours vs hf:grouped_mm: training" in summary and "generation" in summary
    (run_dir,) = tmp_path.iterdir()
    assert {p.name for p in run_dir.iterdir()} >= {"train.json", "generate.json", "summary.txt"}
    train = {row["model"]: row for row in json.loads((run_dir / "train.json").read_text())["results"]}
    assert train["hf:grouped_mm"]["ours_speedup"] > 0


def test_bench_serve_drives_a_real_server(tmp_path, capsys, make_run):
    import bench_serve

    run = make_run(tmp_path / "run", context_length=128)
    out = tmp_path / "serve.json"
    assert bench_serve.main(["--run", str(run), "--clients", "1,2", "--seconds", "1.5", "--max-tokens", "8",
                             "--max-batch", "2", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "x 1 client" in printed and "server RSS" in printed
    rows = json.loads(out.read_text())["results"]
    assert [r["clients"] for r in rows] == [1, 2]
    assert all(r["errors"] == 0 and r["requests"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["x_one_client"] == pytest.approx(1.0)


def test_bench_quality_trains_each_configuration_for_the_budget(tmp_path, capsys, make_corpus, tiny_tables):
    import bench_quality
    from gtransformer.config import to_toml

    corpus = make_corpus(tmp_path / "data")
    other = make_corpus(tmp_path / "data-320", vocab_size=320)  # another vocabulary: a configuration's own corpus
    config = tmp_path / "toy.toml"
    config.write_text(to_toml(tiny_tables(corpus, eval_every=3, checkpoint_every=0)))
    out = tmp_path / "quality.json"
    assert bench_quality.main(["--data", str(corpus), "--minutes", "0.04", "--threads", "1", "--out",
                               str(tmp_path / "runs"), "--json", str(out),
                               "--config", f"moe={config}", "--config", f"dense={config} model.n_experts=0",
                               "--config", f"v320={config} data.path={other} model.vocab_size=320"]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"moe", "dense", "v320"} and rows["moe"]["vs_first"] == 0
    assert all(r["steps"] > 0 and 0 < r["val_bpb"] < 20 and r["curve"] for r in rows.values())
    assert "n_experts = 0" in (tmp_path / "runs" / "dense" / "config.toml").read_text()
    trained = {name: load_toml(tmp_path / "runs" / name / "config.toml") for name in rows}
    assert Path(trained["moe"]["data"]["path"]) == corpus.resolve()
    assert Path(trained["v320"]["data"]["path"]) == other.resolve() and trained["v320"]["model"]["vocab_size"] == 320
    assert (tmp_path / "runs" / "quality.png").is_file() and "val bpb" in capsys.readouterr().out


def test_bench_quality_interleaved_gives_each_configuration_the_same_training_time(tmp_path, make_corpus,
                                                                                   tiny_tables):
    import bench_quality
    from gtransformer.config import to_toml
    from gtransformer.files import read_jsonl

    corpus = make_corpus(tmp_path / "data")
    config = tmp_path / "toy.toml"
    config.write_text(to_toml(tiny_tables(corpus, eval_every=4, checkpoint_every=0)))
    out = tmp_path / "quality.json"
    minutes = 0.05
    assert bench_quality.main(["--data", str(corpus), "--minutes", str(minutes), "--threads", "1", "--interleave",
                               "--out", str(tmp_path / "runs"), "--json", str(out), "--config", f"moe={config}",
                               "--config", f"dense={config} model.n_experts=0"]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert all(r["steps"] > 0 and 0 < r["val_bpb"] < 20 and r["curve"] for r in rows.values())
    own = {name: [r for r in read_jsonl(tmp_path / "runs" / name / "metrics.jsonl") if r["kind"] == "eval"][-1]
           for name in rows}
    for row in own.values():  # each run's clock counted its own turns: it ended at its budget, not before
        assert minutes * 60 <= row["elapsed_s"] < minutes * 60 + 2
    # time-shared: the wall clock covered both budgets
    assert rows["moe"]["wall_s"] >= 2 * minutes * 60
    assert bench_quality.run_tables(str(config), [f"data.path={tmp_path}"], argparse.Namespace(data=str(corpus)))[
        "data"]["path"] == str(tmp_path)  # a configuration's own corpus wins over --data, as in the other mode
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "runs" / "moe" / "metrics.jsonl") if r["kind"] == "train"]
    assert lrs[-1] < max(lrs)  # the schedule decayed over its own time


def test_profile_train_splits_a_step_into_phases_and_operators(tmp_path, capsys, make_corpus, tiny_tables):
    import profile_train
    from gtransformer.config import to_toml

    corpus = make_corpus(tmp_path / "data")
    config = tmp_path / "toy.toml"
    tables = tiny_tables(corpus)
    del tables["data"]
    config.write_text(to_toml(tables))
    assert profile_train.main(["--config", str(config), "--data", str(corpus), "--steps", "3", "--warmup", "1",
                               "--set", "train.optimizer=\"muon\""]) == 0
    out = capsys.readouterr().out
    assert "3 steps" in out and "tokens/s" in out
    for phase in ("data loading", "forward", "optimizer step", "backward, clipping, rest"):
        assert phase in out
    assert "aten::mm" in out  # the operator table
