"""Where and how the work runs: device, precision, autocast, distributed init, threads, peak FLOPs, memory.

Every function here reads the machine; none changes process-wide torch state (the
commands own their process and set its thread count once), so the training loop,
the decoding step and the commands share one answer to "which device, which
precision, how many threads".
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from gtransformer.errors import UserError

PRECISIONS = ("auto", "float32", "bfloat16", "float16")

# Dense half-precision peak FLOP/s per device, for MFU. H100/H200 use the measured ~790 TFLOP/s
# (the 989 TFLOP/s spec is not reachable by matmuls); the others are spec-sheet numbers.
PEAK_FLOPS = {
    "H200": 790e12,
    "H100": 790e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 70e12,
    "V100": 125e12,
    "T4": 65e12,
    "P100": 18.7e12,
}


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` -> this process's CUDA GPU (LOCAL_RANK under torchrun), else mps, else cpu."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device; use cpu, cuda, cuda:0, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def auto_precision(device: torch.device) -> tuple[str, str]:
    """What precision = "auto" picks on this device, and why (for the log)."""
    if device.type == "cuda":
        # T4 and P100 (Kaggle, Colab) have no native bfloat16 (torch.cuda.is_bf16_supported() also counts
        # emulation, true there): float16 with a gradient scaler instead. Native bf16 starts at Ampere (sm 8.0).
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bfloat16", f"GPU compute capability {major}.{minor} has native bfloat16"
        return "float16", f"GPU compute capability {major}.{minor} has no native bfloat16; float16 with a grad scaler"
    if device.type == "cpu":
        flag = cpu_native_bfloat16()
        if flag:
            # Measured (benchmarks/RESULTS.md, "bfloat16 on CPU"): tiny trains ~1.6x faster than in float32
            # on an AMX CPU, once the MoE's shapes stay few and attention runs in float32.
            return "bfloat16", f"the CPU has native bfloat16 ({flag})"
        # Emulated bfloat16 (AVX2-only CPUs, Apple's) is slower than float32.
        return "float32", "the CPU has no native bfloat16 (AMX or AVX-512 BF16)"
    return "float32", f"{device.type} trains in float32"


def cpuinfo_field(name: str) -> str | None:
    """The first `name : value` of /proc/cpuinfo (Linux), or None where it is missing or unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where unreadable."""
    return set((cpuinfo_field("flags") or "").split())


def cpu_native_bfloat16() -> str | None:
    """The CPU flag that gives bfloat16 matmuls native speed (AMX, else AVX-512 BF16), or None."""
    flags = cpu_flags()
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested not in PRECISIONS:
        raise UserError(f"train.precision = {requested!r}; use {', '.join(PRECISIONS)}")
    return auto_precision(device)[0] if requested == "auto" else requested


def autocast_context(device: torch.device, precision: str):
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, precision))


def device_peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (CPU): then MFU is omitted."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def device_name(device: torch.device) -> str:
    """What the device is, in words: the GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    model = cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown model"
    threads = torch.get_num_threads()
    return f"CPU ({model}, {threads} thread{'' if threads == 1 else 's'})"


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory of this process: allocated CUDA memory, or resident memory on CPU."""
    if device.type == "cuda":
        return {"memory_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    # VmHWM, not ru_maxrss: the latter can carry a parent's peak over fork/exec.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"memory_gb": int(line.split()[1]) * 1024 / 1e9}
    except OSError:
        pass
    return {}


def require_cpp_compiler(device: torch.device | str, fix: str) -> None:
    """torch.compile on CPU builds C++ with the system compiler: say so up front instead of failing mid-run."""
    if torch.device(device).type != "cpu":
        return
    if not has_cpp_compiler():
        raise UserError(f"torch.compile on CPU needs a C++ compiler (g++ or clang++) and none was found; "
                        f"install one (e.g. apt-get install g++) or {fix}")


def has_cpp_compiler() -> bool:
    return any(name and shutil.which(name) for name in (os.environ.get("CXX"), "c++", "g++", "clang++"))


# train.compile = "auto" compiles runs at least this long: compiling the training step costs about a minute
# of a short run, and the compiled step's gain (benchmarks/RESULTS.md, "Quality per minute") pays that back
# after 5-10 minutes of training.
COMPILE_MIN_MINUTES = 15.0
COMPILE_MIN_STEPS = 2000  # the same for step-bounded runs (no max_minutes)


def auto_compile(device: torch.device, precision: str, moe: bool, max_minutes: float,
                 max_steps: int) -> tuple[bool, str]:
    """Whether train.compile = "auto" compiles this run, and why (for the log)."""
    if device.type == "cpu":
        if not has_cpp_compiler():
            return False, "no C++ compiler (g++ or clang++) for torch.compile on CPU"
        if moe:
            # Measured (RESULTS.md, "Quality per minute", "bfloat16 on CPU"): the compiled MoE trained at 0.78x
            # eager's tokens/s in float32 (grouped_mm's compiled form is bfloat16-only, so its experts run one by
            # one) and at 0.55x in bfloat16 (eager pads the experts' rows to few shapes; compiled it cannot).
            return False, "a compiled MoE measured slower than eager on CPU (0.78x float32, 0.55x bfloat16)"
        if precision == "float32":
            # The compiled dense float32 step alone was no faster (1.02x); bfloat16's was 1.12x.
            return False, "float32 on CPU: the compiled step measured no faster than eager"
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (torch.compile on CUDA needs it)"
    else:
        return False, f"torch.compile is not used on {device.type}"
    if max_minutes:
        if max_minutes >= COMPILE_MIN_MINUTES:
            return True, f"a {max_minutes:g}-minute run repays the ~1 minute of compiling"
        return False, (f"a {max_minutes:g}-minute run is too short to repay ~1 minute of compiling "
                       f"(compiles from {COMPILE_MIN_MINUTES:g} minutes)")
    if max_steps and max_steps < COMPILE_MIN_STEPS:
        return False, f"{max_steps} steps are too few to repay compiling (compiles from {COMPILE_MIN_STEPS} steps)"
    return True, f"{max_steps} steps repay compiling" if max_steps else "a run of whole epochs repays compiling"


def resolve_compile(requested: bool | str, device: torch.device, precision: str, moe: bool, max_minutes: float,
                    max_steps: int) -> tuple[bool, str | None]:
    """train.compile resolved: `auto_compile`'s answer and reason for "auto"; true / false as given (no reason),
    a UserError up front when true cannot compile on this CPU."""
    if requested == "auto":
        return auto_compile(device, precision, moe, max_minutes, max_steps)
    if requested:
        require_cpp_compiler(device, "set train.compile = false")
    return bool(requested), None


# --- distributed ------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def sum_in_place(self, tensors: list[torch.Tensor]) -> None:
        """Sum same-shaped tensors over the ranks, in place, in one collective (stacked), not one per tensor."""
        if not self.enabled or not tensors:
            return
        stacked = torch.stack(tensors)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        for tensor, total in zip(tensors, stacked.unbind(0)):
            tensor.copy_(total)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_request: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_request)
    if world_size <= 1:
        return Distributed(), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(), enabled=True), device
