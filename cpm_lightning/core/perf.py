"""Peak FLOP/s for MFU (docs/ARCHITECTURE.md, "MLflow"): measured on CPU, from the spec sheet on
GPU; `trainer.precision: auto`, the precision a run trains in on the hardware it has; and
`model.parallel.compile: auto`, whether its blocks are compiled."""

from __future__ import annotations

import functools
import statistics
import time

import torch

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of the device name.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12,
                 "L4": 121e12, "RTX 4090": 165e12, "V100": 125e12}

AUTO = "auto"
BF16_SPEEDUP = 1.25
"""How much faster than fp32 a CPU's bf16 matmul must measure for `auto` to train in bf16-mixed:
a margin, so that a tie measured under load does not flip the choice between the segments of one
run (CPUs with AMX or AVX512-BF16 measure several times faster, CPUs without them several times
slower)."""

COMPILE_MIN_STEPS = 1000
"""Steps a process must have ahead of it for `auto` to compile its blocks (CUDA only). On this
project's CPU measurements (Intel Xeon with AMX, 2 cores, idle, the demo shape; docs/benchmarks.md)
compiled blocks trained 0.98x in fp32 and 1.12x in bf16-mixed (0.45 s steps) after ~74 s of cold
compile: 1,000 steps save ~48 s, less than the compile, so a CPU is never compiled by `auto`. On
CUDA compiling blocks is what torchtitan and litgpt do for throughput; not measured here
(benchmarks/gpu_check.sh step 4 measures it)."""


@functools.cache
def measured_cpu_peak(size: int = 2048, seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Sustained dense matmul FLOP/s at `dtype` on this process's threads: the median of repeated
    timings of a large square matmul (the best single timing would count turbo bursts)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float | None:
    """Peak FLOP/s of one device at the dtype its matmuls run in, or None for a GPU that is not in
    the table (which holds bf16 peaks)."""
    if device.type != "cuda":
        return measured_cpu_peak(dtype=dtype)
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)


def training_dtype(precision: str) -> torch.dtype:
    """The dtype the matmuls of a Lightning `trainer.precision` run in."""
    return torch.bfloat16 if str(precision).startswith("bf16") else torch.float32


@functools.cache
def cpu_bf16_speedup(size: int = 512, repeats: int = 5) -> float:
    """fp32 time / bf16 time of a square matmul on this CPU, each the best of `repeats` (a few ms
    in all; once per process)."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # the first call allocates and picks a kernel
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def precision_for(device_type: str, cuda_bf16: bool, cpu_speedup: float | None, sharded: bool = False) -> str:
    """What `auto` trains in: bf16-mixed on a CUDA GPU that has bf16 and on a CPU whose bf16
    matmul measured BF16_SPEEDUP times the fp32 rate, 32-true otherwise (and on other devices).
    `sharded` (trainer.strategy fsdp): 32-true, because FSDP2's MixedPrecisionPolicy already says
    what its blocks compute in (bf16 on CUDA, with fp32 master weights: train/sharding.py).
    The hardware's facts in, a Lightning precision out; no measuring here."""
    if sharded:
        return "32-true"
    if device_type == "cuda":
        return "bf16-mixed" if cuda_bf16 else "32-true"
    if device_type == "cpu" and cpu_speedup is not None and cpu_speedup >= BF16_SPEEDUP:
        return "bf16-mixed"
    return "32-true"


def auto_precision(accelerator: object, strategy: object = "auto") -> str:
    """precision_for a run with this `trainer.accelerator` and `trainer.strategy`, its facts
    gathered (the CPU's bf16 speed measured) only where they decide."""
    device_type = training_device(accelerator)
    cuda = device_type == "cuda"
    sharded = strategy == "fsdp"
    return precision_for(device_type, cuda and torch.cuda.is_bf16_supported(),
                         cpu_bf16_speedup() if device_type == "cpu" and not sharded else None, sharded)


def compile_for(device_type: str, steps_ahead: int) -> bool:
    """What `model.parallel.compile: auto` means: compile each block when the process trains on
    CUDA and has at least COMPILE_MIN_STEPS steps ahead of it. The facts in, a choice out."""
    return device_type == "cuda" and steps_ahead >= COMPILE_MIN_STEPS


def auto_compile(accelerator: object, steps_ahead: int) -> bool:
    """compile_for a run with this `trainer.accelerator` and `steps_ahead` steps to train."""
    return compile_for(training_device(accelerator), steps_ahead)


def training_device(accelerator: object) -> str:
    """The torch device type a `trainer.accelerator` (a name or an Accelerator) trains on."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower().removesuffix("accelerator")
    if name in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu" if name in ("auto", "cpu") else name
