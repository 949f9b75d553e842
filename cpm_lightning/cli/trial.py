"""`cpm-lightning proposals trial`: evidence for a proposal before it is decided (docs/ARCHITECTURE.md,
"Trials"), and the trials that `proposals show` prints. Running a trial: planning it is
trial_plan.py, its numbers and table trial_stats.py.

A trial trains two arms for N steps, K seeds each: the baseline, the run config with the registry
as it resolves at step S, and the baseline plus the proposal (`registry.trial`). Every arm is one
`fit` (cli/fit.run) in this process, one after the other; seed k of both arms starts from
the same weights (the same seed, or the same checkpoint or model directory) and draws the same
data in the same order. Each arm logs to an MLflow run under the trial's own run, which gets the
comparison: the final validation loss of each arm, the paired difference with a 95% interval over
the seeds, throughput, peak memory, and for an architecture proposal parameters and FLOPs per
token. A trial that cannot be run fairly is refused before anything trains.

Imported by the CLI for every `proposals` action and for `--help`: the training stack and MLflow are
imported inside functions.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from cpm_lightning.cli.trial_plan import ROLES, Trial, plan
from cpm_lightning.cli.trial_stats import Arm, Comparison, render
from cpm_lightning.core.errors import UserError
from cpm_lightning.registry.commands import proposals_show as show_file


def add_commands(proposals) -> None:
    """Add `trial` to the registry's `proposals` verb, and the trial tables to its `show`;
    `proposals`: its subcommands (registry/commands.add_commands returns them)."""
    trial = proposals.add_parser("trial", help="train the baseline and the baseline plus a proposal, K seeds each, "
                                               "and compare them (MLflow)")
    trial.add_argument("id", type=int, help="the proposal to try")
    trial.add_argument("--config", required=True, type=Path, help="the run config; its `registry` group is the baseline")
    trial.add_argument("--steps", required=True, type=int, help="optimizer steps each arm trains")
    trial.add_argument("--seeds", type=int, default=3, help="seeds per arm (default: 3)")
    trial.add_argument("--from", dest="start", metavar="CKPT|DIR",
                       help="start both arms from this checkpoint (weights, optimizer and data position) or model "
                            "directory (weights); default: new weights from each seed")
    trial.add_argument("--at-step", type=int, help="resolve the registry at this step (default: registry.at_step, "
                                                   "else the step of --from's checkpoint, else 0)")
    trial.add_argument("--write", action="store_true",
                       help="append {run, verdict} to the proposal's `evidence` (the rest of its file unchanged)")
    trial.set_defaults(func=proposals_trial)
    show = proposals.choices["show"]
    show.add_argument("--tracking-uri", help="also print the proposal's trials from this MLflow store (default: "
                                             "$MLFLOW_TRACKING_URI; neither: the file only)")
    show.set_defaults(func=proposals_show)


def proposals_trial(args) -> None:
    trial = plan(args)
    uri = trial.tracking.resolved_uri
    from cpm_lightning.tracking.config import check_reachable

    check_reachable(uri)  # one line before anything trains
    if trial.note:
        print(f"note: {trial.note}", file=sys.stderr)
    run_id, table, verdict = run_trial(trial)
    print(table)
    if args.write:
        from cpm_lightning.registry.evidence import append_evidence

        append_evidence(trial.proposal.path, run_id, verdict)
        print(f"added {{run: {run_id}, verdict: ...}} to the evidence of {trial.proposal.path}")


def run_trial(trial: Trial) -> tuple[str, str, str]:
    """Train every arm and log the comparison; returns (the trial's MLflow run id, its Markdown
    table, its verdict). Whatever stops it (an error, Ctrl-C) leaves the trial's run FAILED."""
    from mlflow import MlflowClient

    from cpm_lightning.tracking.trials import PROPOSAL_TAG, RESULTS, ROLE_TAG, SEED_TAG, TABLE, VERDICT_TAG

    client = MlflowClient(trial.tracking.resolved_uri)
    name = trial.tracking.resolved_experiment
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    tags = {PROPOSAL_TAG: trial.label}
    parent = client.create_run(experiment_id, run_name=f"trial-{trial.label}", tags={**tags, ROLE_TAG: "trial"})
    parent_id = parent.info.run_id
    if trial.left_out:
        trial.copy_registry(trial.root / parent_id / "registry")
    client.log_batch(parent_id, params=_params(trial))
    client.log_artifact(parent_id, str(trial.config))
    arms, shared, child, preset = [], {}, None, ""
    try:
        for seed in range(trial.seeds):
            for role in ROLES:
                print(f"trial of {trial.label}: {role} arm, seed {seed} ({len(arms) + 1} of {2 * trial.seeds})",
                      file=sys.stderr, flush=True)
                child = client.create_run(experiment_id, run_name=f"{trial.label}-{role}-seed{seed}", tags={
                    **tags, "mlflow.parentRunId": parent_id, ROLE_TAG: role, SEED_TAG: str(seed)}).info.run_id
                arm, preset = _train_arm(trial, role, seed, child, trial.root / parent_id, shared)
                arms.append(arm)
                _log_arm(client, arm)
    except BaseException as e:
        client.set_terminated(parent_id, "FAILED")
        if child is not None and client.get_run(child).info.status in ("RUNNING", "FINISHED"):
            client.set_terminated(child, "KILLED" if isinstance(e, _Interrupted) else "FAILED")
        if isinstance(e, (KeyboardInterrupt, SystemExit, _Interrupted)):  # Lightning exits after a second Ctrl-C
            where = str(e) if isinstance(e, _Interrupted) else f"{len(arms)} of {2 * trial.seeds} arms done"
            raise UserError(f"trial of proposal {trial.label} interrupted ({where}); its MLflow run {parent_id} is "
                            "marked FAILED and no evidence was written") from None
        raise
    comparison = Comparison(differences=[b.val_loss - a.val_loss for a, b in zip(arms[::2], arms[1::2], strict=True)])
    verdict = comparison.verdict(trial, preset)
    table = render(trial, arms, comparison, verdict, parent_id, preset)
    client.log_text(parent_id, table, TABLE)
    client.log_dict(parent_id, {"proposal": trial.label, "verdict": verdict, "arms": [asdict(a) for a in arms],
                                "difference": asdict(comparison)}, RESULTS)
    client.set_tag(parent_id, VERDICT_TAG, verdict)
    client.set_terminated(parent_id, "FINISHED")
    return parent_id, table, verdict


class _Interrupted(Exception):
    """An arm that stopped before its last step: a signal (Ctrl-C) made `fit` save and stop."""


def _train_arm(trial: Trial, role: str, seed: int, run_id: str, directory: Path,
               shared: dict[str, str]) -> tuple[Arm, str]:
    """Train one arm in `directory`/ROLE-seedK; returns what it measured and its preset. The first
    baseline arm of a data proposal fills `shared` (_baseline_data). Nothing of the arm's `fit`
    outlives this call: the next arm's peak memory is its own."""
    from cpm_lightning.cli.fit import run
    from cpm_lightning.model.stats import model_stats
    from cpm_lightning.train.callbacks import TrialArm

    root = directory / f"{role}-seed{seed}"
    argv, sys.argv = sys.argv, ["cpm-lightning", *trial.argv(role, seed, run_id, root, shared)]
    try:  # as `fit` reads its command line: LightningCLI warns when given arguments beside sys.argv's
        cli = run(None)
    finally:
        sys.argv = argv
    measured = next(c for c in cli.trainer.callbacks if isinstance(c, TrialArm))
    step = cli.trainer.global_step
    if step < measured.stop_at:
        raise _Interrupted(f"the {role} arm of seed {seed} stopped at step {step} of {measured.stop_at}")
    # A trial keeps numbers, not models: the arm's checkpoints go (its MLflow journal stays, if unsent).
    shutil.rmtree(root / "checkpoints", ignore_errors=True)
    if role == "baseline" and trial.proposal.kind == "data" and not shared:
        shared.update(_baseline_data(cli, directory))
    stats = model_stats(cli.model.arch, cli.datamodule.seq_len)
    return Arm(role=role, seed=seed, run_id=run_id, val_loss=float(cli.trainer.callback_metrics["val/loss"]),
               tokens_per_sec=measured.tokens_per_sec, peak_memory=measured.peak_memory, params=stats.params,
               flops_per_token=stats.flops_per_token), cli.model.arch.preset


def _baseline_data(cli, directory: Path) -> dict[str, str]:
    """What the arms of a data proposal take from the baseline's first arm: its tokenizer (a new
    source would change a tokenizer trained on the sources) and its sources as the validation set
    (both arms are measured on the same windows)."""
    from cpm_lightning.core.tokenizer import save_tokenizer

    tokenizer = cli.datamodule.text_tokenizer
    path = directory / tokenizer.file_name
    save_tokenizer(tokenizer, str(path))
    return {"tokenizer": str(path), "val_sources": json.dumps(cli.datamodule.val_sources or sorted(cli.datamodule.sources))}


def _log_arm(client, arm: Arm) -> None:
    """The arm's numbers on its own MLflow run, as trial/*."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {"val_loss": arm.val_loss, "tokens_per_sec": arm.tokens_per_sec, "peak_memory_bytes": arm.peak_memory,
              "params": arm.params, "flops_per_token": arm.flops_per_token}
    client.log_batch(arm.run_id, metrics=[Metric(f"trial/{k}", float(v), now, 0) for k, v in values.items()
                                          if v is not None])


def _params(trial: Trial) -> list:
    from mlflow.entities import Param

    values = {"proposal": trial.label, "title": trial.proposal.title, "kind": trial.proposal.kind,
              "status": trial.proposal.status, "steps": trial.steps, "seeds": trial.seeds, "at_step": trial.at_step,
              "from": trial.start, "config": trial.config, "registry": trial.registry.path}
    return [Param(k, str(v)[:500]) for k, v in values.items()]


# -- proposals show -----------------------------------------------------------------------------
def proposals_show(args) -> None:
    """The proposal's file, then, when a tracking store is named, the tables of its trials."""
    show_file(args)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:  # MLflow takes seconds to import: only when asked
        return
    from mlflow import MlflowClient

    from cpm_lightning.tracking.config import check_reachable
    from cpm_lightning.tracking.trials import trial_runs, trial_table

    label = f"{args.id:04d}"
    try:
        check_reachable(uri)
    except UserError as e:
        print(f"warning: no trials shown: {e}", file=sys.stderr)
        return
    client = MlflowClient(uri)
    runs = trial_runs(client, label)
    print(f"\n# Trials of proposal {label} in {uri}: {len(runs) or 'none'}")
    for run in runs:
        table = trial_table(client, run)
        print(f"\n{table}" if table else f"\n- trial run {run.info.run_id}: {run.info.status}, no comparison")

