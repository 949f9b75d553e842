"""`cpm-lightning report site` against a real `mlflow server`, and the site it builds looked at
in a real browser: served over HTTP on 127.0.0.1 and loaded page by page in headless Chromium.

The module fixture `store` makes one experiment quickly: a tiny in-process fit (with a proposal
applied and held-out evaluation), a change ledger with an applied and a crash record, the daily
and weekly reports, prompt-book completions at two steps and at a release, and the release
itself; the site is built from it once (`site`) and the tests look at that build.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import mlflow
import pytest
import yaml
from conftest import cli_error, write_config, write_corpus, write_proposal
from mlflow import MlflowClient
from PIL import Image

from cpm_lightning.cli.main import main

pytestmark = pytest.mark.slow  # end to end: real subprocesses and servers (`make test-fast` leaves it out)

PASSWORD = "pw-4d1f9c"  # in the tracking URI: no file of the site may contain it
SCRIPT_TITLE = "<script>alert('x')</script> Lower the learning rate & see"
BOLD_PROMPT = "The <b>capital</b> of France is"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when given args while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])
    yield
    mlflow.set_tracking_uri(None)  # the verbs set it process-wide


def chromium() -> str:
    """Debian's Chromium; the test fails (never skips) without it."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.fail("Chromium is missing: install Debian's package with `sudo apt-get install chromium` "
                    "(`make test` does when apt-get is there)")
    return path


def completions(step: int, model: str | None, suffix: str) -> dict:
    return {"step": step, "model": model, "completions": [
        {"id": "capital", "author": "@ada", "text": BOLD_PROMPT, "max_tokens": 8, "completion": f" Paris{suffix}"},
        {"id": "story", "author": "@bob", "text": "Once upon a time", "max_tokens": 8, "completion": f" there{suffix}"}]}


def log_json(client: MlflowClient, run_id: str, tmp: Path, name: str, data, folder: str | None) -> None:
    (tmp / name).write_text(json.dumps(data) if not isinstance(data, str) else data)
    client.log_artifact(run_id, str(tmp / name), folder)


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_server):
    root = tmp_path_factory.mktemp("site")
    uri = mlflow_server.uri.replace("http://", f"http://site:{PASSWORD}@")
    registry = root / "registry"
    write_proposal(registry, 1, {"model.optim.lr": 0.002}, kind="training", title=SCRIPT_TITLE,
                   evidence=[{"run": "0" * 32, "verdict": "loss 1% lower at step 6"}])
    write_proposal(registry, 2, {"model.optim.lr": 0.003}, status="discussion", kind="training")
    write_proposal(registry, 3, {"model.optim.weight_decay": 0.02}, kind="training")  # the run excludes it
    (registry / "prompts.yaml").write_text(yaml.safe_dump({"prompts": [
        {"id": "capital", "author": "@ada", "text": BOLD_PROMPT, "max_tokens": 8},
        {"id": "story", "author": "@bob", "text": "Once upon a time", "max_tokens": 8}]}))
    (registry / "apps.yaml").write_text(yaml.safe_dump({"apps": [
        {"name": "Poem helper", "authors": ["@cy"], "link": "https://example.org/poems", "release": "models:/site-lm@stable"}]}))
    config = write_config(root / "config.yaml", write_corpus(root), **{
        "trainer.max_steps": 6, "trainer.val_check_interval": 3, "checkpoint.every_n_steps": 6,
        "data.cache_dir": str(root / "cache"), "tracking.uri": uri, "tracking.experiment": "site",
        "registry.path": str(registry), "registry.exclude": [3], "eval.every_n_steps": 3, "eval.tasks": ["heldout"], "eval.limit": 2})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(sys, "argv", ["cpm-lightning"])
        main(["fit", "--config", str(config)])
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("site").experiment_id])
        run_id = run.info.run_id
        ledger = [{"time": "2026-11-20T09:59:00Z", "step": 0, "kind": "start", "proposals": [1], "changes": {},
                   "reason": "a new run", "exclude": [3]},
                  {"time": "2026-11-20T10:00:00Z", "step": 0, "kind": "applied", "proposals": [1],
                   "changes": {"model.optim.lr": {"old": 0.001, "new": 0.002}}, "reason": "accepted in the registry"},
                  {"time": "2026-11-20T11:00:00Z", "step": 3, "kind": "crash", "proposals": [], "changes": {},
                   "reason": "the segment died (exit 1)", "exit": 1, "error": "RuntimeError: boom"}]
        log_json(client, run_id, root, "changes.jsonl", "".join(json.dumps(r) + "\n" for r in ledger), None)
        for step in (3, 6):
            log_json(client, run_id, root, f"step-{step:08d}.json", completions(step, None, f" at step {step}"), "prompts")
        # The daily and weekly reports as `report daily|weekly` log them (tests/tracking/test_tracking.py runs those).
        day = time.strftime("%Y-%m-%d", time.gmtime(run.info.start_time / 1000))
        Image.new("RGB", (80, 40), "steelblue").save(root / f"{day}.png")
        client.log_artifact(run_id, str(root / f"{day}.png"), "daily")
        log_json(client, run_id, root, f"{day}.md", f"# Training log {day} (UTC)\n\n## Run {run_id}\n\n"
                 f"- restarts: 0\n- proposals that took effect: 0001 {SCRIPT_TITLE}\n\n![loss]({day}.png)\n", "daily")
        log_json(client, run_id, root, "2026-W47.md", "# Week 2026-W47\n\n## Incidents\n\nNone.\n", "weekly")
        main(["release", str(root / "run" / "checkpoints" / "step-00000006.ckpt"), "--name", "site-lm",
              "--proposals", str(registry), "--eval-tasks", "heldout", "--eval-config", str(config), "--eval-limit", "2"])
        main(["promote", "site-lm", "1", "--alias", "stable"])
        release_run = client.get_model_version("site-lm", "1").run_id
        log_json(client, release_run, root, "completions.json", completions(6, "models:/site-lm/1", " (release)"), "prompts")
        client.create_experiment("site-empty")
    return {"root": root, "uri": uri, "registry": registry, "run_id": run_id, "day": day, "server": mlflow_server}


@pytest.fixture(scope="module")
def site(store) -> Path:
    out = store["root"] / "public"
    main(["report", "site", "--experiment", "site", "--registry", str(store["registry"]), "--out", str(out),
          "--tracking-uri", store["uri"]])
    return out


def text(site: Path, page: str) -> str:
    return (site / page).read_text()


def test_the_pages_show_the_run(site, store):
    index = text(site, "index.html")
    assert all(f"<th>{h}</th>" in index for h in ("step", "tokens", "last loss", "tokens/s", "last update"))
    row = re.search(r"<tr><td>[^<]*\(([0-9a-f]{8})\)</td><td>FINISHED</td><td>(\d+)</td><td>([\d,]+)</td>"
                    r"<td>([\d.]+)</td><td>([\d,]+)</td><td>(\d{4}-\d\d-\d\d \d\d:\d\d UTC)</td></tr>", index)
    assert row and row[1] == store["run_id"][:8] and row[2] == "6", index
    assert 'Latest release: <a href="releases.html#v-site-lm-1">models:/site-lm/1</a> (step 6)' in index
    in_effect, pending = index.split("<h2>Proposals in effect</h2>")[1].split("<h2>Pending proposals</h2>")
    assert "0001" in in_effect and "0002" not in in_effect and "0002" in pending and "discussion" in pending
    assert "Proposal 3</a>: accepted; this run leaves it out (registry.exclude)" in pending

    metrics = text(site, "metrics.html")
    for title in ("Training loss", "Validation loss", "Bits per byte (held-out)", "Held-out loss", "Throughput",
                  "Grad norm"):
        assert f"<h2>{title}</h2>" in metrics
    assert "eval/heldout/en/bpb" in metrics and ">tokens seen</text>" in metrics

    logs = text(site, "logs.html")
    assert f'href="daily/{store["day"]}.html"' in logs and 'href="weekly/2026-W47.html"' in logs
    daily = text(site, f"daily/{store['day']}.html")
    assert f'<p><img src="{store["day"]}.png" alt="loss"></p>' in daily and "<li>restarts: 0</li>" in daily
    assert "<h2>Incidents</h2>\n<p>None.</p>" in text(site, "weekly/2026-W47.html")
    assert (site / "daily" / f"{store['day']}.png").stat().st_size > 0

    proposals = text(site, "proposals.html")
    assert "loss 1% lower at step 6" in proposals
    assert "2026-11-20T10:00:00Z step 0: applied (accepted in the registry" in proposals

    releases = text(site, "releases.html")
    assert '<h2 id="v-site-lm-1">models:/site-lm/1</h2>' in releases and "aliases: candidate, stable" in releases
    assert "cpm-lightning pull models:/site-lm/1 --dst site-lm-1" in releases
    assert "AutoModelForCausalLM.from_pretrained(path)" in releases and "site-lm-1/artifacts/model/hf" in releases
    assert re.search(r"<li>heldout/en/bpb: \d+\.\d{4}</li>", releases)

    prompts = text(site, "prompts.html")
    for source, completion in (("models:/site-lm/1 (step 6)", " Paris (release)"), ("step 6", " Paris at step 6"),
                               ("step 3", " Paris at step 3")):
        assert source in prompts and completion in prompts
    assert prompts.index("models:/site-lm/1") < prompts.index("step 6</td>") < prompts.index("step 3</td>")

    apps = text(site, "apps.html")
    assert '<a href="https://example.org/poems" rel="nofollow noopener">Poem helper</a>' in apps
    assert '<a href="releases.html#v-site-lm-1">models:/site-lm@stable</a>' in apps

    incidents = text(site, "incidents.html")
    assert "2026-11-20T11:00:00Z step 3: crash (the segment died (exit 1))" in incidents and "applied" not in incidents
    assert "RuntimeError: boom" not in incidents  # a crash's stderr lines stay in the ledger


def test_community_text_is_escaped(site, store):
    proposals = text(site, "proposals.html")
    assert "<script>" not in proposals and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; Lower" in proposals
    assert "<b>capital</b>" not in text(site, "prompts.html") and "&lt;b&gt;capital&lt;/b&gt;" in text(site, "prompts.html")
    assert "&lt;script&gt;alert" in text(site, f"daily/{store['day']}.html")  # in a report too
    assert not any("<script" in page.read_text() for page in site.glob("**/*.html"))


def test_no_file_holds_the_tracking_uri_or_its_password(site, store):
    host = urlsplit(store["server"].uri).netloc
    for path in site.resolve().rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert PASSWORD.encode() not in data and host.encode() not in data, path


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(site):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_every_page_loads_in_chromium(served, site, tmp_path):
    """From the overview, every internal page in headless Chromium: no console error, no failed
    request, every internal link and image answers 200, the charts have points; a screenshot
    of the overview."""
    from playwright.sync_api import sync_playwright

    problems, seen, todo = [], set(), [served + "index.html"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium())
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.on("response", lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None)
        page.on("request", lambda r: None if r.url.startswith((served, "data:")) else problems.append(f"external: {r.url}"))
        while todo:
            url = todo.pop()
            if url in seen:
                continue
            seen.add(url)
            assert page.goto(url).status == 200, url
            if url.endswith("index.html") and url.count("/") == 3:
                page.screenshot(path=tmp_path / "site-overview.png", full_page=True)
            refs = page.eval_on_selector_all("a[href], img[src], link[href]",
                                             "els => els.map(e => e.getAttribute('href') || e.getAttribute('src'))")
            for ref in refs:
                target = urljoin(url, ref).split("#")[0]
                if ref.startswith("data:") or not target.startswith(served):
                    continue
                assert status(target) == 200, f"{url}: {ref}"
                if target.endswith(".html"):
                    todo.append(target)
            if url.endswith("metrics.html"):
                points = page.eval_on_selector_all("svg.chart polyline", "els => els.map(e => e.getAttribute('points'))")
                assert len(points) >= 12 and all(p.strip() for p in points), points
                loss = page.eval_on_selector_all("svg.chart polyline", "els => els[0].getAttribute('points')")
                assert len(loss.split()) == 6  # train/loss at steps 1..6
        browser.close()
    assert not problems, problems
    assert {urlsplit(u).path for u in seen} >= {"/index.html", "/metrics.html", "/logs.html", "/proposals.html",
                                                "/releases.html", "/prompts.html", "/apps.html", "/incidents.html"}
    assert any("/daily/" in u for u in seen) and any("/weekly/" in u for u in seen)
    assert (tmp_path / "site-overview.png").stat().st_size > 10_000


def test_an_unreachable_store_leaves_the_site_as_it_was(site, store, capsys):
    before, files = os.readlink(site), sorted(p.name for p in site.iterdir())
    down = f"http://site:{PASSWORD}@127.0.0.1:9"  # the discard port: nothing listens
    error = cli_error(capsys, "report", "site", "--experiment", "site", "--registry", str(store["registry"]),
                      "--out", str(site), "--tracking-uri", down)
    assert error.startswith("tracking server http://127.0.0.1:9 is unreachable") and PASSWORD not in error
    assert os.readlink(site) == before and sorted(p.name for p in site.iterdir()) == files
    assert [p.name for p in site.with_name("public.builds").iterdir() if p.is_dir()] == [Path(before).name]


class Failing(http.server.BaseHTTPRequestHandler):
    """A tracking server that answers its health check and fails every API request."""

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 500)
        self.end_headers()
        self.wfile.write(b"OK" if self.path == "/health" else b'{"error_code": "INTERNAL_ERROR", "message": "disk full"}')

    def log_message(self, *args):
        pass


def test_a_store_failing_mid_read_leaves_the_site_as_it_was(site, store, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    before = os.readlink(site)
    try:
        uri = f"http://site:{PASSWORD}@127.0.0.1:{server.server_address[1]}"
        error = cli_error(capsys, "report", "site", "--experiment", "site", "--registry", str(store["registry"]),
                          "--out", str(site), "--tracking-uri", uri)
    finally:
        server.shutdown()
        server.server_close()
    assert error.startswith(f"tracking store http://127.0.0.1:{server.server_address[1]}: ") and PASSWORD not in error
    assert error.endswith(f"; {site} was left as it was")
    assert os.readlink(site) == before
    assert [p.name for p in site.with_name("public.builds").iterdir() if p.is_dir()] == [Path(before).name]


def test_a_rebuild_replaces_the_link_and_removes_the_old_build(store, tmp_path):
    out = tmp_path / "www"
    argv = ["report", "site", "--experiment", "site-empty", "--registry", str(store["registry"]), "--out", str(out),
            "--tracking-uri", store["uri"]]
    out.mkdir()  # an empty directory made for the site is taken over
    main(argv)
    first = os.readlink(out)
    main(argv)
    second = os.readlink(out)
    assert first != second and not Path(second).is_absolute() and second.startswith("www.builds/")
    assert [p.name for p in (tmp_path / "www.builds").iterdir() if p.is_dir()] == [Path(second).name]
    assert "Nothing yet: the experiment site-empty has no training run" in (out / "index.html").read_text()
    for page in ("metrics.html", "releases.html", "logs.html", "incidents.html"):
        assert 'class="empty"' in (out / page).read_text()


def test_out_that_is_not_a_site_build_is_refused(store, tmp_path, capsys):
    out = tmp_path / "www"
    out.mkdir()
    (out / "index.html").write_text("someone else's site")
    error = cli_error(capsys, "report", "site", "--experiment", "site", "--registry", str(store["registry"]),
                      "--out", str(out), "--tracking-uri", store["uri"])
    assert error == (f"--out {out}: a directory that is not a site build (report site makes --out a symbolic link "
                     "into www.builds/); remove it or choose another --out")
    assert (out / "index.html").read_text() == "someone else's site"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["www"]


def test_a_first_build_that_fails_leaves_nothing(store, tmp_path, capsys):
    error = cli_error(capsys, "report", "site", "--experiment", "nope", "--registry", str(store["registry"]),
                      "--out", str(tmp_path / "www"), "--tracking-uri", store["uri"])
    assert error.startswith("--experiment 'nope' does not exist; experiments: ") and "site-empty" in error
    assert list(tmp_path.iterdir()) == []


def test_bad_input_leaves_the_site_as_it_was(site, store, tmp_path, capsys):
    """A registry that is not there, and one whose community text holds the tracking URI's
    password (a build that would publish it is refused): one line each, OUT still the old build."""
    before = os.readlink(site)
    argv = ["report", "site", "--experiment", "site", "--out", str(site), "--tracking-uri", store["uri"]]
    error = cli_error(capsys, *argv, "--registry", str(tmp_path / "nowhere"))
    assert error == f"--registry {tmp_path / 'nowhere'}: no such directory; expected the proposal registry"
    leaky = tmp_path / "registry"
    shutil.copytree(store["registry"], leaky)
    write_proposal(leaky, 3, {"model.optim.lr": 0.004}, status="discussion", kind="training", title=f"Use {PASSWORD}")
    error = cli_error(capsys, *argv, "--registry", str(leaky), "--experiment", "site-empty")  # the quicker to read
    assert error == ("the site would show the tracking URI or its password (in proposals.html, from the store or the "
                     "registry); nothing was published")
    assert os.readlink(site) == before
    assert [p.name for p in site.with_name("public.builds").iterdir() if p.is_dir()] == [Path(before).name]
