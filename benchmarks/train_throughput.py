"""Throughput of `cpm-lightning fit` against a plain PyTorch loop, and MFU, in one run.

Both train the same model (the `demo` preset by default, with the accepted proposals applied
as `fit` applies them) on the same data and batch, with the same optimizer, schedule and
gradient clipping. `fit` runs in-process through the CLI with
MLflow logging on; its tokens/s come from the timestamps MLflow recorded for
`train/tokens_seen`. The loops alternate (plain, fit, plain, fit) and each side keeps its best
round, so a burst of load on a shared machine hurts neither side alone.

MFU = tokens/s x FLOPs/token / peak, with FLOPs/token = 6 x matmul weights + 12 x layers x
width x seq_len (docs/ARCHITECTURE.md, "MLflow") and the peak measured here as dense fp32 matmul FLOP/s. A shared
machine's speed drifts by tens of percent over minutes, so the peak is measured right before and
right after each timed loop, each loop's MFU is taken against the mean of its two peaks, and the
MFU printed is the median over the rounds.

    .venv/bin/python benchmarks/train_throughput.py [--config configs/demo.yaml] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpm_lightning.cli.main import main as cli_main  # noqa: E402
from cpm_lightning.core.perf import measured_cpu_peak  # noqa: E402
from cpm_lightning.model import ArchConfig  # noqa: E402
from cpm_lightning.model.stats import model_stats  # noqa: E402
from cpm_lightning.train.config import LossConfig, OptimConfig, ScheduleConfig  # noqa: E402
from cpm_lightning.train.module import CausalLM  # noqa: E402
from datamodules.pretrain import PretrainDataModule, TrainStream  # noqa: E402


def plain_loop(cfg: dict, warmup: int, steps: int) -> float:
    """tokens/s of a hand-written loop over the same model, data, optimizer and schedule."""
    dm = PretrainDataModule(**cfg["data"])
    dm.prepare_data()
    dm.setup()
    model_cfg = cfg.get("model", {})
    arch = ArchConfig(**{**model_cfg.get("arch", {}), "vocab_size": dm.vocab_size})
    module = CausalLM(arch, OptimConfig(**model_cfg.get("optim", {})), ScheduleConfig(**model_cfg.get("schedule", {})),
                      LossConfig(**model_cfg.get("loss", {})))
    module.configure_model()
    model, optim, schedule = module.model, module.optim, module.schedule
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=True)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule.factor(s, warmup + steps))
    batches = torch.utils.data.DataLoader(TrainStream(dm, 0, 1, dm.batch_size), batch_size=dm.batch_size)
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        if i == warmup + steps:
            break
        loss = module._loss(model(batch["input_ids"]), batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        lr.step()
        opt.zero_grad(set_to_none=True)
    return steps * dm.batch_size * dm.seq_len / (time.perf_counter() - start)


def lightning_fit(config: str, warmup: int, steps: int, workdir: Path, round_: int) -> float:
    """tokens/s of `cpm-lightning fit` with MLflow logging, from MLflow's metric timestamps."""
    import mlflow

    uri = f"sqlite:///{workdir}/bench.db"
    every = 5
    cli_main(["fit", "--config", config, f"--trainer.max_steps={warmup + steps}",
              f"--trainer.default_root_dir={workdir}/run{round_}", f"--tracking.uri={uri}",
              "--tracking.experiment=throughput", f"--trainer.log_every_n_steps={every}",
              "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", f"--checkpoint.every_n_steps={10 * (warmup + steps)}"])
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("throughput").experiment_id],
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    history = sorted(client.get_metric_history(run.info.run_id, "train/tokens_seen"), key=lambda m: m.step)
    timed = [m for m in history if m.step >= warmup]
    first, last = timed[0], timed[-1]
    return (last.value - first.value) / ((last.timestamp - first.timestamp) / 1000)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="run config (default: the demo)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round (default 30)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per side (default 2)")
    args = parser.parse_args()
    resolved = subprocess.run([sys.executable, "-m", "cpm_lightning.cli", "proposals", "resolve", "--config", args.config],
                              check=True, capture_output=True, text=True).stdout
    cfg = yaml.safe_load(resolved)
    arch = ArchConfig(**cfg["model"]["arch"])
    flops = model_stats(arch, cfg["data"]["seq_len"]).flops_per_token
    plain, fit, plain_mfu, fit_mfu = [], [], [], []
    sys.argv = sys.argv[:1]  # the in-process CLI must not see this script's flags
    with tempfile.TemporaryDirectory() as tmp:
        peak = measured_cpu_peak.__wrapped__  # uncached: a fresh figure beside each loop
        for r in range(args.rounds):
            before = peak(seconds=2.0)
            plain.append(plain_loop(cfg, args.warmup, args.steps))
            between = peak(seconds=2.0)
            fit.append(lightning_fit(args.config, args.warmup, args.steps, Path(tmp), r))
            after = peak(seconds=2.0)
            plain_mfu.append(plain[-1] * flops / ((before + between) / 2))
            fit_mfu.append(fit[-1] * flops / ((between + after) / 2))
            print(f"round {r}: peaks {before / 1e9:.0f}/{between / 1e9:.0f}/{after / 1e9:.0f} GFLOP/s, "
                  f"plain {plain[-1]:.0f} tok/s (MFU {plain_mfu[-1]:.3f}), "
                  f"fit {fit[-1]:.0f} tok/s (MFU {fit_mfu[-1]:.3f})", flush=True)
    best_plain, best_fit = max(plain), max(fit)
    print(f"preset {arch.preset}: {flops / 1e6:.1f} MFLOP/token, {torch.get_num_threads()} threads")
    print(f"plain PyTorch loop   {best_plain:8.0f} tokens/s (best)   MFU {statistics.median(plain_mfu):.3f} (median)")
    print(f"cpm-lightning fit    {best_fit:8.0f} tokens/s (best)   MFU {statistics.median(fit_mfu):.3f} (median)")
    print(f"ratio fit / plain    {best_fit / best_plain:.3f}")


if __name__ == "__main__":
    main()
