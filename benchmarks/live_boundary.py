"""What a boundary of `cpm-lightning live` costs, beside the step time, in one run.

A proposal that takes effect mid-run ends one `fit` segment with a checkpoint and starts the
next from it (docs/ARCHITECTURE.md, "Live training"). This runs the demo (configs/demo.yaml with
the seed proposals, as `make demo`) under `live` for 2N steps with one more accepted training
proposal effective at step N, and reads the times MLflow recorded for `train/loss` at every step:

  step time   the median interval between two steps inside a segment
  boundary    the interval from step N-1 (the last of the first segment) to step N (the first
              of the next), less one step time: checkpoint, exit, a new process that imports
              Lightning, restores the checkpoint and reaches its first step

and prints the boundary as a number of steps.

    .venv/bin/python benchmarks/live_boundary.py [--steps-before 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROPOSAL = """\
id: 99
title: A little more weight decay from step {step}
kind: training
status: accepted
authors: ["@benchmark"]
discussion: https://github.com/cpm-lightning/cpm-lightning/discussions/99
created: 2026-11-30
decided: 2026-11-30
effective_from_step: {step}
summary: The boundary of live_boundary.py.
changes:
  model.optim.weight_decay: 0.02
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-before", type=int, default=10, help="N: steps before the boundary (default 10)")
    args = parser.parse_args()
    n = args.steps_before
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        registry = tmp / "registry"
        registry.mkdir()
        for path in (ROOT / "proposals").glob("*.yaml"):
            shutil.copy(path, registry)
        (registry / "0099-a-little-more-weight-decay.yaml").write_text(PROPOSAL.format(step=n))
        subprocess.run([sys.executable, "-m", "cpm_lightning.cli", "live", "--config", "configs/demo.yaml",
                        "--config", "configs/demo-live.yaml", f"--registry.path={registry}",
                        "--registry.kinds=[architecture, training]", f"--trainer.max_steps={2 * n}",
                        f"--checkpoint.every_n_steps={n}", f"--trainer.default_root_dir={tmp / 'run'}",
                        f"--tracking.uri=sqlite:///{tmp}/mlflow.db", "--tracking.experiment=live-boundary",
                        "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=100000",
                        "--trainer.enable_progress_bar=false"], cwd=ROOT, check=True)
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("live-boundary").experiment_id])
        times = {m.step: m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(times) == list(range(2 * n)), sorted(times)
    # Inside each segment, leaving out its first interval (the first steps warm up).
    inside = [times[s] - times[s - 1] for s in range(2, 2 * n) if s not in (n, n + 1)]
    step = statistics.median(inside)
    boundary = times[n] - times[n - 1] - step
    print(f"step time  {step:7.2f} s   (median of {len(inside)} intervals inside the segments)")
    print(f"boundary   {boundary:7.2f} s   (step {n - 1} -> step {n}, less one step)")
    print(f"boundary / step time: {boundary / step:.1f}")


if __name__ == "__main__":
    main()
