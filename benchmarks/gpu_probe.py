"""Throughput probe for benchmarks/gpu_check.sh, loaded by class path into `cpm-lightning fit`."""

from __future__ import annotations

import time

import lightning as L
import torch

from cpm_lightning.core.perf import peak_flops
from cpm_lightning.model.stats import model_stats


class Throughput(L.Callback):
    """Rank 0 prints tokens/s and MFU over the optimizer steps after `warmup` (compilation,
    allocator warm-up), up to the last step — before the final checkpoint is written."""

    def __init__(self, warmup: int = 10):
        self.warmup = warmup
        self.start: float | None = None
        self.tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step < self.warmup:
            return
        torch.cuda.synchronize()
        if step == self.warmup:
            self.start, self.tokens = time.perf_counter(), 0
            return
        self.tokens += batch["input_ids"].numel() * trainer.world_size
        if step == trainer.max_steps:
            self._report(trainer, pl_module, batch["input_ids"].shape[1], time.perf_counter() - self.start)

    def _report(self, trainer, pl_module, seq_len, seconds):
        tokens_per_sec = self.tokens / seconds
        flops = model_stats(pl_module.arch, seq_len).flops_per_token
        peak = peak_flops(pl_module.device)
        memory = torch.cuda.max_memory_allocated() / 2**30
        if trainer.is_global_zero:
            name, world = torch.cuda.get_device_name(), trainer.world_size
            mfu = f"{tokens_per_sec * flops / (peak * world):.1%}" if peak else "n/a (device not in perf.GPU_BF16_PEAK)"
            print(f"RESULT preset={pl_module.arch.preset} devices={world}x {name} seq_len={seq_len} "
                  f"steps={trainer.max_steps - self.warmup} tokens/s={tokens_per_sec:,.0f} "
                  f"({tokens_per_sec / world:,.0f} per GPU) MFU={mfu} peak_mem_rank0={memory:.1f}GiB "
                  f"[MFU = tokens/s x {flops:,} FLOPs/token (6 x matmul weights + 12 x layers x width x "
                  f"length) / (devices x dense bf16 peak)]", flush=True)
