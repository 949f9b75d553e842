"""Inside a segment: the callback that `fit` adds when `live` started it (cli/fit.py reads the
plan through `segment_plan` and gives the segment's Checkpoints its keep_steps and
`release_pins`). Where the supervisor says the proposals in effect change it writes the
checkpoint and asks what to do: a change of data or training it applies there (the registry
resolved at that step as a new segment's `fit` would resolve it: AdamW's settings in place, the
schedule's lambda, the loss, the mixture's weights and new sources from its cursors) and goes
on; for any other it stops. It watches the loss for divergence, and reports through status.json
(protocol.py). Every decision is the same on every rank: the supervisor's word reaches rank 0
only and is shared in the one collective per step that also averages the loss (and, at a
boundary, in one broadcast of the answer).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cpm_lightning.checkpoint.directory import pin, step_of
from cpm_lightning.checkpoint.meta import CPMMeta, write
from cpm_lightning.checkpoint.store import Checkpoints
from cpm_lightning.live.config import LiveConfig
from cpm_lightning.live.ledger import read_records
from cpm_lightning.live.protocol import (
    ORPHAN_AFTER_S,
    SEGMENT_ENV,
    Boundary,
    Control,
    LiveDir,
    Plan,
    Status,
    lock,
    read_json,
    write_json,
)
from cpm_lightning.registry.apply import AppliedRegistry, apply_registry
from cpm_lightning.registry.keys import OPERATOR_KEYS, ConfigSchema
from cpm_lightning.train.callbacks import CarryProvenance
from cpm_lightning.train.config import LossConfig, OptimConfig, ScheduleConfig
from cpm_lightning.train.run_config import GROUPS
from datamodules.sources import SourceConfig

NONE = -1  # "no step" in the per-step collective
ANSWER_POLL_S = 0.02
"""Seconds between two reads of control.json while a segment waits at a boundary."""


def segment_plan() -> Plan | None:
    """The plan of the segment this process belongs to, or None outside `live`."""
    path = os.environ.get(SEGMENT_ENV)
    return read_json(Path(path), Plan) if path else None


def release_pins(plan: Plan, config: LiveConfig) -> Callable[[Path], None] | None:
    """Checkpoints.on_saved of a segment: a checkpoint of a release step is pinned as it is
    written, before checkpoint.keep_last can prune it, and the supervisor's publisher releases it
    when it can (publish.py). None when the run makes no releases."""
    every, publish = config.release_every_n_steps, LiveDir(plan.root).publish
    if not every:
        return None

    def pin_release(ckpt: Path) -> None:
        if step_of(ckpt) % every == 0:
            pin(ckpt, publish)

    return pin_release


def resolved_values(cfg) -> dict:
    """The values of the keys proposals may set, dotted, of a parsed run config `cfg` (the
    ledger's old -> new): model.arch/optim/schedule/loss and data, less the operator's keys."""
    groups = {f"model.{g}": cfg.model[g].as_dict() for g in ("arch", "optim", "schedule", "loss")}
    return dict(leaf for g, values in {**groups, "data": cfg.data.as_dict()}.items()
                for leaf in _leaves(g, values) if leaf[0] not in OPERATOR_KEYS)


def _leaves(prefix: str, value) -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a config group, as JSON data."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(f"{prefix}.{k}", v)]
    return [(prefix, list(value) if isinstance(value, tuple) else value)]


@dataclass(frozen=True)
class Resolver:
    """The registry resolved at a boundary exactly as a new segment's `fit` resolves it at its
    start (registry/apply.py): `config`, the parsed run config before the registry was applied,
    and `cli_keys`, the keys its command line set. Its values are those a new segment reports
    (Status.resolved); the tokenizer the data module holds stays the run's."""

    config: Any
    cli_keys: frozenset[str]

    def __call__(self, step: int, registry: str, exclude: list[int]) -> tuple[Any, AppliedRegistry]:
        cfg = copy.deepcopy(self.config)
        cfg.registry.path, cfg.registry.exclude, cfg.registry.at_step = registry, list(exclude), step
        return cfg, apply_registry(cfg, set(self.cli_keys), ConfigSchema(GROUPS))


class LiveSegment(L.Callback):
    """The supervisor's agent inside `fit` (see the module docstring)."""

    def __init__(self, plan: Plan, config: LiveConfig, checkpoints: Checkpoints, resolved: dict, resolver: Resolver):
        self.plan, self.config, self.checkpoints, self.resolver = plan, config, checkpoints, resolver
        self.files = LiveDir(plan.root)
        self.status = Status(segment=plan.segment, resolved=resolved)
        self.losses: deque[float] = deque(maxlen=config.spike_window)
        self.nonfinite = 0  # skipped steps in a row
        self._seen_step = -1
        self._skipped = 0
        self._stop_at: int | None = None  # the supervisor's word, as rank 0 last read it
        self._stop_now = False
        self._stop_at_shared: int | None = None  # ... and as every rank last had it
        self._target: int | None = None  # the step this segment stops at for it
        self._control_mtime = 0
        self._answer: Boundary | None = None  # the supervisor's last answer at a boundary
        self._last_beat = time.monotonic()
        self._lock: int | None = None

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        trainer.datamodule.skip = [tuple(w) for w in self.plan.skip]
        if trainer.is_global_zero:
            self._lock = lock(self.files.segment_lock, wait=True)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        live = CPMMeta.of(checkpoint, str(trainer.ckpt_path)).live or {}
        # The loss of a new mixture is not comparable with the old one's: the window restarts.
        if live.get("data") == _data_fingerprint(trainer.datamodule):
            self.losses.extend(live.get("losses", []))
            self.nonfinite = live.get("nonfinite", 0)

    def on_train_start(self, trainer, pl_module):
        s = self.status
        s.start_step = s.leg_step = s.step = self._seen_step = trainer.global_step
        s.tokens, s.run_id = pl_module.tokens_seen, getattr(trainer.logger, "run_id", None)
        s.checkpoints = {str(s.step): _sample_index(trainer)}
        s.migrations = [m.as_dict() for m in pl_module.migrate_on_load]
        self._skipped = pl_module.skipped_steps
        self._write_status(trainer)

    # -- every step -------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._seen_step:  # inside gradient accumulation
            return
        self._seen_step = step
        loss, stop_at, stop_now = self._share(trainer, float(outputs["loss"]) * trainer.accumulate_grad_batches)
        skipped = pl_module.skipped_steps != self._skipped
        self._skipped = pl_module.skipped_steps
        self.nonfinite = self.nonfinite + 1 if skipped else 0
        s = self.status
        s.step, s.loss, s.tokens = step, loss, pl_module.tokens_seen
        if self._diverged(step, loss, trainer):
            self.checkpoints.discard()
            trainer.should_stop = True
        elif stop_now:
            s.state = "orphaned"
            self.checkpoints.request_stop("live: the supervisor is gone or another took over")
        elif self._boundary(step, stop_at):
            self._at_boundary(trainer, pl_module, step)
        self._write_status(trainer)

    # -- a boundary -------------------------------------------------------------------------------
    def _at_boundary(self, trainer, pl_module, step: int) -> None:
        """The checkpoint of `step`, then the supervisor's answer: apply the change here, or stop
        (the checkpoint a new process starts from is written already)."""
        s = self.status
        self.checkpoints.save(trainer)
        s.state = "boundary"
        self._write_status(trainer)
        answer = self._wait_for_answer(step) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            answer = trainer.strategy.broadcast(answer, src=0)
        if not answer.apply:
            self.checkpoints.request_stop(f"live: the proposals in effect change at step {step}")
            return
        cfg, applied = self.resolver(step, answer.registry, answer.exclude)
        self._apply(trainer, pl_module, cfg, applied)
        self.checkpoints.keep_steps = set(answer.keep_steps)
        s.state, s.leg, s.leg_step, s.resolved = "running", s.leg + 1, step, resolved_values(cfg)
        if trainer.is_global_zero:
            self._write_status(trainer)
            self._wait_for_record(step)

    def _wait_for_record(self, step: int) -> None:
        """Train past `step` only once the supervisor has recorded the change (it clears its
        answer then): a supervisor killed in between leaves the segment to stop here, and the
        next one starts from this step's checkpoint and records it."""
        while True:
            _, stop_now = self._read_control()
            if self._answer is None or self._answer.step != step:
                return
            if stop_now:
                self.checkpoints.request_stop("live: the supervisor is gone or another took over")
                return
            time.sleep(ANSWER_POLL_S)

    def _wait_for_answer(self, step: int) -> Boundary:
        """The supervisor's Boundary for `step`; stop when it is gone or asks to stop."""
        while True:
            _, stop_now = self._read_control()
            if self._answer is not None and self._answer.step == step:
                return self._answer
            if stop_now:
                return Boundary(step=step)
            time.sleep(ANSWER_POLL_S)

    def _apply(self, trainer, pl_module, cfg, applied: AppliedRegistry | None) -> None:
        """Train on with the run config `cfg` from this step: what a new segment resumed from this
        step's checkpoint would train with, its data drawn from the same mixture state."""
        model = cfg.model
        pl_module.use_training_config(OptimConfig(**{**model.optim.as_dict(), "betas": tuple(model.optim.betas)}),
                                      ScheduleConfig(**model.schedule.as_dict()), LossConfig(**model.loss.as_dict()))
        dm, before = trainer.datamodule, _data_fingerprint(trainer.datamodule)
        sources = {n: SourceConfig(**(s.as_dict() if hasattr(s, "as_dict") else s)) for n, s in cfg.data.sources.items()}
        if (batch := dm.change_sources(sources)) is not None:
            # Lightning fetched the next batch ahead, from the old mixture: it is drawn again.
            fetcher = trainer.fit_loop._data_fetcher
            _, batch_idx, dataloader_idx = fetcher.batches[0]
            fetcher.batches[0] = (batch, batch_idx, dataloader_idx)
        if _data_fingerprint(dm) != before:  # as on_load_checkpoint: a new mixture's losses start a new window
            self.losses.clear()
            self.nonfinite = 0
        for callback in trainer.callbacks:
            if isinstance(callback, CarryProvenance) and applied is not None:
                callback.proposals = applied.resolution.ids
        logger = trainer.logger
        if trainer.is_global_zero and applied is not None and getattr(logger, "run_id", None):
            applied.log(logger.experiment, logger.run_id)  # cpm.proposals names those in effect now

    def _share(self, trainer, loss: float) -> tuple[float, int | None, bool]:
        """(the loss averaged over ranks, the supervisor's stop_at, stop now), the same on every
        rank: rank 0 reads the control file, and one all_gather carries it."""
        stop_at, stop_now = self._read_control() if trainer.is_global_zero else (None, False)
        if trainer.world_size == 1:
            return loss, stop_at, stop_now
        mine = torch.tensor([loss, NONE if stop_at is None else stop_at, float(stop_now)], dtype=torch.float64,
                            device=trainer.strategy.root_device)
        every = trainer.strategy.all_gather(mine).reshape(-1, 3).cpu()
        shared = int(every[:, 1].max())
        return float(every[:, 0].mean()), None if shared == NONE else shared, bool(every[:, 2].max())

    def _read_control(self) -> tuple[int | None, bool]:
        """The supervisor's last word, and whether its heartbeat stopped (it is gone)."""
        try:
            mtime = os.stat(self.files.control).st_mtime_ns
        except FileNotFoundError:
            mtime = self._control_mtime
        if mtime != self._control_mtime:
            control = read_json(self.files.control, Control)
            self._control_mtime, self._last_beat = mtime, time.monotonic()
            self._stop_at, self._stop_now, self._answer = control.stop_at, control.stop_now, control.boundary
        orphaned = time.monotonic() - self._last_beat > ORPHAN_AFTER_S
        return self._stop_at, self._stop_now or orphaned

    def _boundary(self, step: int, stop_at: int | None) -> bool:
        """Whether to stop here for a change of the proposals in effect: at its step, or at the
        next checkpoint step when the step had passed when the supervisor said so."""
        if stop_at != self._stop_at_shared:
            self._stop_at_shared = stop_at
            every = self.checkpoints.config.every_n_steps
            self._target = None if stop_at is None else stop_at if stop_at >= step else -(-step // every) * every
        return self._target == step

    def _diverged(self, step: int, loss: float, trainer) -> bool:
        """A spike above the window or max_nonfinite skipped steps in a row; records it."""
        window = self.losses
        full = len(window) == window.maxlen
        mean = sum(window) / len(window) if window else math.nan
        std = math.sqrt(sum((x - mean) ** 2 for x in window) / len(window)) if window else math.nan
        spike = math.isfinite(loss) and full and loss > mean + self.config.spike_sigma * std
        if spike or self.nonfinite >= self.config.max_nonfinite:
            self.status.state = "diverged"
            self.status.divergence = {
                "step": step,
                "loss": loss, "window_mean": mean, "window_std": std, "nonfinite_in_a_row": self.nonfinite,
                "end_index": _sample_index(trainer)}
            return True
        if math.isfinite(loss):
            window.append(loss)
        return False

    # -- checkpoints and the end ----------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        write(checkpoint, live={"losses": list(self.losses), "nonfinite": self.nonfinite,
                                "data": _data_fingerprint(trainer.datamodule)},
              changes=read_records(self.files.ledger))
        self.status.checkpoints[str(trainer.global_step)] = _sample_index(trainer)

    def on_train_end(self, trainer, pl_module):
        s = self.status
        if s.state == "running":
            s.state = "finished" if trainer.global_step >= trainer.max_steps else "stopped"
        self._write_status(trainer)

    def teardown(self, trainer, pl_module, stage):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _write_status(self, trainer):
        if trainer.is_global_zero:
            write_json(self.files.status, self.status)


def _sample_index(trainer) -> int:
    """The mixture's global sample index after the last batch trained on."""
    state = trainer.datamodule.state_dict()["mixture"]
    return state["index"] if state else 0


def _data_fingerprint(dm) -> str:
    """The `data` group's values but the operator's (where the caches are): a change means a new mixture."""
    values = {f.name: getattr(dm, f.name) for f in dataclasses.fields(dm) if f"data.{f.name}" not in OPERATOR_KEYS}
    return json.dumps(values, sort_keys=True, default=lambda o: dataclasses.asdict(o))
