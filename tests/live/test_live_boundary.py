"""Boundaries that cost a step (issue 25 item 4): a training and a data boundary are applied
inside the running segment at their exact steps, and a restart from the checkpoint of each
boundary trains on the same samples with the same losses; an architecture boundary still
starts a new process. One `live` run on the tiny preset, 8 steps, a checkpoint every 2:
  step 3   0001 (training: weight decay, z-loss, the schedule's floor) takes effect
  step 5   0002 (data: a new source, its tokens prepared by the segment) takes effect
  step 7   0003 (architecture: ff_dim grown) takes effect: the model migrates in a new process
Then `fit` resumes the boundary checkpoints of steps 3 and 5, without `live`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_corpus
from live_support import extra_source, git_registry, history, live_config, one, probe, proposal, records

from cpm_lightning.checkpoint.directory import complete_checkpoints, step_of
from cpm_lightning.cli.main import main

pytestmark = pytest.mark.slow  # end to end: real `fit` segments, a real MLflow store

TRAINING = {"model.optim.weight_decay": 0.02, "model.loss.z_loss": 1e-4, "model.schedule.min_lr_ratio": 0.2}


def _lines(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def run(tmp_path_factory, live_env):
    root = tmp_path_factory.mktemp("boundary")
    live_env.chdir(root)
    corpus, out = write_corpus(root), str(root)
    registry, _ = git_registry(root, dict([
        proposal(1, "training", TRAINING, step=3),
        proposal(2, "data", {"data.sources.numbers": {"url": str(extra_source(root)), "weight": 1.0}}, step=5),
        proposal(3, "architecture", {"model.arch.ff_dim": 160}, step=7),
    ]))
    probes = [probe("Record", out=out), probe("RecordOptimizer", out=out), probe("RecordPid", out=out)]
    # total_steps fixed, so that a fit of fewer steps has the same schedule
    cfg = live_config(root, corpus, probes, **{"trainer.max_steps": 8, "registry.path": str(registry),
                                               "model.schedule.total_steps": 8})
    main(["live", "--config", str(cfg)])
    return root, cfg


def test_data_and_training_boundaries_apply_in_the_running_segment(run):
    root, _ = run
    recs = records(root)
    training = one(recs, "applied", proposals=[1])
    assert training["step"] == 3 and training["in_segment"] is True
    assert training["changes"]["model.optim.weight_decay"] == {"old": 0.01, "new": 0.02}
    assert training["changes"]["model.loss.z_loss"] == {"old": 0.0, "new": 1e-4}
    data = one(recs, "applied", proposals=[2])
    assert data["step"] == 5 and data["in_segment"] is True and data["in_effect"] == [1, 2]
    assert data["changes"]["data.sources.numbers.weight"] == {"old": None, "new": 1.0}
    pids = {s: r["pid"] for s, r in _lines(root / "pids.jsonl").items()}
    assert sorted(pids) == list(range(1, 9))
    assert len({pids[s] for s in range(1, 8)}) == 1  # one process across the boundaries of steps 3 and 5
    saved = {step_of(p) for p in complete_checkpoints(root / "run" / "checkpoints")}
    assert {3, 5} <= saved  # each boundary's checkpoint, kept while a suspension may return to it
    used = _lines(root / "optim.jsonl")  # what AdamW used for the update that reached step + 1
    assert [used[s]["groups"][0]["weight_decay"] for s in range(8)] == [0.01] * 3 + [0.02] * 5
    numbers = {m.step: m.value for m in history(root, "data/samples/numbers")}
    assert min(numbers) == 6 and numbers[8] > numbers[6] > 0  # drawn from the batch after step 5 on


def test_an_architecture_boundary_still_starts_a_new_process(run):
    root, _ = run
    recs = records(root)
    grown = one(recs, "applied", proposals=[3])
    assert grown["step"] == 7 and grown["in_segment"] is False
    assert [m["name"] for m in grown["migrations"]] == ["grow_ff_dim"]
    pids = {s: r["pid"] for s, r in _lines(root / "pids.jsonl").items()}
    assert pids[8] != pids[7]
    assert len(list((root / "run" / "live").glob("segment-*.log"))) == 2


@pytest.mark.parametrize("boundary", [3, 5])
def test_a_restart_from_the_boundary_checkpoint_trains_as_the_segment_did(run, tmp_path, live_env, boundary):
    """`fit` resumed from the checkpoint of the boundary, the registry resolved there: the next
    two steps' samples are the live run's, and their losses equal to 1e-6 (CPU fp32)."""
    root, cfg = run
    live_env.chdir(tmp_path)
    ckpt = root / "run" / "checkpoints" / f"step-{boundary:08d}.ckpt"
    main(["fit", "--config", str(cfg), f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false",
          f"--trainer.max_steps={boundary + 2}", f"--trainer.callbacks=[{json.dumps(probe('Record', out=str(tmp_path)))}]",
          f"--ckpt_path={ckpt}"])
    live, again = _lines(root / "steps.jsonl"), _lines(tmp_path / "steps.jsonl")
    assert sorted(again) == [boundary + 1, boundary + 2]
    for step in again:
        assert again[step]["samples"] == live[step]["samples"], step
        assert again[step]["loss"] == pytest.approx(live[step]["loss"], abs=1e-6), step
