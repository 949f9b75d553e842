"""Publishing a live run on a schedule (docs/ARCHITECTURE.md, "Publishing"): the daily training
log once a UTC day has ended, the weekly digest once an ISO week has ended, a release of the
checkpoint of every live.release_every_n_steps (alias `nightly`, with the variants of
live.release_quantize, and the adapters of the registry's applications re-scored on it with
live.apps_limit examples per task), and the static site every live.site_every_minutes.

Each is the command an operator would run (`cpm-lightning report daily`, `report weekly`,
`release`, `report site`), in a subprocess, one at a time, beside the training: the training
never waits for it, and a failure (the tracking store down, say) is one line on stderr and in
live/publish.log, tried again RETRY_S later. The tracking URI reaches the commands through
$MLFLOW_TRACKING_URI, not their command lines, which other users of the machine can read.

What was published is kept in live/published.json, so a new supervisor neither repeats nor
skips a day, a week or a release. The segment pins the checkpoint of a release step as it writes
it (segment.py: hard links in live/publish/), so checkpoint.keep_last cannot remove it before
the release has read it; the pinned checkpoints are the queue of releases, and a step trained
again after a rollback is not released twice. A rollback drops the pins of the steps it took off
the run's timeline (the supervisor calls `rolled_back`): the weights the run abandoned are never
released.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from cpm_lightning.checkpoint.directory import remove, step_of
from cpm_lightning.live.protocol import LiveDir, read_json, write_json
from cpm_lightning.live.settings import Settings

NIGHTLY = "nightly"
RETRY_S = 300.0
"""Seconds before a command that failed is run again."""
STOP_GRACE_S = 60.0
"""Seconds a command still running when `live` stops on a signal has to finish."""


def utc_now() -> dt.datetime:
    """The clock of the schedule (a test moves it to the end of a week)."""
    return dt.datetime.now(dt.timezone.utc)


def monday_of(day: dt.date) -> dt.date:
    return day - dt.timedelta(days=day.weekday())


@dataclass
class Published:
    """What has been published (live/published.json)."""

    day: str
    """The last UTC day (YYYY-MM-DD) whose daily log is published, or was before the run."""
    week: str
    """The Monday of the last ISO week whose digest is published, or was before the run."""
    release_step: int = 0
    """The step of the last nightly release."""


@dataclass
class Job:
    what: str
    """What it publishes, for the log: "the daily log of 2026-12-01"."""
    kind: str
    argv: list[str]
    done: Callable[[], None]
    """Called when it succeeded."""


class Publisher:
    def __init__(self, settings: Settings, files: LiveDir):
        self.s, self.live = settings, settings.live
        self.dir = files.publish
        self.state_file = files.path / "published.json"
        self.log = files.path / "publish.log"
        self.registry = Path(settings.registry.path).absolute() if settings.registry.path else None
        today = utc_now().date()
        self.state = read_json(self.state_file, Published) or Published(
            day=str(today - dt.timedelta(days=1)), week=str(monday_of(today) - dt.timedelta(days=7)))
        self.proc: subprocess.Popen | None = None
        self.job: Job | None = None
        self.retry_at: dict[str, float] = {}  # kind -> time.monotonic() after which it runs again
        self.site_at = 0.0  # the site is built when `live` starts
        self.started = 0.0  # time.monotonic() when the running command started

    # -- the schedule -------------------------------------------------------------------------------
    def _due(self, step: int, final: bool = False) -> Job | None:
        """The next command to run, or None. Releases first: they hold pinned checkpoints."""
        ready = lambda kind: time.monotonic() >= self.retry_at.get(kind, 0.0)  # noqa: E731
        for stale in [p for p in self.dir.glob("step-*.ckpt") if step_of(p) <= self.state.release_step]:
            remove(stale)  # trained again after a rollback, and released already
        # Once the run is past a checkpoint's step, its validation there has run: the card has it.
        pinned = sorted((p for p in self.dir.glob("step-*.ckpt") if final or step_of(p) < step), key=step_of)
        if pinned and ready("release"):
            return self._release(pinned[0])
        today = utc_now().date()
        day = dt.date.fromisoformat(self.state.day) + dt.timedelta(days=1)
        if self.live.reports and day < today and ready("daily"):
            return self._daily(day)
        week = dt.date.fromisoformat(self.state.week) + dt.timedelta(days=7)
        if self.live.reports and self.registry and week < monday_of(today) and ready("weekly"):
            return self._weekly(week)
        if self.live.site_dir and (final or time.monotonic() >= self.site_at) and ready("site"):
            return self._site()
        return None

    # -- the commands -------------------------------------------------------------------------------
    def _release(self, ckpt: Path) -> Job:
        tasks = self.s.eval.tasks
        # eval.limit unset is every example: release's --eval-limit has no word for "all".
        argv = ["release", str(ckpt), "--name", self.live.release_name or self.s.experiment, "--alias", NIGHTLY,
                "--eval-tasks", ",".join(tasks) or "none", "--eval-limit", str(self.s.eval.limit or 10**9)]
        if self.registry:  # and its applications' adapters (apps.yaml), re-scored on the new weights
            argv += ["--proposals", str(self.registry), "--apps-limit", str(self.live.apps_limit)]
        if self.live.release_quantize:
            argv += ["--quantize", ",".join(self.live.release_quantize)]
        if "heldout" in tasks:  # the sources of the run config (as the live run merged it)
            config = self.dir / "run-config.yaml"
            config.write_text(yaml.safe_dump(self.s.config, sort_keys=False))
            argv += ["--eval-config", str(config)]
        def done():
            remove(ckpt)
            self._advance(release_step=step_of(ckpt))
        return Job(f"the nightly release of step {step_of(ckpt)}", "release", argv, done)

    def _daily(self, day: dt.date) -> Job:
        argv = ["report", "daily", "--date", str(day), "--experiment", self.s.experiment,
                "--out", str(self.s.root / "reports" / "daily")]
        if self.registry:
            argv += ["--proposals", str(self.registry)]
        return Job(f"the daily log of {day}", "daily", argv, lambda: self._advance(day=str(day)))

    def _weekly(self, monday: dt.date) -> Job:
        year, week, _ = monday.isocalendar()
        argv = ["report", "weekly", "--week", f"{year}-W{week:02d}", "--experiment", self.s.experiment,
                "--registry", str(self.registry), "--out", str(self.s.root / "reports" / "weekly")]
        return Job(f"the weekly digest of {year}-W{week:02d}", "weekly", argv, lambda: self._advance(week=str(monday)))

    def _site(self) -> Job:
        argv = ["report", "site", "--experiment", self.s.experiment, "--registry", str(self.registry),
                "--out", str(Path(self.live.site_dir).absolute())]
        self.site_at = time.monotonic() + 60 * self.live.site_every_minutes  # from this build's start
        return Job("the site", "site", argv, lambda: None)

    def rolled_back(self, step: int) -> list[Path]:
        """The run went back to `step`: the pinned checkpoints after it are dropped (the steps
        trained again are pinned again as they are written). Returns those dropped. A release
        already running goes on: it was started from a checkpoint of the timeline at the time."""
        dropped = [p for p in self.dir.glob("step-*.ckpt") if step_of(p) > step]
        for path in dropped:
            remove(path)
        return dropped

    def _advance(self, **fields) -> None:
        for key, value in fields.items():
            setattr(self.state, key, value)
        write_json(self.state_file, self.state)

    # -- running them -------------------------------------------------------------------------------
    def tick(self, logged: bool, step: int) -> None:
        """Called by the supervisor every second or so: see to the running command, start the
        next command that is due once the run is in MLflow (`logged`: until its first segment has
        made its run, the experiment may not exist). `step`: the optimizer steps the run has done."""
        if self.proc is not None:
            if self.proc.poll() is None:
                return
            self._ended()
        job = self._due(step) if logged else None
        if job is not None:
            self._launch(job)

    def close(self, final: bool) -> None:
        """When `live` stops. At the end of the run (`final`: trainer.max_steps reached, so the
        run is in MLflow), everything due is published, the site once more; otherwise the
        running command gets STOP_GRACE_S to finish."""
        if not final:
            if self.proc is not None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                self._ended()
            return
        if self.proc is not None:
            self.proc.wait()
            self._ended()
        while (job := self._due(0, final=True)) is not None:
            self._launch(job)
            self.proc.wait()
            self._ended()
            if job.kind == "site":
                break

    def _launch(self, job: Job) -> None:
        self.job = job
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "job.log").open("w") as out:
            env = {**os.environ, "MLFLOW_TRACKING_URI": self.s.tracking_uri}
            # Beside the training: an evaluation must not take memory from its accelerators.
            env["CUDA_VISIBLE_DEVICES"] = ""
            self.proc = subprocess.Popen([sys.executable, "-m", "cpm_lightning.cli", *job.argv], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started = time.monotonic()

    def _ended(self) -> None:
        job, rc = self.job, self.proc.returncode
        self.proc, self.job = None, None
        output = (self.dir / "job.log").read_text(errors="replace")
        stamp = utc_now().isoformat(timespec="seconds")
        took = time.monotonic() - self.started
        if rc == 0:
            job.done()
            line = f"live: published {job.what} ({took:.0f} s)"
            print(line, flush=True)
        else:
            error = next((s for s in reversed(output.splitlines()) if s.startswith("error: ")),
                         f"exit status {rc}; its output is in {self.log}")
            self.retry_at[job.kind] = time.monotonic() + RETRY_S
            line = f"live: publishing {job.what} failed: {error.removeprefix('error: ')}; trying again in {RETRY_S:g} s"
            print(line, file=sys.stderr, flush=True)
        with self.log.open("a") as log:
            log.write(f"{stamp} {line}\n$ cpm-lightning {' '.join(job.argv)}\n{output}\n")

