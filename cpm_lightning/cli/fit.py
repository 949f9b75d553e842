"""`cpm-lightning fit|validate|test`: LightningCLI with the run config's own groups
(`tracking`, `checkpoint`, `eval`, `registry`), the registry applied before anything is built, and the
checkpoint a run starts from resolved once (docs/ARCHITECTURE.md, "Data flow of fit").

Imported only for those verbs: Lightning takes seconds to import.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from cpm_lightning.checkpoint.config import CheckpointConfig
from cpm_lightning.checkpoint.directory import resolve_ckpt_path
from cpm_lightning.checkpoint.migrate_on_load import plan_from
from cpm_lightning.checkpoint.store import RUN_ID_KEY, Checkpoints, check_architecture, read_meta
from cpm_lightning.core.errors import UserError
from cpm_lightning.inference.book import load_prompts
from cpm_lightning.inference.evaluation import check_tasks
from cpm_lightning.inference.generate import book_tokens
from cpm_lightning.live.config import LiveConfig
from cpm_lightning.live.segment import LiveSegment, segment_plan
from cpm_lightning.model.migrate import NoMigration
from cpm_lightning.registry.apply import RegistryConfig, apply_registry
from cpm_lightning.registry.keys import OPERATOR_KEYS, ConfigSchema
from cpm_lightning.tracking.config import TrackingConfig, check_reachable
from cpm_lightning.tracking.logger import CPMLogger, TrackRun
from cpm_lightning.train.callbacks import CarryProvenance, Evaluate, LogSamplesPerSource
from cpm_lightning.train.config import EvalConfig
from cpm_lightning.train.run_config import GROUPS, VERBS, kept_tokenizer
from cpm_lightning.train.sharding import FSDP2Strategy


class CPMCLI(LightningCLI):
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

    def parse_arguments(self, parser, args):
        super().parse_arguments(parser, args)
        # Kept to tell command-line overrides of a proposal's key from config-file values.
        self.argv = sys.argv[1:] if args is None else list(args) if isinstance(args, list) else []

    def _parse_ckpt_path(self):
        # LightningCLI would merge a single-file checkpoint's hyper_parameters over the parsed
        # config here, so that a resumed run silently trained with the checkpoint's values, not
        # the config's, the registry's or the command line's. The run config is what trains: the
        # checkpoint is resolved and read in before_instantiate_classes, and a model that does not
        # fit it is an error (check_architecture).
        pass

    def before_instantiate_classes(self):
        cfg = self.config[self.subcommand]
        # The checkpoint the run starts from, once: `last` and (fit only) checkpoint.resume=auto
        # become a path, and its step and MLflow run id are read here.
        resume = cfg.checkpoint.resume if self.subcommand == "fit" else "never"
        self.ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), _root(cfg) / "checkpoints", resume)
        self.ckpt_meta = read_meta(self.ckpt) if self.ckpt else {}
        # Accepted proposals go in above the config files and below the command line; a
        # resumed run applies those in effect at the step it resumes from.
        if cfg.registry.at_step is None:
            cfg.registry.at_step = self.ckpt_meta.get("global_step", 0)
        self.proposals = apply_registry(cfg, self.argv, self.subcommand, ConfigSchema(GROUPS))
        # Started by `live` as one segment of a run: what the supervisor said, and the values
        # of the keys proposals may set as this segment resolved them (the ledger's old -> new).
        self.plan = segment_plan() if self.subcommand == "fit" else None
        if self.plan:
            groups = {f"model.{g}": cfg.model[g].as_dict() for g in ("arch", "optim", "schedule", "loss")}
            self.resolved = dict(leaf for g, values in {**groups, "data": cfg.data.as_dict()}.items()
                                 for leaf in _leaves(g, values) if leaf[0] not in OPERATOR_KEYS)
        # A resumed run keeps the tokenizer it was trained with (run_config.kept_tokenizer).
        tokenizer = self.ckpt_meta.get("cpm", {}).get("tokenizer")
        if tokenizer is not None and cfg.data.tokenizer is None:
            cfg.data.tokenizer = kept_tokenizer(cfg.data, tokenizer)
        # A run may start from a model directory: its architecture always, its weights unless
        # the run resumes a checkpoint (checkpoint.resume=auto after a requeue).
        self.init_from = cfg.checkpoint.init_from if self.subcommand == "fit" else None
        if self.init_from:
            if cfg.get("ckpt_path"):
                raise UserError("--ckpt_path and checkpoint.init_from both say where the run starts; give one")
            self.init_arch = take_architecture(cfg, self.init_from)
        if cfg.trainer.logger in (None, True):  # fail before any work (tokenizer, shards)
            check_reachable(TrackingConfig(uri=cfg.tracking.uri).resolved_uri)
        if self.subcommand == "fit" and cfg.eval.every_n_steps:
            check_tasks(cfg.eval.tasks, "eval.tasks", has_heldout=True)
        # The prompt book of the registry the run follows, completed by the Evaluate callback.
        self.book = load_prompts(Path(cfg.registry.path)) if self.subcommand == "fit" and cfg.eval.every_n_steps \
            and cfg.registry.path else []

    def instantiate_classes(self):
        super().instantiate_classes()
        arch, seq_len = self.model.arch, self.datamodule.seq_len
        if self.init_from:
            if arch.vocab_size != self.init_arch["vocab_size"]:
                raise UserError(f"checkpoint.init_from {self.init_from}: its tokenizer has {arch.vocab_size} tokens, "
                                f"its model's vocab_size is {self.init_arch['vocab_size']}")
            if not self.ckpt:
                self.model.init_from = self.init_from
        if seq_len > arch.max_len:
            raise UserError(f"data.seq_len={seq_len} is above the model's maximum length "
                            f"model.arch.max_len={arch.max_len}")
        if problems := book_tokens(self.book, self.datamodule.text_tokenizer, arch)[1]:
            raise UserError(problems[0])

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand]
        root = _root(cfg)
        cfg["ckpt_path"] = self.ckpt and str(self.ckpt)
        if cfg.trainer.strategy == "fsdp":  # FSDP2; Lightning's "fsdp" is FSDP1 (sharding.py)
            kwargs["strategy"] = FSDP2Strategy()
        checkpoints = Checkpoints(root / "checkpoints", cfg.checkpoint)
        callbacks = [checkpoints, CarryProvenance(self.proposals and self.proposals.resolution.ids), LogSamplesPerSource()]
        if self.subcommand == "fit" and cfg.eval.every_n_steps:
            callbacks.append(Evaluate(cfg.eval, self.book))
        if self.plan:
            callbacks.append(LiveSegment(self.plan, cfg.live, checkpoints, self.resolved))
        if cfg.trainer.logger in (None, True):
            # A resumed fit continues the MLflow run its checkpoint names (or, under `live`, the
            # run's before its first checkpoint), unless tracking.run_id names another.
            run_id = self.ckpt_meta.get("cpm", {}).get(RUN_ID_KEY) if self.subcommand == "fit" else None
            run_id = cfg.tracking.run_id or run_id or (self.plan and self.plan.run_id)
            kwargs["logger"] = _mlflow_logger(cfg.tracking, root, run_id, self.plan.logged_through if self.plan else -1)
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
        if self.ckpt:
            self._plan_migration()
        # Here, before Lightning launches the other ranks: one error line, not one per rank.
        t = self.trainer
        self.datamodule.micro_batch_size(t.num_devices * t.num_nodes, t.accumulate_grad_batches)
        self._log_config()

    def _plan_migration(self):
        """A checkpoint of another model.arch resumes through migrations when some take it to this
        run's (checkpoint/migrate_on_load.py); otherwise its shapes must be this run's."""
        try:
            steps = plan_from(self.ckpt_meta["cpm"]["arch"], self.model.arch)
        except NoMigration as e:
            raise UserError(f"checkpoint {self.ckpt} cannot resume with this run's model.arch: {e}") from None
        if not steps:
            check_architecture(self.ckpt, self.model.arch)
            return
        self.model.migrate_on_load = steps
        rank_zero_info(f"{self.ckpt}: migrating to this run's model.arch: {'; '.join(map(str, steps))}")

    def _log_config(self):
        logger = self.trainer.logger
        if self.trainer.is_global_zero and hasattr(logger, "run_id"):
            text = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
            if self.proposals is not None:  # provenance: tags, proposals.lock, commented keys
                self.proposals.log(logger.experiment, logger.run_id)
                text = self.proposals.annotate(text)
            logger.experiment.log_text(logger.run_id, text, "config.yaml")


# Fields of model.arch that say how a run computes, not what the weights mean: a run that starts
# from a model directory may set them (CPM-Ant raised max_len during its live run).
RUN_OWNED = ("max_len", "split_qk_scale")


def take_architecture(cfg, directory: str) -> dict:
    """Make `directory`'s architecture and tokenizer the run's (checkpoint.init_from): a value
    the run gives that differs is a UserError. Returns the directory's arch."""
    from cpm_lightning.checkpoint.modeldir import is_model_dir, open_model_dir
    from cpm_lightning.core.tokenizer import Tokenizer
    from cpm_lightning.model import ArchConfig

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


def _leaves(prefix: str, value) -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a config group, as JSON data."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(f"{prefix}.{k}", v)]
    return [(prefix, list(value) if isinstance(value, tuple) else value)]


def run(argv: list[str] | None) -> CPMCLI:
    """argv None: LightningCLI reads sys.argv itself (it warns when given both). Returns the CLI,
    whose trainer and model a caller in the same process may read (`proposals trial`)."""
    import jsonargparse

    from cpm_lightning.train.run_config import training_classes

    # `--help` and `--print_config` show each config dataclass field's docstring. Reading them
    # costs ~0.7 s, which every other start of `fit` (each rank, each live segment) is spared.
    words = sys.argv if argv is None else argv
    asked = any(w in ("-h", "--help") or w.startswith("--print_config") for w in words)
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=asked)
    # exit_on_error=False: jsonargparse raises ArgumentError instead of printing its usage block,
    # and cli.main() prints the message as one line.
    return CPMCLI(*training_classes(), args=argv, save_config_callback=None, seed_everything_default=0,
                  parser_kwargs={"exit_on_error": False})
