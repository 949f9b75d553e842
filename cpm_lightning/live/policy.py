"""The proposal policy of a live run (docs/ARCHITECTURE.md, "Live training"): which proposals
are eligible, which are in effect at a step and why, when the running segment must stop for a
change, and what a divergence decides. Pure functions of a registry reading's proposals, the
ledger's fold (ledger.RunState) and the `live` group; the supervisor (supervisor.py) runs the
processes and records what these decide. What is in effect at a step is the registry's one
answer (registry.resolve.in_effect), which each segment's `fit` applies too.
"""

from __future__ import annotations

import signal
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from cpm_lightning.live.config import LiveConfig
from cpm_lightning.live.ledger import RunState
from cpm_lightning.model.migrate import why_none
from cpm_lightning.registry.resolve import InEffect, in_effect
from cpm_lightning.registry.schema import ACCEPTED, Proposal

ARCH = "model.arch."
IN_PLACE = ("model.optim.", "model.schedule.", "model.loss.")
"""Training keys a running segment applies at a boundary: AdamW's settings in its param groups,
the schedule's lambda, the loss on the module."""
SOURCES = "data.sources."


@dataclass(frozen=True)
class Deferral:
    """An architecture change mid-run that no migration folds into the running model."""

    proposal: Proposal
    reason: str


def eligible(proposals: Mapping[int, Proposal], kinds: Collection[str], exclude: Collection[int], state: RunState,
             arch_ok: bool = False) -> tuple[dict[int, Proposal], list[Deferral]]:
    """(the accepted proposals this run applies when they are due, by id; those deferred). An
    architecture change no migration folds in is deferred unless `arch_ok` (the run's first
    segment builds its model with it) or it is in effect already."""
    out, deferred = {}, []
    for p in proposals.values():
        if (p.status != ACCEPTED or p.kind not in kinds or p.id in exclude
                or p.id in state.suspended or (p.id, p.sha256) in state.refused):
            continue
        # Whether the values allow a migration (ff_dim grows, ...) the segment finds out: it
        # refuses one that does not with a line, recorded as `rejected`.
        unfoldable = [f"{k}: {why}" for k in sorted(p.changes) if k.startswith(ARCH)
                      and (why := why_none(k.removeprefix(ARCH)))]
        if unfoldable and not arch_ok and not (p.id in state.since and state.versions.get(p.id) == p.sha256):
            deferred.append(Deferral(p, f"no migration folds it into the running model ({'; '.join(unfoldable)})"))
            continue
        out[p.id] = p
    return out, deferred


@dataclass(frozen=True)
class SegmentSet:
    """The proposals of the segment that starts at `answer.step`, against the last one's."""

    answer: InEffect
    added: list[int]
    """In effect now and not in the last segment, or in a new version."""
    removed: list[int]
    """In the last segment and not now."""
    exclude: list[int]
    """Accepted proposals not in effect: the segment's `registry.exclude`, so that its `fit`
    resolves the registry to `answer.ids`."""
    keep_steps: list[int]
    """Checkpoints kept past checkpoint.keep_last: a suspension returns to the step a proposal
    took effect at while one may."""


def segment_set(eligible: Mapping[int, Proposal], accepted: Collection[int], step: int, state: RunState,
                suspend_window: int) -> SegmentSet:
    answer = in_effect(eligible, step, state.since)
    now = answer.ids
    added = [i for i in now if i not in state.in_effect or eligible[i].sha256 != state.versions.get(i)]
    removed = [i for i in state.in_effect if i not in now]
    keep = {state.since.get(i, step) for i in now}
    return SegmentSet(answer, added, removed, exclude=sorted(set(accepted) - set(now)),
                      keep_steps=sorted(s for s in keep if s + suspend_window >= step))


def start_since(state: RunState, fresh: InEffect | None) -> dict[int, int]:
    """The `since` of a start record: for a new run (`fresh`, the answer at its first step) the
    steps its proposals are due at; for a run going on, the ledger's, for those in effect."""
    if fresh is not None:
        return {i: fresh.due[i] for i in fresh.ids}
    return {i: state.since[i] for i in state.in_effect if i in state.since}


def stop_at(eligible: Mapping[int, Proposal], step: int, since: Mapping[int, int], running: Mapping[int, str]) -> int | None:
    """The step from which the proposals in effect differ from those of the segment that started
    at `step` (`running`: id -> sha256). A step already passed (a new proposal's, or `step` when a
    running one changed or left) means: at the segment's next checkpoint."""
    answer = in_effect(eligible, step, since)
    changed = any(i not in eligible or eligible[i].sha256 != sha for i, sha in running.items())
    passed = [d for i, d in answer.due.items() if i not in running and d <= step] + ([step] if changed else [])
    return min(passed, default=answer.next_change)


def restart_reason(change: SegmentSet, proposals: Mapping[int, Proposal], running: Mapping[int, str],
                   resolved: Mapping[str, object]) -> str | None:
    """Why the boundary of `change` needs a new segment process; None when the running segment
    applies it where it is (docs/live.md, "Boundaries"): every key that its added and removed
    proposals set is a training key (IN_PLACE), the weight of a source the mixture draws from,
    or a new source (its tokens read from the cache, or prepared by the segment at the
    boundary). A migration, any other data key, or a proposal whose version in effect is not
    the registry's (`proposals`: the last reading; `running`: id -> sha256 of the running
    segment's; `resolved`: its config values) needs a new process."""
    for i in [*change.added, *change.removed]:
        p = proposals.get(i)
        if p is None or (i in running and running[i] != p.sha256):
            return f"proposal {i:04d} left the registry or changed, and its version in effect may set other keys"
        for key in sorted(p.changes):
            if (why := _needs_process(key, resolved)) is not None:
                return f"{p.label} sets {key}: {why}"
    return None


def _needs_process(key: str, resolved: Mapping[str, object]) -> str | None:
    if key.startswith(IN_PLACE):
        return None
    if key.startswith(SOURCES):
        name, _, leaf = key.removeprefix(SOURCES).partition(".")
        if not any(k.startswith(f"{SOURCES}{name}.") for k in resolved) or leaf == "weight":
            return None  # a new source, or a weight: the mixture goes on from its cursors
        return "a source the mixture draws from changes what its windows are"
    if key.startswith(ARCH):
        return "the model migrates as a new process loads the checkpoint"
    return "the data module is built again by a new process"


def why(p: Proposal, step: int, state: RunState, first_seen: int) -> str:
    """Why proposal `p` is applied at `step` (first read at step `first_seen`)."""
    if p.id in state.in_effect:
        return "its file changed; the new version applies from this checkpoint boundary"
    if p.id in state.since:
        return f"applies again from step {step}, where it took effect before the rollback"
    if p.effective_from_step == step:
        return f"effective from step {step}"
    return (f"effective_from_step {p.effective_from_step} had passed when the run read it (step {first_seen}); "
            f"applied at the checkpoint boundary {step}")


def why_not(pid: int, step: int, state: RunState) -> str:
    """Why proposal `pid`, in effect before, is not at `step`."""
    if pid in state.suspended:
        return "suspended in this run"
    if pid in state.since and state.since[pid] > step:
        return f"the run rolled back to step {step}, before it took effect (step {state.since[pid]})"
    return "no longer accepted in the registry, or left out with a proposal it requires"


# -- signals, crashes and divergence ------------------------------------------------------------------
def how(rc: int) -> str:
    """How a process with exit status `rc` (negative: the signal that killed it) ended."""
    return f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"


def signal_stop(name: str, rc: int, start: int, checkpoint: str | None, checkpoint_step: int | None) -> str:
    """The reason of the stop record after signal `name` ended the segment that started at step
    `start` with exit status `rc`; `checkpoint` is the run's newest checkpoint then. A checkpoint
    newer than `start` is the one the segment saved, whatever its exit status: the signal sent to
    the whole process group (a terminal's Ctrl-C, a scheduler's kill) reaches it twice, and the
    second may end it after the save."""
    if checkpoint_step is not None and checkpoint_step > start:
        ended = "" if rc == 0 else f", then ended ({how(rc)})"
        return f"{name}: the segment saved checkpoint {checkpoint} at step {checkpoint_step}{ended}"
    if rc == 0:
        return f"{name}: the segment stopped before training past step {start} (last checkpoint: {checkpoint})"
    return f"{name}: the segment ended ({how(rc)}) before it could save a checkpoint"


# -- crashes and divergence ---------------------------------------------------------------------------
def backoff(state: RunState, resume: int, live: LiveConfig) -> tuple[int, float | None]:
    """(the attempt a restart from the checkpoint of step `resume` would be, its backoff in
    seconds; None when live.max_restarts are spent)."""
    attempt = state.resumes[resume] + 1
    return attempt, live.restart_backoff * 2 ** (attempt - 1) if attempt <= live.max_restarts else None


@dataclass(frozen=True)
class Recovery:
    """What a divergence decides: back to the newest checkpoint at or before `before`, and
    `suspend` that proposal in this run (None: a rollback, skipping the samples since)."""

    before: int
    suspend: int | None = None


def recover(d: dict, state: RunState, live: LiveConfig) -> Recovery:
    """After divergence `d` (the segment's status.divergence): a proposal that took effect
    within live.suspend_window steps before it, when the run has rolled back since, is suspended
    (the most recent such), back to its step; otherwise back to before the weights that computed
    the first bad step (those of the step before it: they may be the trouble)."""
    k, since = d["step"], state.since
    blamed = [i for i in state.in_effect if since[i] <= k <= since[i] + live.suspend_window
              and any(since[i] <= r["step"] <= k for r in state.rollbacks)]
    if blamed:
        pid = max(blamed, key=lambda i: since[i])
        return Recovery(since[pid], pid)
    return Recovery(_first_bad(d, live) - 2)


def _first_bad(d: dict, live: LiveConfig) -> int:
    n = d["nonfinite_in_a_row"]
    return d["step"] - n + 1 if n >= live.max_nonfinite else d["step"]


def suspension(d: dict, pid: int, state: RunState, live: LiveConfig, resume: int) -> tuple[str, dict]:
    """(the reason, the evidence) of the `suspended` record of proposal `pid`, back to `resume`."""
    took = state.since[pid]
    evidence = {"loss_before": state.loss_at.get(took), "took_effect": took,
                "divergences": [r for r in state.rollbacks if r["step"] >= took] + [d]}
    reason = (f"the run diverged again (loss {d['loss']:.4g} at step {d['step']}) within live.suspend_window="
              f"{live.suspend_window} steps of proposal {pid:04d} taking effect at step {took}, after a rollback; "
              f"suspended in this run (the registry is unchanged) and back to step {resume}")
    return reason, evidence


def rollback_reason(d: dict, live: LiveConfig, resume: int, skipped: int) -> str:
    """The reason of a `rollback` record, back to `resume`, `skipped` samples left out."""
    what = (f"{d['nonfinite_in_a_row']} non-finite steps in a row" if d["nonfinite_in_a_row"] >= live.max_nonfinite
            else f"loss {d['loss']:.4g} above the window's mean {d['window_mean']:.4g} by more than "
                 f"{live.spike_sigma:g} sd ({d['window_std']:.3g})")
    return f"{what} at step {d['step']}: back to the checkpoint of step {resume}, skipping the {skipped} samples trained on since"
