"""The public site of a run (`cpm-lightning report site`; README, "Publishing the run"): static
HTML pages, one CSS file and inline SVG charts, built from what the MLflow experiment and the
registry directory hold, for any static host. MLflow's own UI stays private: anyone who reaches
it can edit or delete runs.

OUT is a symbolic link to a build directory in OUT.builds/. A build is written in full beside
OUT, moved into OUT.builds, then the link is replaced in one rename, so a reader sees the old
site or the new one, never a mix; a build that fails (the tracking store gone, a bad file) is
removed and OUT still points at the previous one.

Pages: overview, metrics (by step and by tokens), the daily and weekly reports the runs carry
as artifacts, proposals, releases, the prompt book, applications, incidents, rendered here from
what tracking/site_data.py reads. The tracking URI is never written: a build that would contain
it (or its password) is refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

from mlflow import MlflowClient

from cpm_lightning.core.errors import UserError
from cpm_lightning.registry.schema import Proposal
from cpm_lightning.tracking.html import esc, line_chart, link, markdown
from cpm_lightning.tracking.releases import HF_DIR
from cpm_lightning.tracking.site_data import (
    NOISE,
    PROMPT_STEPS,
    REPORTS,
    WORSE_BY,
    RunData,
    SeriesCache,
    Site,
    app_history,
    read_site,
)
from cpm_lightning.tracking.weekly import INCIDENTS, record_line

PAGES = (("index.html", "Overview"), ("metrics.html", "Metrics"), ("logs.html", "Logs"),
         ("proposals.html", "Proposals"), ("releases.html", "Releases"), ("prompts.html", "Prompt book"),
         ("apps.html", "Applications"), ("incidents.html", "Incidents"))

CSS = """\
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #24292f; color: #fff; padding: 0.8em 1.5em; }
header h1 { font-size: 1.2em; margin: 0 0 0.4em 0; }
nav a { color: #cfe3ff; margin-right: 1em; text-decoration: none; }
nav a.here { color: #fff; font-weight: bold; }
main { padding: 1em 1.5em; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; background: #fff; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
.completion, .prompt { white-space: pre-wrap; max-width: 60em; }
.completion { display: block; max-height: 12em; overflow-y: auto; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
.charts > div { max-width: 640px; }
.chart { background: #fff; border: 1px solid #ddd; }
.chart .axis { stroke: #444; } .chart .grid { stroke: #eee; }
.chart text { font-size: 11px; fill: #444; } .chart .label { font-size: 12px; }
.legend { list-style: none; padding: 0; font-size: 0.85em; }
.legend li { display: inline-block; margin-right: 1em; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.3em; }
.empty { color: #666; font-style: italic; }
pre { background: #f0f0f0; padding: 0.6em; overflow-x: auto; }
footer { color: #666; font-size: 0.85em; padding: 1em 1.5em; }
"""




STAGE_GRACE_S = 60.0
"""Seconds a staging directory is left alone after it was made (see _remove_stale_stages)."""
SERIES_CACHE = ".series.json"
"""In OUT.builds/: the charted series of the last build (site_data.SeriesCache)."""


def build_site(experiment: str, registry_dir: Path, out: Path, secrets: list[str]) -> Path:
    """Build the site into a new directory of OUT.builds and point OUT at it; `secrets` (the
    tracking URI, its password) must be in no file. Returns the build directory."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_symlink() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: {'a directory' if out.is_dir() else 'a file'} that is not a site build "
                        f"(report site makes --out a symbolic link into {out.name}.builds/); remove it or choose "
                        "another --out")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: its parent directory {out.parent} does not exist")
    builds = out.with_name(f"{out.name}.builds")
    # Staged beside OUT (one file system: the rename into OUT.builds is atomic) and published
    # only once complete: any failure leaves nothing behind.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as stage, _held(Path(stage)):
        staged = Path(stage) / "site"
        staged.mkdir()
        cache = SeriesCache(builds / SERIES_CACHE)
        render_site(read_site(MlflowClient(), experiment, registry_dir, staged, cache), staged)
        _check_secrets(staged, secrets)
        builds.mkdir(exist_ok=True)
        with _lock(builds):
            _remove_stale_stages(out)
            cache.save()
            build = builds / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            staged.rename(build)
            if out.is_dir() and not out.is_symlink():
                out.rmdir()  # empty (checked above): a first build into a directory made for it
            link_tmp = Path(stage) / "link"
            os.symlink(os.path.relpath(build, out.parent), link_tmp)
            os.replace(link_tmp, out)
            for old in builds.iterdir():
                if old.is_dir() and old != build:
                    shutil.rmtree(old)  # a reader that has a file of it open still reads it to the end
    return build


@contextlib.contextmanager
def _lock(builds: Path) -> Iterator[None]:
    """One build of OUT at a time: the next waits (live's rebuild and an operator's may meet)."""
    with open(builds / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _held(stage: Path) -> Iterator[None]:
    """A lock on a staging directory while its build runs: one whose lock is free is a killed
    build's (SIGKILL, a machine gone), which the next build removes."""
    fd = os.open(stage, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale_stages(out: Path) -> None:
    """The staging directories of killed builds of OUT (`.OUT.xxxxxxxx`, tempfile's names): those
    whose lock is free. One made in the last STAGE_GRACE_S may be a build's that has not taken
    its lock yet."""
    name = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}")
    for stage in out.parent.iterdir():
        if (not name.fullmatch(stage.name) or stage.is_symlink() or not stage.is_dir()
                or time.time() - stage.stat().st_mtime < STAGE_GRACE_S):
            continue
        fd = os.open(stage, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(stage, ignore_errors=True)
        except BlockingIOError:
            pass  # a build running
        finally:
            os.close(fd)


def _check_secrets(build: Path, secrets: list[str]) -> None:
    for path in sorted(build.rglob("*")):
        if path.is_file() and any(s.encode() in path.read_bytes() for s in secrets if s):
            raise UserError(f"the site would show the tracking URI or its password (in {path.relative_to(build)}, "
                            "from the store or the registry); nothing was published")


def tracking_secrets(uri: str) -> list[str]:
    """What of the tracking URI no page may contain: the URI, and its password when it has one."""
    password = urlsplit(uri).password
    return [uri] + ([password] if password else [])


# -- pages ----------------------------------------------------------------------------------------
def _page(title: str, body: str, here: str, depth: int = 0, experiment: str = "") -> str:
    up = "../" * depth
    here_class = ' class="here"'
    nav = "".join(f'<a href="{up}{href}"{here_class if href == here else ""}>{esc(name)}</a>' for href, name in PAGES)
    built = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)}</title><link rel="icon" href="data:,"><link rel="stylesheet" href="{up}style.css"></head>\n'
            f"<body><header><h1>{esc(title)}</h1><nav>{nav}</nav></header>\n<main>\n{body}\n</main>\n"
            f"<footer>Built {built} by cpm-lightning report site{f' from the experiment {esc(experiment)}' if experiment else ''}."
            f"</footer></body></html>\n")


def _table(head: list[str], rows: list[list[str]], empty: str) -> str:
    """A table of already-escaped cells, or the `empty` note."""
    if not rows:
        return f'<p class="empty">{esc(empty)}</p>'
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def _list(items: list[str], empty: str) -> str:
    """A list of already-escaped items, or the `empty` note."""
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>" if items else f'<p class="empty">{esc(empty)}</p>'


def _utc(ms: float) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _last(r: RunData, key: str) -> tuple[int, int, float] | None:
    points = r.series.get(key)
    return points[-1] if points else None


def _in_effect(site: Site) -> list[str]:
    """The proposals the newest run trains with (its `cpm.proposals` tag, set at every start)."""
    if not site.runs:
        return []
    return [s.strip() for s in site.runs[0].run.data.tags.get("cpm.proposals", "").split(",") if s.strip()]


def _events(site: Site, pid: int) -> list[tuple[RunData, dict]]:
    return [(r, rec) for r, rec in site.ledger if pid in rec.get("proposals", [])]


def _proposal_name(p: Proposal) -> str:
    return f"{esc(p.label)} {link(p.discussion, p.title) if p.discussion else esc(p.title)}"


def _overview(site: Site) -> str:
    if not site.runs:
        return (f'<p class="empty">Nothing yet: the experiment {esc(site.experiment)} has no training run. '
                "This site fills in when the run logs its first step.</p>")
    rows = []
    for r in site.runs:
        loss, tokens, speed = _last(r, "train/loss"), _last(r, "train/tokens_seen"), _last(r, "train/tokens_per_sec")
        rows.append([esc(r.label), esc(r.run.info.status), esc(loss[0]) if loss else "&ndash;",
                     esc(f"{tokens[2]:,.0f}") if tokens else "&ndash;", esc(f"{loss[2]:.4f}") if loss else "&ndash;",
                     esc(f"{speed[2]:,.0f}") if speed else "&ndash;", esc(_utc(loss[1])) if loss else "&ndash;"])
    in_effect = set(_in_effect(site))
    step = _last(site.runs[0], "train/loss")
    step = step[0] if step else 0
    effect = [_proposal_name(p) for p in site.proposals if p.label in in_effect]
    starts = [rec for r, rec in site.ledger if r is site.runs[0] and rec["kind"] == "start"]
    excluded = set(starts[-1].get("exclude") or []) if starts else set()  # the latest `live` start's registry.exclude
    pending = []
    for p in site.proposals:
        if p.status in ("draft", "discussion"):
            pending.append(f"{_proposal_name(p)}: {esc(p.status)}")
        elif p.status == "accepted" and p.label not in in_effect:
            refused = [rec for _, rec in _events(site, p.id) if rec["kind"] in ("deferred", "suspended", "rejected")]
            why = (f"{refused[-1]['kind']} at step {refused[-1]['step']}: {refused[-1].get('reason', '')}" if refused
                   else "accepted; this run leaves it out (registry.exclude)" if p.id in excluded
                   else f"accepted, effective from step {p.effective_from_step}" if p.effective_from_step > step
                   else "accepted, not applied yet")
            pending.append(f"{_proposal_name(p)}: {esc(why)}")
    latest = (f'<p>Latest release: <a href="releases.html#{esc(site.releases[0].anchor)}">{esc(site.releases[0].uri)}</a> '
              f"(step {esc(site.releases[0].tags.get('step', '?'))}).</p>" if site.releases else "")
    loss = line_chart([(r.label, [(s, v) for s, _, v in r.series.get("train/loss", [])]) for r in site.runs], "step", "loss")
    return (_table(["run", "status", "step", "tokens", "last loss", "tokens/s", "last update"], rows, "") + latest
            + f'<div class="charts"><div>{loss}</div></div>'
            + "<h2>Proposals in effect</h2>" + _list(effect, "None.")
            + "<h2>Pending proposals</h2>" + _list(pending, "None."))


def _chart_groups(site: Site) -> list[tuple[str, str, list[str]]]:
    """(title, y label, metric keys) of each chart pair on the metrics page."""
    keys = sorted({k for r in site.runs for k in r.series if k.startswith("eval/")})
    groups = [("Training loss", "loss", ["train/loss"]), ("Validation loss", "loss", ["val/loss"]),
              ("Bits per byte (held-out)", "bits per byte", [k for k in keys if re.match(r"eval/heldout/.*/bpb$", k)]),
              ("Held-out loss", "loss", [k for k in keys if re.match(r"eval/heldout/.*/loss$", k)]),
              ("Throughput", "tokens/s", ["train/tokens_per_sec"]), ("Grad norm", "grad norm", ["train/grad_norm"])]
    tasks = sorted({k.split("/")[1] for k in keys} - {"heldout"})
    groups += [(f"Evaluation: {t}", "score", [k for k in keys if k.split("/")[1] == t]) for t in tasks]
    return groups


def _metrics(site: Site) -> str:
    if not site.runs:
        return '<p class="empty">Nothing yet: no run has logged a metric.</p>'
    body = []
    for title, y_label, keys in _chart_groups(site):
        by_step, by_tokens = [], []
        for r in site.runs:
            for key in keys:
                label = r.label + (f" {key}" if len(keys) > 1 else "")
                points = r.series.get(key, [])
                by_step.append((label, [(s, v) for s, _, v in points]))
                by_tokens.append((label, [(t, v) for s, _, v in points if (t := r.tokens_at(s)) is not None]))
        body.append(f'<h2>{esc(title)}</h2><div class="charts"><div>{line_chart(by_step, "step", y_label)}</div>'
                    f'<div>{line_chart(by_tokens, "tokens seen", y_label)}</div></div>')
    return "\n".join(body)


def _logs(site: Site) -> str:
    body = []
    for kind, what in (("daily", "Daily training logs (UTC days)"), ("weekly", "Weekly digests (ISO weeks)")):
        links = [f'<a href="{kind}/{quote(n)}.html">{esc(n)}</a>' for n in site.reports.get(kind, [])]
        body.append(f"<h2>{what}</h2>" + _list(links, "None yet."))
    return "\n".join(body)


def _evidence(p: Proposal) -> str:
    items = [f"run {esc(e['run'])}: {esc(e.get('verdict', ''))}" if isinstance(e, dict) else f"run {esc(e)}"
             for e in p.evidence]
    return "<br>".join(items) or "&ndash;"


def _proposals(site: Site) -> str:
    rows = []
    for p in site.proposals:
        events = "<br>".join(f"{esc(rec['time'])} step {esc(rec['step'])}: {esc(rec['kind'])} "
                             f"({esc(rec.get('reason', ''))}; run {esc(r.label)})" for r, rec in _events(site, p.id))
        rows.append([_proposal_name(p), esc(p.kind), esc(p.status), esc(", ".join(p.authors)), esc(p.created),
                     esc(p.decided or "–"), esc(p.effective_from_step), _evidence(p), events or "&ndash;"])
    note = (f'<p class="empty">{site.unreadable} proposal file(s) could not be read; see '
            "<code>cpm-lightning proposals check</code>.</p>" if site.unreadable else "")
    return _table(["proposal", "kind", "status", "authors", "created", "decided", "effective from step",
                   "evidence (trials)", "in the run (change ledger)"], rows, "No proposals in the registry.") + note


def _releases_page(site: Site) -> str:
    if not site.releases:
        return '<p class="empty">No release yet.</p>'
    body = []
    for rel in site.releases:
        scores = "".join(f"<li>{esc(k.removeprefix('eval/'))}: {esc(v)}</li>" for k, v in sorted(rel.tags.items())
                         if k.startswith("eval/"))
        dst = f"{rel.name}-{rel.version}"
        use = (f"cpm-lightning pull {rel.uri} --dst {dst}\n"
               f"cpm-lightning generate {dst} --prompt \"...\"")
        hf = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
              f"path = \"{dst}/artifacts/model/{HF_DIR}\"  # after the pull above\n"
              "tokenizer = AutoTokenizer.from_pretrained(path)\n"
              "model = AutoModelForCausalLM.from_pretrained(path)")
        body.append(f'<h2 id="{esc(rel.anchor)}">{esc(rel.uri)}</h2><ul>'
                    f"<li>aliases: {esc(', '.join(rel.aliases) or 'none')}</li>"
                    f"<li>released: {esc(_utc(rel.created_ms))}</li>"
                    + "".join(f"<li>{k}: {esc(rel.tags.get(k, 'n/a'))}</li>" for k in ("step", "tokens", "val_loss", "proposals"))
                    + f"</ul><h3>Evaluation</h3>{f'<ul>{scores}</ul>' if scores else '<p class=empty>Not evaluated.</p>'}"
                    f"<h3>Use</h3><pre><code>{esc(use)}</code></pre>"
                    f"<p>In <code>transformers</code> (the release's <code>{HF_DIR}/</code> folder, when its model card "
                    f"says it has one):</p><pre><code>{esc(hf)}</code></pre>")
    return "\n".join(body)


def _prompts(site: Site) -> str:
    book = {p.id: (p.text, p.author) for p in site.prompts}
    for c in site.completions:  # prompts dropped from the book since keep their completions
        for pid, entry in c.by_id.items():
            book.setdefault(pid, (str(entry.get("text", "")), str(entry.get("author", ""))))
    if not book:
        return '<p class="empty">No prompts yet: the community adds them to prompts.yaml in the registry.</p>'
    body = [f"<p>Greedy completions of the community's prompts by every release and the latest {PROMPT_STEPS} "
            "evaluated training steps of each run.</p>"]
    for pid, (text, author) in book.items():
        rows = [[esc(c.source), f'<span class="completion">{_completion(c.by_id[pid].get("completion", ""))}</span>']
                for c in site.completions if pid in c.by_id]
        body.append(f"<h2>{esc(pid)}</h2><p>by {esc(author)}</p><table><tr><th>prompt</th>"
                    f'<td class="prompt">{esc(text)}</td></tr></table>'
                    + _table(["model", "completion"], rows, "No completions yet."))
    return "\n".join(body)


def _release_href(site: Site, uri: str) -> str | None:
    spec = uri.removeprefix("models:/")
    for rel in site.releases:
        if spec in (f"{rel.name}/{rel.version}", *(f"{rel.name}@{a}" for a in rel.aliases)):
            return f"releases.html#{rel.anchor}"
    return None


def _release_cell(site: Site, uri: str) -> str:
    href = _release_href(site, uri)
    return f'<a href="{esc(href)}">{esc(uri)}</a>' if href else esc(uri)


def _apps(site: Site) -> str:
    rows = [[link(app.link, app.name), esc(", ".join(app.authors)), _release_cell(site, app.release),
             esc(app.adapter or "none")] for app in site.apps]
    body = [_table(["application", "authors", "built on", "adapter"], rows, "No applications yet: they are listed in "
                   "apps.yaml in the registry.")]
    tuned = [app for app in site.apps if app.adapter]
    if tuned:
        body.append(f"<p>Every nightly release re-scores each application's adapter on its tasks, applied to the new "
                    f"weights whatever base it was tuned on. Against the previous release: <b>worse</b> when a score "
                    f"fell by more than {WORSE_BY:.0%} of its value and more than {NOISE:g}, <b>better</b> when one "
                    f"rose by as much and none fell, <b>broken</b> when the adapter could not run on it.</p>")
    for app in tuned:
        history = app_history(app, site.releases)
        metrics = sorted({k for row in history for k in row.scores})
        rows = [[_release_cell(site, row.release.uri), esc(row.release.tags.get("step", "?")), *(
            esc(f"{row.scores[k]:.4f}") if k in row.scores else "&ndash;" for k in metrics),
            f"<b>{esc(row.verdict)}</b>" + (f": {esc(row.status.removeprefix('broken: '))}" if row.verdict == "broken"
                                            else "")] for row in reversed(history)]
        body.append(f"<h2>{esc(app.name)}</h2><p>adapter {esc(app.adapter)}, tuned on {_release_cell(site, app.release)}"
                    "</p>" + _table(["release", "step", *metrics, "against the previous release"], rows,
                                    "No release has re-scored it yet."))
    return "\n".join(body)


def _incidents(site: Site) -> str:
    items = [f"{esc(record_line(rec))} (run {esc(r.label)})" for r, rec in reversed(site.ledger) if rec["kind"] in INCIDENTS]
    return ("<p>Crashes, restarts, rollbacks, suspended proposals and a registry the run could not follow, "
            "from the runs' change ledgers, newest first.</p>"
            + _list(items, "None."))


def _report_pages(kind: str, names: list[str], directory: Path) -> None:
    """Each downloaded Markdown report of `directory` rendered to HTML beside its PNG, in its place."""
    images = {p.name for p in directory.glob("*.png")}
    for name in names:
        text = (directory / f"{name}.md").read_text(encoding="utf-8", errors="replace")
        (directory / f"{name}.html").write_text(_page(f"{kind.capitalize()} report {name}", markdown(text, images),
                                                      "logs.html", depth=1), encoding="utf-8")
        (directory / f"{name}.md").unlink()


def render_site(site: Site, build: Path) -> None:
    """Every page of `site` into `build`, where read_site downloaded its reports."""
    (build / "style.css").write_text(CSS)
    for kind in REPORTS:
        _report_pages(kind, site.reports.get(kind, []), build / kind)
    bodies = {"index.html": _overview, "metrics.html": _metrics, "logs.html": _logs, "proposals.html": _proposals,
              "releases.html": _releases_page, "prompts.html": _prompts, "apps.html": _apps, "incidents.html": _incidents}
    for href, name in PAGES:
        (build / href).write_text(_page(f"{name}: {site.experiment}", bodies[href](site), href,
                                        experiment=site.experiment), encoding="utf-8")



def _completion(text) -> str:
    """A completion as HTML, each line break shown (a young model's completion is often nothing
    else) and kept."""
    text = str(text)
    return esc(text.replace("\n", "\u23ce\n")) if text else '<em class="empty">(empty)</em>'
