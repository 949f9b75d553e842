"""The change ledger (docs/ARCHITECTURE.md, "Live training"): every change to a live run is one
JSON line of <root>/live/changes.jsonl, appended by the supervisor and never rewritten. Each
checkpoint carries the lines written before it (checkpoint["cpm"]["changes"]), and the MLflow
run has the file as its artifact `changes.jsonl`, uploaded again after every append (MLflow
artifacts cannot be appended to; each upload holds every earlier line unchanged).

A line: {"time": UTC ISO 8601, "step": int, "kind": one of KINDS, "proposals": [ids],
"changes": {key: {"old": value, "new": value}}, "reason": text, ...} with more fields by kind
(supervisor.py says which).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

KINDS = ("start", "applied", "deferred", "rejected", "suspended", "rollback", "crash", "restart", "unfollowed",
         "followed", "stop")


def read_records(path: Path) -> list[dict]:
    """The ledger's lines; a last line that a kill cut short (no newline) is not one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


class Ledger:
    """Appends to the ledger file; one writer (the supervisor)."""

    def __init__(self, path: Path, echo=lambda line: print(line, flush=True)):
        self.path = path
        self.echo = echo
        self.records = read_records(path)
        self.uploader: Uploader | None = None
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            # A line cut short by a kill of the last writer: it was never a record.
            text = path.read_bytes()
            path.write_bytes(text[: text.rfind(b"\n") + 1])

    def append(self, kind: str, step: int, reason: str, proposals=(), changes: dict | None = None, **fields) -> dict:
        assert kind in KINDS, kind
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
                  "step": step, "kind": kind, "proposals": sorted(proposals), "changes": changes or {},
                  "reason": reason, **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        self.echo(f"live: {json.dumps(record)}")
        if self.uploader is not None:
            self.uploader.changed()
        return record


class Uploader:
    """Copies the ledger to the MLflow run as `changes.jsonl` from a background thread, after
    every change, retrying while the tracking store is unreachable (training does not wait)."""

    def __init__(self, path: Path, tracking_uri: str):
        self.path, self.uri = path, tracking_uri
        self.run_id: str | None = None
        self._dirty = False
        self._closed = False
        self._cond = threading.Condition()
        self._warned = False
        threading.Thread(target=self._loop, name="cpm-live-ledger-upload", daemon=True).start()

    def set_run(self, run_id: str | None) -> None:
        with self._cond:
            if run_id and run_id != self.run_id:
                self.run_id, self._dirty = run_id, True
                self._cond.notify_all()

    def changed(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def close(self, timeout: float) -> None:
        """Wait up to `timeout` s for the last upload."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._dirty and self.run_id and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(deadline - time.monotonic(), 0.01)))
            self._closed = True
            self._cond.notify_all()

    def _loop(self) -> None:
        client = None
        while True:
            with self._cond:
                while not self._closed and not (self._dirty and self.run_id):
                    self._cond.wait()
                if self._closed:
                    return
                self._dirty, run_id = False, self.run_id
            try:
                if client is None:
                    from mlflow import MlflowClient  # seconds to import: here, off the supervisor's path

                    client = MlflowClient(self.uri)
                with tempfile.TemporaryDirectory() as tmp:
                    text = self.path.read_text()
                    copy = Path(tmp) / "changes.jsonl"
                    copy.write_text(text[: text.rfind("\n") + 1])
                    client.log_artifact(run_id, str(copy))
                self._warned = False
            except Exception as e:  # the store is down, or refuses: try again later
                if not self._warned:
                    print(f"warning: could not copy the change ledger to MLflow run {run_id} "
                          f"({str(e).splitlines()[0][:200]}); retrying", file=sys.stderr, flush=True)
                    self._warned = True
                with self._cond:
                    self._dirty = True
                    self._cond.wait(10.0)
            with self._cond:
                self._cond.notify_all()


@dataclass
class RunState:
    """What the ledger says about a run, folded record by record: the supervisor's memory
    across restarts of `live`, and what `live status` prints."""

    since: dict[int, int] = field(default_factory=dict)
    """Proposal -> the step it took effect at in this run (again there after a rollback before it)."""
    in_effect: list[int] = field(default_factory=list)
    """The proposals of the last segment that trained."""
    versions: dict[int, str] = field(default_factory=dict)
    """sha256 of each proposal applied."""
    suspended: set[int] = field(default_factory=set)
    refused: set[tuple[int, str]] = field(default_factory=set)
    """(id, sha256) of the proposal versions deferred or rejected."""
    deferred: set[int] = field(default_factory=set)
    skip: list[list[int]] = field(default_factory=list)
    """[start, end) global sample indices skipped after rollbacks."""
    rollbacks: list[dict] = field(default_factory=list)
    """The divergences rolled back from."""
    resumes: collections.Counter = field(default_factory=collections.Counter)
    """Checkpoint step -> how many restarts, rollbacks and suspensions resumed from it."""
    loss_at: dict[int, float | None] = field(default_factory=dict)
    """The last loss before each change of the proposals in effect, by its step."""
    incident: dict | None = None
    """The last crash, rollback, suspension or registry no longer followed."""
    unfollowed: dict | None = None
    """The `unfollowed` record of a registry whose upstream the run cannot follow now; None while it does."""
    start: dict | None = None
    """The first start record."""

    def fold(self, r: dict) -> None:
        kind, step = r["kind"], r["step"]
        ids = lambda d: {int(k): v for k, v in (d or {}).items()}  # noqa: E731  JSON keys are strings
        if kind in ("start", "applied"):
            self.start = self.start or r
            self.in_effect = r["in_effect"]
            self.versions.update(ids(r.get("sha256")))
            for i, s in ids(r.get("since")).items():
                self.since.setdefault(i, s)
            for i in r["proposals"]:
                self.since.setdefault(i, step)
            self.loss_at[step] = r.get("loss")
        elif kind in ("deferred", "rejected"):
            self.refused |= set(ids(r.get("sha256")).items())
            if kind == "deferred":
                self.deferred |= set(r["proposals"])
        elif kind == "suspended":
            self.suspended |= set(r["proposals"])
        elif kind == "rollback":
            self.skip.append(r["skipped_samples"])
            self.rollbacks.append(r["divergence"])
        elif kind in ("unfollowed", "followed"):
            self.unfollowed = r if kind == "unfollowed" else None
        if kind in ("crash", "rollback", "suspended", "unfollowed"):
            self.incident = r
        if "resume_step" in r:
            self.resumes[r["resume_step"]] += 1
