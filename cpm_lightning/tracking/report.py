"""The daily training log (docs/ARCHITECTURE.md, "MLflow"), with the fields of CPM-Live's published daily logs:
loss at the start and end of the day, tokens and GB of text seen, average grad norm, progress
towards the planned tokens, throughput, restarts, non-finite steps, proposals, releases. The
weekly digest (weekly.py) has the same section for each run, over a week.

A step logged twice (a job resumed from a checkpoint older than its last logged step trains
those steps again) counts once, with its latest value.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from cpm_lightning.core.errors import UserError
from cpm_lightning.tracking.config import START_STEP
from cpm_lightning.tracking.releases import RUN_TAG, applied_proposals
from cpm_lightning.tracking.trials import is_trial

KEYS = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_seen", "train/tokens_per_sec")
DAY_MS = 86_400_000


@dataclass(kw_only=True)
class RunPeriod:
    """One run's metrics up to the end of a period (a day, a week), each step once."""

    run_id: str
    """MLflow run id."""
    name: str
    """MLflow run name."""
    series: dict[str, list[tuple[int, int, float]]]
    """Metric -> (step, timestamp ms, value), one per step (the latest), by step."""
    replayed: int
    """Steps of the period logged more than once."""
    starts: list[tuple[int, float]]
    """(timestamp ms, start step) of every start of `fit` during the period."""


def dedup(history, end_ms: float) -> tuple[list[tuple[int, int, float]], dict[int, int]]:
    """(step, timestamp ms, value) of a metric history before end_ms, one per step (the latest), by
    step; and how many times each step was logged."""
    latest, count = {}, {}
    for m in history:
        if m.timestamp < end_ms:
            count[m.step] = count.get(m.step, 0) + 1
            if m.step not in latest or m.timestamp >= latest[m.step][1]:
                latest[m.step] = (m.step, m.timestamp, m.value)
    return sorted(latest.values()), count


def run_period(client: MlflowClient, run, start_ms: int, end_ms: int) -> RunPeriod | None:
    """The run's metrics up to end_ms, or None when it logged no step and no start in the period."""
    series, replayed = {}, 0
    for key in KEYS:
        series[key], count = dedup(client.get_metric_history(run.info.run_id, key), end_ms)
        if key == "train/loss":
            replayed = sum(1 for s, t, _ in series[key] if t >= start_ms and count[s] > 1)
    starts = [(m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, START_STEP)
              if start_ms <= m.timestamp < end_ms]
    if not any(t >= start_ms for _, t, _ in series["train/loss"]) and not starts:
        return None
    return RunPeriod(run_id=run.info.run_id, name=run.info.run_name, series=series, replayed=replayed, starts=starts)


def _in_period(points, start_ms):
    return [p for p in points if p[1] >= start_ms]


def section(client: MlflowClient, run, day: RunPeriod, start_ms: int, end_ms: int, registry_dir: Path,
            period: str = "day") -> list[str]:
    """The Markdown section of one run's training in the period that starts at start_ms."""
    tags = run.data.tags
    loss = _in_period(day.series["train/loss"], start_ms)
    tokens = day.series["train/tokens_seen"]
    before = [v for _, t, v in tokens if t < start_ms]
    total = tokens[-1][2] if tokens else 0.0
    today = total - (before[-1] if before else 0.0)
    bytes_per_token = float(tags.get("cpm.bytes_per_token", "nan"))
    planned = float(tags.get("cpm.planned_tokens", "nan"))
    grad = [v for _, _, v in _in_period(day.series["train/grad_norm"], start_ms)]
    speed = [v for _, _, v in _in_period(day.series["train/tokens_per_sec"], start_ms)]
    bad = [s for s, _, v in loss if not math.isfinite(v)]
    steps = [s for s, _, _ in loss]
    lines = [f"## Run {day.name} ({day.run_id})", ""]
    if loss:
        lines += [f"- steps: {steps[0]} to {steps[-1]}",
                  f"- loss at the start of the {period}: {loss[0][2]:.4f} (step {loss[0][0]})",
                  f"- loss at the end of the {period}: {loss[-1][2]:.4f} (step {loss[-1][0]})"]
    else:
        lines += ["- no training steps were logged"]
    lines += [f"- tokens seen that {period}: {today:,.0f} ({_gb(today, bytes_per_token)} of text)",
              f"- tokens seen in total: {total:,.0f} ({_gb(total, bytes_per_token)} of text)",
              f"- average grad norm: {sum(grad) / len(grad):.4f}" if grad else "- average grad norm: not logged",
              f"- progress: {100 * total / planned:.2f}% of {planned:,.0f} planned tokens" if math.isfinite(planned)
              else "- progress: no planned token count (trainer.max_steps unset)",
              f"- throughput: {sum(speed) / len(speed):,.0f} tokens/s on average" if speed else "- throughput: not logged"]
    restarts = [s for _, s in day.starts if s > 0]
    at = ", ".join(str(int(s)) for s in restarts)
    lines += [f"- restarts: {len(restarts)}" + (f" (resumed at step{'s' * (len(restarts) > 1)} {at})" if restarts else "")]
    if day.replayed:
        lines += [f"- steps trained again after a restart (counted once): {day.replayed}"]
    lines += [f"- skipped or NaN steps: {len(bad)}" + (f" (steps {', '.join(map(str, bad[:20]))})" if bad else "")]
    started_today = any(s == 0 for _, s in day.starts)
    took_effect = [p for p in applied_proposals(client, run.info.run_id, registry_dir)
                   if steps and (started_today or p["effective_from_step"] is None
                                 or steps[0] <= p["effective_from_step"] <= steps[-1])]
    lines += ["- proposals that took effect: " + ("; ".join(f"{p['id']} {p['title']} {p['discussion']}".strip()
                                                            for p in took_effect) or "none")]
    releases = [v for v in client.search_model_versions() if v.tags.get(RUN_TAG) == run.info.run_id
                and start_ms <= v.creation_timestamp < end_ms]
    lines += ["- releases: " + (", ".join(f"models:/{v.name}/{v.version} (step {v.tags.get('step')})"
                                          for v in sorted(releases, key=lambda v: v.creation_timestamp)) or "none")]
    return lines + [""]


def _gb(tokens: float, bytes_per_token: float) -> str:
    return f"{tokens * bytes_per_token / 1e9:.4g} GB" if math.isfinite(bytes_per_token) else "unknown GB"


def plot(days: list[RunPeriod], start_ms: int, path: Path) -> None:
    """Loss, learning rate and throughput of each run from start_ms on, by step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for key, ax, label in zip(("train/loss", "train/lr", "train/tokens_per_sec"), axes,
                              ("loss", "learning rate", "tokens/s"), strict=True):
        for day in days:
            points = _in_period(day.series[key], start_ms)
            ax.plot([s for s, _, _ in points], [v for _, _, v in points], label=f"{day.name} ({day.run_id[:8]})")
        ax.set_ylabel(label)
    axes[0].legend()
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def experiment_runs(client: MlflowClient, experiment: str) -> list:
    """The runs of `experiment` that train its model: not release runs, not trials (UserError if
    there is no such experiment)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"--experiment {experiment!r} does not exist; experiments: {', '.join(names) or 'none'}")
    return [r for r in client.search_runs([exp.experiment_id]) if RUN_TAG not in r.data.tags and not is_trial(r)]


def utc_ms(date: dt.date) -> int:
    """Milliseconds since the epoch at the start of `date`, UTC."""
    return int(dt.datetime.combine(date, dt.time(), dt.timezone.utc).timestamp() * 1000)


def daily_report(date: dt.date, experiment: str, out: Path, registry_dir: Path) -> Path:
    """Write out/DATE.md (and out/DATE.png when there was training) and log them to each run
    that trained that day. Returns the markdown file."""
    client = MlflowClient()
    runs = experiment_runs(client, experiment)
    start_ms = utc_ms(date)
    end_ms = start_ms + DAY_MS
    days = [(r, d) for r in runs if (d := run_period(client, r, start_ms, end_ms)) is not None]
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / f"{date}.md", out / f"{date}.png"
    lines = [f"# Training log {date} (UTC)", "", f"Experiment: {experiment}", ""]
    if not days:
        md.write_text("\n".join(lines + [f"No training on {date}: no run of this experiment logged a step that day.", ""]))
        return md
    for run, day in days:
        lines += section(client, run, day, start_ms, end_ms, registry_dir)
    lines += [f"![loss, learning rate and throughput]({png.name})", ""]
    md.write_text("\n".join(lines))
    plot([d for _, d in days], start_ms, png)
    for run, _ in days:
        client.log_artifact(run.info.run_id, str(md), "daily")
        client.log_artifact(run.info.run_id, str(png), "daily")
    return md
