"""Shared pieces of the benchmark scripts: model construction (ours and Hugging Face's
Mixtral at one identical shape), timing, memory measurement, FLOP counting and tables.

The benchmarks compare like with like: both models are built from one `ModelConfig`,
see the same random token batches, use the same optimiser and precision, and run
alternately in one process so that noise from other processes on a shared machine
hits both equally. Ratios are what we quote; absolute numbers drift with load.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The scripts run from a checkout without `pip install -e .` too (the GPU machine).
if str(REPO_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "src"))

from gtransformer import config as config_lib  # noqa: E402
from gtransformer.errors import UserError  # noqa: E402
from gtransformer.interop import hf  # noqa: E402
from gtransformer.model.config import ModelConfig  # noqa: E402
from gtransformer.model.model import GPT  # noqa: E402

HF_EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")


# ---------------------------------------------------------------- configuration


def add_model_args(parser, default_models: str) -> None:
    """The options every benchmark shares: which preset, which overrides, which models."""
    parser.add_argument("--preset", default="tiny", help="model preset in configs/ (tiny, base, ...) or a TOML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a [model] key of the preset, e.g. --set n_layers=2 (repeatable)")
    parser.add_argument("--models", default=default_models,
                        help="comma-separated models: ours and/or hf:grouped_mm, hf:eager, hf:batched_mm")


def add_run_args(parser) -> None:
    """Where and how a benchmark runs, and where its results go."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write all results to this JSON file")


def load_model_config(preset: str, overrides: list[str] | None = None):
    """`ModelConfig` from `configs/<preset>.toml` (or a TOML path), with `key=value` overrides of [model]."""
    path = Path(preset)
    if not path.suffix:
        path = REPO_ROOT / "configs" / f"{preset}.toml"
    tables = config_lib.load_toml(path)
    if "model" not in tables:
        raise UserError(f"{path} has no [model] table; pass a preset such as tiny or base")
    config_lib.apply_overrides(tables, [f"model.{item}" for item in overrides or []])
    return config_lib.from_dict(ModelConfig, tables["model"], "model")


def mixtral_config(model_config, experts_implementation: str = "grouped_mm"):
    """A `transformers.MixtralConfig` with exactly our architecture's shape and options (`hf.mixtral_config`)."""
    from transformers import MixtralConfig

    c = model_config
    bad = hf.mixtral_incompatibilities(c)
    if c.balance != "aux":  # bias balancing moves the routing during training, which Mixtral cannot
        bad.append(f"balance = {c.balance!r} (Mixtral balances with the auxiliary loss only)")
    if bad:
        raise UserError(f"Mixtral has no equivalent of [model] {'; '.join(bad)}; benchmark a Mixtral-shaped preset")
    values = hf.mixtral_config(c, None, torch.float32)
    for key in ("architectures", "model_type", "torch_dtype", "rope_parameters"):
        values.pop(key)
    config = MixtralConfig(
        **values,
        # Our trainer optimises loss + the weighted balancing loss, so HF computes its own too.
        output_router_logits=c.aux_loss_coef > 0,
        pad_token_id=None,
    )
    config._experts_implementation = experts_implementation
    return config


def build_ours(model_config, device: str):
    torch.manual_seed(0)
    return GPT(model_config).to(device)


def build_hf(model_config, experts_implementation: str, device: str):
    from transformers import MixtralForCausalLM

    if experts_implementation not in HF_EXPERTS_IMPLEMENTATIONS:
        raise UserError(
            f"unknown experts implementation {experts_implementation!r}; "
            f"choose one of {', '.join(HF_EXPERTS_IMPLEMENTATIONS)}"
        )
    torch.manual_seed(0)
    model = MixtralForCausalLM._from_config(
        mixtral_config(model_config), experts_implementation=experts_implementation
    )
    got = model.config._experts_implementation
    if got != experts_implementation:
        raise RuntimeError(f"transformers picked experts implementation {got!r}, not {experts_implementation!r}")
    return model.to(device)


# Our model names in --models: "ours:compiled" runs ours under torch.compile while the others stay
# eager (training: torch.compile(model); generation: DecodeOptions.compile, compiled in the warm-up).
OURS_VARIANTS = ("ours", "ours:compiled")


def add_reference_speedups(rows: list[dict]) -> tuple:
    """Each row's tokens/s against the first HF model's (the reference the targets name); its table column."""
    reference = next((r for r in rows if r["model"].startswith("hf:")), None)
    if reference is not None:
        for row in rows:
            row["speedup_vs_reference"] = row["tokens_per_s"] / reference["tokens_per_s"]
    return ("speedup_vs_reference", f"x {reference['model']}" if reference else "x ref", ".2f")


def parse_models(text: str, ours_variants: tuple[str, ...] = ("ours",)) -> list[str]:
    """`ours,hf:grouped_mm,hf:eager` -> validated list of model names (ours_variants: the names accepted besides hf:IMPL)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name in ours_variants:
            continue
        kind, _, impl = name.partition(":")
        if kind != "hf" or impl not in HF_EXPERTS_IMPLEMENTATIONS:
            raise UserError(
                f"unknown model {name!r} in --models; use {' or '.join(ours_variants)} or hf:IMPL with IMPL one of "
                f"{', '.join(HF_EXPERTS_IMPLEMENTATIONS)}"
            )
    if not names:
        raise UserError("--models is empty; pass e.g. ours,hf:grouped_mm")
    return names


def build_model(name: str, model_config, device: str):
    if name.partition(":")[0] == "ours":
        return build_ours(model_config, device)
    return build_hf(model_config, name.partition(":")[2], device)


# ---------------------------------------------------------------- FLOPs


def training_flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token by `GPT.flops_per_token` (6 N_active + attention, PaLM/nanoGPT convention).

    Both models share the shape, so one count serves both MFUs. Built on the meta
    device: no memory, instant even for the base preset."""
    with torch.device("meta"):
        return float(GPT(model_config).flops_per_token(seq_len))


# ---------------------------------------------------------------- devices, precision, timing


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but torch sees no CUDA GPU; use --device cpu")
    return name


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def autocast(device: str, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise UserError(f"unknown --dtype {dtype!r}; use float32 or bf16")


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds one call of `fn` takes, with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------- memory


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process's address space (VmHWM).

    Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a child
    started by a big parent reports at least the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    raise RuntimeError("no VmHWM in /proc/self/status; peak memory needs Linux")


def run_isolated(script: Path, args: list[str]) -> dict[str, Any]:
    """Run `script args` in a fresh interpreter and parse the JSON line it prints last.

    Peak RSS is a per-process high-water mark, so a fair CPU memory comparison needs
    one process per model."""
    result = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- reporting


def environment(device: str) -> dict[str, Any]:
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit + ("+dirty" if dirty else ""),
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as an aligned table; columns are (key, header, format spec)."""

    def cell(row, key, spec):
        value = row.get(key)
        if value is None:
            return "-"
        return format(value, spec) if spec else str(value)

    cells = [[header for _, header, _ in columns]]
    cells += [[cell(row, key, spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print("  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def config_dict(model_config) -> dict[str, Any]:
    return asdict(model_config)

