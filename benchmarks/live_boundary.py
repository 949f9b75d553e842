"""What a boundary of `cpm-lightning live` costs, beside the step time, in one run.

A proposal that takes effect mid-run is a boundary (docs/ARCHITECTURE.md, "Live training"): a
data or training change is applied inside the running segment at its step (checkpoint, the
supervisor's answer, the change in place), an architecture change ends the segment with a
checkpoint and starts the next from it (a new process that imports Lightning, restores the
checkpoint and migrates the model). This runs the demo (configs/demo.yaml with the seed
proposals, as `make demo`) under `live` for 4N steps with three more accepted proposals:

  step N    training      weight decay 0.01 -> 0.02
  step 2N   data          the weight of the `modules` source 0.6 -> 0.5
  step 3N   architecture  ff_dim 1280 -> 1536 (grow_ff_dim)

and reads the times MLflow recorded for `train/loss` at every step:

  step time   the median interval between two steps away from the boundaries, leaving out
              the first interval of each process (the first steps warm up)
  boundary    the two intervals around it (step B-1 to step B+1), less two step times

and prints each boundary as a number of steps. The machine may be shared: the figures are
ratios measured in the one run, so both sides ran under the same load. Publishing (site,
reports) is off, so that nothing else runs beside the segments.

    .venv/bin/python benchmarks/live_boundary.py [--steps-before 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROPOSAL = """\
id: {id}
title: {title}
kind: {kind}
status: accepted
authors: ["@benchmark"]
discussion: https://github.com/cpm-lightning/cpm-lightning/discussions/{id}
created: 2026-11-30
decided: 2026-11-30
effective_from_step: {step}
summary: A boundary of live_boundary.py.
changes:
  {key}: {value}
"""
BOUNDARIES = [  # (id, kind, title, key, value); the k-th takes effect at step k * N
    (97, "training", "A little more weight decay", "model.optim.weight_decay", 0.02),
    (98, "data", "A little less of the modules' docstrings", "data.sources.modules.weight", 0.5),
    (99, "architecture", "A wider feed-forward layer", "model.arch.ff_dim", 1536),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-before", type=int, default=10, help="N: steps between two boundaries, a divisor of live.release_every_n_steps (default 10)")
    args = parser.parse_args()
    n = args.steps_before
    steps = (len(BOUNDARIES) + 1) * n
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        registry = tmp / "registry"
        registry.mkdir()
        for path in (ROOT / "proposals").glob("*.yaml"):
            shutil.copy(path, registry)
        for k, (pid, kind, title, key, value) in enumerate(BOUNDARIES, 1):
            (registry / f"{pid:04d}-boundary.yaml").write_text(
                PROPOSAL.format(id=pid, title=title, kind=kind, step=k * n, key=key, value=value))
        subprocess.run([sys.executable, "-m", "cpm_lightning.cli", "live", "--config", "configs/demo.yaml",
                        "--config", "configs/demo-live.yaml", f"--registry.path={registry}",
                        f"--trainer.max_steps={steps}", f"--checkpoint.every_n_steps={n}",
                        f"--trainer.default_root_dir={tmp / 'run'}", "--live.site_dir=null", "--live.reports=false",
                        f"--tracking.uri=sqlite:///{tmp}/mlflow.db", "--tracking.experiment=live-boundary",
                        "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=100000",
                        "--trainer.enable_progress_bar=false"], cwd=ROOT, check=True)
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("live-boundary").experiment_id])
        times = {m.step: m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, "train/loss")}
        ledger = (tmp / "run" / "live" / "changes.jsonl").read_text()
    assert sorted(times) == list(range(1, steps + 1)), sorted(times)  # step s: logged after update s
    at = [k * n for k in range(1, len(BOUNDARIES) + 1)]
    # The boundary's work follows update B, in the interval (B, B + 1) or (B - 1, B), by where
    # Lightning logs; the first interval of a new process, (B + 1, B + 2), warms up.
    near = {s for b in at for s in (b, b + 1, b + 2)}
    inside = [times[s] - times[s - 1] for s in range(3, steps + 1) if s not in near]
    step = statistics.median(inside)
    print(f"step time  {step:7.2f} s   (median of {len(inside)} intervals away from the boundaries)")
    for b, (pid, kind, *_) in zip(at, BOUNDARIES, strict=True):
        where = "in the segment" if _in_segment(ledger, pid) else "new process"
        cost = times[b + 1] - times[b - 1] - 2 * step
        print(f"{kind:<13} boundary at step {b:3d} ({where}): {cost:6.2f} s beyond a step = {cost / step:5.1f} steps")


def _in_segment(ledger: str, pid: int) -> bool:
    """Whether the ledger's `applied` record of proposal `pid` says the segment applied it in place."""
    return any(r["kind"] == "applied" and r["proposals"] == [pid] and r.get("in_segment")
               for r in map(json.loads, ledger.splitlines()))


if __name__ == "__main__":
    main()
