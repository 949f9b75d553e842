"""Rebuilding the site of a run (issue 22 item 6) on a sqlite store, without a server: the
metrics are read from where the previous build's cache ends, and a killed build's staging
directory is removed by the next build."""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from cpm_lightning.cli.main import main
from cpm_lightning.tracking import site_data
from cpm_lightning.tracking.site import SERIES_CACHE
from cpm_lightning.tracking.site_data import SeriesCache

T0 = 1_800_000_000_000  # ms


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cpm-lightning"])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("rebuild"), run_name="r").info.run_id
    (tmp_path / "registry").mkdir()
    out = tmp_path / "www"
    argv = ["report", "site", "--experiment", "rebuild", "--registry", str(tmp_path / "registry"), "--out", str(out),
            "--tracking-uri", uri]
    yield client, run_id, out, lambda: main(argv)
    mlflow.set_tracking_uri(None)  # the verb sets it process-wide


def log(client, run_id, steps, value=lambda s: 1.0 / (s + 1), at=lambda s: T0 + 1000 * s):
    client.log_batch(run_id, metrics=[Metric("train/loss", value(s), at(s), s) for s in steps])


@pytest.fixture
def rows_read(monkeypatch):
    """The rows of metric history each build reads, in pages of 10."""
    monkeypatch.setattr(site_data, "HISTORY_PAGE", 10)
    counted, page = [], site_data._page

    def counting(*args):
        rows, following = page(*args)
        counted.append(len(rows))
        return rows, following

    monkeypatch.setattr(site_data, "_page", counting)
    return counted


def cached(out, run_id) -> list:
    return json.loads(out.with_name(f"{out.name}.builds").joinpath(SERIES_CACHE).read_text())[run_id]["train/loss"]["points"]


def test_a_rebuild_reads_what_was_logged_since_and_charts_what_a_full_read_does(store, rows_read):
    client, run_id, out, build = store
    log(client, run_id, range(25))
    build()
    assert sum(rows_read) == 25
    rows_read.clear()
    log(client, run_id, range(25, 30))
    build()
    assert sum(rows_read) == 10  # the last page again (20-24) and the 5 new rows, not 30
    rows_read.clear()
    log(client, run_id, range(30, 33))
    build()
    assert sum(rows_read) == 8  # what the previous rebuild read last (25-29) and the 3 new rows
    full = [list(p) for p in SeriesCache(None).series(client, run_id, "train/loss")]
    assert cached(out, run_id) == full and [p[0] for p in full] == list(range(33))


def test_a_point_logged_late_before_the_cached_page_is_a_full_read(store, rows_read):
    """A journal replayed after an outage sends points with the time they were logged: one of
    step 3 (a later value of it) lands among the rows the cache has read."""
    client, run_id, out, build = store
    log(client, run_id, range(25))
    build()
    rows_read.clear()
    log(client, run_id, [3], value=lambda s: 99.0, at=lambda s: T0 + 3500)
    build()
    assert sum(rows_read) > 26  # the cached page no longer starts where it did: all of it again
    points = cached(out, run_id)
    assert points == [list(p) for p in SeriesCache(None).series(client, run_id, "train/loss")]
    assert points[3] == [3, T0 + 3500, 99.0]


@pytest.mark.parametrize("cache", ["{not json", "[]", '{"RUN": {"train/loss": {"token": "not a token", "page": [], '
                                   '"points": []}}}', '{"RUN": {"train/loss": {"page": 3}}}', '{"RUN": 1}'])
def test_a_cache_that_cannot_be_read_or_does_not_fit_is_a_full_read(store, cache):
    client, run_id, out, build = store
    log(client, run_id, range(5))
    build()
    out.with_name(f"{out.name}.builds").joinpath(SERIES_CACHE).write_text(cache.replace("RUN", run_id))
    log(client, run_id, range(5, 7))
    build()
    assert [p[0] for p in cached(out, run_id)] == list(range(7))


def test_a_killed_build_s_staging_directory_is_removed_by_the_next(store):
    client, run_id, out, build = store
    log(client, run_id, range(3))
    stale, young, running = (out.with_name(f".www.{name}") for name in ("kill0000", "young000", "running0"))
    for stage in (stale, young, running):
        (stage / "site").mkdir(parents=True)
        (stage / "site" / "index.html").write_text("half a site")
    for stage in (stale, running):
        os.utime(stage, (time.time() - 3600, time.time() - 3600))
    fd = os.open(running, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a build that still runs
    try:
        build()
    finally:
        os.close(fd)
    assert not stale.exists() and young.exists() and running.exists()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".www.")) == [".www.running0",
                                                                                          ".www.young000"]
