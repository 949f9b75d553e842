"""Planning a trial (`cpm-lightning proposals trial`; docs/ARCHITECTURE.md, "Trials"): what a trial
is (`Trial`: the proposal, the run config, the seeds, where the arms start) and each arm's `fit`
arguments, checked before anything trains: a trial that cannot be run fairly is a UserError.

Runs nothing: the registry and the run config are read, a starting checkpoint's metadata opened.
Lightning is imported only for a trial --from a checkpoint or model directory (migration_problem
reads fit's `RUN_OWNED`, cli/fit.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cpm_lightning.core.errors import UserError
from cpm_lightning.registry.apply import RegistryConfig
from cpm_lightning.registry.commands import checked_group, config_schema, registry_settings
from cpm_lightning.registry.resolve import Registry, load_registry, resolve, trial_problems
from cpm_lightning.registry.run_args import read_run_config
from cpm_lightning.registry.schema import Proposal
from cpm_lightning.tracking.config import TrackingConfig

ROLES = ("baseline", "proposal")
NOTED = ("rejected", "superseded", "retired")  # tried with a note; `withdrawn` is refused
TOKENIZER_KEYS = ("data.tokenizer", "data.tokenizer_vocab_size")
SOURCE_URL = re.compile(r"^data\.sources\.([^.]+)\.url$")
# A trial is a short paired comparison; more seeds than this is a sweep, more steps a run (and a
# typo of either would train for months before anyone noticed).
MOST = {"steps": 1_000_000, "seeds": 100}


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
    left_out: list[int] = field(default_factory=list)
    """Proposals whose files have a problem that does not involve the one tried: both arms read
    a copy of the registry without them (`copy_registry`), as `live` follows a registry."""
    registry_copy: Path | None = None
    """That copy, once written; None: the arms read registry.path."""
    proposals: list[Path] = field(default_factory=list)
    """The proposal files the copy holds."""

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
        exclude = [i for i in self.registry.exclude if i not in self.left_out]
        if self.registry_copy is not None:
            argv += [f"--registry.path={self.registry_copy}"]
            argv += [f"--registry.exclude={json.dumps(exclude)}"] if role == "baseline" else []
        if role == "proposal":
            exclude = [i for i in exclude if i != self.proposal.id]
            argv += [f"--registry.trial={self.proposal.id}", f"--registry.exclude={json.dumps(exclude)}"]
            argv += [f"--data.{key}={value}" for key, value in shared.items()]
        return argv

    def copy_registry(self, directory: Path) -> None:
        """Write the registry without `left_out` to `directory`, for both arms."""
        directory.mkdir(parents=True, exist_ok=True)
        for path in self.proposals:
            shutil.copyfile(path, directory / path.name)
        self.registry_copy = directory


def _is_model_dir(path: Path) -> bool:
    from cpm_lightning.checkpoint.modeldir import is_model_dir

    return is_model_dir(path)


def plan(args) -> Trial:
    """The trial `args` ask for, or a UserError that says why it cannot be run fairly."""
    for name, most in MOST.items():
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
        if getattr(args, name) > most:
            raise UserError(f"--{name} must be at most {most:,} (a trial is a short paired comparison), "
                            f"got {getattr(args, name):,}")
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
    reg, left_out = _registry_for(args.id, settings)
    proposal = reg.get(args.id)
    if proposal.status == "withdrawn":
        raise UserError(f"proposal {proposal.label} ({proposal.path}) is withdrawn: its authors took it back; "
                        "a withdrawn proposal is not tried")
    trial = Trial(proposal=proposal, config=args.config, registry=settings, steps=args.steps, seeds=args.seeds,
                  at_step=0, tracking=TrackingConfig(**checked_group(config.get("tracking") or {}, TrackingConfig,
                                                                     "tracking", args.config)))
    trial.left_out, trial.proposals = sorted(left_out), [p.path for p in reg.proposals.values()]
    notes = []
    if proposal.status in NOTED:
        notes.append(f"proposal {proposal.label} is {proposal.status} ({proposal.decided}); tried anyway")
    if left_out:
        notes.append(f"{_labels(left_out)} left out of both arms, their files have a problem: "
                     f"{'; '.join(dict.fromkeys(left_out.values()))}")
    trial.note = "; ".join(notes) or None
    arch = _start(trial, args.start)
    trial.at_step = next(s for s in (args.at_step, settings.at_step, trial.start_step) if s is not None)  # as fit's
    try:
        baseline = resolve(reg, trial.at_step, settings.kinds, [i for i in settings.exclude if i not in left_out])
    except UserError as e:  # every problem, one a line: the first one says enough
        first, *rest = str(e).splitlines()
        raise UserError(f"no trial runs: the baseline of {args.config} does not resolve at step {trial.at_step}: "
                        f"{rest[0] if rest else first}" + (f" (and {len(rest) - 1} more)" if len(rest) > 1 else "")) from None
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


def _registry_for(pid: int, settings: RegistryConfig) -> tuple[Registry, dict[int, str]]:
    """The registry a trial of proposal `pid` reads, and the proposals left out of it with their
    first problem. A problem that involves `pid`, or the registry as a whole, refuses the
    trial; one of another proposal only leaves that one out."""
    reg = load_registry(settings.path, config_schema(), settings)
    if own := [p for p in reg.problems if pid in p.ids]:
        raise UserError(f"proposal {pid:04d} cannot be tried: {own[0]}")
    if whole := [p for p in reg.problems if not p.ids]:
        raise UserError(f"no trial runs: {whole[0]}")
    left_out: dict[int, str] = {}
    for problem in reg.problems:
        for i in sorted(problem.ids):
            left_out.setdefault(i, str(problem))
    good = Registry(reg.path, {i: p for i, p in reg.proposals.items() if i not in left_out})
    return good, left_out


def _labels(ids) -> str:
    return ", ".join(f"{i:04d}" for i in sorted(ids))


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

