"""Publishing inside `live` (issue 15, docs/ARCHITECTURE.md "Publishing"): one real live run on
the tiny preset, logging to a real `mlflow server`, whose schedule's clock is set a few seconds
before the end of this week's Sunday (UTC): while it trains the day and the week end, and it
releases the checkpoints of steps 4 and 8 with alias `nightly` (each with the int8 variant
of live.release_quantize). The site is built when nothing else is due, and once more at the end
(tests/tracking/test_site.py looks at a site in a browser)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
from conftest import write_corpus
from live_support import live_config, proposal, records
from mlflow import MlflowClient

from cpm_lightning.cli.main import main
from cpm_lightning.live import publish
from cpm_lightning.live.protocol import LiveDir
from cpm_lightning.live.settings import read_settings
from cpm_lightning.tracking.releases import RUN_TAG

pytestmark = pytest.mark.slow  # end to end: real subprocesses and servers (`make test-fast` leaves it out)


def sunday_before_midnight(seconds: float) -> dt.datetime:
    """`seconds` before the end of this ISO week, UTC."""
    today = dt.datetime.now(dt.timezone.utc).date()
    monday = publish.monday_of(today) + dt.timedelta(days=7)
    return dt.datetime.combine(monday, dt.time(), dt.timezone.utc) - dt.timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def published(tmp_path_factory, live_env, mlflow_server):
    root = tmp_path_factory.mktemp("publish")
    live_env.chdir(root)
    (root / "registry").mkdir()
    name, text = proposal(1, "training", {"model.loss.z_loss": 0.0})
    (root / "registry" / name).write_text(text)

    cfg = live_config(root, write_corpus(root), [], **{
        "trainer.max_steps": 8, "registry.path": str(root / "registry"),
        "tracking.uri": mlflow_server.uri, "tracking.experiment": "publish",
        "eval.tasks": ["piqa"], "eval.limit": 4, "live.release_every_n_steps": 4, "live.release_quantize": ["int8"],
        "live.site_dir": str(root / "site"), "live.site_every_minutes": 60})
    end, started = sunday_before_midnight(5), []

    def clock():  # 5 s before the week's end when the schedule first looks, however long `live` took to start
        started[:] = started or [time.monotonic()]
        return end + dt.timedelta(seconds=time.monotonic() - started[0])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(publish, "utc_now", clock)
        main(["live", "--config", str(cfg)])
    return root, MlflowClient(mlflow_server.uri), end


def test_the_ended_day_and_week_are_published(published):
    root, client, end = published
    sunday = end.date()
    year, week, _ = sunday.isocalendar()
    daily = root / "run" / "reports" / "daily" / f"{sunday}.md"
    assert daily.read_text().startswith(f"# Training log {sunday} (UTC)")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("publish").experiment_id])
              if RUN_TAG not in r.data.tags]  # the training run, not the releases'
    digest = client.download_artifacts(run.info.run_id, f"weekly/{year}-W{week:02d}.md", str(root))
    text = Path(digest).read_text()
    assert text.startswith(f"# Week {year}-W{week:02d}")
    assert f"## Run {run.info.run_name} ({run.info.run_id})" in text  # this week's training is in it
    state = json.loads((root / "run" / "live" / "published.json").read_text())
    assert state == {"day": str(sunday), "week": str(publish.monday_of(sunday)), "release_step": 8}


def test_every_fourth_step_is_released_as_nightly(published):
    root, client, _ = published
    versions = sorted(client.search_model_versions("name='publish'"), key=lambda v: int(v.version))
    assert [int(v.tags["step"]) for v in versions] == [4, 8]
    assert client.get_model_version_by_alias("publish", "nightly").version == versions[-1].version
    assert [v.tags["proposals"] for v in versions] == ["0001", "0001"]  # the checkpoints' (test_live_fleet.py)
    assert all(0 <= float(v.tags["eval/piqa/acc"]) <= 1 for v in versions)  # the `eval` group's task
    assert [v.tags["variants"] for v in versions] == ["int8", "int8"]  # live.release_quantize
    assert not list((root / "run" / "live" / "publish").glob("step-*"))  # the pinned checkpoints are gone
    log = (root / "run" / "live" / "publish.log").read_text()
    assert "live: published the nightly release of step 4" in log and "failed" not in log
    assert records(root)[-1]["kind"] == "stop"


def test_the_site_is_built_at_the_end_with_the_nightly_release(published):
    root, client, _ = published
    site = root / "site"
    builds = [p for p in root.glob("site.builds/*") if not p.name.startswith(".")]
    assert site.is_symlink() and site.resolve() == builds[0] and len(builds) == 1  # the last build, swapped in
    releases = (site / "releases.html").read_text()  # built after the last release: `live` waited for it
    assert "models:/publish/2" in releases and "nightly" in releases


def test_a_command_that_fails_is_one_line_and_is_tried_again_later(tmp_path, corpus, capsys, monkeypatch):
    """The tracking store is down: the daily log of yesterday cannot be published."""
    cfg = live_config(tmp_path, corpus, [], **{"trainer.max_steps": 4, "tracking.uri": "http://127.0.0.1:9"})
    settings = read_settings(["--config", str(cfg)])
    p = publish.Publisher(settings, LiveDir(settings.root))
    settings.root.joinpath("live").mkdir(parents=True)
    real = publish.utc_now
    monkeypatch.setattr(publish, "utc_now", lambda: real() + dt.timedelta(days=1))  # a day has ended
    p.tick(logged=True, step=0)
    p.proc.wait()
    p.tick(logged=True, step=0)
    err = capsys.readouterr().err.strip().splitlines()
    today = dt.datetime.now(dt.timezone.utc).date()
    assert err == [f"live: publishing the daily log of {today} failed: tracking server http://127.0.0.1:9 is "
                   "unreachable (ConnectionError); start it or point tracking.uri / $MLFLOW_TRACKING_URI at a running "
                   "one; trying again in 300 s"]
    assert p.proc is None and p.state.day == str(today - dt.timedelta(days=1))  # not published, due again
    assert "$ cpm-lightning report daily --date" in (settings.root / "live" / "publish.log").read_text()


def test_a_step_trained_again_after_it_was_released_is_not_released_again(tmp_path, corpus):
    """After a rollback the segment pins the checkpoint of a release step it trains again: the
    publisher drops it instead of releasing the step twice, and releases the steps after it."""
    cfg = live_config(tmp_path, corpus, [], **{"trainer.max_steps": 12, "live.release_every_n_steps": 4})
    settings = read_settings(["--config", str(cfg)])
    files = LiveDir(settings.root)
    files.publish.mkdir(parents=True)
    for step in (4, 8):
        (files.publish / f"step-{step:08d}.ckpt").write_bytes(b"a checkpoint")
    p = publish.Publisher(settings, files)
    p.state.release_step = 4
    job = p._due(step=10)
    assert job.what == "the nightly release of step 8" and not (files.publish / "step-00000004.ckpt").exists()
    job.done()
    assert p.state.release_step == 8 and not list(files.publish.glob("step-*"))


@pytest.mark.parametrize("overrides, message", [
    ({"live.release_every_n_steps": 3}, "live.release_every_n_steps=3: expected a multiple of "
     "checkpoint.every_n_steps=2, so that a checkpoint is written at every release step"),
    ({"live.release_every_n_steps": 4, "trainer.logger": False}, "live.release_every_n_steps: publishing reads the "
     "run from MLflow, and trainer.logger is off; turn the logger on or unset it"),
    ({"live.site_dir": "site", "registry.path": None}, "live.site_dir: the site shows the run's proposals; set "
     "registry.path, or unset live.site_dir"),
    ({"live.site_every_minutes": 0}, "live.site_every_minutes must be positive, got 0"),
])
def test_what_cannot_be_published_is_one_line(tmp_path, corpus, capsys, overrides, message):
    cfg = live_config(tmp_path, corpus, [], **{"trainer.max_steps": 4, **overrides})
    with pytest.raises(SystemExit) as exit_:
        main(["live", "--config", str(cfg)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_fit_help_explains_the_publishing_keys(capsys):
    """`fit --help` reads the config dataclasses' field docstrings (only then: cli/fit.py run)."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("--live.release_every_n_steps RELEASE_EVERY_N_STEPS Release the checkpoint of every this many steps (a "
            "multiple of checkpoint.every_n_steps) to the Model Registry with alias `nightly`") in text


def test_a_nightly_release_rescores_the_applications_adapters(tmp_path, corpus):
    """With a registry, the release command re-scores its apps.yaml adapters on live.apps_limit
    examples per task (tests/tracking/test_apps.py runs that release)."""
    (tmp_path / "registry").mkdir()
    cfg = live_config(tmp_path, corpus, [], **{"trainer.max_steps": 8, "live.release_every_n_steps": 4,
                                               "live.apps_limit": 3, "registry.path": str(tmp_path / "registry")})
    settings = read_settings(["--config", str(cfg)])
    files = LiveDir(settings.root)
    files.publish.mkdir(parents=True)
    (files.publish / "step-00000004.ckpt").write_bytes(b"a checkpoint")
    argv = publish.Publisher(settings, files)._due(step=6).argv
    assert argv[argv.index("--proposals"):argv.index("--proposals") + 4] == [
        "--proposals", str(tmp_path / "registry"), "--apps-limit", "3"]
