"""Proposal trials in MLflow (docs/ARCHITECTURE.md, "Trials"): the tags that mark a trial's own
run and its arms' runs, and finding trials again (`proposals show`, the weekly digest).

A trial (`cpm-lightning proposals trial`, trial.py) is one MLflow run with a child run per arm
and seed. Its run holds the comparison as the artifacts TABLE and RESULTS and the verdict as a
tag; its status is FINISHED only once every arm has trained.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

PROPOSAL_TAG = "cpm.trial.proposal"
"""On a trial's run and on each arm's: the proposal tried, NNNN."""
ROLE_TAG = "cpm.trial.role"
"""`trial` on the trial's own run; `baseline` or `proposal` on an arm's."""
SEED_TAG = "cpm.trial.seed"
"""On an arm's run: the seed, 0 to K-1 (both arms of a seed share it)."""
VERDICT_TAG = "cpm.trial.verdict"
"""On a finished trial's run: the one-line verdict, as `--write` adds it to the proposal's evidence."""
TABLE, RESULTS = "trial.md", "trial.json"
"""Artifacts of a trial's run: the comparison as Markdown, and its numbers."""


def is_trial(run: Run) -> bool:
    """Whether `run` is a trial's run or one of its arms (the daily and weekly logs of the run
    being trained leave them out)."""
    return PROPOSAL_TAG in run.data.tags


def trial_runs(client: MlflowClient, proposal: str | None = None) -> list[Run]:
    """The runs of trials, of every experiment (of proposal NNNN if given), newest first."""
    query = f"tags.`{ROLE_TAG}` = 'trial'" + (f" and tags.`{PROPOSAL_TAG}` = '{proposal}'" if proposal else "")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, query, order_by=["attributes.start_time DESC"]) if experiments else []


def trial_table(client: MlflowClient, run: Run) -> str | None:
    """The Markdown comparison of a finished trial, None when its run has none (it failed)."""
    if run.info.status != "FINISHED":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(client.download_artifacts(run.info.run_id, TABLE, tmp)).read_text()
        except Exception:  # MLflow raises several kinds for a missing artifact
            return None
