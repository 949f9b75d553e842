"""`cpm-lightning live` on two processes (gloo FSDP2), and a supervisor SIGKILLed mid-run: `fleet`
(8 steps): 0009 (data) is merged at step 1, effective at step 4; at step 6 the supervisor is
SIGKILLed and `live` started again, which takes over the running segment and finishes. Apart
from test_live.py, so that the two long runs can go to different test workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_corpus
from live_support import TIMEOUT_S, extra_source, git_registry, history, live_config, one, probe, proposal, records

from cpm_lightning.checkpoint.store import read_meta
from cpm_lightning.cli.main import main

pytestmark = pytest.mark.slow  # end to end: real subprocesses and servers (`make test-fast` leaves it out)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, live_env):
    root = tmp_path_factory.mktemp("fleet")
    live_env.chdir(root)
    corpus, out, run = write_corpus(root), str(root), str(root / "run")
    registry, community = git_registry(root, dict([proposal(1, "training", {"model.loss.z_loss": 0.0})]))
    data = dict([proposal(9, "data", {"data.sources.numbers": {"url": str(extra_source(root)), "weight": 1.0}},
                          step=4)])
    cfg = live_config(root, corpus, [
        probe("Publish", step=1, out=out, root=run, files=data, clone=str(community), stop_at=4),
        probe("WaitForTakeOver", step=6, out=out, root=run),
    ], **{"trainer.max_steps": 8, "trainer.devices": 2, "trainer.strategy": "fsdp", "trainer.accelerator": "cpu",
          "registry.path": str(registry)})
    log = (root / "supervisor.log").open("w")
    first = subprocess.Popen([sys.executable, "-m", "cpm_lightning.cli", "live", "--config", str(cfg)],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (root / "waiting").exists():
            assert first.poll() is None and time.monotonic() < deadline, (root / "supervisor.log").read_text()[-3000:]
            time.sleep(0.2)
        first.kill()  # SIGKILL: its segment goes on, waiting
        first.wait()
        main(["live", "--config", str(cfg)])  # takes over from the running segment
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return root


def test_two_processes_apply_a_data_proposal_at_its_step(fleet):
    recs = records(fleet)
    applied = one(recs, "applied", proposals=[9])
    assert applied["step"] == 4 and applied["reason"] == "0009 effective from step 4"
    numbers = {m.step: m.value for m in history(fleet, "data/samples/numbers")}
    assert min(numbers) == 5 and numbers[5] > 0  # step 5, the first after the boundary
    # Each checkpoint names the proposals in effect when it was written (a release card lists them).
    proposals = {step: read_meta(fleet / "run" / "checkpoints" / f"step-{step:08d}.ckpt")["cpm"]["proposals"]
                 for step in (4, 8)}
    assert proposals == {4: "0001", 8: "0001,0009"}


def test_live_again_after_the_supervisor_was_killed_continues_the_run_and_the_ledger(fleet):
    recs = records(fleet)
    assert [r["kind"] for r in recs].count("start") == 2
    crash = one(recs, "crash")
    assert "ended without a stop record" in crash["reason"] and crash["step"] == 6
    again = [r for r in recs if r["kind"] == "start"][1]
    assert (again["step"], again["reason"], again["checkpoint"]) == (6, "continues from step 6", "step-00000006.ckpt")
    assert recs[-1]["kind"] == "stop" and recs[-1]["step"] == 8
    assert [m.step for m in history(fleet, "train/loss")] == list(range(1, 9))


def test_another_architecture_s_checkpoints_are_one_error(fleet, capsys):
    cfg = fleet / "run.yaml"
    with pytest.raises(SystemExit) as exit_:
        main(["live", "--config", str(cfg), "--trainer.max_steps=10", "--model.arch.ff_dim=96"])
    ckpt = (fleet / "run" / "checkpoints" / "step-00000008.ckpt").resolve()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err[-1] == (f"error: checkpoint {ckpt} cannot resume with this run's model.arch: model.arch.ff_dim 128 -> 96: "
                       "a migration only grows it (128 -> 96 would drop what the model learned)")
    assert records(fleet)[-1]["kind"] == "stop" and records(fleet)[-1]["exit"] == 2
