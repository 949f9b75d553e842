"""Throughput of `cpm-lightning fit` against a plain PyTorch loop, and MFU, in one run.

Both train the same model (the `demo` preset by default, with the accepted proposals applied
as `fit` applies them) on the same data and batch, with the same optimizer, schedule and
gradient clipping. `fit` runs in-process through the CLI with
MLflow logging on; its tokens/s come from the timestamps MLflow recorded for
`train/tokens_seen`. The loops alternate (plain, fit, plain, fit) and each side keeps its best
round, so a burst of load on a shared machine hurts neither side alone.

Each side runs at every `--precision` (Lightning's name: 32-true, bf16-mixed; the plain loop
autocasts as Lightning's bf16-mixed does) and every `--compile` setting (model.parallel.compile:
each block torch.compiled), so a variant's speed is compared with the others' in the same run.

MFU = tokens/s x FLOPs/token / peak, with FLOPs/token = 6 x matmul weights + 12 x layers x
width x seq_len (docs/ARCHITECTURE.md, "MLflow") and the peak measured here as dense matmul FLOP/s
in the dtype the variant trains in (fp32 or bf16). A shared machine's speed drifts by tens of
percent over minutes, so the peak is measured right before and right after each timed loop, each
loop's MFU is taken against the mean of its two peaks, and the MFU printed is the median over the
rounds.

A compiled variant's first step includes compiling the blocks: the plain loop's first step time is
printed for each variant (the compile time is the compiled one's minus the uncompiled one's). The
inductor cache is a fresh directory (cold compiles) unless TORCHINDUCTOR_CACHE_DIR names one: run
twice with the same directory to time a restart's compile (a `live` boundary starts a new
process, which finds the previous one's compiled code on disk).

    .venv/bin/python benchmarks/train_throughput.py [--config configs/demo.yaml] [--steps 30]
        [--precision 32-true bf16-mixed] [--compile off on]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
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
from cpm_lightning.core.perf import measured_cpu_peak, training_dtype  # noqa: E402
from cpm_lightning.model import ArchConfig  # noqa: E402
from cpm_lightning.model.stats import model_stats  # noqa: E402
from cpm_lightning.train.config import LossConfig, OptimConfig, ParallelConfig, ScheduleConfig  # noqa: E402
from cpm_lightning.train.module import CausalLM  # noqa: E402
from datamodules.pretrain import PretrainDataModule, TrainStream  # noqa: E402


def plain_loop(cfg: dict, warmup: int, steps: int, precision: str, compiled: bool) -> tuple[float, float]:
    """(tokens/s, seconds of the first step) of a hand-written loop over the same model, data,
    optimizer and schedule."""
    dm = PretrainDataModule(**cfg["data"])
    dm.prepare_data()
    dm.setup()
    model_cfg = cfg.get("model", {})
    arch = ArchConfig(**{**model_cfg.get("arch", {}), "vocab_size": dm.vocab_size})
    module = CausalLM(arch, OptimConfig(**model_cfg.get("optim", {})), ScheduleConfig(**model_cfg.get("schedule", {})),
                      LossConfig(**model_cfg.get("loss", {})), ParallelConfig(compile=compiled))
    module.configure_model()
    model, optim, schedule = module.model, module.optim, module.schedule
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=True)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule.factor(s, warmup + steps))
    batches = torch.utils.data.DataLoader(TrainStream(dm, 0, 1, dm.batch_size), batch_size=dm.batch_size)
    bf16 = training_dtype(precision) == torch.bfloat16
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        if i == warmup + steps:
            break
        t = time.perf_counter()
        # Lightning's bf16-mixed on CPU: the forward and the loss under autocast, the backward outside.
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = module._loss(model(batch["input_ids"]), batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        lr.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            first = time.perf_counter() - t
    return steps * dm.batch_size * dm.seq_len / (time.perf_counter() - start), first


def lightning_fit(config: str, warmup: int, steps: int, workdir: Path, name: str, precision: str,
                  compiled: bool) -> float:
    """tokens/s of `cpm-lightning fit` with MLflow logging, from MLflow's metric timestamps."""
    import mlflow

    uri = f"sqlite:///{workdir}/bench.db"
    every = 5
    cli_main(["fit", "--config", config, f"--trainer.max_steps={warmup + steps}",
              f"--trainer.default_root_dir={workdir}/{name}", f"--tracking.uri={uri}",
              "--tracking.experiment=throughput", f"--trainer.log_every_n_steps={every}",
              "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", f"--checkpoint.every_n_steps={10 * (warmup + steps)}",
              f"--trainer.precision={precision}", f"--model.parallel.compile={str(compiled).lower()}"])
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
    parser.add_argument("--precision", nargs="+", default=["32-true"], choices=["32-true", "bf16-mixed"],
                        help="trainer.precision of each variant (default 32-true)")
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                        help="model.parallel.compile of each variant (default off)")
    args = parser.parse_args()
    resolved = subprocess.run([sys.executable, "-m", "cpm_lightning.cli", "proposals", "resolve", "--config", args.config],
                              check=True, capture_output=True, text=True).stdout
    cfg = yaml.safe_load(resolved)
    arch = ArchConfig(**cfg["model"]["arch"])
    flops = model_stats(arch, cfg["data"]["seq_len"]).flops_per_token
    variants = [(p, c == "on") for p in args.precision for c in args.compile]
    results = {v: {"plain": [], "fit": [], "plain_mfu": [], "fit_mfu": [], "first": []} for v in variants}
    sys.argv = sys.argv[:1]  # the in-process CLI must not see this script's flags
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", f"{tmp}/inductor")  # cold compiles unless given
        for r in range(args.rounds):
            for precision, compiled in variants:
                res = results[precision, compiled]
                peak = functools.partial(measured_cpu_peak.__wrapped__, seconds=2.0,  # uncached
                                         dtype=training_dtype(precision))
                before = peak()
                plain, first = plain_loop(cfg, args.warmup, args.steps, precision, compiled)
                between = peak()
                name = f"run{r}-{precision}-{'compiled' if compiled else 'eager'}"
                fit = lightning_fit(args.config, args.warmup, args.steps, Path(tmp), name, precision, compiled)
                after = peak()
                res["plain"].append(plain)
                res["fit"].append(fit)
                res["first"].append(first)
                res["plain_mfu"].append(plain * flops / ((before + between) / 2))
                res["fit_mfu"].append(fit * flops / ((between + after) / 2))
                print(f"round {r} {precision} compile {'on' if compiled else 'off'}: peaks {before / 1e9:.0f}/"
                      f"{between / 1e9:.0f}/{after / 1e9:.0f} GFLOP/s, plain {plain:.0f} tok/s (MFU "
                      f"{res['plain_mfu'][-1]:.3f}, first step {first:.1f} s), fit {fit:.0f} tok/s (MFU "
                      f"{res['fit_mfu'][-1]:.3f})", flush=True)
    print(f"preset {arch.preset}: {flops / 1e6:.1f} MFLOP/token, {torch.get_num_threads()} threads")
    base = max(results[variants[0]]["fit"])
    for (precision, compiled), res in results.items():
        best_plain, best_fit = max(res["plain"]), max(res["fit"])
        print(f"{precision:10} compile {'on ' if compiled else 'off'}  plain {best_plain:6.0f} tok/s (best), "
              f"MFU {statistics.median(res['plain_mfu']):.3f} (median)  fit {best_fit:6.0f} tok/s (best), "
              f"MFU {statistics.median(res['fit_mfu']):.3f} (median)  fit/plain {best_fit / best_plain:.3f}  "
              f"fit / first variant's fit {best_fit / base:.3f}  first steps {', '.join(f'{t:.1f}' for t in res['first'])} s")


if __name__ == "__main__":
    main()
