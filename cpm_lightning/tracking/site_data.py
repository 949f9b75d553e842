"""What the public site of a run shows (`cpm-lightning report site`, tracking/site.py renders it), read
from the MLflow experiment and the registry directory: its runs and their charted metrics, the
change ledgers, releases, the prompt book's completions, the applications' adapters re-scored on
each release, the daily and weekly reports. Everything comes from the store a reader of the
experiment could read.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cpm_lightning.inference.book import COMPLETIONS_ARTIFACT, STEP_ARTIFACT, App, Prompt, load_apps, load_prompts
from cpm_lightning.registry.schema import Proposal
from cpm_lightning.tracking.releases import APP_STATUS, RUN_TAG, app_tag, version_aliases
from cpm_lightning.tracking.report import experiment_runs
from cpm_lightning.tracking.weekly import ledger_records, read_proposals

CHARTED = ("train/loss", "val/loss", "train/tokens_per_sec", "train/grad_norm", "train/tokens_seen")
REPORTS = ("daily", "weekly")  # the artifact folders of `report daily|weekly` on a run
REPORT_FILE = re.compile(r"^[\w.-]+\.(md|png)$")
PROMPT_STEP = re.compile(r"^step-(\d+)\.json$")
WORSE_BY = 0.10
NOISE = 0.01
"""An application's row is `worse` when one of its scores fell from the previous release's by more
than WORSE_BY of that score and more than NOISE (a young model's scores near zero move by noise),
`better` when one rose by as much and none fell."""
PROMPT_STEPS = 12
"""Training steps of each run whose completions the prompt book shows, the latest: each is a
download at every rebuild. MLflow keeps all of them."""


@dataclass
class RunData:
    """One training run of the experiment and its charted metrics."""

    run: object
    """The MLflow run."""
    series: dict[str, list[tuple[int, int, float]]]
    """Metric -> (step, timestamp ms, value), one per step, by step."""

    @property
    def label(self) -> str:
        return f"{self.run.info.run_name} ({self.run.info.run_id[:8]})"

    @functools.cached_property
    def _token_steps(self) -> list[int]:
        """The steps of train/tokens_seen, once: the metrics page looks up every point of every chart."""
        return [s for s, _, _ in self.series.get("train/tokens_seen", [])]

    def tokens_at(self, step: int) -> float | None:
        """Tokens seen at the last logged step at or before `step`."""
        i = bisect.bisect_right(self._token_steps, step)
        return self.series["train/tokens_seen"][i - 1][2] if i else None


@dataclass
class Release:
    """A registered model version released from one of the experiment's runs."""

    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    created_ms: int
    run_id: str | None
    """The release's own MLflow run (its book.COMPLETIONS_ARTIFACT)."""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def anchor(self) -> str:
        return "v-" + re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.name}-{self.version}")


@dataclass
class AppScores:
    """An application's adapter re-scored on one release (`release --apps-limit`)."""

    release: Release
    status: str
    """ok, or "broken: why"."""
    scores: dict[str, float]
    """TASK/METRIC -> value."""
    verdict: str
    """Against the previous release that scored it: first, better, same, worse (WORSE_BY), broken
    (its adapter could not run), or fixed (it runs again)."""


def app_history(app: App, releases: list[Release]) -> list[AppScores]:
    """The rows of `app` (with an adapter), one per release that re-scored it, oldest first."""
    rows: list[AppScores] = []
    prefix = app_tag(app.name, "")
    for rel in sorted(releases, key=lambda r: r.created_ms):
        status = rel.tags.get(app_tag(app.name, APP_STATUS))
        if status is None:
            continue
        scores = {k.removeprefix(prefix): float(v) for k, v in sorted(rel.tags.items())
                  if k.startswith(prefix) and k != app_tag(app.name, APP_STATUS)}
        rows.append(AppScores(rel, status, scores, _verdict(status, scores, rows[-1] if rows else None)))
    return rows


def _verdict(status: str, scores: dict[str, float], previous: AppScores | None) -> str:
    if status != "ok":
        return "broken"
    if previous is None:
        return "first"
    if previous.status != "ok":
        return "fixed"
    moved = [(v - previous.scores[k]) for k, v in scores.items() if k in previous.scores]
    margin = [max(WORSE_BY * abs(previous.scores[k]), NOISE) for k in scores if k in previous.scores]
    if any(d < -m for d, m in zip(moved, margin, strict=True)):
        return "worse"
    return "better" if any(d > m for d, m in zip(moved, margin, strict=True)) else "same"


@dataclass
class Completions:
    """One completions artifact (issue 15's contract): of a release, or of a training step."""

    source: str
    """What the reader sees: the release's URI and step, or the run and step."""
    by_id: dict[str, dict]
    """Prompt id -> its entry (id, author, text, max_tokens, completion)."""


@dataclass
class Site:
    """Everything the pages show, read from MLflow and the registry directory."""

    experiment: str
    runs: list[RunData]
    """Newest first."""
    proposals: list[Proposal]
    unreadable: int
    """Proposal files that cannot be read."""
    ledger: list[tuple[RunData, dict]]
    """(run, change-ledger record), in time order."""
    releases: list[Release]
    """Newest first."""
    prompts: list[Prompt]
    apps: list[App]
    completions: list[Completions]
    reports: dict[str, list[str]] = field(default_factory=dict)
    """daily/weekly -> the report names (2026-11-20, 2026-W47) copied into the build, newest first."""


class SeriesCache:
    """The charted series of the previous build, so that a rebuild reads only what was logged
    since (a months-long run has millions of points; reading them all took most of a rebuild:
    docs/benchmarks.md). Kept in one JSON file, `path` (OUT.builds/.series.json), written after a
    build.

    MLflow has no "points after step N" query for a metric's history (the step-range one,
    get_metric_history_bulk_interval, samples and is the UI server's, not the client's); what
    every store offers is the history in pages, in logging order (timestamp, step, value), each
    page's token an offset. The cache keeps, per run and metric, the series (one point per step,
    the latest), the token of the last page read and that page's rows: a rebuild reads that page
    again and on from its end (so it reads again what the previous build read last: after a
    full read, up to HISTORY_PAGE rows; after that, what was new then). A page that no longer
    starts with the cached rows (a point logged late with an earlier timestamp, a run
    rewritten), or a cache entry the store does not take, is a full read."""

    def __init__(self, path: Path | None):
        self.path = path
        self.previous: dict[str, dict[str, dict]] = {}
        try:
            loaded = json.loads(path.read_text()) if path is not None and path.is_file() else {}
            self.previous = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            pass  # a cache that cannot be read is a full read, not a failed build
        self.now: dict[str, dict[str, dict]] = {}

    def series(self, client: MlflowClient, run_id: str, key: str) -> list[tuple[int, int, float]]:
        """(step, timestamp ms, value) of metric `key`, one per step (the latest), by step."""
        of_run = self.previous.get(run_id)
        cached = of_run.pop(key, None) if isinstance(of_run, dict) else None  # popped: one copy in memory
        try:
            history = _history(client, run_id, key, cached)
        except (KeyError, TypeError, IndexError, ValueError, MlflowException):
            if cached is None:
                raise
            history = _history(client, run_id, key, None)  # an entry that does not fit (edited, old)
        self.now.setdefault(run_id, {})[key] = history
        return [tuple(p) for p in history["points"]]

    def save(self) -> None:
        """The series of this build (those of runs gone from the experiment are dropped)."""
        tmp = self.path.with_name(f"{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.now))
        tmp.replace(self.path)


HISTORY_PAGE = 25_000
"""Rows of a metric's history per request: MLflow's own page size (GET_METRIC_HISTORY_MAX_RESULTS)."""


def _history(client: MlflowClient, run_id: str, key: str, cached: dict | None) -> dict:
    """The cache entry of one metric (SeriesCache), from `cached` and what was logged since."""
    # The paged call is the store's: MlflowClient.get_metric_history reads every page, always.
    store = client._tracking_client.store
    token, page = (cached["token"], cached["page"]) if cached else (None, [])
    # The cached page again, exactly (the store's next token is then where it ended), so that a
    # rebuild reads again only what the previous one read last.
    rows, following = _page(store, run_id, key, token, len(page) or HISTORY_PAGE)
    if json.dumps(rows[:len(page)]) != json.dumps(page):  # json: NaN is not equal to itself
        return _history(client, run_id, key, None)
    latest = {p[0]: p for p in cached["points"]} if cached else {}
    fresh = rows[len(page):]
    while True:
        for row in fresh:  # as report.dedup: the latest timestamp of a step wins, then the later row
            if row[0] not in latest or row[1] >= latest[row[0]][1]:
                latest[row[0]] = row
        if following is None:
            break
        token = following
        rows, following = _page(store, run_id, key, token, HISTORY_PAGE)
        fresh = rows
    return {"token": token, "page": rows, "points": sorted(latest.values())}  # mostly in order: linear


def _page(store, run_id: str, key: str, token: str | None, size: int) -> tuple[list[list], str | None]:
    """Up to `size` rows of a metric's history from `token` on, as [step, timestamp ms, value],
    and the token of the rows after them (None: there are none)."""
    paged = store.get_metric_history(run_id, key, max_results=size, page_token=token)
    following = paged.token.decode() if isinstance(paged.token, bytes) else paged.token
    return [[m.step, m.timestamp, m.value] for m in paged], following


def read_site(client: MlflowClient, experiment: str, registry_dir: Path, build: Path,
              cache: SeriesCache | None = None) -> Site:
    """What the pages show; the reports are downloaded into `build`/daily and `build`/weekly.
    The metrics are read through `cache` (none: all of them)."""
    proposals, unreadable = read_proposals(registry_dir)
    prompts, apps = load_prompts(registry_dir), load_apps(registry_dir)
    runs = _runs(client, experiment_runs(client, experiment), cache or SeriesCache(None))
    ledger = sorted(((r, rec) for r in runs for rec in ledger_records(client, r.run.info.run_id)),
                    key=lambda item: item[1]["time"])
    releases = _releases(client, {r.run.info.run_id for r in runs})
    site = Site(experiment=experiment, runs=runs, proposals=proposals, unreadable=unreadable, ledger=ledger,
                releases=releases, prompts=prompts, apps=apps, completions=_completions(client, runs, releases))
    site.reports = {kind: _download_reports(client, runs, kind, build / kind) for kind in REPORTS}
    return site


def _runs(client: MlflowClient, runs: list, cache: SeriesCache) -> list[RunData]:
    out = []
    for run in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
        keys = [k for k in run.data.metrics if k in CHARTED or k.startswith("eval/")]
        out.append(RunData(run, {k: cache.series(client, run.info.run_id, k) for k in keys}))
    return out


def _releases(client: MlflowClient, run_ids: set[str]) -> list[Release]:
    versions = [v for v in client.search_model_versions() if v.tags.get(RUN_TAG) in run_ids]
    aliases = {name: version_aliases(client.get_registered_model(name)) for name in {v.name for v in versions}}
    return [Release(v.name, str(v.version), aliases[v.name].get(str(v.version), []), dict(v.tags),
                    v.creation_timestamp, v.run_id)
            for v in sorted(versions, key=lambda v: v.creation_timestamp, reverse=True)]


def _download_json(client: MlflowClient, run_id: str, path: str) -> dict | None:
    """A JSON artifact, or None when it is not an object (it is left out of the site)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            data = json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text(encoding="utf-8"))
        except ValueError:  # not UTF-8, or not JSON
            return None
    return data if isinstance(data, dict) and isinstance(data.get("completions"), list) else None


def _by_id(data: dict) -> dict[str, dict]:
    return {str(c.get("id")): c for c in data["completions"] if isinstance(c, dict)}


def _completions(client: MlflowClient, runs: list[RunData], releases: list[Release]) -> list[Completions]:
    """The prompt book's completions: every release's, then the latest PROMPT_STEPS steps of each run."""
    out = []
    for rel in releases:
        folder = str(Path(COMPLETIONS_ARTIFACT).parent)
        if rel.run_id and COMPLETIONS_ARTIFACT in {a.path for a in client.list_artifacts(rel.run_id, folder)}:
            if (data := _download_json(client, rel.run_id, COMPLETIONS_ARTIFACT)) is not None:
                out.append(Completions(f"{rel.uri} (step {rel.tags.get('step', '?')})", _by_id(data)))
    for r in runs:
        steps = sorted((int(m[1]), a.path) for a in client.list_artifacts(r.run.info.run_id, str(Path(STEP_ARTIFACT).parent))
                       if (m := PROMPT_STEP.match(Path(a.path).name)))
        for step, path in reversed(steps[-PROMPT_STEPS:]):
            if (data := _download_json(client, r.run.info.run_id, path)) is not None:
                out.append(Completions(f"{r.label} step {step}", _by_id(data)))
    return out


def _download_reports(client: MlflowClient, runs: list[RunData], kind: str, dst: Path) -> list[str]:
    """Download the `kind` reports of every run (the same report is logged to each run it covers)
    into dst, each Markdown file beside its PNG. Returns the names, newest first."""
    dst.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            files = [Path(a.path).name for a in client.list_artifacts(r.run.info.run_id, kind)]
            if files:
                local = Path(client.download_artifacts(r.run.info.run_id, kind, f"{tmp}/{r.run.info.run_id}"))
                for name in files:
                    if REPORT_FILE.match(name) and (local / name).is_file():
                        shutil.copyfile(local / name, dst / name)
    return sorted((p.stem for p in dst.glob("*.md")), reverse=True)
