"""A trial's plan and numbers without training (cli/trial_plan.py, cli/trial_stats.py): what each
arm's `fit` is given, the refusals that come before anything trains, the paired difference with
its t interval, and the table. The trials themselves train in test_trial.py (slow)."""

from __future__ import annotations

import json
import math
import statistics
from argparse import Namespace

import pytest
from conftest import cli_error, write_config, write_corpus, write_proposal
from scipy.stats import t

from cpm_lightning.cli.trial_plan import plan
from cpm_lightning.cli.trial_stats import Arm, Comparison, render
from cpm_lightning.core.errors import UserError
from cpm_lightning.registry.commands import config_schema
from cpm_lightning.registry.resolve import load_registry


@pytest.fixture
def bench(tmp_path):
    """A registry (0001 accepted, 0002 in discussion, an architecture proposal 0003, a rejected
    0004) and a run config that excludes 0001 from the baseline."""
    registry = tmp_path / "proposals"
    write_proposal(registry, 1, {"model.optim.lr": 0.03}, kind="training")
    write_proposal(registry, 2, {"model.optim.lr": 0.05}, status="discussion", kind="training")
    write_proposal(registry, 3, {"model.arch.ff_dim": 256}, status="discussion")
    write_proposal(registry, 4, {"model.optim.eps": 1.0e-6}, status="rejected", kind="training")
    corpus = write_corpus(tmp_path)

    def config(name="config.yaml", **overrides):
        return write_config(tmp_path / name, corpus, **{
            "registry.path": str(registry), "registry.exclude": [1], "seed_everything": 7, "data.seed": 3,
            "trainer.max_steps": 10, **overrides})

    return Namespace(root=tmp_path, registry=registry, config=config)


def args(config, pid=2, steps=3, seeds=2, start=None, at_step=None):
    return Namespace(id=pid, config=config, steps=steps, seeds=seeds, start=start, at_step=at_step)


def test_the_arms_differ_only_in_the_proposal_and_seed_k_adds_k_to_both_seeds(bench):
    trial = plan(args(bench.config()))
    assert (trial.at_step, trial.start, trial.start_step, trial.base_seeds) == (0, None, 0, (7, 3))
    assert trial.root == bench.root / "run" / "trials" and trial.note is None
    baseline = trial.argv("baseline", 1, "r1", bench.root / "b", {})
    treated = trial.argv("proposal", 1, "r2", bench.root / "p", {"tokenizer": "tok.model"})
    assert "--seed_everything=8" in baseline and "--data.seed=4" in baseline and "--tracking.run_id=r1" in baseline
    assert not any(a.startswith(("--registry.trial", "--registry.exclude", "--data.tokenizer")) for a in baseline)
    # The proposal's arm lifts the proposal out of the baseline's exclude list (0001 stays out).
    extra = [a for a in treated if a not in baseline]
    assert extra == [f"--trainer.default_root_dir={bench.root / 'p'}", "--tracking.run_id=r2", "--registry.trial=2",
                     "--registry.exclude=[1]", "--data.tokenizer=tok.model"]
    callbacks = next(a for a in baseline if a.startswith("--trainer.callbacks+="))
    assert json.loads(callbacks.partition("=")[2])["init_args"] == {"stop_at": 3}


def test_a_model_directory_starts_the_arms_by_init_from(bench):
    directory = bench.root / "model"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"")
    trial = plan(args(bench.config()))
    trial.start = directory
    assert f"--checkpoint.init_from={directory}" in trial.argv("baseline", 0, "r", bench.root, {})
    trial.start = bench.root / "step-00000002.ckpt"
    argv = trial.argv("baseline", 0, "r", bench.root, {})
    assert argv[argv.index("--ckpt_path") + 1] == str(trial.start)


def test_a_rejected_proposal_is_planned_with_a_note_and_at_step_wins(bench):
    trial = plan(args(bench.config(**{"registry.at_step": 5}), pid=4, at_step=2))
    assert trial.note == "proposal 0004 is rejected (2026-11-02); tried anyway"
    assert trial.at_step == 2
    assert plan(args(bench.config("at5.yaml", **{"registry.at_step": 5}))).at_step == 5


def test_what_cannot_be_tried_fairly_is_refused_before_anything_trains(bench, capsys):
    config = bench.config()
    refused = lambda *argv: cli_error(capsys, "proposals", "trial", *argv)  # noqa: E731
    assert refused("2", "--config", str(config), "--steps", "1", "--at-step", "-1") == "--at-step must be >= 0, got -1"
    assert refused("1", "--config", str(bench.config("with1.yaml", **{"registry.exclude": []})), "--steps", "1") == (
        "proposal 0001 is already in effect at step 0: the baseline has it. Leave it out of the baseline "
        f"(registry.exclude: [1] in {bench.root / 'with1.yaml'})")
    assert refused("2", "--config", str(config), "--steps", "11") == (
        "--steps 11 from step 0 goes past the run config's trainer.max_steps=10 (the length of its learning-rate "
        "schedule); lower --steps or raise trainer.max_steps")
    cases = {
        "nopath.yaml": ({"registry.path": None}, "registry.path is null; a trial tries a proposal of the registry it names"),
        "trial.yaml": ({"registry.trial": 2}, "registry.trial is set; a trial sets it in its proposal's arm only"),
        "logger.yaml": ({"trainer.logger": False}, "trainer.logger is set; a trial logs each arm to MLflow (leave it unset)"),
        "novalid.yaml": ({"data.val_windows": 0},
                         "data.val_windows: 0 leaves no validation; a trial compares the arms' validation loss"),
    }
    for name, (overrides, message) in cases.items():
        path = bench.config(name, **overrides)
        assert refused("2", "--config", str(path), "--steps", "1") == f"{path}: {message}"
    with pytest.raises(UserError, match=r"^--from .*missing.ckpt: no such checkpoint or model directory$"):
        plan(args(config, start=str(bench.root / "missing.ckpt")))


def test_the_paired_difference_and_its_t_interval():
    differences = [-0.10, -0.20, -0.15]
    c = Comparison(differences=differences)
    half = t.ppf(0.975, 2) * statistics.stdev(differences) / math.sqrt(3)
    assert c.mean == pytest.approx(-0.15) and (c.low, c.high) == (pytest.approx(-0.15 - half), pytest.approx(-0.15 + half))
    assert c.word == "better"
    assert Comparison(differences=[0.10, 0.11, 0.12]).word == "worse"
    assert Comparison(differences=[-0.1, 0.2]).word == "no clear difference"
    one = Comparison(differences=[-0.3])
    assert (one.mean, one.low, one.high, one.word) == (-0.3, None, None, "one seed, no interval")


def test_the_verdict_and_the_table(bench):
    trial = plan(args(bench.config(), pid=3, seeds=2))
    arm = dict(tokens_per_sec=1000.0, peak_memory=2**21, params=3_000_000, flops_per_token=12_000_000)
    arms = [Arm(role="baseline", seed=0, run_id="a", val_loss=3.0, **arm),
            Arm(role="proposal", seed=0, run_id="b", val_loss=2.9, **arm),
            Arm(role="baseline", seed=1, run_id="c", val_loss=3.2, **{**arm, "tokens_per_sec": None}),
            Arm(role="proposal", seed=1, run_id="d", val_loss=3.0, **arm)]
    c = Comparison(differences=[-0.1, -0.2])
    verdict = c.verdict(trial, "tiny")
    assert verdict == (f"no clear difference: final val loss -0.1500 (95% interval {c.low:+.4f} to {c.high:+.4f}) "
                       "with 0003 over 2 seeds x 3 steps, tiny preset, from new weights")
    lines = render(trial, arms, c, verdict, "RUN", "tiny").splitlines()
    assert lines[0] == "## Trial of proposal 0003: Proposal 3"
    assert lines[2].endswith("MLflow run RUN.") and "registry `" + str(bench.registry) + "` at step 0" in lines[2]
    # An architecture proposal's table has parameters and FLOPs; a missing measurement is left out of the mean.
    assert "| arm | final val loss | tokens/s | peak memory | parameters | GFLOP/token |" in lines
    assert "| baseline | 3.1000 ± 0.1414 | 1,000 | 2 MiB | 3.00 M | 0.0120 |" in lines
    assert "| baseline + 0003 | 2.9500 ± 0.0707 | 1,000 | 2 MiB | 3.00 M | 0.0120 |" in lines
    assert ["| 0 | 3.0000 | 2.9000 | -0.1000 |", "| 1 | 3.2000 | 3.0000 | -0.2000 |"] == [
        line for line in lines if line.startswith(("| 0 |", "| 1 |"))]
    assert f"**Verdict:** {verdict}." in lines


def test_a_broken_proposal_elsewhere_in_the_registry_is_left_out_of_both_arms(bench, capsys):
    """One invalid proposal file used to refuse every trial, even of an unknown id, in lines
    without `error:`: now only a trial that involves it is refused, in one line."""
    (bench.registry / "0005-broken.yaml").write_text("id: 5\ntitle: [unclosed\n")
    config = bench.config()
    trial = plan(args(config))
    assert trial.left_out == [5] and trial.note.startswith(
        f"0005 left out of both arms, their files have a problem: {bench.registry / '0005-broken.yaml'}:")
    trial.copy_registry(bench.root / "copy")
    assert sorted(p.name for p in (bench.root / "copy").iterdir()) == sorted(
        p.name for p in bench.registry.iterdir() if p.name != "0005-broken.yaml")
    copy = load_registry(bench.root / "copy", config_schema(), trial.registry)
    assert copy.problems == [] and sorted(copy.proposals) == [1, 2, 3, 4]
    baseline = trial.argv("baseline", 0, "r", bench.root / "b", {})
    treated = trial.argv("proposal", 0, "r", bench.root / "p", {})
    assert f"--registry.path={bench.root / 'copy'}" in baseline and "--registry.exclude=[1]" in baseline
    assert f"--registry.path={bench.root / 'copy'}" in treated and treated[-1] == "--registry.exclude=[1]"
    refused = lambda *argv: cli_error(capsys, "proposals", "trial", *argv, "--config", str(config), "--steps", "1")  # noqa: E731
    assert refused("5").startswith(f"proposal 0005 cannot be tried: {bench.registry / '0005-broken.yaml'}:")
    assert refused("99") == f"no proposal 99 in {bench.registry}"


def test_a_baseline_that_does_not_resolve_is_one_line(bench, capsys):
    config = bench.config(**{"registry.exclude": [1, 7]})
    assert cli_error(capsys, "proposals", "trial", "2", "--config", str(config), "--steps", "1") == (
        f"no trial runs: the baseline of {config} does not resolve at step 0: "
        f"registry.exclude: no proposal 7 in {bench.registry}")


@pytest.mark.parametrize(("flag", "most"), [("--seeds", "100"), ("--steps", "1,000,000")])
def test_seeds_and_steps_are_bounded_with_the_bound_in_the_message(bench, capsys, flag, most):
    argv = {"--steps": "1", "--seeds": "1", flag: "1000000000"}
    assert cli_error(capsys, "proposals", "trial", "2", "--config", str(bench.config()),
                     *(x for kv in argv.items() for x in kv)) == (
        f"{flag} must be at most {most} (a trial is a short paired comparison), got 1,000,000,000")


@pytest.mark.slow
def test_a_trial_beside_a_broken_proposal_trains_both_arms_on_the_copy(bench, capsys):
    from cpm_lightning.cli.main import main

    (bench.registry / "0005-broken.yaml").write_text("id: 5\ntitle: [unclosed\n")
    main(["proposals", "trial", "2", "--config", str(bench.config()), "--steps", "1", "--seeds", "1"])
    out, err = capsys.readouterr()
    assert "| baseline + 0002 |" in out and "note: 0005 left out of both arms, their files have a problem: " in err
    (copy,) = (bench.root / "run" / "trials").glob("*/registry")
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        p.name for p in bench.registry.iterdir() if p.name != "0005-broken.yaml")
