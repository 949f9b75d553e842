"""`cpm-lightning live --config FILE [fit's overrides]` and `cpm-lightning live status --root DIR`
(docs/ARCHITECTURE.md, "Live training"). cli/main.py hands `live` its arguments as they are: they are
`fit`'s, passed on to every segment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpm_lightning.core.errors import UserError

USAGE = """usage: cpm-lightning live --config FILE [fit's --key value overrides]
       cpm-lightning live status --root DIR

Train through the change ledger: `fit` in segments that take up accepted proposals at their
step, restart after crashes and roll back from divergence (the run config's `live` group says
how; `cpm-lightning fit --help` lists it). `live status` prints a run's state from its ledger
and checkpoints; DIR is the run's trainer.default_root_dir."""


def main(argv: list[str]) -> None:
    if not argv:
        raise UserError("live: expected --config FILE [fit's overrides], or `status --root DIR` "
                        "(see `cpm-lightning live --help`)")
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] == "status":
        parser = argparse.ArgumentParser(prog="cpm-lightning live status", exit_on_error=False)
        parser.add_argument("--root", required=True, help="the run's trainer.default_root_dir")
        try:
            args = parser.parse_args(argv[1:])
        except argparse.ArgumentError as e:
            raise UserError(f"live status: {e}") from None
        print(status_text(Path(args.root)))
        return
    from cpm_lightning.live.settings import read_settings
    from cpm_lightning.live.supervisor import LiveStopped, Supervisor

    try:
        Supervisor(read_settings(argv)).run()
    except LiveStopped as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def status_text(root: Path) -> str:
    """The run's state: step, tokens, last loss, proposals in effect, a registry it no longer
    follows, pending, deferred and suspended, the last incident and the last checkpoint."""
    from cpm_lightning.checkpoint.directory import latest
    from cpm_lightning.live.ledger import RunState, read_records
    from cpm_lightning.live.protocol import LiveDir, Status, read_json

    files = LiveDir(root)
    records = read_records(files.ledger)
    if not records:
        raise UserError(f"live status: no change ledger at {files.ledger}; expected the "
                        "trainer.default_root_dir of a run started with `cpm-lightning live`")
    state = RunState()
    for r in records:
        state.fold(r)
    status = read_json(files.status, Status)
    last, ckpt = records[-1], latest(files.checkpoints)
    labels = lambda ids: ", ".join(f"{i:04d}" for i in sorted(ids)) or "none"  # noqa: E731
    running = "stopped" if last["kind"] == "stop" else "running (or its supervisor was killed)"
    lines = [f"run              {root}  ({running}; last record: {last['kind']} at step {last['step']}, "
             f"{last['time']})",
             f"step             {status.step if status else last['step']}",
             f"tokens           {status.tokens if status else 0:,}",
             f"last loss        {status.loss if status and status.loss is not None else 'none yet'}",
             f"precision        {status.precision if status and status.precision else 'unknown'}",
             f"in effect        {labels(state.in_effect)}",
             *([f"registry         not followed since step {u['step']} ({u['time']}): {u['reason']}"]
               if (u := state.unfollowed) else []),
             f"pending          {_pending(state, status.step if status else last['step'])}",
             f"deferred         {labels(state.deferred)}",
             f"suspended        {labels(state.suspended)}"]
    i = state.incident
    lines.append(f"last incident    {i['kind']} at step {i['step']} ({i['time']}): {i['reason']}" if i else
                 "last incident    none")
    lines.append(f"last checkpoint  {ckpt if ckpt else 'none'}")
    return "\n".join(lines)


def _pending(state, step: int) -> str:
    """Accepted proposals of the run's registry that are not in effect yet, with their steps."""
    from cpm_lightning.live.policy import eligible
    from cpm_lightning.registry.keys import ConfigSchema
    from cpm_lightning.registry.limits import Limits
    from cpm_lightning.registry.resolve import in_effect, load_registry
    from cpm_lightning.train.run_config import GROUPS

    start = state.start
    if not start.get("registry"):
        return "none (the run has no registry)"
    limits = Limits(allowed_sources=start["allowed_sources"], max_params=start["max_params"])
    reg = load_registry(start["registry"], ConfigSchema(GROUPS), limits)
    if any(not p.ids for p in reg.problems):
        return f"unknown (registry {start['registry']} cannot be read)"
    broken = {i for p in reg.problems for i in p.ids}
    good = {i: p for i, p in reg.proposals.items() if i not in broken}
    waiting = eligible(good, start["kinds"], start["exclude"], state, arch_ok=True)[0]
    due = in_effect(waiting, step, state.since).due
    steps = {i: due.get(i, p.effective_from_step) for i, p in waiting.items() if i not in state.in_effect}
    return ", ".join(f"{waiting[i].label} (" + (f"step {s}" if s > step else "at the next checkpoint") + ")"
                     for i, s in sorted(steps.items())) or "none"
