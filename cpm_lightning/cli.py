"""`cpm-lightning`: LightningCLI for fit/validate/test, argparse for the other verbs.

This is the only module that wires the trainer core (`cpm_lightning`) to the data package
(`datamodules`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonargparse

from cpm_lightning.errors import UserError

LIGHTNING_VERBS = ("fit", "validate", "test")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# Modules that add verbs to `cpm-lightning`: each has `add_commands(subparsers)`, and each
# command it adds sets `func` (called with the parsed args).
COMMAND_MODULES = [
    "cpm_lightning.commands",
    "cpm_lightning.tracking.commands",
    "cpm_lightning.checkpoint_commands",
    "cpm_lightning.registry.commands",
]


@dataclass(kw_only=True)
class TrackingConfig:
    """Where the run's metrics, config and provenance go (MLflow)."""

    uri: str | None = None
    """MLflow tracking URI; unset: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    experiment: str | None = None
    """MLflow experiment; unset: $MLFLOW_EXPERIMENT_NAME, else cpm-lightning."""
    run_name: str | None = None
    """MLflow run name; unset: MLflow picks one."""
    flush_timeout: float = 600.0
    """Seconds the end of training waits for an unreachable tracking server before it writes the
    unsent metrics to <trainer.default_root_dir>/mlflow-unsent-RUN.jsonl (sent on resume)."""

    @property
    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI

    @property
    def resolved_experiment(self) -> str:
        return self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "cpm-lightning"


def run_config_classes() -> dict[str, type]:
    """The classes whose typed __init__ signatures are the run config's `model` and `data`
    groups (what proposals are checked against), without the rest of the Lightning CLI."""
    from cpm_lightning.module import CausalLM
    from datamodules.pretrain import PretrainDataModule

    return {"model": CausalLM, "data": PretrainDataModule}


def _lightning_cli_class():
    # Imported here so that `cpm-lightning model info` and friends start without Lightning.
    from lightning.pytorch.cli import LightningCLI

    from cpm_lightning.callbacks import CarryTokenizer
    from cpm_lightning.checkpoint import (CheckpointConfig, Checkpoints, check_architecture, read_meta,
                                         resolve_ckpt_path)
    from cpm_lightning.module import CausalLM
    from cpm_lightning.registry.apply import RegistryConfig, apply_registry
    from cpm_lightning.registry.keys import ConfigSchema
    from cpm_lightning.sharding import FSDP2Strategy
    from cpm_lightning.tracking.logger import RUN_ID_KEY, TrackRun, check_reachable
    from datamodules.pretrain import PretrainDataModule

    class CPMCLI(LightningCLI):
        @staticmethod
        def subcommands():
            return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_VERBS}

        def add_arguments_to_parser(self, parser):
            parser.add_class_arguments(TrackingConfig, "tracking")
            parser.add_class_arguments(CheckpointConfig, "checkpoint")
            parser.add_class_arguments(RegistryConfig, "registry")
            parser.link_arguments("data.vocab_size", "model.arch.vocab_size", apply_on="instantiate")

        def parse_arguments(self, parser, args):
            super().parse_arguments(parser, args)
            # Kept to tell command-line overrides of a proposal's key from config-file values.
            self.argv = sys.argv[1:] if args is None else list(args) if isinstance(args, list) else []

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
            schema = ConfigSchema(run_config_classes())
            self.proposals = apply_registry(cfg, self.argv, self.subcommand, schema)
            if cfg.trainer.logger in (None, True):  # fail before any work (tokenizer, shards)
                check_reachable(TrackingConfig(uri=cfg.tracking.uri).resolved_uri)

        def instantiate_classes(self):
            super().instantiate_classes()
            arch, seq_len = self.model.arch, self.datamodule.seq_len
            if seq_len > arch.max_len:
                raise UserError(f"data.seq_len={seq_len} is above the model's maximum length "
                                f"model.arch.max_len={arch.max_len}")

        def instantiate_trainer(self, **kwargs):
            cfg = self.config_init[self.subcommand]
            root = _root(cfg)
            cfg["ckpt_path"] = self.ckpt and str(self.ckpt)
            if cfg.trainer.strategy == "fsdp":  # FSDP2; Lightning's "fsdp" is FSDP1 (sharding.py)
                kwargs["strategy"] = FSDP2Strategy()
            callbacks = [Checkpoints(root / "checkpoints", cfg.checkpoint), CarryTokenizer()]
            if cfg.trainer.logger in (None, True):
                # A resumed fit continues the MLflow run its checkpoint names.
                run_id = self.ckpt_meta.get("cpm", {}).get(RUN_ID_KEY) if self.subcommand == "fit" else None
                kwargs["logger"] = _mlflow_logger(cfg.tracking, root, run_id)
                callbacks.append(TrackRun(kwargs["logger"]))
            configured = cfg.trainer.callbacks or []  # instantiated already: keep them
            configured = configured if isinstance(configured, list) else [configured]
            return super().instantiate_trainer(callbacks=[*configured, *callbacks], **kwargs)

        def before_fit(self):
            if self.ckpt:
                check_architecture(self.ckpt, self.model.arch)
            # Here, before Lightning launches the other ranks: one error line, not one per rank.
            t = self.trainer
            self.datamodule.micro_batch_size(t.num_devices * t.num_nodes, t.accumulate_grad_batches)
            self._log_config()

        def _log_config(self):
            logger = self.trainer.logger
            if self.trainer.is_global_zero and hasattr(logger, "run_id"):
                text = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
                if self.proposals is not None:  # provenance: tags, proposals.lock, commented keys
                    self.proposals.log(logger.experiment, logger.run_id)
                    text = self.proposals.annotate(text)
                logger.experiment.log_text(logger.run_id, text, "config.yaml")

    return CPMCLI, CausalLM, PretrainDataModule


def _root(cfg) -> Path:
    """trainer.default_root_dir: where checkpoints (and an MLflow fallback) go."""
    return Path(cfg.trainer.default_root_dir or os.getcwd())


def _mlflow_logger(tracking: TrackingConfig, root: Path, run_id: str | None):
    """The run's MLflow logger: a new run, or the existing run `run_id` continued."""
    from cpm_lightning.tracking.logger import CPMLogger

    return CPMLogger(tracking_uri=tracking.resolved_uri, experiment_name=tracking.resolved_experiment,
                     run_name=tracking.run_name, run_id=run_id, fallback_dir=root, flush_timeout=tracking.flush_timeout)


def run_lightning(argv: list[str] | None) -> None:
    """argv None: LightningCLI reads sys.argv itself (it warns when given both)."""
    _check_config_yaml(sys.argv[1:] if argv is None else argv)
    CPMCLI, CausalLM, PretrainDataModule = _lightning_cli_class()
    # `--help` and `--print_config` show each config dataclass field's docstring.
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # exit_on_error=False: jsonargparse raises ArgumentError instead of printing its usage block,
    # and main() prints the message as one line.
    CPMCLI(CausalLM, PretrainDataModule, args=argv, save_config_callback=None, seed_everything_default=0,
           parser_kwargs={"exit_on_error": False})


def _check_config_yaml(argv: list[str]) -> None:
    """A --config file that is not valid YAML, as file:line:column (jsonargparse names neither)."""
    import yaml

    paths = [b for a, b in zip(argv, argv[1:]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError):
            pass  # not a readable file (or an inline YAML string): jsonargparse reports it
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            raise UserError(f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {e.problem}") from None


def tools_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpm-lightning",
        description="Train CPM-Ant-style language models in public.\n\n"
        "Training verbs (LightningCLI; `cpm-lightning fit --help` lists every config key):\n"
        "  fit --config FILE        train (resume with --ckpt_path last)\n"
        "  validate --config FILE   validation metrics of a checkpoint\n"
        "  test --config FILE       test metrics of a checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="other verbs", metavar="VERB")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    from_sys = argv is None
    argv = sys.argv[1:] if from_sys else argv
    try:
        if argv and argv[0] in LIGHTNING_VERBS:
            run_lightning(None if from_sys else argv)
        else:
            args = tools_parser().parse_args(argv)
            if not hasattr(args, "func"):
                tools_parser().print_help()
                sys.exit(2)
            args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except argparse.ArgumentError as e:  # from jsonargparse (see run_lightning); its messages may span lines
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
