"""The run config's `tracking` group: where a run's metrics, config and provenance go."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cpm_lightning.core.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
START_STEP = "cpm/start_step"
"""Metric logged at every start of `fit`: its value is the optimizer step training starts from
(0 for a new run), so restarts can be counted and replayed steps recognized (the reports, which
import this module and not Lightning's logger, read it)."""


@dataclass(kw_only=True)
class TrackingConfig:
    """Where the run's metrics, config and provenance go (MLflow)."""

    uri: str | None = None
    """MLflow tracking URI; unset: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    experiment: str | None = None
    """MLflow experiment; unset: $MLFLOW_EXPERIMENT_NAME, else cpm-lightning."""
    run_name: str | None = None
    """MLflow run name; unset: the experiment and the UTC start time, e.g. demo-20261201-045950."""
    run_id: str | None = None
    """An existing MLflow run to log to, made beforehand (`proposals trial` makes one per arm,
    under its own run); unset: the run of the checkpoint `fit` resumes, else a new run."""
    flush_timeout: float = 600.0
    """Seconds the end of training waits for an unreachable tracking server; what is still unsent
    stays in <trainer.default_root_dir>/mlflow-journal-RUN.jsonl, and resuming the run sends it."""

    @property
    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI

    @property
    def resolved_experiment(self) -> str:
        return self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "cpm-lightning"


def without_credentials(uri: str) -> str:
    """`uri` without the user and password of its network location (http://user:pass@host ->
    http://host), as messages show it: their lines end up in logs."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def check_reachable(uri: str) -> None:
    """A UserError unless the tracking store at `uri` can be used; quick, no retries."""
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
        except requests.RequestException as e:
            raise UserError(f"tracking server {without_credentials(uri)} is unreachable ({type(e).__name__}); start it or point "
                            "tracking.uri / $MLFLOW_TRACKING_URI at a running one") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri.removeprefix("sqlite:///")).parent
        if not parent.is_dir():
            raise UserError(f"tracking.uri {uri}: directory {parent} does not exist")
