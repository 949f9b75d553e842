"""A rebuild of the public site (`report site`) of a long run, reading every metric's whole
history (no series cache: what every rebuild did before issue 22) against reading from where the
previous build's cache ends (docs/benchmarks.md).

    .venv/bin/python benchmarks/site_rebuild.py [--points 1000000] [--new-steps 600]

The run is written into a sqlite MLflow store directly (the `metrics` table; logging a million
points through the client would take longer than the benchmark): `--points` spread over the
four charted training metrics, one per step, as `fit` logs them. The site is built without a
cache ("before": it reads every history and writes the cache), `--new-steps` more steps are
logged (600: ten minutes at a step a second, live.site_every_minutes' default), and it is built
from the cache ("after"), twice: the first rebuild after a full read reads its last page again
(up to 25,000 rows a metric), the next ones only what the previous rebuild read last.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from cpm_lightning.tracking.site import SERIES_CACHE, build_site

KEYS = ("train/loss", "train/tokens_seen", "train/tokens_per_sec", "train/grad_norm")
T0 = 1_800_000_000_000  # ms


def value(key: str, step: int) -> float:
    return {"train/loss": 10.0 / (1 + step) ** 0.1, "train/tokens_seen": 4096.0 * step,
            "train/tokens_per_sec": 2000.0 + step % 7, "train/grad_norm": 1.0 + step % 5 / 10}[key]


def insert(db: Path, run_id: str, steps: range) -> None:
    with sqlite3.connect(db) as con:
        con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, 0)",
                        ((k, value(k, s), T0 + 1000 * s, run_id, s) for s in steps for k in KEYS))


def timed(build) -> float:
    start = time.perf_counter()
    build()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--new-steps", type=int, default=600)
    args = parser.parse_args()
    steps = args.points // len(KEYS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("bench"), run_name="long").info.run_id
        insert(root / "mlflow.db", run_id, range(steps - 1))
        # The last step through the client: the run's latest metrics name the charted keys.
        client.log_batch(run_id, metrics=[Metric(k, value(k, steps - 1), T0 + 1000 * (steps - 1), steps - 1)
                                          for k in KEYS])
        (root / "registry").mkdir()
        out = root / "site"
        build = lambda: build_site("bench", root / "registry", out, [uri])  # noqa: E731
        before = timed(build)  # no cache yet: every history read in full, as every build did before
        cache = out.with_name(f"{out.name}.builds") / SERIES_CACHE
        after = []
        for start in (steps, steps + args.new_steps):
            # The new steps, as the logger sends them: batches of at most 1000 metrics.
            new = [Metric(k, value(k, s), T0 + 1000 * s, s) for s in range(start, start + args.new_steps) for k in KEYS]
            for i in range(0, len(new), 1000):
                client.log_batch(run_id, metrics=new[i:i + 1000])
            after.append(timed(build))
        print(f"{steps * len(KEYS):,} points ({steps:,} steps x {len(KEYS)} metrics), then {len(new):,} new before "
              f"each rebuild; cache {cache.stat().st_size / 2**20:.0f} MiB")
        print(f"build reading every history: {before:.1f} s; rebuilds from the cache: {after[0]:.1f} s "
              f"(after the full read), {after[1]:.1f} s (the next); ratio {before / after[0]:.1f}x, "
              f"{before / after[1]:.1f}x")
        mlflow.set_tracking_uri(None)


if __name__ == "__main__":
    main()
