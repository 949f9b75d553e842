"""Step time of the `demo` preset with MLflow logging at every step against logging off, in one
run (docs/ARCHITECTURE.md, "MLflow"; logging must never stall training; the target is under 2% growth).

    .venv/bin/python benchmarks/logging_overhead.py [--steps 120] [--block 5]

One `fit` with the logger and callbacks of `cpm-lightning fit` (sqlite store in a temp dir,
system metrics on), in which logging is switched on and off every `--block` steps: on a shared
machine, load from other processes then falls on both settings alike, which separate runs do
not get. "Off" drops the metrics in the logger, so the training loop does exactly what it does
with `trainer.logger=false`. The first two blocks are warm-up; the medians of the kept step times
are compared. Batches are random tokens: the cost of logging does not depend on the data.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from cpm_lightning.model import ArchConfig
from cpm_lightning.tracking.logger import CPMLogger, TrackRun
from cpm_lightning.train.config import ScheduleConfig
from cpm_lightning.train.module import CausalLM


class RandomTokens(IterableDataset):
    def __init__(self, vocab: int, seq_len: int):
        self.vocab, self.seq_len = vocab, seq_len

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            w = torch.randint(self.vocab, (self.seq_len + 1,), generator=g)
            yield {"input_ids": w[:-1], "targets": w[1:]}


class SwitchedLogger(CPMLogger):
    """CPMLogger that drops metrics while `on` is False."""

    on = True

    def log_metrics(self, metrics, step=None):
        if self.on:
            super().log_metrics(metrics, step)


class Alternate(L.Callback):
    """Switches logging every `block` steps and records each step's time under its setting,
    start to start: Lightning hands a step's metrics to the logger after on_train_batch_end."""

    def __init__(self, logger: SwitchedLogger, block: int):
        self.logger, self.block = logger, block
        self.times: dict[bool, list[float]] = {True: [], False: []}
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if batch_idx > 2 * self.block:  # the first two blocks are warm-up
            self.times[self.logger.on].append(now - self._start)  # the previous step, its setting
        self.logger.on = (batch_idx // self.block) % 2 == 0
        self._start = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps in all (default 120)")
    parser.add_argument("--block", type=int, default=5, help="steps per on/off block (default 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="as configs/demo.yaml (default 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="as configs/demo.yaml (default 256)")
    args = parser.parse_args()
    torch.manual_seed(0)
    arch = ArchConfig(preset="demo", vocab_size=4096)
    with tempfile.TemporaryDirectory() as tmp:
        logger = SwitchedLogger(tracking_uri=f"sqlite:///{tmp}/mlflow.db", experiment_name="logging-overhead",
                                run_name=None, run_id=None, fallback_dir=Path(tmp), flush_timeout=60)
        timer = Alternate(logger, args.block)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=logger, log_every_n_steps=1,
                            callbacks=[TrackRun(logger), timer], enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(CausalLM(arch=arch, schedule=ScheduleConfig(warmup_steps=10)),
                    DataLoader(RandomTokens(arch.vocab_size, args.seq_len), batch_size=args.batch_size))
    on, off = statistics.median(timer.times[True]), statistics.median(timer.times[False])
    print(f"demo preset, batch {args.batch_size} x {args.seq_len}, {torch.get_num_threads()} threads, "
          f"{len(timer.times[True])} + {len(timer.times[False])} steps (on + off)")
    print(f"median step time: logging off {off * 1000:.1f} ms, logging every step {on * 1000:.1f} ms")
    print(f"ratio {on / off:.4f} (step time grows {100 * (on / off - 1):+.2f}%; target < 2%)")


if __name__ == "__main__":
    main()
