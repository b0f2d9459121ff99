"""`report`: plots and report.md from the files a run writes (no model, no data needed)."""

from __future__ import annotations

import json
from pathlib import Path

from gtransformer.cli import main
from gtransformer.training.report import make_report


def write_run(run: Path, steps: int = 6) -> None:
    run.mkdir()
    (run / "config.toml").write_text('[model]\nd_model = 32\nn_layers = 2\nn_experts = 4\n')
    rows = []
    for step in range(1, steps + 1):
        rows.append({"kind": "train", "step": step, "epoch": step / 10, "tokens": step * 256, "loss": 6.0 - step / 2,
                     "lr": 1e-3 * step / steps, "grad_norm": 1.0, "tokens_per_s": 1000.0 + step, "elapsed_s": step * 2.0,
                     "expert_load": [[0.1 * step % 1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25]]})
        if step % 3 == 0:
            rows.append({"kind": "eval", "step": step, "tokens": step * 256, "val_loss": 5.5 - step / 3,
                         "val_perplexity": 99.0, "val_bits_per_byte": 2.5 - step / 10})
    lines = [json.dumps(r) for r in rows] + ['{"kind": "train", "step": 7, "lo']  # a torn last line
    (run / "metrics.jsonl").write_text("\n".join(lines))
    samples = [{"step": s, "tokens": s * 256, "prompt": p, "text": f" texto {s}"} for s in (3, 6) for p in ("Era uma vez", "O amor é")]
    (run / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def test_report_writes_plots_and_markdown(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    report = make_report(run)
    for name in ("loss.png", "lr.png", "throughput.png", "expert_load.png"):
        assert (run / name).stat().st_size > 1000, name
    text = report.read_text()
    assert "| steps | 6 |" in text
    assert "| val bits per byte | 1.9000 |" in text  # the last evaluation, step 6
    assert "| last train loss | 3.0000 |" in text
    assert text.index("- step 3: Era uma vez texto 3") < text.index("- step 6: Era uma vez texto 6")
    assert "### “O amor é”" in text


def test_report_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "train first" in capsys.readouterr().err
