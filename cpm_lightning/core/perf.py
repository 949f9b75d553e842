"""Peak FLOP/s for MFU (docs/ARCHITECTURE.md, "MLflow"): measured on CPU, from the spec sheet on GPU."""

from __future__ import annotations

import functools
import statistics
import time

import torch

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of the device name.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12,
                 "L4": 121e12, "RTX 4090": 165e12, "V100": 125e12}


@functools.cache
def measured_cpu_peak(size: int = 2048, seconds: float = 1.0) -> float:
    """Sustained dense fp32 matmul FLOP/s on this process's threads: the median of repeated
    timings of a large square matmul (the best single timing would count turbo bursts)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times)


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of one device, or None for a GPU that is not in the table."""
    if device.type != "cuda":
        return measured_cpu_peak()
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)
