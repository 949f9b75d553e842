"""A `release` killed while it uploaded leaves its MLflow run RUNNING: the next release of the
experiment marks it FAILED (tracking/make_release.py `fail_abandoned`), and only it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from mlflow import MlflowClient

from cpm_lightning.tracking.make_release import PROCESS_TAG, fail_abandoned


def test_a_release_run_whose_process_is_gone_is_marked_failed(tmp_path, capsys):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("releases")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    runs = {name: client.create_run(experiment, run_name=name, tags={PROCESS_TAG: process}).info.run_id
            for name, process in (("killed", f"{host}:{gone.stdout.strip()}"), ("running", f"{host}:{os.getpid()}"),
                                  ("elsewhere", f"another-{host}:1"))}
    runs["training"] = client.create_run(experiment, run_name="training").info.run_id
    fail_abandoned(client, experiment)
    assert {name: client.get_run(i).info.status for name, i in runs.items()} == {
        "killed": "FAILED", "running": "RUNNING", "elsewhere": "RUNNING", "training": "RUNNING"}
    assert (f"release: MLflow run {runs['killed']} (killed) was left running by a release that was killed "
            f"(pid {gone.stdout.strip()}); marked FAILED") in capsys.readouterr().err.splitlines()
