"""`cpm-lightning fit|validate|test`: LightningCLI with the run config's own groups
(`tracking`, `checkpoint`, `eval`, `registry`), and what a run starts from worked out once, before
anything is built (RunPlan: the checkpoint it resumes, read once, the registry applied at its
step, the live segment's plan, the prompt book; docs/ARCHITECTURE.md, "Data flow of fit").

Imported only for those verbs: Lightning takes seconds to import.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from cpm_lightning.checkpoint.config import CheckpointConfig
from cpm_lightning.checkpoint.directory import resolve_ckpt_path
from cpm_lightning.checkpoint.migrate_on_load import plan_from
from cpm_lightning.checkpoint.store import Checkpoints, SavedCheckpoint, check_architecture, read_checkpoint
from cpm_lightning.core.errors import UserError
from cpm_lightning.core.file_hashes import trust_unverified
from cpm_lightning.core.perf import AUTO, auto_compile, auto_precision, training_device
from cpm_lightning.core.ranges import Range
from cpm_lightning.inference.book import Prompt, load_prompts
from cpm_lightning.inference.evaluation import runnable_tasks
from cpm_lightning.inference.generate import book_tokens
from cpm_lightning.live.config import LiveConfig
from cpm_lightning.live.protocol import Plan
from cpm_lightning.live.segment import LiveSegment, Resolver, release_pins, resolved_values, segment_plan
from cpm_lightning.model import ArchConfig
from cpm_lightning.model.attention import choose_kernel
from cpm_lightning.model.migrate import NoMigration, Step
from cpm_lightning.registry.apply import AppliedRegistry, RegistryConfig, apply_registry
from cpm_lightning.registry.keys import ConfigSchema
from cpm_lightning.registry.run_args import RunArgs, read_run_args
from cpm_lightning.tracking.config import TrackingConfig, check_reachable
from cpm_lightning.tracking.logger import CPMLogger, TrackRun
from cpm_lightning.train import adapters
from cpm_lightning.train.adapters import AdapterConfig
from cpm_lightning.train.callbacks import CarryProvenance, Evaluate, LogSamplesPerSource
from cpm_lightning.train.config import MAX_STEPS, EvalConfig
from cpm_lightning.train.run_config import GROUPS, VERBS, kept_tokenizer
from cpm_lightning.train.sharding import FSDP2Strategy
from datamodules.tasks import TaskPrompts


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """What a run starts from, worked out once in before_instantiate_classes, before any class is
    built, and handed to the callbacks that need it. Here, not in train/: it joins the registry,
    `live` and the prompt book, which sit above the training package."""

    start: SavedCheckpoint | None
    """The checkpoint the run resumes (`--ckpt_path`, `last`, checkpoint.resume=auto), read once."""
    proposals: AppliedRegistry | None
    """The registry as applied at the starting step; None without registry.path."""
    segment: Plan | None
    """Under `live`: what the supervisor told this segment."""
    resolved: dict
    """Under `live`: the values of the keys proposals may set, as this segment resolved them
    (the ledger's old -> new)."""
    init_from: str | None
    """checkpoint.init_from: a model directory whose architecture (always) and weights (unless the
    run resumes a checkpoint) the run starts from."""
    init_arch: dict | None
    """init_from's architecture."""
    book: list[Prompt]
    """The registry's prompt book, completed by the Evaluate callback."""
    run_id: str | None
    """The MLflow run a resumed fit continues: its checkpoint's (under `live`, before the first
    checkpoint, the run's); tracking.run_id overrides it."""
    resolver: Resolver | None = None
    """Under `live`: resolves the registry again at a boundary the segment applies in place."""


class CPMCLI(LightningCLI):
    def __init__(self, *args, run_args: RunArgs, adapter: AdapterConfig | None = None, **kwargs):
        # The run config as run_args.py read the command line (which keys it set): parsed once,
        # before LightningCLI parses it again into its namespace.
        self.run_args = run_args
        self.adapter = adapter  # `tune`: only this adapter trains
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands():
        return {k: v for k, v in LightningCLI.subcommands().items() if k in VERBS}

    def add_arguments_to_parser(self, parser):
        parser.add_class_arguments(TrackingConfig, "tracking")
        parser.add_class_arguments(CheckpointConfig, "checkpoint")
        parser.add_class_arguments(EvalConfig, "eval")
        parser.add_class_arguments(RegistryConfig, "registry")
        parser.add_class_arguments(LiveConfig, "live")  # read by `live`; a plain `fit` ignores it
        parser.link_arguments("data.vocab_size", "model.arch.vocab_size", apply_on="instantiate")
        # trainer.precision: auto, the default (core/perf.py, plan_run resolves it). Lightning's
        # type for it has no "auto" and jsonargparse has no public way to widen an argument's
        # type, so its action takes the wider type hint before anything is parsed.
        precision = next(a for a in parser._actions if a.dest == "trainer.precision")
        precision._typehint = Literal[AUTO] | _PRECISION_INPUT | None
        parser.set_defaults({"trainer.precision": AUTO})

    def _parse_ckpt_path(self):
        # The only way to keep LightningCLI from reading the checkpoint before any hook: its
        # __init__ calls _parse_ckpt_path right after parse_arguments (lightning/pytorch/cli.py,
        # LightningCLI.__init__ and _parse_ckpt_path, 2.6), which torch.loads a single-file
        # checkpoint whole and merges its hyper_parameters over the parsed config, so that a
        # resumed run would train with the checkpoint's values, not the config's, the registry's
        # or the command line's. There is no argument to turn it off. The run config is what
        # trains: the checkpoint is read once in before_instantiate_classes (RunPlan), and a
        # model that does not fit it is an error (check_architecture).
        pass

    def before_instantiate_classes(self):
        self.run_plan = plan_run(self.config[self.subcommand], self.subcommand, self.run_args.cli_keys)

    def instantiate_classes(self):
        super().instantiate_classes()
        plan, arch, seq_len = self.run_plan, self.model.arch, self.datamodule.seq_len
        self.datamodule.prompts = TaskPrompts(arch.vocab_size, arch.num_tasks, arch.prompt_len)
        if plan.init_from:
            if arch.vocab_size != plan.init_arch["vocab_size"]:
                raise UserError(f"checkpoint.init_from {plan.init_from}: its tokenizer has {arch.vocab_size} tokens, "
                                f"its model's vocab_size is {plan.init_arch['vocab_size']}")
            if not plan.start:
                self.model.init_from = plan.init_from
        if seq_len > arch.max_len:
            raise UserError(f"data.seq_len={seq_len} is above the model's maximum length "
                            f"model.arch.max_len={arch.max_len}")
        if problems := book_tokens(plan.book, self.datamodule.text_tokenizer, arch)[1]:
            raise UserError(problems[0])
        if self.adapter:  # checked here, before a trainer or an MLflow run exists
            self.model.adapter = self.adapter.for_tasks(self.datamodule.task_rows)
            adapters.check(arch, self.model.adapter)

    def instantiate_trainer(self, **kwargs):
        cfg, plan = self.config_init[self.subcommand], self.run_plan
        root = _root(cfg)
        cfg["ckpt_path"] = plan.start and str(plan.start.path)
        if cfg.trainer.strategy == "fsdp" and self.adapter:
            # peft wraps plain projections; FSDP2 shards them while the model is built (sharding.py)
            raise UserError("tune: trainer.strategy fsdp is not supported; an adapter trains on one device "
                            "(or under ddp) with the base held whole")
        if cfg.trainer.strategy == "fsdp":  # FSDP2; Lightning's "fsdp" is FSDP1 (sharding.py)
            kwargs["strategy"] = FSDP2Strategy()
        segment = plan.segment
        checkpoints = Checkpoints(root / "checkpoints", cfg.checkpoint, keep_steps=segment.keep_steps if segment else (),
                                  on_saved=release_pins(segment, cfg.live) if segment else None)
        callbacks = [checkpoints, CarryProvenance(plan.proposals and plan.proposals.resolution.ids), LogSamplesPerSource()]
        if self.subcommand == "fit" and cfg.eval.every_n_steps:
            callbacks.append(Evaluate(cfg.eval, plan.book))
        if segment:
            live = LiveSegment(segment, cfg.live, checkpoints, plan.resolved, plan.resolver)
            live.status.precision = cfg.trainer.precision  # for `live status`
            callbacks.append(live)
        if cfg.trainer.logger in (None, True):
            # A resumed fit continues the MLflow run its checkpoint names, unless tracking.run_id names another.
            kwargs["logger"] = _mlflow_logger(cfg.tracking, root, cfg.tracking.run_id or plan.run_id,
                                              segment.logged_through if segment else -1)
            callbacks.append(TrackRun(kwargs["logger"]))
        configured = cfg.trainer.callbacks or []  # instantiated already: keep them
        configured = configured if isinstance(configured, list) else [configured]
        try:
            return super().instantiate_trainer(callbacks=[*configured, *callbacks], **kwargs)
        except (MisconfigurationException, ValueError, TypeError, ModuleNotFoundError) as e:
            # Lightning checks trainer.accelerator, devices, strategy and their combination here.
            message = " ".join(str(e).split())
            raise UserError(f"trainer: {message} (accelerators on this machine: {', '.join(_accelerators())})") from None

    def before_fit(self):
        if start := self.run_plan.start:
            if self.adapter:  # a tune checkpoint holds the base's weights under peft's names and the adapter's
                start = dataclasses.replace(start, shapes=adapters.base_shapes(start.shapes))
            self.model.migrate_on_load = migration_plan(start, self.model.arch)
        # Here, before Lightning launches the other ranks: one error line, not one per rank.
        t = self.trainer
        self.datamodule.micro_batch_size(t.num_devices * t.num_nodes, t.accumulate_grad_batches)
        self._log_config()

    def _log_config(self):
        logger = self.trainer.logger
        if self.trainer.is_global_zero and hasattr(logger, "run_id"):
            text = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
            if self.run_plan.proposals is not None:  # provenance: tags, proposals.lock, commented keys
                self.run_plan.proposals.log(logger.experiment, logger.run_id)
                text = self.run_plan.proposals.annotate(text)
            logger.experiment.log_text(logger.run_id, text, "config.yaml")


def plan_run(cfg, subcommand: str, cli_keys: set[str]) -> RunPlan:
    """The RunPlan of a parsed run config `cfg` (the subcommand's namespace), which it completes:
    the registry's values (except at the keys the command line set, `cli_keys`), the starting
    step, the kept tokenizer, init_from's architecture."""
    fit = subcommand == "fit"
    if cfg.trainer.precision == AUTO:  # here, before the Trainer is built from it
        cfg.trainer.precision = auto_precision(cfg.trainer.accelerator, cfg.trainer.strategy)
    # Lightning's -1 is "no limit", and the training stream never ends an epoch: trainer.max_steps
    # is what ends a fit, and what its schedule, checkpoints and live boundaries are keyed on.
    steps = Range(1, MAX_STEPS)
    if fit and not (isinstance(cfg.trainer.max_steps, int) and steps.admits(cfg.trainer.max_steps)):
        raise UserError(f"trainer.max_steps must be {steps}, got {cfg.trainer.max_steps!r}: a fit trains until "
                        "then (its data has no end; -1, Lightning's default, would train forever)")
    # `last` and (fit only) checkpoint.resume=auto become a path; its step picks the proposals,
    # its run id the MLflow run.
    path = resolve_ckpt_path(cfg.get("ckpt_path"), _root(cfg) / "checkpoints", cfg.checkpoint.resume if fit else "never")
    trust_unverified(cfg.checkpoint.trust_unverified)  # for every read of this run: ours and Lightning's restore
    start = read_checkpoint(path) if path else None
    # Accepted proposals go in above the config files and below the command line; a resumed run
    # applies those in effect at the step it resumes from.
    if cfg.registry.at_step is None:
        cfg.registry.at_step = start.step if start else 0
    if cfg.model.parallel.compile == AUTO:  # on the steps this process trains
        cfg.model.parallel.compile = auto_compile(cfg.trainer.accelerator, cfg.trainer.max_steps - (start.step if start else 0))
    # The attention kernel's rule (flex cannot train on CPU), here before data is prepared or a run
    # is logged rather than at the first step.
    if fit and training_device(cfg.trainer.accelerator) == "cpu":
        choose_kernel(cfg.model.parallel.attention, torch.device("cpu"), backward=True)
    segment = segment_plan() if fit else None
    before = copy.deepcopy(cfg) if segment else None  # what a boundary inside the segment resolves again
    proposals = apply_registry(cfg, cli_keys, ConfigSchema(GROUPS))
    resolved = resolved_values(cfg) if segment else {}
    # A resumed run keeps the tokenizer it was trained with (run_config.kept_tokenizer).
    if start and start.meta.tokenizer is not None and cfg.data.tokenizer is None:
        cfg.data.tokenizer = kept_tokenizer(cfg.data, start.meta.tokenizer)
    init_from = cfg.checkpoint.init_from if fit else None
    if init_from and cfg.get("ckpt_path"):
        raise UserError("--ckpt_path and checkpoint.init_from both say where the run starts; give one")
    init_arch = take_architecture(cfg, init_from) if init_from else None
    if cfg.trainer.logger in (None, True):  # fail before any work (tokenizer, shards)
        check_reachable(TrackingConfig(uri=cfg.tracking.uri).resolved_uri)
    evaluates = fit and cfg.eval.every_n_steps
    if evaluates:
        cfg.eval.tasks, skipped = runnable_tasks(list(cfg.eval.tasks), "eval.tasks", has_heldout=True)
        if skipped:
            print(f"warning: {skipped}", file=sys.stderr)
    book = load_prompts(Path(cfg.registry.path)) if evaluates and cfg.registry.path else []
    run_id = (start.meta.mlflow_run_id if fit and start else None) or (segment and segment.run_id)
    return RunPlan(start=start, proposals=proposals, segment=segment, resolved=resolved, init_from=init_from,
                   init_arch=init_arch, book=book, run_id=run_id,
                   resolver=Resolver(before, frozenset(cli_keys)) if segment else None)


def migration_plan(start: SavedCheckpoint, arch: ArchConfig) -> list[Step]:
    """The migrations that take checkpoint `start` to this run's model.arch (migrate_on_load.py);
    none when they agree, and then its shapes must be this run's."""
    try:
        steps = plan_from(start.meta.arch, arch)
    except NoMigration as e:
        raise UserError(f"checkpoint {start.path} cannot resume with this run's model.arch: {e}") from None
    if not steps:
        check_architecture(start, arch)
    else:
        rank_zero_info(f"{start.path}: migrating to this run's model.arch: {'; '.join(map(str, steps))}")
    return steps


# Fields of model.arch that say how a run computes, not what the weights mean: a run that starts
# from a model directory may set them (CPM-Ant raised max_len during its live run).
RUN_OWNED = ("max_len", "split_qk_scale")


def take_architecture(cfg, directory: str) -> dict:
    """Make `directory`'s architecture and tokenizer the run's (checkpoint.init_from): a value
    the run gives that differs is a UserError. Returns the directory's arch."""
    from cpm_lightning.checkpoint.modeldir import is_model_dir, open_model_dir
    from cpm_lightning.core.tokenizer import Tokenizer

    if not is_model_dir(Path(directory)):
        raise UserError(f"checkpoint.init_from {directory}: not a model directory (no model.safetensors); expected "
                        "one written by `convert from-hf`, `checkpoint consolidate` or a release")
    stored = open_model_dir(directory)
    defaults = {f.name: f.default for f in dataclasses.fields(ArchConfig)}
    run = cfg.model.arch
    for key, value in stored.arch.items():
        given = run.get(key)
        set_by_run = given is not None and given != defaults[key] and key != "vocab_size"
        if key in RUN_OWNED and set_by_run:
            continue
        if set_by_run and given != value:
            raise UserError(f"model.arch.{key} is {given!r} in this run, but checkpoint.init_from {directory} holds a "
                            f"model with {key} {value!r}; leave it unset or give {value!r}")
        run[key] = value
    tokenizer = stored.require_tokenizer()
    path = Path(directory) / tokenizer.file_name
    if cfg.data.tokenizer is None:
        cfg.data.tokenizer = str(path)
    elif Tokenizer.load(cfg.data.tokenizer).model_bytes != tokenizer.model_bytes:
        raise UserError(f"data.tokenizer {cfg.data.tokenizer} is not the tokenizer of checkpoint.init_from {directory} "
                        f"({path}); leave data.tokenizer unset to use it")
    return stored.arch


def _accelerators() -> list[str]:
    """The trainer.accelerator values this machine can run, with their device counts (cpu has
    none: its devices are processes)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    found = []
    for name in sorted(AcceleratorRegistry.available_accelerators()):
        accelerator = AcceleratorRegistry[name]["accelerator"]
        if accelerator.is_available():
            found.append(name if name == "cpu" else f"{name} ({accelerator.auto_device_count()} devices)")
    return found


def _root(cfg) -> Path:
    """trainer.default_root_dir: where checkpoints (and an MLflow fallback) go."""
    return Path(cfg.trainer.default_root_dir or os.getcwd())


def _mlflow_logger(tracking: TrackingConfig, root: Path, run_id: str | None, logged_through: int) -> CPMLogger:
    """The run's MLflow logger: a new run, or the existing run `run_id` continued."""
    return CPMLogger(tracking_uri=tracking.resolved_uri, experiment_name=tracking.resolved_experiment,
                     run_name=tracking.run_name, run_id=run_id, fallback_dir=root, flush_timeout=tracking.flush_timeout,
                     logged_through=logged_through)


def run(argv: list[str] | None, run_args: RunArgs | None = None, adapter: AdapterConfig | None = None) -> CPMCLI:
    """argv None: LightningCLI reads sys.argv itself (it warns when given both). `run_args`: the
    run config as registry/run_args.py read argv (read here when not given). `adapter`: train
    only it, the model frozen (`tune`, cli/tune.py). Returns the CLI,
    whose trainer and model a caller in the same process may read (`proposals trial`)."""
    import jsonargparse

    from cpm_lightning.train.run_config import training_classes

    # `--help` and `--print_config` show each config dataclass field's docstring. Reading them
    # costs ~0.7 s, which every other start of `fit` (each rank, each live segment) is spared.
    words = sys.argv[1:] if argv is None else argv
    run_args = run_args or read_run_args(words[1:])  # after the verb
    asked = any(w in ("-h", "--help") or w.startswith("--print_config") for w in words)
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=asked)
    # exit_on_error=False: jsonargparse raises ArgumentError instead of printing its usage block,
    # and cli.main() prints the message as one line.
    return CPMCLI(*training_classes(), run_args=run_args, adapter=adapter, args=argv, save_config_callback=None, seed_everything_default=0,
                  parser_kwargs={"exit_on_error": False})
