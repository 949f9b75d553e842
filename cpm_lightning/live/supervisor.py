"""The `live` supervisor (docs/ARCHITECTURE.md, "Live training").

It runs the training as consecutive `fit` segments, each a subprocess started exactly as an
operator would start `fit` (so FSDP2 and multi-process launches are the same code path), from
the run's last good checkpoint and with the registry applied at the segment's first step. While
a segment runs, the supervisor reads the registry every live.poll_seconds and tells the segment
the step at which the proposals in effect change next (control.json); the segment writes a
checkpoint there and waits for the answer: a change of data or training (policy.restart_reason)
it applies where it is and goes on, any other it stops for, and the next segment starts with
the new set. Between segments it restarts after
a crash (with backoff), rolls back after a divergence (skipping the data that preceded it) and
suspends a proposal that made the run diverge twice. What each of those decides is the policy's
(policy.py, pure functions); this module runs the processes and writes the records. Beside the
segments it publishes the run on a schedule (publish.py): reports, nightly releases, the site.

Its state is a fold over the ledger (ledger.RunState), so a new supervisor on the same root (after this
one was killed) carries on where the ledger ends. It does not import Lightning (MLflow only in the
thread that copies the ledger).

The records it writes, beyond time/step/kind/proposals/changes/reason (ledger.py):
  start      checkpoint, in_effect (ids), since ({id: step it took effect}), registry, kinds,
             exclude, allowed_sources, max_params (the registry group), argv
  applied    in_effect, removed (ids), loss (the last loss before the change), sha256 ({id: sha} of
             those added), migrations (those the model went through: name, key, old, new, exact),
             in_segment (true: the running segment applied it at its step and went on)
  deferred   sha256
  rejected   sha256 (ids and versions left out; none when the registry itself was unreadable)
  unfollowed (the registry's git pull fails: nothing new reaches the run; an incident), then
  followed   once it works again
  rollback   resume_step, skipped_samples ([start, end) global indices), divergence, removed
             (checkpoint names)
  suspended  resume_step, evidence (loss before the proposal, the divergences after it), removed
  crash      exit (the segment's exit status), error (its last lines on stderr)
  restart    resume_step, attempt, backoff_s
  stop       exit status of `live`: 0 at max_steps or on a signal
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cpm_lightning.checkpoint.directory import SIGNALS, complete_checkpoints, latest, roll_back, step_of
from cpm_lightning.core.errors import UserError
from cpm_lightning.live import policy, watch
from cpm_lightning.live.ledger import Ledger, RunState, Uploader
from cpm_lightning.live.protocol import (
    SEGMENT_ENV,
    Boundary,
    Control,
    LiveDir,
    Plan,
    Status,
    holder,
    lock,
    read_json,
    write_json,
)
from cpm_lightning.live.publish import Publisher
from cpm_lightning.live.settings import Settings
from cpm_lightning.model.migrate import migration_text
from cpm_lightning.registry.keys import ConfigSchema
from cpm_lightning.registry.resolve import in_effect
from cpm_lightning.registry.schema import ACCEPTED, Proposal
from cpm_lightning.train.run_config import GROUPS

TICK_S = 0.25
"""Seconds between two looks at a running segment's status: a segment waits this long at most
(about) for the answer at a boundary."""
EXCEPTION = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*")  # the last line of a traceback


QUIET = ("enable_progress_bar", "enable_model_summary")
"""Trainer options that are on by default and that `live` turns off for its segments, unless the
run config sets them. A segment's output goes to logs (its stderr to segment-NNNN.log, both on to
live's output, which a service manager keeps), where a progress bar is a line per redraw
(`Epoch 0/-2 ...`: max_epochs is unset) and the model summary is repeated by every segment."""


def quiet_options(config: dict) -> list[str]:
    """fit's options that turn off the QUIET ones the run config (`config`, merged) leaves unset."""
    trainer = config.get("trainer") or {}
    return [f"--trainer.{key}=false" for key in QUIET if key not in trainer]


class LiveStopped(Exception):
    """`live` stopped on an error a human must fix (exit status 1); the ledger's last line says
    which."""


class Supervisor:
    def __init__(self, settings: Settings):
        self.s = settings
        self.files = LiveDir(settings.root)
        self.files.path.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.files.ledger)
        self.schema = ConfigSchema(GROUPS)
        self.registry_dir = Path(settings.registry.path).absolute() if settings.registry.path else None
        self.state = RunState()  # the fold of the ledger
        # -- this process ----------------------------------------------------------------------------
        self.reading = watch.last_snapshot(self.files.registry, self.schema, settings.registry) if self.registry_dir else watch.Reading()
        self.registry_error: str | None = None
        self.book_refused: set[str] = set()  # the problems of the prompt book and apps list recorded
        self.first_seen: dict[int, int] = {}  # step at which a proposal was first read
        self.last_loss: float | None = None  # of the last segment that ended well
        self.signal: int | None = None
        self.proc: subprocess.Popen | None = None
        self.beat = 0
        self.control = Control()
        self.current: dict[int, str] = {}  # the running segment's proposals and their sha256
        last = read_json(self.files.status, Status)
        self.segment = last.segment if last else 0  # numbers go on: a status names its segment
        self.step = last.step if last else 0  # where the run is, as far as a status said
        self.logged_through = last.step if last else -1
        self.run_id = last.run_id if last else None
        self.resolved = last.resolved if last else {}  # the last segment's values of the proposal keys
        self.uploader = Uploader(self.files.ledger, settings.tracking_uri) if settings.tracking_uri else None
        self.ledger.uploader = self.uploader
        self.publisher = Publisher(settings, self.files) if settings.tracking_uri else None
        self.finished = False  # trainer.max_steps reached: what is due is published before `live` ends

    # -- the ledger ---------------------------------------------------------------------------------
    def record(self, kind: str, step: int, reason: str, **fields) -> dict:
        record = self.ledger.append(kind, step, reason, **fields)
        self.state.fold(record)
        return record

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> None:
        held = lock(self.files.supervisor_lock, wait=False)
        if held is None:
            raise UserError(f"another `live` (pid {holder(self.files.supervisor_lock)}) supervises "
                            f"{self.s.root}; one run has one supervisor")
        previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        try:
            self._take_over()
            for r in self.ledger.records:
                self.state.fold(r)
            ckpt = latest(self.files.checkpoints)
            self._start(ckpt)
            while True:
                if self.signal is not None:
                    return self._stop(f"{signal.Signals(self.signal).name} before the next segment started")
                ckpt = latest(self.files.checkpoints)
                step = step_of(ckpt) if ckpt else 0
                if step >= self.s.max_steps:
                    self.finished = True
                    return self._stop(f"trainer.max_steps={self.s.max_steps} reached", step)
                if self._segment(step, ckpt):
                    return
        finally:
            if self.publisher is not None:
                self.publisher.close(final=self.finished)
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.uploader is not None:
                self.uploader.close(timeout=30)
            os.close(held)

    def _take_over(self) -> None:
        """Wait for a segment left running by a supervisor that was killed: it is asked to stop
        with a checkpoint (it would also stop by itself once the heartbeat is missed)."""
        fd = lock(self.files.segment_lock, wait=False)
        if fd is None:
            print(f"live: the segment of the previous supervisor (pid {holder(self.files.segment_lock)}) still "
                  "runs; asking it to stop with a checkpoint", file=sys.stderr, flush=True)
            self.control = Control(stop_now=True)
            self._beat()
            fd = lock(self.files.segment_lock, wait=True)
            last = read_json(self.files.status, Status)
            if last:
                self.step, self.logged_through, self.run_id = last.step, last.step, last.run_id
                self.resolved = last.resolved
        os.close(fd)
        self.control = Control()

    def _start(self, ckpt: Path | None) -> None:
        step = step_of(ckpt) if ckpt else 0
        if self.uploader is not None:
            self.uploader.set_run(self.run_id)
        fresh = not self.ledger.records
        if not fresh and self.ledger.records[-1]["kind"] != "stop":
            self.record("crash", self.step, "the previous `live` supervisor ended without a stop record "
                        "(killed, or its machine went down)", exit=None, error=None)
        reading = self._read_registry()
        if reading and reading.error and not self.reading.files:
            raise UserError(reading.error)  # as `fit` would: there is nothing to go on with
        if reading and not reading.error:
            self.reading = reading
        # A new run, or the first `live` of a run `fit` started, resolves as `fit` would resume it.
        answer = in_effect(self._eligible(step, arch_ok=True), step) if fresh else None
        ids = answer.ids if answer else self.state.in_effect
        self.record("start", step, "a new run" if step == 0 and fresh else f"continues from step {step}",
                    proposals=ids, checkpoint=ckpt and ckpt.name, in_effect=ids,
                    since=policy.start_since(self.state, answer),
                    sha256={i: self.reading.registry.proposals[i].sha256 for i in ids
                            if i in self.reading.registry.proposals},
                    registry=str(self.registry_dir) if self.registry_dir else None, kinds=list(self.s.registry.kinds),
                    exclude=self.s.registry.exclude, allowed_sources=self.s.registry.allowed_sources,
                    max_params=self.s.registry.max_params, argv=self.s.argv)
        if reading:
            self._take(reading, step)  # what the registry holds that is not applied

    def _stop(self, reason: str, step: int | None = None, exit_status: int = 0) -> None:
        self.record("stop", self.step if step is None else step, reason, exit=exit_status)

    # -- the registry -------------------------------------------------------------------------------
    def _read_registry(self) -> watch.Reading | None:
        if self.registry_dir is None:
            return None
        return watch.read(self.registry_dir, self.reading, self.files.registry, self.schema, self.s.registry)

    def _take(self, reading: watch.Reading, step: int) -> None:
        """Take a reading of the registry: record what it refuses, and keep it if it is good."""
        if reading.error:
            if reading.error != self.registry_error:
                self.record("rejected", step, f"{reading.error}; the run goes on with the last good registry "
                            f"(proposals in effect: {_labels(self.state.in_effect)})")
            self.registry_error = reading.error
            return
        if self.registry_error:
            print(f"live: registry {self.registry_dir} can be read again", file=sys.stderr, flush=True)
            self.registry_error = None
        self._follow(reading.warning, step)
        for r in reading.rejected:
            # A proposal the run excludes is left out of the snapshot like a rejected one, unrecorded.
            if r.shas and not set(r.shas.items()) <= self.state.refused and not set(r.ids) <= set(self.s.registry.exclude):
                self.record("rejected", step, f"not applied: {r.reason}", proposals=r.ids, sha256=r.shas)
            elif not r.ids and r.reason not in self.book_refused:  # prompts.yaml or apps.yaml: once per problem
                self.book_refused.add(r.reason)
                self.record("rejected", step, f"not applied: {r.reason}")
        self.reading = reading
        for i in reading.registry.proposals:
            self.first_seen.setdefault(i, step)

    def _follow(self, failure: str | None, step: int) -> None:
        """Record once that the registry's upstream can no longer be followed (`failure`: a failed
        git pull, after a force-push or with the remote gone), and once that it can again: every
        poll would fail the same way while nothing new reaches the run."""
        if failure and self.state.unfollowed is None:
            self.record("unfollowed", step, f"{failure}; the run no longer follows the registry's upstream and "
                        "goes on with its working copy as it is (fix the clone, e.g. `git reset --hard @{upstream}`)")
        elif not failure and self.state.unfollowed is not None:
            self.record("followed", step, f"git pull in {self.registry_dir} works again: the run follows the "
                        "registry's upstream")

    def _eligible(self, step: int, arch_ok: bool = False) -> dict[int, Proposal]:
        """policy.eligible of the last good reading; records those deferred."""
        out, deferred = policy.eligible(self.reading.registry.proposals, self.s.registry.kinds,
                                        self.s.registry.exclude, self.state, arch_ok)
        for d in deferred:
            self.record("deferred", step, d.reason, proposals=[d.proposal.id], sha256={d.proposal.id: d.proposal.sha256})
        return out

    # -- one segment ----------------------------------------------------------------------------------
    def _segment(self, step: int, ckpt: Path | None) -> bool:
        """Run one segment from `step`; True when `live` is done."""
        self.segment += 1
        eligible = self._eligible(step)
        accepted = [i for i, p in self.reading.registry.proposals.items() if p.status == ACCEPTED]
        change = policy.segment_set(eligible, accepted, step, self.state, self.s.live.suspend_window)
        in_effect, added, removed = change.answer.ids, change.added, change.removed
        plan = Plan(root=str(self.s.root), segment=self.segment, skip=self.state.skip, run_id=self.run_id,
                    logged_through=self.logged_through, keep_steps=change.keep_steps)
        write_json(self.files.plan, plan)
        self.current = {i: eligible[i].sha256 for i in in_effect}
        self.control = Control(stop_at=self._stop_at(eligible, step))
        self._beat()
        watch.prune_snapshots(self.files.registry, self.reading.snapshot)
        argv = [*(self.s.live.launcher or [sys.executable]), "-m", "cpm_lightning.cli", "fit", *self.s.argv,
                *quiet_options(self.s.config),
                "--registry.path", str(self.reading.snapshot) if self.reading.snapshot else "null",
                "--registry.exclude", str(change.exclude),  # registry.exclude among them
                *(["--ckpt_path", str(ckpt)] if ckpt else [])]
        errors: collections.deque[str] = collections.deque(maxlen=20)
        # The segment's stderr goes to a file that is passed on here: a pipe would break, and
        # the segment with it, if this process were killed.
        log = self.files.path / f"segment-{self.segment:04d}.log"
        for old in sorted(self.files.path.glob("segment-*.log"))[:-4]:
            old.unlink()
        with log.open("w") as stderr:
            self.proc = subprocess.Popen(argv, env={**os.environ, SEGMENT_ENV: str(self.files.plan)}, stderr=stderr)
        tee = _Tee(log, errors, self.proc)
        status = self._wait(step, in_effect, added, removed, eligible)
        tee.join()
        rc, self.proc = self.proc.returncode, None
        started = status is not None
        if started:
            self.step, self.logged_through = status.step, max(self.logged_through, status.step)
            self.last_loss = status.loss if status.state != "diverged" else None
        error = _error(list(errors))
        if self.signal is not None:
            saved = latest(self.files.checkpoints)
            saved_step = step_of(saved) if saved else None
            self._stop(policy.signal_stop(signal.Signals(self.signal).name, rc, step, saved and saved.name, saved_step),
                       max(self.step, saved_step or 0))
            return True
        if rc == 0 and status.state == "finished":
            self.finished = True
            self._stop(f"trainer.max_steps={self.s.max_steps} reached")
            return True
        if rc == 0 and status.state == "stopped":
            self._stop(f"the segment was stopped by a signal at step {self.step} (checkpoint saved)")
            return True
        if rc == 0 and status.state == "diverged":
            self._diverged(status)
            return False
        if rc == 0:  # boundary, or a takeover's stop: the next segment goes on
            return False
        if rc == 2 and error and not started:  # fit refused its input, and said why in one line
            if not added:
                self._stop(error.removeprefix("error: "), step, exit_status=2)
                raise UserError(error.removeprefix("error: "))
            self.record("rejected", step, f"the segment could not start with it: {error.removeprefix('error: ')}",
                        proposals=added, sha256={i: eligible[i].sha256 for i in added})
            return False
        return self._crashed(rc, error or next((line for line in reversed(errors) if EXCEPTION.match(line)), None))

    def _wait(self, step, in_effect, added, removed, eligible) -> Status | None:
        """Beat, follow the registry, record the change once the segment trains and answer it at
        each boundary, until it ends; its last status (None when it never started training)."""
        tick = min(TICK_S, self.s.live.poll_seconds)
        next_poll, poll, started = time.monotonic() + self.s.live.poll_seconds, None, None
        leg, answered = 0, None  # the boundaries applied in this process; the step last answered
        sent: dict[int, tuple] = {}  # boundary step -> (SegmentSet, eligible) told to apply there
        while True:
            done = self.proc.poll() is not None
            status = read_json(self.files.status, Status)
            status = status if status and status.segment == self.segment else None
            if status and not started:
                started = status
                self._applied(status, step, in_effect, added, removed, eligible)
            if status and status.leg > leg:  # the segment applied the boundary it was told to
                leg, step = status.leg, status.leg_step
                change, eligible = sent.pop(step)
                self._applied(status, step, change.answer.ids, change.added, change.removed, eligible, in_segment=True)
                self.current = {i: eligible[i].sha256 for i in change.answer.ids}
                self.control.boundary, self.control.stop_at = None, self._stop_at(eligible, step)
            elif status and status.state == "boundary" and not done and answered != status.step:
                answered = status.step
                self.control.boundary, applies = self._boundary(status)
                if applies is not None:
                    sent[status.step] = applies
            if done:
                return status
            if poll and not poll.is_alive():
                self._take(poll.reading, status.step if status else step)
                self.control.stop_at = self._stop_at(self._eligible(step), step)
                poll = None
            if poll is None and time.monotonic() >= next_poll and self.registry_dir is not None:
                poll = _Poll(self.registry_dir, self.reading, self.files.registry, self.schema, self.s.registry)
                next_poll = time.monotonic() + self.s.live.poll_seconds
            if self.publisher is not None:
                self.publisher.tick(logged=self.run_id is not None, step=status.step if status else step)
            self._beat()
            time.sleep(tick)

    def _boundary(self, status: Status) -> tuple[Boundary, tuple | None]:
        """The answer to a segment waiting at a boundary (its checkpoint written), and what it is
        told to apply: the proposals in effect at its step, as a new segment would resolve them
        there; in place when policy.restart_reason finds no reason for a new process."""
        at = status.step
        self.last_loss = status.loss
        eligible = self._eligible(at)
        accepted = [i for i, p in self.reading.registry.proposals.items() if p.status == ACCEPTED]
        change = policy.segment_set(eligible, accepted, at, self.state, self.s.live.suspend_window)
        why = policy.restart_reason(change, self.reading.registry.proposals, self.current, self.resolved)
        if self.signal is not None or why is not None or self.reading.snapshot is None:
            if why is not None:
                print(f"live: step {at}: a new segment process applies the change ({why})", file=sys.stderr, flush=True)
            return Boundary(step=at), None
        # The next change goes with the answer: the segment may train past it before it reads
        # a later control.json.
        self.control.stop_at = policy.stop_at(eligible, at, self.state.since,
                                              {i: eligible[i].sha256 for i in change.answer.ids})
        return Boundary(step=at, apply=True, registry=str(self.reading.snapshot), exclude=change.exclude,
                        keep_steps=change.keep_steps), (change, eligible)

    def _applied(self, status: Status, step, in_effect, added, removed, eligible, in_segment: bool = False) -> None:
        if status.run_id and status.run_id != self.run_id:
            self.run_id = status.run_id
        if self.uploader is not None:
            self.uploader.set_run(self.run_id)
        if added or removed:
            old = self.resolved
            changes = {k: {"old": old.get(k), "new": status.resolved.get(k)}
                       for k in sorted(set(old) | set(status.resolved)) if old.get(k) != status.resolved.get(k)}
            reasons = [f"{eligible[i].label} {policy.why(eligible[i], step, self.state, self.first_seen.get(i, step))}"
                       for i in added]
            reasons += [f"{i:04d} {policy.why_not(i, step, self.state)}" for i in removed]
            if status.migrations:
                reasons.append(f"the model migrated: {', '.join(map(migration_text, status.migrations))}")
            self.record("applied", step, "; ".join(reasons), proposals=added, removed=removed, in_effect=in_effect,
                        changes=changes, loss=self.last_loss, sha256={i: eligible[i].sha256 for i in added},
                        migrations=status.migrations, in_segment=in_segment)
        self.resolved = status.resolved

    def _stop_at(self, eligible: dict[int, Proposal], step: int) -> int | None:
        return policy.stop_at(eligible, step, self.state.since, self.current)

    # -- crashes, divergence ----------------------------------------------------------------------------
    def _crashed(self, rc: int, error: str | None) -> bool:
        self.record("crash", self.step, f"the segment died ({policy.how(rc)})", exit=rc, error=error)
        ckpt = latest(self.files.checkpoints)
        resume = step_of(ckpt) if ckpt else 0
        attempt, backoff = policy.backoff(self.state, resume, self.s.live)
        if backoff is None:
            self._stop(f"{attempt - 1} restarts from step {resume} did not get past it; last error: {error}",
                       exit_status=1)
            raise LiveStopped(f"the run stopped after {attempt - 1} restarts from step {resume}; last error: {error}")
        self.record("restart", resume, f"restart {attempt} from the checkpoint of step {resume} in {backoff:g} s",
                    resume_step=resume, attempt=attempt, backoff_s=backoff)
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and self.signal is None:
            time.sleep(min(0.5, deadline - time.monotonic()))
        return False

    def _diverged(self, status: Status) -> None:
        d = status.divergence
        decided = policy.recover(d, self.state, self.s.live)
        target = self._checkpoint_at_or_before(decided.before, d)
        resume = step_of(target)
        self._resume_check(resume, d)
        if decided.suspend is not None:
            reason, evidence = policy.suspension(d, decided.suspend, self.state, self.s.live, resume)
            removed = self._roll_back(target)
            self.record("suspended", d["step"], reason, proposals=[decided.suspend], resume_step=resume,
                        evidence=evidence, removed=[p.name for p in removed])
            return
        start = status.checkpoints.get(str(resume), status.checkpoints[str(status.start_step)])
        removed = self._roll_back(target)
        self.record("rollback", d["step"], policy.rollback_reason(d, self.s.live, resume, d["end_index"] - start),
                    resume_step=resume, skipped_samples=[start, d["end_index"]], divergence=d,
                    removed=[p.name for p in removed])

    def _roll_back(self, target: Path) -> list[Path]:
        """The checkpoints after `target` removed, and the releases pinned after it dropped."""
        if self.publisher is not None:
            self.publisher.rolled_back(step_of(target))
        return roll_back(self.files.checkpoints, target)

    def _checkpoint_at_or_before(self, step: int, d: dict) -> Path:
        found = [p for p in complete_checkpoints(self.files.checkpoints) if step_of(p) <= step]
        if not found:
            self._stop(f"diverged at step {d['step']} with no checkpoint at step {step} or before to roll back to",
                       exit_status=1)
            raise LiveStopped(f"diverged at step {d['step']}, and no checkpoint at or before step {step} is left")
        return max(found, key=step_of)

    def _resume_check(self, resume: int, d: dict) -> None:
        if self.state.resumes[resume] + 1 > self.s.live.max_restarts:
            self._stop(f"{self.state.resumes[resume]} restarts from step {resume} did not get past it; last: "
                       f"diverged at step {d['step']} (loss {d['loss']})", exit_status=1)
            raise LiveStopped(f"the run stopped after {self.state.resumes[resume]} restarts from step {resume}; "
                              f"it diverged again at step {d['step']}")

    # -- signals and the heartbeat ------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self.signal = signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)  # the segment saves a checkpoint and stops

    def _beat(self) -> None:
        self.beat += 1
        self.control.beat = self.beat
        write_json(self.files.control, self.control)


class _Poll(threading.Thread):
    """One read of the registry off the supervisor's loop (git pull may take a while)."""

    def __init__(self, *args):
        super().__init__(daemon=True, name="cpm-live-registry")
        self.args, self.reading = args, None
        self.start()

    def run(self):
        self.reading = watch.read(*self.args)


class _Tee(threading.Thread):
    """Passes a segment's stderr log on to this process's stderr as it grows, keeping its last
    lines; the segment's one-line `error:` is kept back (live reports it, once)."""

    def __init__(self, path: Path, errors: collections.deque, proc: subprocess.Popen):
        super().__init__(daemon=True, name="cpm-live-stderr")
        self.path, self.errors, self.proc = path, errors, proc
        self.start()

    def run(self):
        with self.path.open(errors="replace") as f:
            while True:
                ended = self.proc.poll() is not None  # before reading: nothing written after is missed
                for line in iter(f.readline, ""):
                    self.errors.append(line.rstrip("\n"))
                    if not line.startswith("error: "):
                        sys.stderr.write(line)
                sys.stderr.flush()
                if ended:
                    return
                time.sleep(0.2)


def _error(lines: list[str]) -> str | None:
    """The segment's `error:` line, with the lines that list its problems when it ends in ':'."""
    at = next((i for i in reversed(range(len(lines))) if lines[i].startswith("error: ")), None)
    if at is None:
        return None
    return " ".join([lines[at], *(line.strip() for line in lines[at + 1:])]) if lines[at].endswith(":") else lines[at]


def _labels(ids) -> str:
    return ", ".join(f"{i:04d}" for i in ids) or "none"
