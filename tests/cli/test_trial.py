"""Proposal trials (issue 14): `proposals trial` on the tiny preset, `--write`, trials `--from` a
checkpoint, the refusals, `proposals show` with the trial table, and the weekly digest.

The trials share one registry, corpus and MLflow store (module fixtures, in order): trial one
of proposal 0002, a second identical one with --write, a `fit` whose checkpoint a third trial
starts from; the digest reads them all.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import lightning as L
import pytest
from conftest import cli_error, english_text, write_config, write_corpus, write_proposal
from mlflow import MlflowClient
from scipy.stats import t

from cpm_lightning.cli.main import main
from cpm_lightning.registry.schema import load_proposal
from cpm_lightning.tracking.logger import START_STEP
from cpm_lightning.tracking.trials import RESULTS, TABLE, VERDICT_TAG

pytestmark = pytest.mark.slow  # end to end: real subprocesses and servers (`make test-fast` leaves it out)

TODAY = dt.datetime.now(dt.timezone.utc).date()
SEEDS, STEPS = 2, 3
# The proposal tried: a training proposal in discussion, its file written by hand, comments and all.
PROPOSAL = f"""\
id: 2
title: A higher peak learning rate
kind: training
status: discussion
authors: ["@someone"]      # who proposes it
discussion: https://github.com/cpm-lightning/cpm-lightning/discussions/2
created: {TODAY}
summary: >-
  Peak learning rate 0.05 instead of 0.02.
evidence: []               # trials that show the effect
changes:
  model.optim.lr: 0.05     # the run config's is 0.02
"""


class SigintAt(L.Callback):
    """Ctrl-C at the end of optimizer step `step`, as someone at the terminal would press it."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class Bench:
    """The registry, run config and MLflow store the trials share."""

    def __init__(self, root: Path):
        self.root, self.registry = root, root / "proposals"
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.client = MlflowClient(self.uri)
        write_proposal(self.registry, 1, {"model.arch.position": "rotary"})
        (self.registry / "0002-higher-lr.yaml").write_text(PROPOSAL)
        write_proposal(self.registry, 3, {"model.loss.z_loss": 1.0e-4}, kind="training", decided=TODAY)
        write_proposal(self.registry, 4, {"model.loss.z_loss": 1.0e-3}, status="withdrawn", kind="training")
        write_proposal(self.registry, 5, {"model.optim.eps": 1.0e-6}, status="rejected", kind="training")
        write_proposal(self.registry, 6, {"data.sources.more": {"url": f"{root}/missing/*.txt", "weight": 0.2}},
                       status="discussion", kind="data")
        write_proposal(self.registry, 7, {"model.arch.ffn": "swiglu"}, status="discussion")
        write_proposal(self.registry, 8, {"model.optim.eps": 1.0e-7}, status="discussion", kind="training",
                       conflicts=[3])
        (root / "more").mkdir()
        (root / "more" / "a.txt").write_text(english_text(60))
        write_proposal(self.registry, 9, {"data.sources.more": {"url": f"{root}/more/*.txt", "weight": 0.5}},
                       status="discussion", kind="data")
        self.config = self.write_config("config.yaml")

    def write_config(self, name: str, **overrides) -> Path:
        return write_config(self.root / name, write_corpus(self.root), **{
            "registry.path": str(self.registry), "registry.allowed_sources": [f"{self.root}/"],
            "tracking.uri": self.uri, "tracking.experiment": "trials", "data.cache_dir": str(self.root / "cache"),
            "trainer.max_steps": 10, **overrides})

    def trial(self, *args: str) -> str:
        """Run `proposals trial ARGS` on the bench config; the id of the trial's run."""
        before = {r.info.run_id for r in self.trials()}
        main(["proposals", "trial", *args, "--config", str(self.config)])
        (new,) = [r for r in self.trials() if r.info.run_id not in before]
        return new.info.run_id

    def trials(self):
        exp = self.client.get_experiment_by_name("trials")
        return self.client.search_runs([exp.experiment_id], "tags.`cpm.trial.role` = 'trial'") if exp else []

    def arms(self, run_id: str) -> dict[tuple[str, int], object]:
        """(role, seed) -> the arm's MLflow run."""
        runs = self.client.search_runs([self.client.get_run(run_id).info.experiment_id],
                                       f"tags.`mlflow.parentRunId` = '{run_id}'")
        return {(r.data.tags["cpm.trial.role"], int(r.data.tags["cpm.trial.seed"])): r for r in runs}

    def losses(self, run) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run.info.run_id, "train/loss")]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    return Bench(tmp_path_factory.mktemp("trial"))


@pytest.fixture(scope="module")
def first(bench) -> str:
    return bench.trial("2", "--steps", str(STEPS), "--seeds", str(SEEDS))


@pytest.fixture(scope="module")
def second(bench, first) -> tuple[str, bytes, bytes]:
    """The same trial again, seed 0 only, with --write: (its run id, the proposal file before, after)."""
    path = bench.registry / "0002-higher-lr.yaml"
    before = path.read_bytes()
    run_id = bench.trial("2", "--steps", str(STEPS), "--seeds", "1", "--write")
    return run_id, before, path.read_bytes()


@pytest.fixture(scope="module")
def original(bench) -> tuple[object, Path]:
    """A plain `fit` of the bench config for 3 steps: (its MLflow run, its checkpoint at step 2)."""
    root = bench.root / "original"
    main(["fit", "--config", str(bench.config), "--trainer.max_steps=3", "--checkpoint.every_n_steps=2",
          f"--trainer.default_root_dir={root}", "--tracking.run_name=original"])
    (run,) = bench.client.search_runs([bench.client.get_experiment_by_name("trials").experiment_id],
                                      "attributes.run_name = 'original'")
    return run, root / "checkpoints" / "step-00000002.ckpt"


def test_a_trial_has_one_run_with_an_arm_run_per_arm_and_seed(bench, first):
    parent = bench.client.get_run(first)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cpm.trial.proposal"] == "0002"
    arms = bench.arms(first)
    assert sorted(arms) == [(role, seed) for role in ("baseline", "proposal") for seed in range(SEEDS)]
    for (role, _), run in arms.items():
        assert run.info.status == "FINISHED"
        # Each arm resolved the registry by itself: the proposal is in the proposal arms only.
        assert run.data.tags["cpm.proposals"] == ("0001,0003,0002" if role == "proposal" else "0001,0003")
        assert max(step for step, _ in bench.losses(run)) == STEPS
    results = json.loads(Path(bench.client.download_artifacts(first, RESULTS, str(bench.root))).read_text())
    val = {(a["role"], a["seed"]): a["val_loss"] for a in results["arms"]}
    for key, run in arms.items():  # the loss of the validation after the last step
        (final,) = [m for m in bench.client.get_metric_history(run.info.run_id, "val/loss") if m.step == STEPS]
        assert val[key] == pytest.approx(final.value) == run.data.metrics["trial/val_loss"]
    differences = [val["proposal", s] - val["baseline", s] for s in range(SEEDS)]
    mean = sum(differences) / SEEDS
    half = t.ppf(0.975, SEEDS - 1) * (sum((d - mean) ** 2 for d in differences) / (SEEDS - 1)) ** 0.5 / SEEDS**0.5
    assert results["difference"]["mean"] == pytest.approx(mean)
    assert (results["difference"]["low"], results["difference"]["high"]) == pytest.approx((mean - half, mean + half))
    table = Path(bench.client.download_artifacts(first, TABLE, str(bench.root))).read_text()
    assert f"| 0 | {val['baseline', 0]:.4f} | {val['proposal', 0]:.4f} | {differences[0]:+.4f} |" in table
    assert f"final val loss {mean:+.4f} (95% interval {mean - half:+.4f} to {mean + half:+.4f})" in table
    assert parent.data.tags[VERDICT_TAG] in table
    assert "GFLOP/token" not in table  # for architecture proposals only


def test_the_same_seeds_train_the_same_arms_in_two_trials(bench, first, second):
    before, again = bench.arms(first), bench.arms(second[0])
    assert sorted(again) == [("baseline", 0), ("proposal", 0)]
    for key, run in again.items():
        assert bench.losses(run) == bench.losses(before[key]), key
    assert bench.losses(before["baseline", 0]) != bench.losses(before["baseline", 1])  # a seed changes the arm


def test_write_appends_the_verdict_and_leaves_the_rest_of_the_file_as_it_was(bench, second):
    run_id, before, after = second
    verdict = bench.client.get_run(run_id).data.tags[VERDICT_TAG]
    entry = f'  - {{run: "{run_id}", verdict: {json.dumps(verdict)}}}\n'
    assert after == before.replace(b"evidence: []", b"evidence: ").replace(
        b"the effect\n", b"the effect\n" + entry.encode())
    proposal, problems = load_proposal(bench.registry / "0002-higher-lr.yaml")
    assert not problems and proposal.evidence == [{"run": run_id, "verdict": verdict}]


def test_proposals_check_accepts_written_evidence_and_refuses_malformed(bench, second, capsys):
    main(["proposals", "check", str(bench.registry), "--allowed-sources", f"{bench.root}/"])
    assert capsys.readouterr().out == "9 proposal file(s) OK\n"
    bad = bench.root / "bad" / "0002-higher-lr.yaml"
    bad.parent.mkdir()
    bad.write_text(PROPOSAL.replace("evidence: []", "evidence: [{run: 12ab, verdict: better, seeds: three}]"))
    with pytest.raises(SystemExit):
        main(["proposals", "check", str(bad)])
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"{bad}:10: evidence.0: unknown key 'seeds'; an entry is {{run: MLflow run id, verdict: one line}}",
        f"{bad}:10: evidence.0: run: expected an MLflow run id (32 hex digits), got '12ab'"]


def test_show_prints_the_trial_tables_from_the_tracking_store(bench, first, second, capsys, monkeypatch):
    main(["proposals", "show", "2", "--dir", str(bench.registry), "--tracking-uri", bench.uri])
    out = capsys.readouterr().out
    finished = [r for r in bench.trials() if r.data.tags["cpm.trial.proposal"] == "0002" and r.info.status == "FINISHED"]
    assert out.count("## Trial of proposal 0002: A higher peak learning rate") == len(finished) >= 2
    assert bench.client.get_run(first).data.tags[VERDICT_TAG] in out
    # Without a tracking store named, the file alone, without importing MLflow (a light command).
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    code = ("import sys; from cpm_lightning.cli.main import main; main(sys.argv[1:]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'lightning'}))")
    shown = subprocess.run([sys.executable, "-c", code, "proposals", "show", "2", "--dir", str(bench.registry)],
                           capture_output=True, text=True, check=True).stdout
    assert "title: A higher peak learning rate" in shown and "## Trial" not in shown
    assert shown.splitlines()[-1] == "[]"


def test_a_trial_from_a_checkpoint_starts_both_arms_from_its_weights_and_data(bench, original):
    run, checkpoint = original
    trial = bench.trial("2", "--steps", "2", "--seeds", "1", "--from", str(checkpoint))
    arms = bench.arms(trial)
    first_step = dict(bench.losses(run))[3]
    for role in ("baseline", "proposal"):
        losses = dict(bench.losses(arms[role, 0]))
        assert sorted(losses) == [3, 4]
        # Step 3 is computed before any update of the arm: the checkpoint's weights on its next batch.
        assert losses[3] == first_step, role
        assert [m.value for m in bench.client.get_metric_history(arms[role, 0].info.run_id, START_STEP)] == [2]
    # Then the proposal's learning rate changes the update.
    assert dict(bench.losses(arms["proposal", 0]))[4] != dict(bench.losses(arms["baseline", 0]))[4]
    assert bench.client.get_run(trial).data.params["from"] == str(checkpoint)


def test_a_data_proposal_is_tried_with_the_baselines_tokenizer_and_validation_windows(bench):
    import yaml

    trial = bench.trial("9", "--steps", "1", "--seeds", "1")
    arms = bench.arms(trial)
    config = {role: yaml.safe_load(Path(bench.client.download_artifacts(arms[role, 0].info.run_id, "config.yaml",
                                                                        str(bench.root / role))).read_text())
              for role in ("baseline", "proposal")}
    assert config["baseline"]["data"]["val_sources"] is None and sorted(config["baseline"]["data"]["sources"]) == [
        "en", "zh"]
    assert config["proposal"]["data"]["val_sources"] == ["en", "zh"]
    tokenizer = Path(config["proposal"]["data"]["tokenizer"])
    assert tokenizer.parent == bench.root / "run" / "trials" / trial
    assert "data/samples/more" in arms["proposal", 0].data.metrics and "data/samples/more" not in arms[
        "baseline", 0].data.metrics
    assert "| baseline + 0009 |" in Path(bench.client.download_artifacts(trial, TABLE, str(bench.root))).read_text()


def test_ctrl_c_fails_the_trial_and_writes_no_evidence(bench, capsys):
    config = bench.write_config("interrupted.yaml", **{"trainer.callbacks": [
        {"class_path": "test_trial.SigintAt", "init_args": {"step": 1}}]})
    path = bench.registry / "0005-proposal-5.yaml"
    before = path.read_bytes()
    error = cli_error(capsys, "proposals", "trial", "5", "--config", str(config), "--steps", "2", "--seeds", "1",
                      "--write")
    (run,) = [r for r in bench.trials() if r.data.tags["cpm.trial.proposal"] == "0005"]
    assert error == (f"trial of proposal 0005 interrupted (the baseline arm of seed 0 stopped at step 1 of 2); its "
                     f"MLflow run {run.info.run_id} is marked FAILED and no evidence was written")
    assert run.info.status == "FAILED" and VERDICT_TAG not in run.data.tags
    assert [r.info.status for r in bench.arms(run.info.run_id).values()] == ["KILLED"]
    assert path.read_bytes() == before


def test_a_rejected_proposal_is_tried_with_a_note(bench):
    from cpm_lightning.cli.trial_plan import plan

    trial = plan(Namespace(id=5, config=bench.config, steps=1, seeds=1, start=None, at_step=None))
    assert trial.note == f"proposal 0005 is rejected ({dt.date(2026, 11, 2)}); tried anyway"


def test_trials_that_cannot_be_run_fairly_are_refused(bench, original, capsys, tmp_path):
    from cpm_lightning.checkpoint.store import read_meta
    from cpm_lightning.cli.trial_plan import migration_problem

    config = str(bench.config)
    trial = lambda *args: cli_error(capsys, "proposals", "trial", *args)  # noqa: E731
    assert trial("42", "--config", config, "--steps", "1") == f"no proposal 42 in {bench.registry}"
    assert trial("2", "--config", config, "--steps", "0") == "--steps must be at least 1, got 0"
    assert trial("2", "--config", config, "--steps", "1", "--seeds", "0") == "--seeds must be at least 1, got 0"
    assert trial("4", "--config", config, "--steps", "1") == (
        f"proposal 0004 ({bench.registry / '0004-proposal-4.yaml'}) is withdrawn: its authors took it back; "
        "a withdrawn proposal is not tried")
    assert trial("3", "--config", config, "--steps", "1") == (
        "proposal 0003 is already in effect at step 0: the baseline has it. Leave it out of the baseline "
        f"(registry.exclude: [3] in {config})")
    assert trial("6", "--config", config, "--steps", "1") == (
        f"proposal 0006 cannot be tried: data.sources.more.url: '{bench.root}/missing/*.txt' matches no file")
    assert trial("8", "--config", config, "--steps", "1") == (
        f"proposal 0008 cannot be tried on the baseline: {bench.registry / '0008-proposal-8.yaml'}:11: "
        f"conflicts: conflicts with proposal 3 ({bench.registry / '0003-proposal-3.yaml'}), which is applied at step 0")
    assert trial("7", "--config", config, "--steps", "1", "--from", str(original[1])) == (
        f"proposal 0007 cannot be tried --from {original[1]}: model.arch.ffn 'gated_gelu' -> 'swiglu': it changes what "
        "every layer computes and belongs to the next model generation; try it without --from (both arms from new "
        "weights)")
    # What migrations reach is tried from a checkpoint; a model directory's weights take no new shape.
    arch = read_meta(original[1])["cpm"]["arch"]
    grown = {"model.arch.ff_dim": 256, "model.arch.num_kv_heads": 2}
    assert migration_problem(grown, arch, checkpoint=True) is None
    assert migration_problem(grown, arch, checkpoint=False) == (
        "model.arch.num_kv_heads 4 -> 2: a model directory's weights are loaded as they are (checkpoint.init_from), "
        "only max_len and split_qk_scale may change")
    assert trial("2", "--config", config, "--steps", "9", "--from", str(original[1])) == (
        "--steps 9 from step 2 goes past the run config's trainer.max_steps=10 (the length of its "
        "learning-rate schedule); lower --steps or raise trainer.max_steps")
    unvalidated = bench.write_config("unvalidated.yaml", **{"trainer.limit_val_batches": 0})
    assert trial("2", "--config", str(unvalidated), "--steps", "1") == (
        f"{unvalidated}: trainer.limit_val_batches: 0 leaves no validation; a trial compares the arms' validation loss")
    outside = write_proposal(tmp_path / "registry", 1, {"data.sources.more": {"url": "/etc/*", "weight": 0.2}},
                             status="discussion", kind="data")
    elsewhere = bench.write_config("elsewhere.yaml", **{"registry.path": str(outside.parent)})
    refused = trial("1", "--config", str(elsewhere), "--steps", "1")
    assert refused.startswith(f"proposal 0001 cannot be tried: {outside}:")
    assert ": changes.data.sources.more.url: '/etc/*' is not under an allowed prefix" in refused
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        down = bench.write_config("down.yaml", **{"tracking.uri": f"http://127.0.0.1:{s.getsockname()[1]}"})
        trials = bench.root / "run" / "trials"
        arms = set(trials.iterdir()) if trials.exists() else set()
        assert trial("2", "--config", str(down), "--steps", "1").startswith(
            f"tracking server http://127.0.0.1:{s.getsockname()[1]} is unreachable (ConnectionError)")
    assert (set(trials.iterdir()) if trials.exists() else set()) == arms  # nothing trained


def test_the_weekly_digest(bench, first, second, original, tmp_path, capsys):
    from cpm_lightning.live.ledger import Ledger

    run = original[0].info.run_id
    ledger = Ledger(tmp_path / "changes.jsonl", echo=lambda line: None)
    ledger.append("applied", 2, "0003 effective from step 2", proposals=[3],
                  changes={"model.loss.z_loss": {"old": 0.0, "new": 1.0e-4}})
    ledger.append("rollback", 3, "loss 9.1 above the last 128 losses' mean by 6 sd", skipped_samples=[8, 12])
    bench.client.log_artifact(run, str(ledger.path))
    bench.client.create_registered_model("tiny-lm")
    bench.client.create_model_version("tiny-lm", f"runs:/{run}/model", run, tags={"cpm.run_id": run, "step": "3"})
    year, week, _ = TODAY.isocalendar()
    name = f"{year}-W{week:02d}"
    main(["report", "weekly", "--week", name, "--experiment", "trials", "--registry", str(bench.registry),
          "--out", str(tmp_path / "out"), "--tracking-uri", bench.uri])
    text = (tmp_path / "out" / f"{name}.md").read_text()
    verdict = bench.client.get_run(first).data.tags[VERDICT_TAG]
    for line in ("Opened: 1", "- 0002 A higher peak learning rate (training, now discussion), "
                               "https://github.com/cpm-lightning/cpm-lightning/discussions/2",
                 "Decided: 1", f"- 0003 Proposal 3: accepted on {TODAY}, "
                               "https://github.com/cpm-lightning/cpm-lightning/discussions/3",
                 f"- 0002 A higher peak learning rate: {verdict} (MLflow run {first})",
                 "- models:/tiny-lm/1: step 3, val loss n/a, proposals none, ",
                 "### Run original (" + run + ")", "![loss, learning rate and throughput](" + name + ".png)"):
        assert any(x.startswith(line) for x in text.splitlines()), line
    assert f"step 2: applied 0003 (0003 effective from step 2): model.loss.z_loss: 0.0 -> 0.0001 (run original, {run[:8]})" in text
    incidents = text.split("## Incidents")[1].split("##")[0]
    assert f"step 3: rollback (loss 9.1 above the last 128 losses' mean by 6 sd) (run original, {run[:8]})" in incidents
    assert "-seed0" not in text  # the trials' arms are not the run's training
    assert (tmp_path / "out" / f"{name}.png").stat().st_size > 0
    assert {Path(a.path).name for a in bench.client.list_artifacts(run, "weekly")} == {f"{name}.md", f"{name}.png"}
    assert cli_error(capsys, "report", "weekly", "--week", "2026-48", "--out", str(tmp_path)) == (
        "--week '2026-48': expected an ISO week YYYY-Www, e.g. 2026-W48")


def test_validation_sources_name_sources_of_the_mixture(bench):
    from cpm_lightning.core.errors import UserError
    from datamodules.config import DataConfig

    sources = {"en": {"url": "en.txt"}, "zh": {"url": "zh.jsonl", "format": "jsonl"}}
    with pytest.raises(UserError, match=r"^data.val_sources: no source 'fr'; the sources are en, zh$"):
        DataConfig(sources=sources, val_sources=["en", "fr"])
    with pytest.raises(UserError, match=r"^data.val_sources is empty; name at least one source, or leave it unset"):
        DataConfig(sources=sources, val_sources=[])
