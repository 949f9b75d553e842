"""Issue 22's open items in `live`, without training: a segment's options (a stand-in for `fit`
records them) and what a rollback does to the checkpoints pinned for nightly releases."""

from __future__ import annotations

import json
import os
import sys
import time

import yaml
from live_support import live_config, records

from cpm_lightning.cli.main import main
from cpm_lightning.live.protocol import LiveDir, Status
from cpm_lightning.live.settings import read_settings
from cpm_lightning.live.supervisor import Supervisor

# The segment's stand-in: records its arguments and reports the run done.
SEGMENT = ("import json, os, pathlib, sys; from cpm_lightning.live.protocol import *; "
           "plan = read_json(pathlib.Path(os.environ[SEGMENT_ENV]), Plan); "
           "open({argv!r}, 'a').write(json.dumps(sys.argv[1:]) + chr(10)); "
           "write_json(LiveDir(plan.root).status, Status(segment=plan.segment, state='finished', step=4))")


def segment_argv(tmp_path, corpus, **trainer) -> list[str]:
    """fit's arguments of the one segment of a live run whose trainer group sets `trainer` and
    leaves the progress bar and the model summary unset otherwise."""
    argv = tmp_path / "argv.jsonl"
    cfg = live_config(tmp_path, corpus, [], **{"trainer.max_steps": 4, "registry.path": None,
                                               "live.launcher": [sys.executable, "-c", SEGMENT.format(argv=str(argv))]})
    config = yaml.safe_load(cfg.read_text())
    for key in ("enable_progress_bar", "enable_model_summary"):
        config["trainer"].pop(key)
    config["trainer"].update(trainer)
    cfg.write_text(yaml.safe_dump(config))
    main(["live", "--config", str(cfg)])
    assert [r["kind"] for r in records(tmp_path)] == ["start", "stop"]
    return json.loads(argv.read_text())


def test_a_segment_runs_without_progress_bar_and_model_summary(tmp_path, corpus, live_env):
    argv = segment_argv(tmp_path, corpus)
    assert "--trainer.enable_progress_bar=false" in argv and "--trainer.enable_model_summary=false" in argv


def test_the_operator_s_progress_bar_and_model_summary_are_kept(tmp_path, corpus, live_env):
    argv = segment_argv(tmp_path, corpus, enable_progress_bar=True, enable_model_summary=False)
    assert not [a for a in argv if "enable_progress_bar" in a or "enable_model_summary" in a]  # the config's


def test_a_rollback_drops_the_releases_pinned_after_its_target(tmp_path, corpus):
    """Steps 4 and 8 are pinned for release; the run diverges at step 9 and goes back to the
    checkpoint of step 6: step 8's weights are off the run's timeline and never released."""
    cfg = live_config(tmp_path, corpus, [], **{"trainer.max_steps": 12, "live.release_every_n_steps": 4,
                                               "checkpoint.keep_last": 4})
    settings = read_settings(["--config", str(cfg)])
    files = LiveDir(settings.root)
    files.checkpoints.mkdir(parents=True)
    files.publish.mkdir(parents=True)
    for step in (4, 6, 8):
        (files.checkpoints / f"step-{step:08d}.ckpt").write_bytes(b"a checkpoint")
        time.sleep(0.01)  # written in step order (complete_checkpoints sorts by time)
    for step in (4, 8):
        os.link(files.checkpoints / f"step-{step:08d}.ckpt", files.publish / f"step-{step:08d}.ckpt")
    supervisor = Supervisor(settings)
    divergence = {"step": 9, "loss": 50.0, "window_mean": 1.0, "window_std": 0.1, "nonfinite_in_a_row": 0,
                  "end_index": 36}
    supervisor._diverged(Status(segment=1, state="diverged", start_step=4, step=9, checkpoints={"4": 16},
                                divergence=divergence))
    supervisor.uploader.close(timeout=1)
    rollback = records(tmp_path)[-1]
    assert rollback["kind"] == "rollback" and rollback["resume_step"] == 6
    assert sorted(p.name for p in files.publish.glob("step-*")) == ["step-00000004.ckpt"]
    assert sorted(p.name for p in files.checkpoints.glob("step-*")) == ["step-00000004.ckpt", "step-00000006.ckpt"]
