"""The MLflow logger of `fit`: asynchronous, rank 0 only, resumable, and tolerant of a tracking
server that goes away in the middle of a run (docs/ARCHITECTURE.md, "MLflow").

Lightning's MLFlowLogger sends each step's metrics from the training loop (MLflow's own async
queue gives up on a failed batch); here a background thread sends them, keeps what fails queued
and retries. Everything to be sent is first appended to a local journal, which also records what
the store acknowledged: the next start of the same run sends what a crash, a SIGKILL or an
unreachable store left unsent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from cpm_lightning.checkpoint.meta import write
from cpm_lightning.core.errors import UserError
from cpm_lightning.tracking.config import START_STEP

PARAM_CHARS = 500  # the longest param value every MLflow server since 1.28 accepts
# MLflow's per-request limits of log_batch.
BATCH_ITEMS, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100
DEFAULT_INTERVAL_S = 5.0
INTERVAL_ENV = "CPM_LIGHTNING_MLFLOW_INTERVAL"
"""Environment variable: seconds between the sender's requests, default DEFAULT_INTERVAL_S."""


SENDER_THREAD = "cpm-mlflow-sender"


MONITOR = ("SystemMetricsMonitor", "mlflow.system_metrics.system_metrics_monitor")
"""MLflow's system metrics thread and the logger of its requests to the store (its GPU readings log elsewhere)."""


class _QuietSender(logging.Filter):
    """Drops MLflow's and urllib3's own lines about each failed request to the store, and its
    retries, made by the sender's thread or by MLflow's system metrics thread (some with the
    server's traceback; 18 in a 15 s outage). The sender says once that the store is unreachable
    and once that it is back."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != SENDER_THREAD and (record.threadName, record.name) != MONITOR


def _quiet_sender_logs() -> None:
    """Add _QuietSender to the handlers MLflow's and urllib3's lines reach (MLflow's own, the root's)."""
    for name in ("mlflow", "urllib3", ""):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _QuietSender) for f in handler.filters):
                handler.addFilter(_QuietSender())


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def send_interval() -> float:
    """$CPM_LIGHTNING_MLFLOW_INTERVAL, else DEFAULT_INTERVAL_S (read here only)."""
    value = os.environ.get(INTERVAL_ENV)
    if value is None:
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UserError(f"${INTERVAL_ENV}={value!r}: expected a number of seconds, 0 or more")
    return seconds


def _is_rejected(e: Exception) -> bool:
    """True when the store refused the data itself (4xx): retrying cannot help."""
    return isinstance(e, MlflowException) and 400 <= e.get_http_status_code() < 500


class Sender:
    """Sends metrics, params and tags of one run from a background thread, in order, at most one
    request per `interval` seconds. While the store fails, everything stays queued and is
    retried every `retry_s` seconds.

    `journal` is a write-ahead log of the queue: every item is appended to it before it is
    queued, and every answered request appends how many items it settled. A new Sender on the
    same journal (the next start of the run, after a clean stop, a crash or a SIGKILL) sends first
    what no answer settled."""

    def __init__(self, client, run_id: str, journal: Path, retry_s: float = 2.0, interval: float = DEFAULT_INTERVAL_S):
        # One request costs ~10 ms of CPU (MLflow's SQL layer). On a CPU trainer that uses every
        # core, that is step time: a request per step cost 2.5% of a demo step, one per 5 s
        # costs a fraction of that. The live view does not need fresher numbers.
        self._client, self._run_id, self._journal = client, run_id, journal
        self._retry_s, self._interval = retry_s, interval
        self._pending: list[Metric | Param | RunTag] = unsent(journal) if journal.exists() else []
        self._settled = 0  # items at the head of the journal file that are no longer queued
        self._file = None  # the journal, open for appending
        self._cond = threading.Condition()
        self._closed = False
        self._closing = False  # close() waits: send without waiting for the interval
        self._failing = False
        if self._pending:
            print(f"sending {len(self._pending)} metrics/params/tags left unsent by the last start, from {journal}",
                  file=sys.stderr)
        journal.parent.mkdir(parents=True, exist_ok=True)
        self._rewrite_journal()
        _quiet_sender_logs()
        threading.Thread(target=self._loop, name=SENDER_THREAD, daemon=True).start()

    def put(self, items: list[Metric | Param | RunTag]) -> None:
        with self._cond:
            # In the OS's hands before put() returns, so a SIGKILL loses nothing that was logged:
            # one write() per step, no open() (a metadata request on a network file system). The
            # fsync against a crash of the machine is the sender thread's, before each request.
            self._file.write("".join(map(_line, items)))
            self._file.flush()
            self._pending.extend(items)
            self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Wait up to `timeout` s for everything to be sent; what is not stays in the journal for
        the next start. True when all was sent."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._pending and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(deadline - time.monotonic(), 0.01)))
            self._closed = True
            left = len(self._pending)
            self._file.close()
            if not left:
                self._journal.unlink(missing_ok=True)
            self._cond.notify_all()
        if left:
            warn(f"the tracking store stayed unreachable: {left} metrics/params/tags are kept in {self._journal}; "
                 "the next `fit --ckpt_path` of this run sends them")
        return not left

    def _take(self) -> list:
        """The longest prefix of the queue that fits in one log_batch request."""
        counts = {Metric: 0, Param: 0, RunTag: 0}
        limits = {Metric: BATCH_ITEMS, Param: BATCH_PARAMS, RunTag: BATCH_TAGS}
        n = 0
        for item in self._pending[:BATCH_ITEMS]:
            counts[type(item)] += 1
            if counts[type(item)] > limits[type(item)]:
                break
            n += 1
        return self._pending[:n]

    def _settle(self, n: int) -> None:
        """The store answered the first `n` queued items: off the queue and, in the journal, settled.

        Exactly once: a replay sends only what no answer settled. A kill after the store took a
        batch and before its `sent` line reached the journal leaves that one batch to be sent
        again, which is harmless: each metric keeps the timestamp it was logged with, and MLflow's
        SQL store (every `sqlite:` URI and `mlflow server` on a database) keys metrics by (key,
        timestamp, step, value) and skips rows it already has (SqlAlchemyStore._log_metrics); a
        param with the same value and a tag set again change nothing. Filtering the replay against
        the run's metric history instead would read every key's whole history at each resume for
        that one batch. (MLflow's file store, which MLflow 3 refuses unless
        $MLFLOW_ALLOW_FILE_STORE is set, would show that batch twice.)"""
        del self._pending[:n]
        self._settled += n
        if self._settled >= len(self._pending):  # a rewrite costs no more than what was settled since the last
            self._rewrite_journal()
        else:
            self._file.write(json.dumps({"sent": n}) + "\n")
            self._file.flush()

    def _rewrite_journal(self) -> None:
        """The journal becomes the queue: a new file renamed over the old, so that a kill leaves
        one or the other."""
        tmp = self._journal.with_name(self._journal.name + ".tmp")
        tmp.write_text("".join(map(_line, self._pending)))
        os.replace(tmp, self._journal)
        if self._file is not None:
            self._file.close()
        self._file = self._journal.open("a")
        self._settled = 0

    def _loop(self) -> None:
        sent = -float("inf")  # time.monotonic() of the last request the store answered
        while True:
            with self._cond:
                while not self._closed:
                    wait = sent + self._interval - time.monotonic()
                    if self._pending and (wait <= 0 or self._closing or len(self._pending) >= BATCH_ITEMS):
                        break
                    self._cond.wait(wait if self._pending else None)
                if self._closed:
                    return
                batch = self._take()
            _fsync(self._journal)  # what this request carries, and all before it, survives a crash of the machine
            try:
                self._client.log_batch(self._run_id, metrics=[m for m in batch if isinstance(m, Metric)],
                                       params=[p for p in batch if isinstance(p, Param)],
                                       tags=[t for t in batch if isinstance(t, RunTag)])
            except Exception as e:
                if not _is_rejected(e):
                    if not self._failing:
                        warn(f"tracking store unreachable ({str(e).splitlines()[0][:200]}); training goes on, "
                             "metrics are kept and sent when it is back")
                    self._failing = True
                    time.sleep(self._retry_s)
                    continue
                warn(f"the tracking store refused {len(batch)} metrics/params/tags: {str(e).splitlines()[0][:200]}")
            sent = time.monotonic()  # not after a failure: that retries every retry_s instead
            if self._failing:  # before the batch is settled: a close() waiting for it returns after this line
                print("the tracking store is back; queued metrics sent", file=sys.stderr, flush=True)
                self._failing = False
            with self._cond:
                if self._closed:  # the journal is closed: replay sends the batch again (see _settle)
                    return
                self._settle(len(batch))
                self._cond.notify_all()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _line(item: Metric | Param | RunTag) -> str:
    if isinstance(item, Metric):
        d = {"metric": item.key, "value": item.value, "timestamp": item.timestamp, "step": item.step}
    else:
        d = {"param" if isinstance(item, Param) else "tag": item.key, "value": item.value}
    return json.dumps(d) + "\n"


def unsent(journal: Path) -> list[Metric | Param | RunTag]:
    """The items of a Sender's `journal` that no answer of the store settled, in order."""
    items, settled = [], 0
    # A line that a kill cut short has no newline: its put() never returned, it was never logged.
    for line in journal.read_text().split("\n")[:-1]:
        d = json.loads(line)
        if "sent" in d:
            settled += d["sent"]
        elif "metric" in d:
            items.append(Metric(d["metric"], d["value"], d["timestamp"], d["step"]))
        else:
            items.append((Param if "param" in d else RunTag)(d.get("param", d.get("tag")), d["value"]))
    return items[settled:]


def journal_path(root: Path, run_id: str) -> Path:
    """The Sender's journal of MLflow run `run_id` under trainer.default_root_dir `root`."""
    return root / f"mlflow-journal-{run_id}.jsonl"


class CPMLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with sending moved off the training loop (see the module
    docstring), MLflow system metrics, and continuation of an existing run (`run_id`)."""

    def __init__(self, *, tracking_uri: str, experiment_name: str, run_name: str | None, run_id: str | None,
                 fallback_dir: Path, flush_timeout: float, logged_through: int = -1):
        """logged_through: metrics of steps up to this one are dropped, because an earlier start
        of the run logged them (a `live` restart re-trains the steps after its checkpoint); the
        START_STEP marker is kept."""
        # Unnamed, MLflow would draw a name from Python's `random`, which seed_everything has
        # seeded: every run of a seed would have the same name. The start time tells runs apart.
        run_name = run_name or f"{experiment_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                         run_id=run_id, synchronous=True)
        self._fallback_dir, self._flush_timeout = fallback_dir, flush_timeout
        self._interval = send_interval()
        self._logged_through = logged_through
        self.trainer = None  # set by TrackRun: the step every metric is recorded at
        self.resumed = run_id is not None
        self._sender: Sender | None = None
        self._monitor = None
        self._finalized = False

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._sender is not None:
            return self._mlflow_client
        if self._run_id is not None:
            try:
                self._mlflow_client.get_run(self._run_id)
            except MlflowException:
                warn(f"the checkpoint's MLflow run {self._run_id} is not in {self._tracking_uri}; "
                     "logging to a new run")
                self._run_id, self.resumed = None, False
        client = super().experiment
        if self.resumed:
            client.update_run(self._run_id, status="RUNNING")
        self._sender = Sender(client, self._run_id, journal_path(self._fallback_dir, self._run_id), interval=self._interval)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self._run_id, resume_logging=self.resumed, tracking_uri=self._tracking_uri)
        self._monitor.start()
        return client

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        """Records the metrics at the trainer's global step: the optimizer steps done, the step of
        the checkpoint, release and evaluation made then. Lightning passes its own count, one less
        after each step: the loss of step 80 and the validation after it would show at 79."""
        _ = self.experiment
        timestamp = int(time.time() * 1000)
        step = self.trainer.global_step if self.trainer is not None else step or 0
        self._sender.put([Metric(k, float(v), timestamp, step) for k, v in metrics.items()
                          if step > self._logged_through or k == START_STEP])

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        params = {k: str(v)[:PARAM_CHARS] for k, v in _flatten_dict(_convert_params(params)).items()}
        # MLflow params cannot change: a resumed run keeps the first values, and a value changed
        # since (a migrated shape, a new learning rate) is the run's tag of the same name, set
        # again at every start that has one (back to the param's value when it changed back).
        client = self.experiment
        data = client.get_run(self.run_id).data if self.resumed else None
        logged, tagged = (data.params, data.tags) if data else ({}, {})
        now = {k: v for k, v in params.items() if k in logged and (logged[k] != v or k in tagged)}
        changed = sorted(k for k, v in now.items() if logged[k] != v)
        if changed:
            warn(f"MLflow params keep their first value; changed since: {', '.join(changed)} "
                 "(the run's tags of the same names have the values now)")
        self._sender.put([Param(k, v) for k, v in params.items() if k not in logged]
                         + [RunTag(k, v) for k, v in now.items()])

    @rank_zero_only
    def set_tags(self, tags: dict[str, object]) -> None:
        _ = self.experiment
        self._sender.put([RunTag(k, str(v)) for k, v in tags.items()])

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._sender is None or self._finalized:
            return
        self._finalized = True
        self._monitor.finish()
        if self._sender.close(self._flush_timeout):
            try:
                self._mlflow_client.set_terminated(self._run_id, "FINISHED" if status in ("success", "finished") else "FAILED")
            except MlflowException as e:
                warn(f"could not mark MLflow run {self._run_id} as ended: {str(e).splitlines()[0][:200]}")


def _git_commit() -> dict[str, str]:
    """The git commit of the package's checkout, and whether it has uncommitted changes."""
    here = str(Path(__file__).parent)
    head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode:
        return {}
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return {"mlflow.source.git.commit": head.stdout.strip(), "cpm.git_dirty": str(bool(dirty)).lower()}


class TrackRun(L.Callback):
    """Run tags (git commit, preset, world size, planned tokens, bytes per token), the precision
    param, the start marker of every `fit`, and the run id in every checkpoint so a resumed job continues the run."""

    def __init__(self, logger: CPMLogger):
        self.logger = logger
        self.run_id: str | None = None
        self._tagged_batch = False

    def setup(self, trainer, pl_module, stage):
        self.logger.trainer = trainer

    def on_train_start(self, trainer, pl_module):
        self.run_id = trainer.strategy.broadcast(self.logger.run_id if trainer.is_global_zero else None, src=0)
        arch = getattr(pl_module, "arch", None)
        self.logger.set_tags({**_git_commit(), "cpm.world_size": trainer.world_size,
                              **({"cpm.preset": arch.preset} if arch is not None else {})})
        self.logger.log_metrics({START_STEP: trainer.global_step})
        # What it trains in, `trainer.precision: auto` resolved (core/perf.py).
        self.logger.log_hyperparams({"trainer.precision": trainer.precision})
        self._tagged_batch = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._tagged_batch or not trainer.is_global_zero:
            return
        self._tagged_batch = True
        ids = batch["input_ids"]
        tokens_per_step = ids.numel() * trainer.world_size * trainer.accumulate_grad_batches
        tags = {"cpm.tokens_per_step": tokens_per_step}
        if trainer.max_steps > 0:
            tags["cpm.planned_tokens"] = tokens_per_step * trainer.max_steps
        tokenizer = getattr(trainer.datamodule, "text_tokenizer", None)
        if tokenizer is not None:  # for "GB of text" in the daily log
            # Ids from vocab_size on are task prompt positions (datamodules/tasks.py), not text.
            text = "".join(tokenizer.decode([i for i in row if i < tokenizer.vocab_size]) for row in ids.tolist())
            tags["cpm.bytes_per_token"] = f"{len(text.encode()) / ids.numel():.4f}"
        self.logger.set_tags(tags)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.run_id is not None:
            write(checkpoint, mlflow_run_id=self.run_id)
