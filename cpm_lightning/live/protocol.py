"""The files through which the `live` supervisor and the `fit` segments it starts talk, all in
<trainer.default_root_dir>/live (on a file system every rank sees, like the checkpoints):

  changes.jsonl        the change ledger (ledger.py); written by the supervisor only
  plan.json            what the next segment needs to know (Plan); written before it starts
  control.json         supervisor -> running segment: the next step at which the proposals in
                       effect change, what the segment does there (Boundary), a request to
                       stop now, and a heartbeat (Control)
  status.json          running segment -> supervisor, rewritten by rank 0 after every step
                       (Status): where it is, and why it ended
  registry/<hash>/     the registry as a segment applies it (watch.py)
  supervisor.lock, segment.lock   one supervisor per run; the segment that runs

Every JSON file is replaced in one rename, so a reader sees the old or the new content.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

SEGMENT_ENV = "CPM_LIGHTNING_LIVE_SEGMENT"
"""Set by `live` for the `fit` processes of a segment: the path of its plan.json."""
ORPHAN_AFTER_S = 60.0
"""A segment that has seen no heartbeat of its supervisor for this long stops with a checkpoint."""


@dataclass
class Plan:
    """What a segment is told before it starts."""

    root: str
    """trainer.default_root_dir of the run."""
    segment: int
    """Number of the segment in this run, echoed in its status."""
    skip: list[list[int]] = field(default_factory=list)
    """[start, end) global sample indices skipped after rollbacks."""
    keep_steps: list[int] = field(default_factory=list)
    """Checkpoint steps a later rollback may return to, kept beyond checkpoint.keep_last."""
    logged_through: int = -1
    """The highest step whose metrics an earlier segment logged: not logged again."""
    run_id: str | None = None
    """The run's MLflow run, when no checkpoint names it yet (a crash before the first one)."""


@dataclass
class Boundary:
    """The supervisor's answer to a segment that reached a boundary (Status.state `boundary`):
    apply the change there and go on, or stop (a new process starts from the checkpoint)."""

    step: int
    """The boundary's step (the segment's Status.step): an answer for another step is stale."""
    apply: bool = False
    """Apply the change inside the segment (data and training changes only, policy.restart_reason);
    false: stop, the checkpoint of `step` is written already."""
    registry: str | None = None
    """The registry snapshot to resolve at `step` (watch.py), as a new segment's --registry.path."""
    exclude: list[int] = field(default_factory=list)
    """Its registry.exclude: the accepted proposals not in effect at `step`."""
    keep_steps: list[int] = field(default_factory=list)
    """Checkpoint steps kept beyond checkpoint.keep_last from now on (as Plan.keep_steps)."""


@dataclass
class Control:
    """Supervisor -> running segment."""

    stop_at: int | None = None
    """The step from which the proposals in effect change: the segment writes a checkpoint
    there and asks what to do (Status.state `boundary`, answered by `boundary`); a step it has
    passed already means its next checkpoint step."""
    boundary: Boundary | None = None
    """The answer at the boundary the segment waits at."""
    stop_now: bool = False
    """Stop at the end of the current step with a checkpoint (a new supervisor takes over)."""
    beat: int = 0
    """Counts up while the supervisor lives."""

    def __post_init__(self):
        if isinstance(self.boundary, dict):  # read back from JSON
            self.boundary = Boundary(**self.boundary)


@dataclass
class Status:
    """Running segment -> supervisor (rank 0 writes it)."""

    segment: int
    state: str = "running"
    """running, then: finished (trainer.max_steps), boundary (at a change of proposals, its
    checkpoint written: waiting for the supervisor's Boundary, then stopped if told so),
    diverged (stopped without saving), stopped (a signal), orphaned (the supervisor is gone)."""
    start_step: int = 0
    """The step this segment started from."""
    leg: int = 0
    """Boundaries applied inside this segment so far."""
    leg_step: int = 0
    """The step of the last of them (`start_step` before the first): the config of `resolved`
    is in effect from there."""
    step: int = 0
    """Optimizer steps done; the metrics of steps up to it are logged."""
    loss: float | None = None
    """The last step's loss (the mean over ranks)."""
    tokens: int = 0
    """Training tokens seen by the run, all ranks."""
    run_id: str | None = None
    precision: str | None = None
    """The trainer.precision it trains in (`auto` resolved: core/perf.py)."""
    resolved: dict = field(default_factory=dict)
    """The segment's config: every key of the `model` and `data` groups, dotted, and its value."""
    checkpoints: dict[str, int] = field(default_factory=dict)
    """Step -> global sample index (the mixture's position) of the checkpoint this segment
    started from and of those it wrote."""
    migrations: list[dict] = field(default_factory=list)
    """The migrations its model went through as it loaded its checkpoint (model/migrate.Step.as_dict)."""
    divergence: dict | None = None
    """When it diverged: step, loss, the window's mean and std, non-finite steps in a row, and
    the sample index after the step (end of the window to skip)."""


class LiveDir:
    """Paths of <root>/live."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / "live"
        self.ledger = self.path / "changes.jsonl"
        self.plan = self.path / "plan.json"
        self.control = self.path / "control.json"
        self.status = self.path / "status.json"
        self.registry = self.path / "registry"
        self.supervisor_lock = self.path / "supervisor.lock"
        self.segment_lock = self.path / "segment.lock"
        self.checkpoints = self.root / "checkpoints"
        self.publish = self.path / "publish"
        """The checkpoints pinned for nightly releases (checkpoint/directory.py pin), and the publisher's files."""


def write_json(path: Path, value) -> None:
    """Replace `path` by the JSON of `value` (a dataclass or plain data) in one rename."""
    data = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path, cls):
    """The `cls` dataclass stored at `path`, or None when there is none."""
    try:
        return cls(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def lock(path: Path, wait: bool) -> int | None:
    """An exclusive lock on `path` (flock: released when the process ends, however it ends): the
    open file descriptor, or None when another process holds it and `wait` is false."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def holder(path: Path) -> str:
    """The pid written into a lock file by its holder."""
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"
