"""What the `live` tests share: proposals in a git registry the community merges into, the
run config of a live run with probe callbacks (live_probe.py, fsdp_probe.py), and reading back
its ledger and MLflow run."""

from __future__ import annotations

import subprocess
from datetime import date
from pathlib import Path

import yaml
from conftest import write_config
from mlflow import MlflowClient

from cpm_lightning.live.ledger import read_records

TIMEOUT_S = 600


def proposal(pid: int, kind: str, changes: dict, step: int = 0, **fields) -> tuple[str, str]:
    """(file name, text) of an accepted proposal."""
    data = {"id": pid, "title": f"Proposal {pid}", "kind": kind, "status": "accepted", "authors": ["@someone"],
            "discussion": f"https://github.com/cpm-lightning/cpm-lightning/discussions/{pid}",
            "created": date(2026, 11, 1), "decided": date(2026, 11, 2), "effective_from_step": step,
            "summary": "A test.", "changes": changes, **fields}
    return f"{pid:04d}-proposal-{pid}.yaml", yaml.safe_dump(data, sort_keys=False)


def git(*args, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args], cwd=cwd,
                   check=True, capture_output=True)


def git_registry(root: Path, files: dict[str, str]) -> tuple[Path, Path]:
    """A bare upstream holding `files`, the run's clone of it (registry.path) and the clone the
    community merges through; returns (run's clone, community clone)."""
    upstream, community, run = root / "upstream.git", root / "community", root / "registry"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(upstream)], check=True)
    subprocess.run(["git", "clone", "-q", str(upstream), str(community)], check=True, capture_output=True)
    for name, text in files.items():
        (community / name).write_text(text)
    git("add", "-A", cwd=community)
    git("commit", "-qm", "seed", cwd=community)
    git("push", "-q", "origin", "HEAD:main", cwd=community)
    subprocess.run(["git", "clone", "-q", str(upstream), str(run)], check=True, capture_output=True)
    return run, community


def probe(cls: str, **init) -> dict:
    module = "fsdp_probe" if cls in ("Record", "RecordOptimizer") else "live_probe"
    return {"class_path": f"{module}.{cls}", "init_args": init}


def live_config(root: Path, corpus: dict, callbacks: list[dict], **overrides) -> Path:
    return write_config(root / "run.yaml", corpus, **{
        "trainer.default_root_dir": str(root / "run"), "trainer.val_check_interval": 1000,
        "trainer.callbacks": callbacks, "checkpoint.every_n_steps": 2, "checkpoint.keep_last": 2,
        "model.schedule.warmup_steps": 2, "data.cache_dir": str(root / "cache"),
        "tracking.uri": f"sqlite:///{root}/mlflow.db", "tracking.experiment": "live",
        "registry.allowed_sources": [f"{root}/"],  # the data proposals' sources are test files
        "live.poll_seconds": 0.2, "live.restart_backoff": 0.0, "live.spike_window": 4, **overrides})

def extra_source(root: Path) -> Path:
    path = root / "numbers.txt"
    path.write_text("\n".join(f"{i} plus {i} makes {2 * i}; {i} times {i} makes {i * i}." for i in range(800)))
    return path

def records(root: Path) -> list[dict]:
    return read_records(root / "run" / "live" / "changes.jsonl")


def one(recs: list[dict], kind: str, **match) -> dict:
    found = [r for r in recs if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (kind, match, [(r["kind"], r["step"], r["proposals"]) for r in recs])
    return found[0]


def history(root: Path, key: str) -> list:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("live").experiment_id])
    return sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
