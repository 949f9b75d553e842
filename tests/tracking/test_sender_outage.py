"""An outage of the tracking store under `fit` (tracking/logger.py `Sender`): one line when it
starts and one when it is over, not MLflow's own lines about every failed request and retry."""

from __future__ import annotations

import logging
import threading

import mlflow  # noqa: F401  configures MLflow's loggers and their handler, as in `fit`
from mlflow.entities import Metric

from cpm_lightning.tracking.logger import Sender

HANG_GUARD_S = 600


class OutageClient:
    """log_batch fails `failures` times, each time logging as MLflow's REST layer and urllib3 do."""

    def __init__(self, failures: int):
        self.failures, self.sent = failures, threading.Event()

    def log_batch(self, run_id, metrics, params, tags):
        if self.failures:
            self.failures -= 1
            logging.getLogger("urllib3.connectionpool").warning("Retrying (Retry(total=6)) after connection broken")
            logging.getLogger("mlflow.utils.rest_utils").warning(
                "Response is not a valid JSON object: Traceback (most recent call last):\n  File ...\nOperationalError")
            raise ConnectionError("connection refused")
        self.sent.set()


def test_an_outage_is_two_lines_on_stderr(tmp_path, capfd):
    client = OutageClient(failures=5)
    sender = Sender(client, "run", tmp_path / "journal.jsonl", retry_s=0.01, interval=0)
    sender.put([Metric("train/loss", 2.5, 1000, 1)])
    assert client.sent.wait(HANG_GUARD_S) and sender.close(timeout=HANG_GUARD_S)
    monitor = threading.Thread(name="SystemMetricsMonitor", target=lambda: logging.getLogger(
        "mlflow.system_metrics.system_metrics_monitor").warning("Failed to get mlflow run: API request failed"))
    monitor.start()
    monitor.join()
    logging.getLogger("mlflow.tracking").warning("a line of another thread")  # still shown
    err = capfd.readouterr().err.splitlines()
    assert err[:2] == ["warning: tracking store unreachable (connection refused); training goes on, metrics are kept "
                       "and sent when it is back", "the tracking store is back; queued metrics sent"]
    assert len(err) == 3 and err[2].endswith("a line of another thread")
