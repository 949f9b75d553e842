"""The weekly community digest (`cpm-lightning report weekly`; docs/ARCHITECTURE.md, "Trials"):
what happened in one ISO week, Monday to Sunday, UTC. Proposals opened and decided (the dates in
their files), trials run and their verdicts, the changes and incidents of the run's change ledger
(the `changes.jsonl` artifact that `live` keeps on its MLflow run), releases, and the training of
each run of the experiment as the daily log has it, with the week's loss and throughput curves.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tempfile
from pathlib import Path

from mlflow import MlflowClient

from cpm_lightning.core.errors import UserError
from cpm_lightning.registry.resolve import proposal_files
from cpm_lightning.registry.schema import Proposal, load_proposal
from cpm_lightning.tracking.releases import RUN_TAG
from cpm_lightning.tracking.report import DAY_MS, experiment_runs, plot, run_period, section, utc_ms
from cpm_lightning.tracking.trials import PROPOSAL_TAG, VERDICT_TAG, trial_runs

WEEK = re.compile(r"^(\d{4})-W(\d{2})$")
LEDGER = "changes.jsonl"  # the artifact of a `live` run (live/ledger.py)
INCIDENTS = ("crash", "restart", "rollback", "suspended", "unfollowed")
"""Ledger records that are incidents; the others (start, applied, deferred, rejected, followed, stop) are changes."""


def parse_week(text: str | None) -> dt.date:
    """The Monday of ISO week `text` (YYYY-Www), or of this week (UTC) when None."""
    if text is None:
        today = dt.datetime.now(dt.timezone.utc).date()
        return today - dt.timedelta(days=today.weekday())
    m = WEEK.match(text)
    try:
        if m is None:
            raise ValueError
        return dt.date.fromisocalendar(int(m[1]), int(m[2]), 1)
    except ValueError:
        raise UserError(f"--week {text!r}: expected an ISO week YYYY-Www, e.g. 2026-W48") from None


def week_name(monday: dt.date) -> str:
    year, week, _ = monday.isocalendar()
    return f"{year}-W{week:02d}"


def weekly_report(monday: dt.date, experiment: str, registry_dir: Path, out: Path) -> Path:
    """Write out/YYYY-Www.md (and .png when there was training) and log them to each run that
    trained that week. Returns the Markdown file."""
    client = MlflowClient()
    runs = experiment_runs(client, experiment)
    start_ms = utc_ms(monday)
    end_ms = start_ms + 7 * DAY_MS
    sunday = monday + dt.timedelta(days=6)
    proposals, unreadable = read_proposals(registry_dir)
    name = week_name(monday)
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / f"{name}.md", out / f"{name}.png"
    lines = [f"# Week {name} ({monday} to {sunday}, UTC)", "", f"Experiment: {experiment}; registry: {registry_dir}", ""]
    lines += _proposals(proposals, unreadable, monday, sunday)
    lines += _trials(client, {p.label: p for p in proposals}, start_ms, end_ms)
    lines += _ledger(client, runs, start_ms, end_ms)
    lines += _releases(client, {r.info.run_id for r in runs}, start_ms, end_ms)
    weeks = [(r, w) for r in runs if (w := run_period(client, r, start_ms, end_ms)) is not None]
    lines += ["## Training", ""]
    if not weeks:
        lines += [f"No run of {experiment} logged a training step this week.", ""]
    for run, week in weeks:
        lines += ["#" + line if line.startswith("## ") else line
                  for line in section(client, run, week, start_ms, end_ms, registry_dir, period="week")]
    if weeks:
        lines += [f"![loss, learning rate and throughput]({png.name})", ""]
        plot([w for _, w in weeks], start_ms, png)
    md.write_text("\n".join(lines))
    for run, _ in weeks:
        client.log_artifact(run.info.run_id, str(md), "weekly")
        client.log_artifact(run.info.run_id, str(png), "weekly")
    return md


def read_proposals(directory: Path) -> tuple[list[Proposal], int]:
    """The proposals of a registry directory whose fields `proposals check` accepts, by id, and
    how many files it refuses (a link it refuses is not shown as one). Their `changes` are not
    checked: the digest needs only their dates, status and links."""
    if not directory.is_dir():
        raise UserError(f"--registry {directory}: no such directory; expected the proposal registry")
    read = [None if problems else proposal for proposal, problems in map(load_proposal, proposal_files(directory))]
    return sorted((p for p in read if p is not None), key=lambda p: p.id), read.count(None)


def _proposals(proposals: list[Proposal], unreadable: int, monday: dt.date, sunday: dt.date) -> list[str]:
    within = lambda d: d is not None and monday <= d <= sunday  # noqa: E731
    opened = [p for p in proposals if within(p.created)]
    decided = [p for p in proposals if within(p.decided)]
    lines = ["## Proposals", "", f"Opened: {len(opened) or 'none'}", ""]
    lines += [f"- {_name(p)} ({p.kind}, now {p.status}){_link(p)}" for p in opened] + ([""] if opened else [])
    lines += [f"Decided: {len(decided) or 'none'}", ""]
    lines += [f"- {_name(p)}: {p.status} on {p.decided}{_link(p)}" for p in decided] + ([""] if decided else [])
    if unreadable:
        lines += [f"{unreadable} proposal file(s) could not be read; see `cpm-lightning proposals check`.", ""]
    return lines


def _name(p: Proposal) -> str:
    return f"{p.label} {p.title}"


def _link(p: Proposal) -> str:
    return f", {p.discussion}" if p.discussion else ""


def _trials(client: MlflowClient, proposals: dict[str, Proposal], start_ms: int, end_ms: int) -> list[str]:
    runs = [r for r in trial_runs(client) if start_ms <= r.info.start_time < end_ms]
    lines = ["## Trials", "", f"{len(runs) or 'None'} run this week{':' if runs else '.'}", ""]
    for run in sorted(runs, key=lambda r: r.info.start_time):
        label = run.data.tags[PROPOSAL_TAG]
        p = proposals.get(label)
        outcome = run.data.tags.get(VERDICT_TAG) or f"no verdict ({run.info.status})"
        title = f" {p.title}" if p else ""
        lines.append(f"- {label}{title}: {outcome} (MLflow run {run.info.run_id})")
    return lines + ([""] if runs else [])


def _ledger(client: MlflowClient, runs: list, start_ms: int, end_ms: int) -> list[str]:
    """The changes and incidents the change ledgers of the experiment's runs recorded this week."""
    changes, incidents = [], []
    for run in runs:
        for record in ledger_records(client, run.info.run_id):
            at = dt.datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp() * 1000
            if start_ms <= at < end_ms:
                line = f"- {record_line(record)} (run {run.info.run_name}, {run.info.run_id[:8]})"
                (incidents if record["kind"] in INCIDENTS else changes).append((at, line))
    lines = ["## Changes to the run", ""] + ([line for _, line in sorted(changes)]
                                             or ["None recorded (no change ledger, or nothing changed)."])
    lines += ["", "## Incidents", ""] + ([line for _, line in sorted(incidents)] or ["None."])
    return lines + [""]


def ledger_records(client: MlflowClient, run_id: str) -> list[dict]:
    if LEDGER not in {Path(a.path).name for a in client.list_artifacts(run_id)}:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(run_id, LEDGER, tmp)).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def record_line(r: dict) -> str:
    """A ledger record in one line: when, which step, what, and the config keys it changed."""
    ids = ", ".join(f"{i:04d}" for i in r.get("proposals", []))
    changed = "; ".join(f"{k}: {json.dumps(v.get('old'))} -> {json.dumps(v.get('new'))}"
                        for k, v in sorted(r.get("changes", {}).items()))
    return (f"{r['time']} step {r['step']}: {r['kind']}" + (f" {ids}" if ids else "") + f" ({r.get('reason', '')})"
            + (f": {changed}" if changed else ""))


def _releases(client: MlflowClient, run_ids: set[str], start_ms: int, end_ms: int) -> list[str]:
    versions = sorted((v for v in client.search_model_versions() if v.tags.get(RUN_TAG) in run_ids
                       and start_ms <= v.creation_timestamp < end_ms), key=lambda v: v.creation_timestamp)
    lines = ["## Releases", ""]
    lines += [f"- models:/{v.name}/{v.version}: step {v.tags.get('step')}, val loss {v.tags.get('val_loss', 'n/a')}, "
              f"proposals {v.tags.get('proposals') or 'none'}, "
              f"{dt.datetime.fromtimestamp(v.creation_timestamp / 1000, dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
              for v in versions] or ["None."]
    return lines + [""]
