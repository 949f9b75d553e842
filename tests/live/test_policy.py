"""The proposal policy of `live` (live/policy.py) without a process: what is eligible, in effect
and why, when the running segment stops, and what a crash or a divergence decides; and the
`since` a restarted supervisor's start record carries."""

from __future__ import annotations

import pytest
import yaml
from conftest import write_proposal
from live_support import git, git_registry

from cpm_lightning.live import policy
from cpm_lightning.live.commands import status_text
from cpm_lightning.live.config import LiveConfig
from cpm_lightning.live.ledger import Ledger, RunState, read_records
from cpm_lightning.live.settings import read_settings
from cpm_lightning.live.supervisor import Supervisor
from cpm_lightning.registry.keys import ConfigSchema
from cpm_lightning.registry.resolve import load_registry, resolve
from cpm_lightning.registry.schema import KINDS
from cpm_lightning.train.run_config import GROUPS

LIVE = LiveConfig(max_restarts=2, restart_backoff=5.0, max_nonfinite=3, suspend_window=6)


@pytest.fixture
def registry(tmp_path):
    write_proposal(tmp_path, 1, {"model.loss.z_loss": 0.0}, kind="training")
    write_proposal(tmp_path, 2, {"model.optim.lr": 0.5}, kind="training", effective_from_step=14)
    write_proposal(tmp_path, 3, {"model.optim.weight_decay": 0.02}, kind="training", effective_from_step=2)
    write_proposal(tmp_path, 6, {"model.arch.ff_dim": 160}, effective_from_step=18)
    write_proposal(tmp_path, 8, {"data.sources.en.weight": 0.5}, kind="data", effective_from_step=18, requires=[6])
    write_proposal(tmp_path, 9, {"model.arch.position": "rotary"}, effective_from_step=20)
    write_proposal(tmp_path, 10, {"model.arch.max_len": 1024}, status="rejected")
    return load_registry(tmp_path, ConfigSchema(GROUPS))


def fold(*records: dict) -> RunState:
    state = RunState()
    for r in records:
        state.fold({"proposals": [], **r})
    return state


def test_a_boundary_of_data_or_training_keys_is_applied_in_the_running_segment(registry, tmp_path):
    """policy.restart_reason: None (in place) for training keys, a source's weight and a new
    source; a reason for a migration, another data key, a changed source or an unknown version."""
    proposals = dict(registry.proposals)
    resolved = {"data.sources.en.url": "en.txt", "data.sources.en.weight": 0.7, "model.optim.lr": 0.02}

    def why(added=(), removed=(), running=None):
        change = policy.SegmentSet(answer=None, added=list(added), removed=list(removed), exclude=[], keep_steps=[])
        return policy.restart_reason(change, proposals, running or {}, resolved)

    assert why(added=[1, 2, 3]) is None and why(removed=[2], running={2: proposals[2].sha256}) is None
    assert why(added=[8]) is None  # data.sources.en.weight
    assert why(added=[6]) == "0006 sets model.arch.ff_dim: the model migrates as a new process loads the checkpoint"
    more = tmp_path / "more"
    more.mkdir()
    write_proposal(more, 11, {"data.sources.numbers": {"url": "s3://cpm-lightning-data/n.txt", "weight": 1.0}},
                   kind="data")
    write_proposal(more, 12, {"data.sources.en.url": "s3://cpm-lightning-data/other.txt"}, kind="data")
    write_proposal(more, 13, {"data.seq_len": 64}, kind="data")
    proposals.update(load_registry(more, ConfigSchema(GROUPS)).proposals)
    assert sorted(proposals) == [1, 2, 3, 6, 8, 9, 10, 11, 12, 13]
    assert why(added=[11]) is None  # a new source
    assert why(added=[12]) == ("0012 sets data.sources.en.url: a source the mixture draws from changes what its "
                               "windows are")
    assert why(added=[13]) == "0013 sets data.seq_len: the data module is built again by a new process"
    assert why(added=[1], running={1: "an older version"}) == (
        "proposal 0001 left the registry or changed, and its version in effect may set other keys")
    assert why(removed=[42], running={42: "gone"}).startswith("proposal 0042 left the registry")


def test_eligible_leaves_out_what_the_run_does_not_apply_and_defers_what_no_migration_folds_in(registry):
    proposals = registry.proposals
    out, deferred = policy.eligible(proposals, KINDS, [], RunState())
    assert sorted(out) == [1, 2, 3, 6, 8]
    assert [(d.proposal.id, d.reason) for d in deferred] == [(9, (
        "no migration folds it into the running model (model.arch.position: it changes what every layer computes "
        "and belongs to the next model generation)"))]
    assert sorted(policy.eligible(proposals, KINDS, [], RunState(), arch_ok=True)[0]) == [1, 2, 3, 6, 8, 9]
    state = fold({"kind": "suspended", "step": 16, "proposals": [2]},
                 {"kind": "deferred", "step": 0, "proposals": [9], "sha256": {"9": proposals[9].sha256}})
    out, deferred = policy.eligible(proposals, ["training", "architecture"], [3], state)
    assert (sorted(out), deferred) == ([1, 6], [])
    # In effect already (the run started with it), in the same version: not deferred.
    started = fold({"kind": "start", "step": 0, "in_effect": [9], "since": {"9": 0},
                    "sha256": {"9": proposals[9].sha256}})
    assert 9 in policy.eligible(proposals, KINDS, [], started)[0]


def test_the_segment_s_set_is_what_its_fit_resolves_with_the_exclude_it_is_given(registry):
    """0003 (effective_from_step 2) was read at step 10 and applied at the boundary 12; the run
    rolled back to step 8 since: it is not in effect there, and the segment's `fit` (which knows
    effective_from_step only) leaves it out through registry.exclude."""
    proposals = registry.proposals
    eligible = policy.eligible(proposals, KINDS, [], RunState(), arch_ok=True)[0]
    accepted = [i for i in proposals if i != 10]
    state = fold({"kind": "start", "step": 0, "in_effect": [1], "since": {"1": 0}, "sha256": {"1": proposals[1].sha256}},
                 {"kind": "applied", "step": 12, "proposals": [3], "in_effect": [1, 3],
                  "sha256": {"3": proposals[3].sha256}})
    change = policy.segment_set(eligible, accepted, 8, state, suspend_window=6)
    assert (change.answer.ids, change.added, change.removed, change.exclude) == ([1], [], [3], [2, 3, 6, 8, 9])
    assert change.answer.next_change == 12 and change.keep_steps == []  # step 0: out of live.suspend_window
    assert policy.why_not(3, 8, state) == "the run rolled back to step 8, before it took effect (step 12)"
    assert resolve(registry, 8, exclude=change.exclude).ids == "0001"
    for step in (12, 14, 18, 20):
        change = policy.segment_set(eligible, accepted, step, state, suspend_window=6)
        assert sorted(p.id for p in resolve(registry, step, exclude=change.exclude).applied) == change.answer.ids
    assert change.answer.ids == [1, 2, 3, 6, 8, 9] and change.keep_steps == [20]


def test_the_segment_stops_where_the_set_changes(registry):
    proposals = registry.proposals
    eligible = policy.eligible(proposals, KINDS, [], RunState())[0]
    running = {1: proposals[1].sha256}
    since = {1: 0}
    new = {i: p for i, p in eligible.items() if i != 3}  # 0003 not merged yet
    assert policy.stop_at(new, 4, since, running) == 14  # 0002's step
    assert policy.stop_at({1: proposals[1]}, 4, since, running) is None
    # 0003's step had passed when it was read: its step (the segment stops at its next checkpoint).
    assert policy.stop_at(eligible, 4, since, running) == 2
    assert policy.stop_at(new, 4, since, {1: "an older version"}) == 4
    assert policy.stop_at({}, 4, {}, running) == 4  # 0001 is no longer accepted


def test_why_a_proposal_is_applied(registry):
    p3, state = registry.proposals[3], fold({"kind": "start", "step": 0, "in_effect": [1], "since": {"1": 0}})
    assert policy.why(registry.proposals[2], 14, state, 4) == "effective from step 14"
    assert policy.why(p3, 12, state, 10) == ("effective_from_step 2 had passed when the run read it (step 10); "
                                             "applied at the checkpoint boundary 12")
    assert policy.why(registry.proposals[1], 12, state, 0).startswith("its file changed")
    back = fold({"kind": "applied", "step": 12, "proposals": [3], "in_effect": [3]},
                {"kind": "applied", "step": 8, "proposals": [], "removed": [3], "in_effect": []})
    assert policy.why(p3, 12, back, 10) == "applies again from step 12, where it took effect before the rollback"
    assert policy.why_not(2, 14, fold({"kind": "suspended", "step": 16, "proposals": [2]})) == "suspended in this run"


def test_restarts_back_off_doubling_until_max_restarts():
    state = RunState()
    assert policy.backoff(state, 4, LIVE) == (1, 5.0)
    for _ in range(2):
        state.fold({"kind": "restart", "step": 4, "proposals": [], "resume_step": 4})
    assert policy.backoff(state, 4, LIVE) == (3, None)
    assert policy.backoff(state, 6, LIVE) == (1, 5.0)
    state.fold({"kind": "restart", "step": 6, "proposals": [], "resume_step": 6})
    assert policy.backoff(state, 6, LIVE) == (2, 10.0)


def divergence(step: int, loss: float = 9.0, nonfinite: int = 0) -> dict:
    return {"step": step, "loss": loss, "window_mean": 3.0, "window_std": 0.1, "nonfinite_in_a_row": nonfinite,
            "end_index": 4 * step}


def test_a_divergence_rolls_back_before_the_weights_that_computed_it():
    state = fold({"kind": "start", "step": 0, "in_effect": [1], "since": {"1": 0}})
    assert policy.recover(divergence(10), state, LIVE) == policy.Recovery(8)
    assert policy.recover(divergence(10, nonfinite=3), state, LIVE) == policy.Recovery(6)  # first bad: step 8
    assert policy.rollback_reason(divergence(10), LIVE, 8, 8) == (
        "loss 9 above the window's mean 3 by more than 6 sd (0.1) at step 10: back to the checkpoint of step 8, "
        "skipping the 8 samples trained on since")
    assert policy.rollback_reason(divergence(10, nonfinite=3), LIVE, 6, 16).startswith("3 non-finite steps in a row at step 10")


def test_a_second_divergence_after_a_proposal_took_effect_suspends_it():
    state = fold({"kind": "start", "step": 0, "in_effect": [1], "since": {"1": 0}},
                 {"kind": "applied", "step": 14, "proposals": [2], "in_effect": [1, 2], "loss": 2.5})
    first = divergence(16)
    assert policy.recover(first, state, LIVE) == policy.Recovery(14)  # no rollback since 0002: roll back
    state.fold({"kind": "rollback", "step": 16, "proposals": [], "divergence": first, "skipped_samples": [56, 64],
                "resume_step": 14})
    again = divergence(17, loss=12.0)
    assert policy.recover(again, state, LIVE) == policy.Recovery(14, suspend=2)
    reason, evidence = policy.suspension(again, 2, state, LIVE, 14)
    assert evidence == {"loss_before": 2.5, "took_effect": 14, "divergences": [first, again]}
    assert reason == ("the run diverged again (loss 12 at step 17) within live.suspend_window=6 steps of proposal 0002 "
                      "taking effect at step 14, after a rollback; suspended in this run (the registry is unchanged) "
                      "and back to step 14")
    assert policy.recover(divergence(21), state, LIVE) == policy.Recovery(19)  # past the window: a rollback


def test_a_restarted_supervisor_s_start_carries_since(tmp_path):
    """A supervisor killed mid-run is replaced by `live` again: its start record names the steps
    the proposals in effect took effect at, as the first one's did."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"max_steps": 24, "default_root_dir": str(tmp_path / "run"),
                                                  "logger": False}, "registry": {"path": None}}))
    (tmp_path / "run" / "live").mkdir(parents=True)
    ledger = Ledger(tmp_path / "run" / "live" / "changes.jsonl")
    ledger.append("start", 0, "a new run", proposals=[1], in_effect=[1], since={1: 0})
    ledger.append("applied", 12, "0003 ...", proposals=[3], in_effect=[1, 3])
    supervisor = Supervisor(read_settings(["--config", str(config)]))
    for r in supervisor.ledger.records:
        supervisor.state.fold(r)
    supervisor._start(None)
    crash, start = read_records(ledger.path)[-2:]
    assert crash["kind"] == "crash" and start["kind"] == "start"
    assert (start["in_effect"], start["since"]) == ([1, 3], {"1": 0, "3": 12})


def test_the_stop_record_after_a_signal_names_the_checkpoint_the_segment_saved():
    """A SIGTERM that reaches the segment twice (sent to the process group) may end it after its
    checkpoint was saved: the record names that checkpoint, not a save that did not happen."""
    assert policy.signal_stop("SIGTERM", -15, 4, "step-00000007.ckpt", 7) == (
        "SIGTERM: the segment saved checkpoint step-00000007.ckpt at step 7, then ended (killed by SIGTERM)")
    assert policy.signal_stop("SIGINT", 0, 4, "step-00000007.ckpt", 7) == (
        "SIGINT: the segment saved checkpoint step-00000007.ckpt at step 7")
    assert policy.signal_stop("SIGTERM", -9, 4, "step-00000004.ckpt", 4) == (
        "SIGTERM: the segment ended (killed by SIGKILL) before it could save a checkpoint")
    assert policy.signal_stop("SIGTERM", 0, 4, "step-00000004.ckpt", 4) == (
        "SIGTERM: the segment stopped before training past step 4 (last checkpoint: step-00000004.ckpt)")


def test_a_registry_whose_upstream_was_force_pushed_is_recorded_once_and_shown_by_live_status(tmp_path):
    """Every poll's `git pull --ff-only` fails after a force-push, and nothing new reaches the run:
    one `unfollowed` record (an incident), `live status` says so, and `followed` once it pulls again."""
    run, community = git_registry(tmp_path, {"README.md": "the registry\n"})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"max_steps": 24, "default_root_dir": str(tmp_path / "run"),
                                                  "logger": False}, "registry": {"path": str(run)}}))
    supervisor = Supervisor(read_settings(["--config", str(config)]))
    supervisor._start(None)
    git("commit", "-q", "--amend", "-m", "history rewritten", cwd=community)
    git("push", "-q", "-f", "origin", "HEAD:main", cwd=community)
    for step in (2, 4):
        supervisor._take(supervisor._read_registry(), step)
    records = read_records(supervisor.ledger.path)
    assert [r["kind"] for r in records] == ["start", "unfollowed"]
    assert records[-1]["step"] == 2 and records[-1]["reason"].startswith(f"git pull --ff-only in {run} failed: ")
    assert records[-1]["reason"].endswith("; the run no longer follows the registry's upstream and goes on with its "
                                          "working copy as it is (fix the clone, e.g. `git reset --hard @{upstream}`)")
    lines = status_text(tmp_path / "run").splitlines()
    assert f"registry         not followed since step 2 ({records[-1]['time']}): {records[-1]['reason']}" in lines
    assert next(line for line in lines if line.startswith("last incident")).startswith("last incident    unfollowed at step 2")
    git("fetch", "-q", cwd=run)
    git("reset", "-q", "--hard", "@{upstream}", cwd=run)
    supervisor._take(supervisor._read_registry(), 6)
    assert [r["kind"] for r in read_records(supervisor.ledger.path)][-1] == "followed"
    assert not any(line.startswith("registry ") for line in status_text(tmp_path / "run").splitlines())
