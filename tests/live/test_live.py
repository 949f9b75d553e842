"""`cpm-lightning live` (issue 12): real `fit` segments on the tiny preset, a git registry that
the community (the probes of live_probe.py) merges into while the run goes on, a real MLflow
store. Each segment is a subprocess that imports Lightning, so one live run, `journey` (one
process, 24 steps, a checkpoint every 2), carries most tests:
  step 3   proposal 0008 (data: a new source) is merged, effective at step 18
  step 5   the segment is SIGKILLed: restart from step 4
  step 7   a NaN gradient: skipped and counted
  step 9   the weights are spiked: rollback to step 8, the samples of steps 8-9 skipped
  step 11  0003 (training, effective_from_step 2: passed) is merged, with a conflicting pair
           0004/0005 and an invalid 0007: 0003 applies at the checkpoint boundary 12
  step 13  the registry directory disappears for a while
  step 14  0002 (training, a far too large learning rate) takes effect: the run diverges,
           rolls back, diverges again: 0002 is suspended, back to step 14 without it
  step 18  0008 takes effect, and architecture proposal 0006 (ff_dim and FFN layers grown): the
           model migrates; 0009 (rotary) has no migration and was deferred from the start
Two processes and a killed supervisor: test_live_fleet.py. The other tests here start no
training: a one-line stand-in for the segment (live.launcher), or an error before a segment
starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import write_corpus
from live_support import extra_source, git_registry, history, live_config, one, probe, proposal, records
from mlflow import MlflowClient

from cpm_lightning.checkpoint.directory import latest, step_of
from cpm_lightning.checkpoint.store import read_meta
from cpm_lightning.cli.main import main
from cpm_lightning.core.perf import auto_precision
from cpm_lightning.live.commands import status_text
from cpm_lightning.live.ledger import read_records
from cpm_lightning.train.config import ScheduleConfig

pytestmark = pytest.mark.slow  # end to end: real subprocesses and servers (`make test-fast` leaves it out)

BAD_LR = 30.0  # inside what the registry accepts (any positive number), far too large for the model


@pytest.fixture(scope="module")
def journey(tmp_path_factory, live_env):
    root = tmp_path_factory.mktemp("journey")
    live_env.chdir(root)
    corpus, out, run = write_corpus(root), str(root), str(root / "run")
    registry, community = git_registry(root, dict([
        proposal(1, "training", {"model.loss.z_loss": 0.0}),
        proposal(2, "training", {"model.optim.lr": BAD_LR}, step=14),
        proposal(6, "architecture", {"model.arch.ff_dim": 160, "model.arch.num_ffn_layers": 3}, step=18),
        proposal(9, "architecture", {"model.arch.position": "rotary"}, step=20),
    ]))
    data = dict([proposal(8, "data", {"data.sources.numbers": {"url": str(extra_source(root)), "weight": 1.0}},
                          step=18)])
    late = dict([proposal(3, "training", {"model.optim.weight_decay": 0.02}, step=2),
                 proposal(4, "training", {"model.loss.z_loss": 1e-4}, step=2, conflicts=[5], supersedes=[1]),
                 proposal(5, "training", {"model.schedule.min_lr_ratio": 0.2}, step=2, conflicts=[4]),
                 proposal(7, "training", {"model.optim.lrr": 0.1}, step=2)])
    cfg = live_config(root, corpus, [
        probe("Record", out=out), probe("RecordOptimizer", out=out),
        probe("InjectNaN", step=7, out=out),
        probe("Publish", step=3, out=out, root=run, files=data, clone=str(community)),
        probe("KillAt", step=5, out=out),
        probe("InjectSpike", step=9, out=out),
        probe("Publish", step=11, out=out, root=run, files=late, clone=str(community), stop_at=2),
        probe("HideRegistry", step=13, out=out, root=run, registry=str(registry)),
    ], **{"trainer.max_steps": 24, "registry.path": str(registry), "live.max_restarts": 2,
          "live.suspend_window": 6})
    started = time.monotonic()
    main(["live", "--config", str(cfg)])
    print(f"journey: {time.monotonic() - started:.0f} s")
    return root

def last_per_step(path: Path) -> dict[int, dict]:
    """The last record of each step in a probe's JSON lines: the timeline that survived."""
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}

def test_the_ledger_tells_the_story(journey):
    recs = records(journey)
    kinds = [r["kind"] for r in recs]
    assert kinds[0] == "start" and kinds[-1] == "stop" and recs[-1]["step"] == 24 and recs[-1]["exit"] == 0
    assert recs[0]["in_effect"] == [1] and recs[0]["step"] == 0
    assert one(recs, "deferred", proposals=[9])["reason"] == (
        "no migration folds it into the running model (model.arch.position: it changes what every layer computes "
        "and belongs to the next model generation)")
    crash = one(recs, "crash")
    # Killed after the update of step 4, before its status (and its metrics) were written.
    assert crash["step"] == 4 and crash["exit"] == -signal.SIGKILL and crash["error"] is None
    assert one(recs, "restart")["resume_step"] == 4
    late = one(recs, "applied", proposals=[3])
    assert late["reason"] == ("0003 effective_from_step 2 had passed when the run read it (step 10); applied at "
                              "the checkpoint boundary 12")  # merged after step 11, before its status was written
    assert late["step"] == 12 and late["changes"] == {"model.optim.weight_decay": {"old": 0.01, "new": 0.02}}
    conflict = one(recs, "rejected", proposals=[4, 5])
    assert "accepted too" in conflict["reason"]
    assert "model.optim.lrr" in one(recs, "rejected", proposals=[7])["reason"]
    vanished = [r for r in recs if r["kind"] == "rejected" and "no such directory" in r["reason"]]
    assert len(vanished) == 1 and "the run goes on with the last good registry" in vanished[0]["reason"]
    data = one(recs, "applied", proposals=[6, 8])
    assert data["step"] == 18 and data["reason"] == (
        "0006 effective from step 18; 0008 effective from step 18; the model migrated: grow_ff_dim (model.arch.ff_dim "
        "128 -> 160), add_ffn_layers (model.arch.num_ffn_layers 2 -> 3)")
    assert [m["name"] for m in data["migrations"]] == ["grow_ff_dim", "add_ffn_layers"]
    assert data["changes"]["model.arch.ff_dim"] == {"old": None, "new": 160}
    assert data["changes"]["data.sources.numbers.weight"] == {"old": None, "new": 1.0}
    assert set(recs[-1]) >= {"time", "step", "kind", "proposals", "changes", "reason"}
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["time"]) for r in recs)


def test_a_spike_rolls_back_and_skips_the_data_window(journey):
    spike = [r for r in records(journey) if r["kind"] == "rollback"][0]
    assert spike["step"] == 10 and spike["resume_step"] == 8
    assert spike["skipped_samples"] == [8 * 4, 10 * 4]  # the global batches of steps 8 and 9
    d = spike["divergence"]
    assert d["loss"] > d["window_mean"] + 6 * d["window_std"]
    # The spiked weights of step 9 computed the loss of step 10: back to the checkpoint before them.
    trained = [json.loads(line) for line in (journey / "steps.jsonl").read_text().splitlines()]
    before, after = [r["samples"] for r in trained if r["step"] == 9][:2]
    assert before != after


def test_a_diverging_proposal_is_suspended_and_the_run_finishes(journey):
    recs = records(journey)
    applied = one(recs, "applied", proposals=[2])
    assert applied["step"] == 14 and applied["changes"]["model.optim.lr"] == {"old": 0.02, "new": BAD_LR}
    rollback = [r for r in recs if r["kind"] == "rollback"][1]
    suspended = one(recs, "suspended", proposals=[2])
    assert rollback["step"] >= 14 and rollback["resume_step"] == 14
    assert suspended["resume_step"] == 14 and suspended["step"] >= 14
    evidence = suspended["evidence"]
    assert evidence["took_effect"] == 14 and math.isfinite(evidence["loss_before"])
    assert [d["step"] for d in evidence["divergences"]] == [rollback["step"], suspended["step"]]
    assert all(d["loss"] > evidence["loss_before"] for d in evidence["divergences"])
    without = [r for r in recs if r["kind"] == "applied" and r["removed"] == [2]]
    assert without and without[0]["step"] == 14 and "suspended" in without[0]["reason"]
    assert (journey / "registry" / "0002-proposal-2.yaml").exists()  # the registry is the community's
    loss = history(journey, "train/loss")
    assert loss[-1].step == 24 and math.isfinite(loss[-1].value)


def test_the_optimizer_used_what_each_segment_resolved(journey):
    """Read back from AdamW before every update: the base settings, 0003's weight decay from
    step 12 on, 0002's learning rate in the segments that diverged, and not after."""
    schedule = ScheduleConfig(warmup_steps=2)
    used = last_per_step(journey / "optim.jsonl")  # the last timeline: 0002 suspended
    assert sorted(used) == list(range(24))
    for step, r in used.items():
        matrices = r["groups"][0]
        assert matrices["weight_decay"] == (0.02 if step >= 12 else 0.01), r
        assert matrices["lr"] == pytest.approx(0.02 * schedule.factor(step, 24), rel=1e-6), r
        # The NaN update of step 7 left AdamW's state alone: one update fewer from then on.
        assert matrices["adam_step"] == (step if step <= 7 else step - 1), r
    records_14 = [json.loads(line) for line in (journey / "optim.jsonl").read_text().splitlines()
                  if json.loads(line)["step"] == 14]
    assert [r["groups"][0]["lr"] for r in records_14][:2] == pytest.approx([BAD_LR * schedule.factor(14, 24)] * 2)


def test_one_mlflow_run_without_a_step_twice_and_the_mixture_change_at_its_step(journey):
    # Crash, rollbacks and restarts: each step once. The metrics the SIGKILLed segment had not sent
    # yet (its sender sends every 5 s) are lost without a write-ahead journal of the sender.
    steps = [m.step for m in history(journey, "train/loss")]
    assert len(steps) == len(set(steps)) and set(range(5, 25)) <= set(steps) <= set(range(1, 25))
    skipped = {m.step: m.value for m in history(journey, "train/skipped_steps")}
    assert skipped[7] == 0 and skipped[8] == 1 and skipped[24] == 1
    numbers = {m.step: m.value for m in history(journey, "data/samples/numbers")}
    english = {m.step: m.value for m in history(journey, "data/samples/en")}
    assert min(numbers) == 19 and numbers[19] > 0 and numbers[24] > numbers[19]
    assert 18 in english and english[24] > english[18]
    client = MlflowClient(f"sqlite:///{journey}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("live").experiment_id])
    copy = Path(client.download_artifacts(run.info.run_id, "changes.jsonl", str(journey)))
    assert read_records(copy) == records(journey)


def test_checkpoints_carry_the_ledger_and_status_prints_the_run(journey):
    ckpt = latest(journey / "run" / "checkpoints")
    assert step_of(ckpt) == 24
    cpm = read_meta(ckpt)["cpm"]
    assert cpm["changes"] == records(journey)[:-1]  # all but the stop that followed it
    assert cpm["skipped_steps"] >= 1
    text = status_text(journey / "run")
    assert re.search(r"^step +24$", text, re.M) and re.search(r"^suspended +0002$", text, re.M)
    assert re.search(r"^in effect +0001, 0003, 0006, 0008$", text, re.M)
    assert re.search(r"^deferred +0009$", text, re.M) and re.search(r"^pending +none$", text, re.M)
    assert cpm["arch"]["ff_dim"] == 160 and cpm["arch"]["num_ffn_layers"] == 3
    assert [(m["name"], m["step"]) for m in cpm["migrations"]] == [("grow_ff_dim", 18), ("add_ffn_layers", 18)]
    assert re.search(r"^last incident +suspended at step", text, re.M)
    assert re.search(r"^tokens +3,072$", text, re.M)  # 24 steps x 4 samples x 32 tokens
    assert re.search(rf"^precision +{auto_precision('auto')}$", text, re.M)  # trainer.precision: auto, resolved


# -- without training -------------------------------------------------------------------------------------
def quick_config(tmp_path, corpus, **overrides) -> Path:
    return live_config(tmp_path, corpus, [], **{"trainer.max_steps": 4, "registry.path": None, **overrides})


def test_crashes_at_one_step_stop_after_max_restarts_with_the_last_error(tmp_path, corpus, capsys):
    dies = ("import sys; sys.stderr.write('Traceback (most recent call last):\\n"
            "torch.OutOfMemoryError: CUDA out of memory\\n'); sys.exit(1)")
    launcher = [sys.executable, "-c", dies]  # instead of the segment's python
    cfg = quick_config(tmp_path, corpus, **{"live.launcher": launcher, "live.max_restarts": 2})
    with pytest.raises(SystemExit) as exit_:
        main(["live", "--config", str(cfg)])
    recs = records(tmp_path)
    assert exit_.value.code == 1
    assert [r["kind"] for r in recs] == ["start", "crash", "restart", "crash", "restart", "crash", "stop"]
    assert [r["resume_step"] for r in recs if r["kind"] == "restart"] == [0, 0]
    assert recs[-1]["reason"] == ("2 restarts from step 0 did not get past it; last error: "
                                  "torch.OutOfMemoryError: CUDA out of memory")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the run stopped after 2 restarts from step 0; last error: torch.OutOfMemoryError: CUDA out of memory")


def test_sigterm_reaches_the_segment_and_live_stops_with_a_record(tmp_path, corpus):
    """The segment here stands in for `fit`, which saves a checkpoint on SIGTERM (test_fsdp.py)."""
    segment = (f"import pathlib, signal, time; got = []; signal.signal(signal.SIGTERM, lambda *a: got.append(1)); "
               f"pathlib.Path({str(tmp_path / 'started')!r}).touch()\nwhile not got: time.sleep(0.05)\n"
               f"pathlib.Path({str(tmp_path / 'got-sigterm')!r}).touch()")
    cfg = quick_config(tmp_path, corpus, **{"live.launcher": [sys.executable, "-c", segment]})

    def terminate():
        while not (tmp_path / "started").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # to `live`, running here

    threading.Thread(target=terminate, daemon=True).start()
    main(["live", "--config", str(cfg)])  # returns: exit status 0
    assert (tmp_path / "got-sigterm").exists()
    last = records(tmp_path)[-1]
    assert last["kind"] == "stop" and last["exit"] == 0 and last["reason"].startswith("SIGTERM: ")


def test_a_registry_gone_when_live_starts_again_leaves_the_last_good_set_in_force(tmp_path, corpus):
    """The segment here stands in for `fit`: it records its arguments and reports the run done."""
    registry = tmp_path / "registry"
    registry.mkdir()
    # 0003 names a source outside registry.allowed_sources, and the run excludes it: left out
    # of the snapshot like 0002, but without a record, and not passed on as an exclusion.
    outside = {"data.sources.elsewhere": {"url": "s3://elsewhere/a.txt", "weight": 1.0}}
    for name, text in [proposal(1, "training", {"model.loss.z_loss": 0.0}), proposal(2, "training", {"x.y": 1}),
                       proposal(3, "data", outside)]:
        (registry / name).write_text(text)
    (registry / "prompts.yaml").write_text("prompts:\n  - id: p\n    author: a\n    text: hi\n    max_tokens: 0\n")
    segment = ("import json, os, sys; from cpm_lightning.live.protocol import *; "
               "plan = read_json(pathlib.Path(os.environ[SEGMENT_ENV]), Plan); "
               f"open({str(tmp_path / 'argv.jsonl')!r}, 'a').write(json.dumps(sys.argv[1:]) + chr(10)); "
               "write_json(LiveDir(plan.root).status, Status(segment=plan.segment, state='finished', step=4))")
    cfg = quick_config(tmp_path, corpus, **{"registry.path": str(registry), "registry.exclude": [3],
                                            "live.launcher": [sys.executable, "-c", f"import pathlib; {segment}"]})
    main(["live", "--config", str(cfg)])
    registry.rename(tmp_path / "gone")
    main(["live", "--config", str(cfg)])
    recs = records(tmp_path)
    assert [r["kind"] for r in recs] == ["start", "rejected", "rejected", "stop", "start", "rejected", "stop"]
    proposal_2, book = sorted(recs[1:3], key=lambda r: r["proposals"], reverse=True)
    assert proposal_2["proposals"] == [2] and "x.y" in proposal_2["reason"]
    assert book["proposals"] == [] and "prompts.yaml" in book["reason"] and "max_tokens" in book["reason"]
    assert recs[4]["in_effect"] == [1] and recs[5]["proposals"] == [] and "no such directory" in recs[5]["reason"]
    first, again = (json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines())
    assert first == again  # the same snapshot of the registry, and the same proposals left out
    snapshot = Path(first[first.index("--registry.path") + 1])
    assert sorted(p.name for p in snapshot.iterdir()) == ["0001-proposal-1.yaml"]
    assert first[first.index("--registry.exclude") + 1] == "[]"


@pytest.mark.parametrize(("args", "message"), [
    (["--ckpt_path", "last"], "live: --ckpt_path is not an option of live: live resumes each segment from the "
                              "run's own checkpoints"),
    (["--registry.at_step=3"], "registry.at_step=3: live applies the proposals in effect at the step each segment "
                               "starts from; leave it unset"),
    (["--registry.trial=2"], "registry.trial=2: live applies accepted proposals only; leave it unset (`proposals "
                             "trial` tries one)"),
    (["--trainer.max_steps=-1"], "trainer.max_steps: live needs the run's length (a positive integer), got -1"),
    (["--live.poll_seconds=0"], "live.poll_seconds must be positive, got 0"),
    (["--live.spike_sigma=high"], "live.spike_sigma: expected a number, got 'high' (a string)"),
])
def test_bad_input_is_one_line(tmp_path, corpus, capsys, args, message):
    cfg = quick_config(tmp_path, corpus)
    with pytest.raises(SystemExit) as exit_:
        main(["live", "--config", str(cfg), *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "run" / "live" / "changes.jsonl").exists()


def test_a_registry_that_cannot_be_read_at_the_start_is_one_error(tmp_path, corpus, capsys):
    cfg = quick_config(tmp_path, corpus, **{"registry.path": str(tmp_path / "nowhere")})
    with pytest.raises(SystemExit) as exit_:
        main(["live", "--config", str(cfg)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nowhere'}: registry: no such directory; set "
        "registry.path to the proposal registry, or null to run without one")


def test_two_supervisors_on_one_run_is_one_error(tmp_path, corpus, capsys):
    from cpm_lightning.live.protocol import LiveDir, lock

    files = LiveDir(tmp_path / "run")
    files.path.mkdir(parents=True)
    holds = (f"import fcntl, time; f = open({str(files.supervisor_lock)!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
             "f.write('4242'); f.flush(); print('held', flush=True); time.sleep(60)")
    held = subprocess.Popen([sys.executable, "-c", holds], stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as exit_:
            main(["live", "--config", str(quick_config(tmp_path, corpus))])
    finally:
        held.kill()
        held.wait()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: another `live` (pid 4242) supervises {tmp_path / 'run'}; one run has one supervisor")
    assert lock(files.supervisor_lock, wait=False) is not None  # released with its holder


def test_live_status_without_a_ledger_is_one_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["live", "status", "--root", str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: live status: no change ledger at {tmp_path / 'live' / 'changes.jsonl'}; expected the "
        "trainer.default_root_dir of a run started with `cpm-lightning live`"]


def test_live_without_arguments_is_one_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["live"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: live: expected --config FILE [fit's overrides], "
                                                            "or `status --root DIR` (see `cpm-lightning live --help`)"]
