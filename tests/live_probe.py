"""Callbacks that the `fit` segments of the live tests load by class path: they inject faults
(a NaN, a loss spike, SIGKILL) and act as the community (a merged proposal, a registry that
disappears) at exact steps, each once per run (a marker file in `out`), and wait until the
supervisor has seen what they did, so every run takes the same course."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import torch

WAIT_S = 120  # a supervisor that never reacts fails the test instead of hanging it


def _once(out: str, name: str) -> bool:
    """True the first time in a run (across segments), False after."""
    marker = Path(out) / f"done-{name}"
    if marker.exists():
        return False
    marker.touch()
    return True


def _wait(what: str, condition) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"live_probe: waited {WAIT_S} s for {what}")
        time.sleep(0.05)


def _control(root: str) -> dict:
    try:
        return json.loads((Path(root) / "live" / "control.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _ledger(root: str) -> str:
    path = Path(root) / "live" / "changes.jsonl"
    return path.read_text() if path.exists() else ""


class InjectNaN(L.Callback):
    """A NaN in one gradient of the update at `step`."""

    def __init__(self, step: int, out: str):
        self.step, self.out = step, out

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step and _once(self.out, f"nan-{self.step}"):
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("nan"))


class InjectSpike(L.Callback):
    """Weights scaled up before the update at `step`: its loss spikes."""

    def __init__(self, step: int, out: str):
        self.step, self.out = step, out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and _once(self.out, f"spike-{self.step}"):
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(8.0)


class KillAt(L.Callback):
    """SIGKILL of the segment's own process after the update at `step` (once)."""

    def __init__(self, step: int, out: str):
        self.step, self.out = step, out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and _once(self.out, f"kill-{self.step}"):
            os.kill(os.getpid(), signal.SIGKILL)


class Publish(L.Callback):
    """After step `step`, the community merges proposal files: written into a clone of the
    registry's upstream, committed and pushed (or, without `clone`, written into `registry`).
    Rank 0 then waits until the supervisor has read them (a snapshot holds `files`' first
    file), and, with `stop_at`, until it has told the segment that step."""

    def __init__(self, step: int, out: str, root: str, files: dict[str, str], clone: str | None = None,
                 registry: str | None = None, stop_at: int | None = None):
        self.step, self.out, self.root, self.files = step, out, root, files
        self.clone, self.registry, self.stop_at = clone, registry, stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        first = next(iter(self.files))
        if trainer.global_step != self.step or not trainer.is_global_zero or not _once(self.out, f"publish-{first}"):
            return
        target = Path(self.clone or self.registry)
        for name, text in self.files.items():
            (target / name).write_text(text)
        if self.clone:
            git = ["git", "-C", self.clone, "-c", "user.name=test", "-c", "user.email=test@example.org"]
            subprocess.run([*git, "add", "-A"], check=True)
            subprocess.run([*git, "commit", "-qm", f"accept {first}"], check=True)
            subprocess.run([*git, "push", "-q"], check=True, capture_output=True)
        snapshots = Path(self.root) / "live" / "registry"
        _wait(f"the supervisor to read {first}", lambda: any(snapshots.glob(f"*/{first}")))
        if self.stop_at is not None:
            _wait(f"control.json stop_at {self.stop_at}", lambda: _control(self.root).get("stop_at") == self.stop_at)


class HideRegistry(L.Callback):
    """After step `step`, the registry directory disappears until the ledger records it."""

    def __init__(self, step: int, out: str, root: str, registry: str):
        self.step, self.out, self.root, self.registry = step, out, root, registry

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step or not _once(self.out, "hide"):
            return
        hidden = Path(self.registry).with_name("hidden")
        before = _ledger(self.root).count("no such directory")
        os.rename(self.registry, hidden)
        try:
            _wait("a ledger record of the vanished registry",
                  lambda: _ledger(self.root).count("no such directory") > before)
        finally:
            os.rename(hidden, self.registry)


class WaitForTakeOver(L.Callback):
    """After step `step`, rank 0 waits until a supervisor asks the segment to stop now (the
    test killed the one that started it and started another)."""

    def __init__(self, step: int, out: str, root: str):
        self.step, self.out, self.root = step, out, root

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.is_global_zero and _once(self.out, "takeover"):
            (Path(self.out) / "waiting").touch()
            _wait("a new supervisor", lambda: _control(self.root).get("stop_now"))


class RecordPid(L.Callback):
    """Appends the id of the process that trained each step to `out`/pids.jsonl."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(os.path.join(self.out, "pids.jsonl"), "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "pid": os.getpid()}) + "\n")
