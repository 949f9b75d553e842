"""`cpm-lightning proposals trial`: evidence for a proposal before it is decided (docs/ARCHITECTURE.md,
"Trials"), and the trials that `proposals show` prints.

A trial trains two arms for N steps, K seeds each: the baseline, the run config with the registry
as it resolves at step S, and the baseline plus the proposal (`registry.trial`). Every arm is one
`fit` (lightning_cli.run) in this process, one after the other; seed k of both arms starts from
the same weights (the same seed, or the same checkpoint or model directory) and draws the same
data in the same order. Each arm logs to an MLflow run under the trial's own run, which gets the
comparison: the final validation loss of each arm, the paired difference with a 95% interval over
the seeds, throughput, peak memory, and for an architecture proposal parameters and FLOPs per
token. A trial that cannot be run fairly is refused before anything trains.

Imported by the CLI for every verb: the training stack and MLflow are imported inside functions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cpm_lightning.core.errors import UserError
from cpm_lightning.registry.apply import RegistryConfig
from cpm_lightning.registry.commands import checked_group, config_schema, registry_settings
from cpm_lightning.registry.commands import proposals_show as show_file
from cpm_lightning.registry.resolve import load_registry, resolve, trial_problems
from cpm_lightning.registry.schema import Proposal, read_run_config
from cpm_lightning.tracking.config import TrackingConfig

ROLES = ("baseline", "proposal")
NOTED = ("rejected", "superseded", "retired")  # tried with a note; `withdrawn` is refused
TOKENIZER_KEYS = ("data.tokenizer", "data.tokenizer_vocab_size")
SOURCE_URL = re.compile(r"^data\.sources\.([^.]+)\.url$")


def add_commands(sub) -> None:
    proposals = _subcommands(sub.choices["proposals"])
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


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The subcommands of `parser` (argparse has no public getter for them)."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


# -- what a trial is ----------------------------------------------------------------------------
@dataclass(kw_only=True)
class Trial:
    """A trial, checked and ready to run."""

    proposal: Proposal
    config: Path
    """The run config both arms train with."""
    registry: RegistryConfig
    """Its `registry` group: the baseline."""
    tracking: TrackingConfig
    """Its `tracking` group: where the arms and the trial log."""
    steps: int
    seeds: int
    at_step: int
    """The step the registry is resolved at, for both arms."""
    start: Path | None = None
    """A checkpoint (--ckpt_path) or a model directory (checkpoint.init_from), or None."""
    start_step: int = 0
    """The step the arms start from: the checkpoint's, else 0."""
    base_seeds: tuple[int, int] = (0, 0)
    """The run config's seed_everything and data.seed: seed k adds k to both."""
    root: Path = Path()
    """Where the arms' trainer.default_root_dir go: <the run config's>/trials."""
    note: str | None = None
    """Said before the trial and in its table (a rejected proposal is tried anyway)."""

    @property
    def label(self) -> str:
        return self.proposal.label

    def argv(self, role: str, seed: int, run_id: str, root: Path, shared: dict[str, str]) -> list[str]:
        """`fit`'s arguments for one arm; `shared`: what the treatment of a data proposal takes
        from the first baseline arm (its tokenizer and validation sources)."""
        measure = {"class_path": "cpm_lightning.train.callbacks.TrialArm", "init_args": {"stop_at": self.start_step + self.steps}}
        argv = ["fit", "--config", str(self.config), f"--trainer.default_root_dir={root}",
                "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.num_sanity_val_steps=0",
                "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", "--checkpoint.resume=never",
                f"--trainer.callbacks+={json.dumps(measure)}",
                f"--seed_everything={self.base_seeds[0] + seed}", f"--data.seed={self.base_seeds[1] + seed}",
                f"--registry.at_step={self.at_step}", f"--tracking.run_id={run_id}"]
        if self.start is not None:
            argv += [f"--checkpoint.init_from={self.start}"] if _is_model_dir(self.start) else ["--ckpt_path", str(self.start)]
        if role == "proposal":
            exclude = [i for i in self.registry.exclude if i != self.proposal.id]
            argv += [f"--registry.trial={self.proposal.id}", f"--registry.exclude={json.dumps(exclude)}"]
            argv += [f"--data.{key}={value}" for key, value in shared.items()]
        return argv


def _is_model_dir(path: Path) -> bool:
    from cpm_lightning.checkpoint.modeldir import is_model_dir

    return is_model_dir(path)


def plan(args) -> Trial:
    """The trial `args` ask for, or a UserError that says why it cannot be run fairly."""
    for name, least in (("steps", 1), ("seeds", 1)):
        if getattr(args, name) < least:
            raise UserError(f"--{name} must be at least {least}, got {getattr(args, name)}")
    if args.at_step is not None and args.at_step < 0:
        raise UserError(f"--at-step must be >= 0, got {args.at_step}")
    config = read_run_config(args.config)
    settings = registry_settings(config, args.config)
    if settings.path is None:
        raise UserError(f"{args.config}: registry.path is null; a trial tries a proposal of the registry it names")
    if settings.trial is not None:
        raise UserError(f"{args.config}: registry.trial is set; a trial sets it in its proposal's arm only")
    trainer = config.get("trainer") or {}
    if trainer.get("logger") not in (None, True):
        raise UserError(f"{args.config}: trainer.logger is set; a trial logs each arm to MLflow (leave it unset)")
    data = config.get("data") or {}
    for key, value in (("trainer.limit_val_batches", trainer.get("limit_val_batches")),
                       ("data.val_windows", data.get("val_windows"))):
        if value == 0:
            raise UserError(f"{args.config}: {key}: 0 leaves no validation; a trial compares the arms' validation loss")
    reg = load_registry(settings.path, config_schema(), settings)
    own = [p for p in reg.problems if args.id in p.ids]
    if own:
        raise UserError(f"proposal {args.id:04d} cannot be tried: {own[0]}")
    reg.raise_problems("no trial runs")
    proposal = reg.get(args.id)
    if proposal.status == "withdrawn":
        raise UserError(f"proposal {proposal.label} ({proposal.path}) is withdrawn: its authors took it back; "
                        "a withdrawn proposal is not tried")
    trial = Trial(proposal=proposal, config=args.config, registry=settings, steps=args.steps, seeds=args.seeds,
                  at_step=0, tracking=TrackingConfig(**checked_group(config.get("tracking") or {}, TrackingConfig,
                                                                     "tracking", args.config)))
    if proposal.status in NOTED:
        trial.note = f"proposal {proposal.label} is {proposal.status} ({proposal.decided}); tried anyway"
    arch = _start(trial, args.start)
    trial.at_step = next(s for s in (args.at_step, settings.at_step, trial.start_step) if s is not None)  # as fit's
    baseline = resolve(reg, trial.at_step, settings.kinds, settings.exclude)
    if proposal in baseline.applied:
        earlier = (f" or give --at-step below its effective_from_step {proposal.effective_from_step}"
                   if proposal.effective_from_step else "")
        raise UserError(f"proposal {proposal.label} is already in effect at step {trial.at_step}: the baseline has it. "
                        f"Leave it out of the baseline (registry.exclude: [{proposal.id}] in {args.config}){earlier}")
    if problems := trial_problems(proposal, baseline.applied, trial.at_step):
        raise UserError(f"proposal {proposal.label} cannot be tried on the baseline: {problems[0]}")
    if arch is not None and (problem := migration_problem(proposal.changes, arch, not _is_model_dir(trial.start))):
        raise UserError(f"proposal {proposal.label} cannot be tried --from {args.start}: {problem}; try it without "
                        "--from (both arms from new weights)")
    if proposal.kind == "data":
        _check_data(proposal)
    max_steps = trainer.get("max_steps")
    if max_steps is not None and 0 <= max_steps < trial.start_step + trial.steps:
        raise UserError(f"--steps {trial.steps} from step {trial.start_step} goes past the run config's "
                        f"trainer.max_steps={max_steps} (the length of its learning-rate schedule); lower --steps "
                        "or raise trainer.max_steps")
    seed = config.get("seed_everything", 0)
    trial.base_seeds = (seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
                        data.get("seed", 0))
    trial.root = Path(trainer.get("default_root_dir") or os.getcwd()) / "trials"
    return trial


def _start(trial: Trial, start: str | None) -> dict | None:
    """Set the trial's start from --from; returns the architecture it starts from (None: new weights)."""
    if start is None:
        return None
    path = Path(start)
    if not os.path.exists(path):
        raise UserError(f"--from {start}: no such checkpoint or model directory")
    trial.start = path
    if _is_model_dir(path):
        from cpm_lightning.checkpoint.modeldir import open_model_dir

        return open_model_dir(path).arch
    from cpm_lightning.checkpoint.store import read_checkpoint

    saved = read_checkpoint(path)
    trial.start_step = saved.step
    return saved.meta.arch


def migration_problem(changes: dict, arch: dict, checkpoint: bool) -> str | None:
    """Why the weights of a model of architecture `arch` cannot be carried to it with a proposal's
    model.arch `changes`, or None. A checkpoint is migrated as `fit` resumes it, by the migrations
    model/migrate.py plans; a model directory's weights are loaded as they are
    (checkpoint.init_from), with only the fields a run may set on them changed (RUN_OWNED)."""
    from cpm_lightning.checkpoint.migrate_on_load import resolved
    from cpm_lightning.cli.fit import RUN_OWNED
    from cpm_lightning.model.migrate import NoMigration, plan

    new = {**arch, **{k.removeprefix("model.arch."): v for k, v in changes.items() if k.startswith("model.arch.")}}
    if checkpoint:
        try:
            plan(resolved(arch), resolved(new))
        except NoMigration as e:
            return str(e)
        return None
    key = next((k for k, v in new.items() if k not in RUN_OWNED and arch.get(k) != v), None)
    return key and (f"model.arch.{key} {arch.get(key)!r} -> {new[key]!r}: a model directory's weights are loaded as "
                    f"they are (checkpoint.init_from), only {' and '.join(RUN_OWNED)} may change")


def _check_data(p: Proposal) -> None:
    """A data proposal is tried with the baseline's tokenizer (losses per token compare only on
    one vocabulary) and only when every source it adds can be listed now."""
    from datamodules.sources import SourceConfig, expand

    if keys := [k for k in p.changes if k in TOKENIZER_KEYS]:
        raise UserError(f"proposal {p.label} sets {', '.join(keys)}: its arm would have another tokenizer than the "
                        "baseline, and losses per token of different vocabularies do not compare")
    for key, url in p.changes.items():
        if m := SOURCE_URL.match(key):
            try:
                expand(m[1], SourceConfig(url=url))
            except UserError as e:
                raise UserError(f"proposal {p.label} cannot be tried: {e}") from None
            except Exception as e:  # a store that is down, a missing fsspec driver, no credentials
                reason = (str(e).splitlines() or [""])[0][:200]
                raise UserError(f"proposal {p.label} cannot be tried: {key} {url!r} is unreachable "
                                f"({type(e).__name__}: {reason})") from None


# -- running it ---------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Arm:
    """What one arm measured."""

    role: str
    seed: int
    run_id: str
    val_loss: float
    """Validation loss after the last step."""
    tokens_per_sec: float | None
    peak_memory: int | None
    """Bytes (see callbacks.peak_memory)."""
    params: int
    flops_per_token: int
    """Training FLOPs per token at data.seq_len (model/stats.py)."""


@dataclass(kw_only=True)
class Comparison:
    """The paired difference of the final validation loss, proposal minus baseline, over seeds."""

    differences: list[float]
    mean: float = field(init=False)
    low: float | None = field(init=False)
    """The 95% interval (t distribution, K-1 degrees of freedom); None for one seed."""
    high: float | None = field(init=False)

    def __post_init__(self):
        k = len(self.differences)
        self.mean = statistics.fmean(self.differences)
        self.low = self.high = None
        if k > 1:
            from scipy.stats import t

            half = t.ppf(0.975, k - 1) * statistics.stdev(self.differences) / math.sqrt(k)
            self.low, self.high = self.mean - half, self.mean + half

    @property
    def word(self) -> str:
        if self.low is None:
            return "one seed, no interval"
        return "better" if self.high < 0 else "worse" if self.low > 0 else "no clear difference"

    def verdict(self, trial: Trial, preset: str) -> str:
        """One line: the word, the difference and its interval, and what was trained."""
        interval = f" (95% interval {self.low:+.4f} to {self.high:+.4f})" if self.low is not None else ""
        start = f"from {trial.start} (step {trial.start_step})" if trial.start else "from new weights"
        return (f"{self.word}: final val loss {self.mean:+.4f}{interval} with {trial.label} over "
                f"{_seeds(len(self.differences))} x {trial.steps} steps, {preset} preset, {start}")


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


# -- the table ----------------------------------------------------------------------------------
def render(trial: Trial, arms: list[Arm], comparison: Comparison, verdict: str, run_id: str, preset: str) -> str:
    """The trial's comparison in Markdown."""
    p = trial.proposal
    names = {"baseline": "baseline", "proposal": f"baseline + {p.label}"}
    start = f"from {trial.start} (step {trial.start_step})" if trial.start else "from new weights"
    lines = [f"## Trial of proposal {p.label}: {p.title}", "",
             f"{trial.steps} steps {start}, seeds {', '.join(map(str, range(trial.seeds)))}: run config "
             f"`{trial.config}` ({preset} preset), registry `{trial.registry.path}` at step {trial.at_step}. "
             f"MLflow run {run_id}.", ""]
    if trial.note:
        lines += [f"Note: {trial.note}.", ""]
    architecture = p.kind == "architecture"
    head = ["arm", "final val loss", "tokens/s", "peak memory"] + (["parameters", "GFLOP/token"] if architecture else [])
    lines += [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    for role in ROLES:
        group = [a for a in arms if a.role == role]
        losses = [a.val_loss for a in group]
        cells = [names[role], f"{statistics.fmean(losses):.4f}" + (f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""),
                 _mean([a.tokens_per_sec for a in group], lambda v: f"{v:,.0f}"),
                 _mean([a.peak_memory for a in group], lambda v: f"{v / 2**20:,.0f} MiB")]
        if architecture:
            cells += [_count(group[0].params), f"{group[0].flops_per_token / 1e9:.4f}"]
        lines.append(_row(cells))
    lines += ["", _row(["seed", "baseline", names["proposal"], "difference"]), _row(["---:"] * 4)]
    for a, b in zip(arms[::2], arms[1::2], strict=True):
        lines.append(_row([str(a.seed), f"{a.val_loss:.4f}", f"{b.val_loss:.4f}", f"{b.val_loss - a.val_loss:+.4f}"]))
    lines += ["", f"**Verdict:** {verdict}.", "",
              "Final val loss: after the last step, mean ± standard deviation over the seeds. Difference: the "
              "proposal's minus the baseline's, per seed (same initial weights or checkpoint, same data order); its "
              "95% interval is the mean's, t distribution with seeds − 1 degrees of freedom. Tokens/s: from the end "
              "of the first step to the end of the last. Peak memory: the peak resident set of the process while the "
              "arm trained (on a GPU: the peak allocated by torch).", ""]
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _mean(values: list, fmt) -> str:
    known = [v for v in values if v is not None]
    return fmt(statistics.fmean(known)) if known else "n/a"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


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


def _seeds(k: int) -> str:
    return f"{k} seed{'s' if k > 1 else ''}"
