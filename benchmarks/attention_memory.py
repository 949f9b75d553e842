"""Peak memory and time of one block at the `cpm-ant-1b` width (relative buckets, two segments, a
context prefix) attending through SDPA over the dense bias vs the path without it (model/attention.py,
`model.parallel.attention`): FlexAttention, or on CPU training query-chunked SDPA, at T = 512,
1024, 2048.

    .venv/bin/python benchmarks/attention_memory.py [--device cpu|cuda] [--T 512 1024 2048] [--batch B]
        [--steps both|train|forward]

Each case runs in its own process: a warm-up step (FlexAttention's compile), then `--repeat`
timed steps. Peak memory is what the step adds to what was resident before it: on CUDA
torch.cuda.max_memory_allocated; on CPU the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs after the warm-up and a malloc_trim, so the warm-up's freed pages do not
hide the step's). The model is one block of the preset (one attention and one FFN sublayer) with
a 256-token vocabulary, so the embedding and output projection are negligible.

Steps: forward+backward (training) and forward alone (no grad: evaluation, a prompt's prefill).
On CPU this torch has no FlexAttention backward, so there forward+backward compares `chunked`
(chunks of 256 queries, model.parallel.attention_chunk's default, each chunk's mask rebuilt in
the backward) and FlexAttention is compared on the forward. Ratios are new / sdpa measured in one run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from cpm_lightning.model import ArchConfig, CPMAnt


def _resident_kib(field: str) -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(field)).split()[1])


def measure(kernel: str, T: int, batch: int, backward: bool, device: str, dtype: str, repeat: int) -> dict:
    """One case in this process: peak bytes the step adds, seconds per step (median), warm-up s."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = CPMAnt(ArchConfig(preset="cpm-ant-1b", vocab_size=256, num_attn_layers=1, num_ffn_layers=1))
    model.init_weights()
    model = model.to(dev, getattr(torch, dtype))
    model.attention_kernel = kernel
    ids = torch.randint(0, 256, (batch, T), device=dev)
    segment_ids = (torch.arange(T, device=dev) >= T // 4).long().expand(batch, T)  # a prompt, then text
    context = segment_ids == 0

    def step():
        with torch.set_grad_enabled(backward):
            out = model(ids, segment_ids=segment_ids, context=context)
            if backward:
                out.float().square().mean().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    warmup = time.perf_counter() - start
    model.zero_grad(set_to_none=False)  # the gradients' memory is held before the timed step
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _resident_kib("VmRSS") * 1024
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _resident_kib("VmHWM") * 1024
    return {"peak": peak - before, "seconds": statistics.median(times), "warmup": warmup}


def run_case(args, kernel: str, T: int, backward: bool) -> dict:
    argv = [sys.executable, __file__, "--child", kernel, str(T), str(int(backward)), "--device", args.device,
            "--batch", str(args.batch), "--dtype", args.dtype, "--repeat", str(args.repeat), "--threads",
            str(args.threads)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per case (median)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per case")
    parser.add_argument("--steps", default="both", choices=["both", "train", "forward"],
                        help="forward+backward, forward alone, or both")
    parser.add_argument("--child", nargs=3, metavar=("KERNEL", "T", "BACKWARD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        kernel, T, backward = args.child
        print(json.dumps(measure(kernel, int(T), args.batch, backward == "1", args.device, args.dtype, args.repeat)))
        return

    heads = ArchConfig(preset="cpm-ant-1b").resolved().num_heads
    print(f"one cpm-ant-1b block (dim 2048, {heads} heads, relative buckets, two segments), batch {args.batch}, "
          f"{args.dtype}, {args.device}; torch {torch.__version__}; peak = memory the step adds, time = median of "
          f"{args.repeat}")
    steps = [("forward+backward", True), ("forward", False)]
    for name, backward in steps[:1] if args.steps == "train" else steps[1:] if args.steps == "forward" else steps:
        print(f"\n{name}")
        new = "chunked" if backward and args.device == "cpu" else "flex"  # no FlexAttention backward on CPU
        print(f"{'T':>5} {'dense bias':>10} | {'sdpa peak':>9} {'time':>7} | {new + ' peak':>12} {'time':>7} "
              f"{'warm-up':>7} | {'peak ratio':>10} {'time ratio':>10}")
        for T in args.T:
            sdpa = run_case(args, "sdpa", T, backward)
            other = run_case(args, new, T, backward)
            dense = args.batch * heads * T * T * torch.finfo(getattr(torch, args.dtype)).bits // 8
            print(f"{T:>5} {dense / 2**20:>8.0f} M | {sdpa['peak'] / 2**20:>7.0f} M {sdpa['seconds']:>6.3f}s | "
                  f"{other['peak'] / 2**20:>10.0f} M {other['seconds']:>6.3f}s {other['warmup']:>6.1f}s | "
                  f"{other['peak'] / sdpa['peak']:>10.3f} {other['seconds'] / sdpa['seconds']:>10.3f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
