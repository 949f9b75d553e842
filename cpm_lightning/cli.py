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

from cpm_lightning.errors import UserError

LIGHTNING_VERBS = ("fit", "validate", "test")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# Modules that add verbs to `cpm-lightning`: each has `add_commands(subparsers)`, and each
# command it adds sets `func` (called with the parsed args).
COMMAND_MODULES = ["cpm_lightning.commands"]


@dataclass(kw_only=True)
class TrackingConfig:
    """Where the run's metrics, config and provenance go (MLflow)."""

    uri: str | None = None
    """MLflow tracking URI; unset: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    experiment: str | None = None
    """MLflow experiment; unset: $MLFLOW_EXPERIMENT_NAME, else cpm-lightning."""
    run_name: str | None = None
    """MLflow run name; unset: MLflow picks one."""

    @property
    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI

    @property
    def resolved_experiment(self) -> str:
        return self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "cpm-lightning"


@dataclass(kw_only=True)
class CheckpointConfig:
    """When and how many checkpoints are kept (in <trainer.default_root_dir>/checkpoints)."""

    every_n_steps: int = 500
    """Save a checkpoint every this many optimizer steps (CPM-Ant: 500), and at the end."""
    keep_last: int = 3
    """Keep this many step checkpoints besides `last`."""


def _lightning_cli_class():
    # Imported here so that `cpm-lightning model info` and friends start without Lightning.
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from cpm_lightning.callbacks import CarryTokenizer
    from cpm_lightning.module import CausalLM
    from datamodules.pretrain import PretrainDataModule

    class CPMCLI(LightningCLI):
        @staticmethod
        def subcommands():
            return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_VERBS}

        def add_arguments_to_parser(self, parser):
            parser.add_class_arguments(TrackingConfig, "tracking")
            parser.add_class_arguments(CheckpointConfig, "checkpoint")
            parser.link_arguments("data.vocab_size", "model.arch.vocab_size", apply_on="instantiate")

        def instantiate_classes(self):
            super().instantiate_classes()
            arch, seq_len = self.model.arch, self.datamodule.seq_len
            if seq_len > arch.max_len:
                raise UserError(f"data.seq_len={seq_len} is above the model's maximum length "
                                f"model.arch.max_len={arch.max_len}")

        def instantiate_trainer(self, **kwargs):
            cfg = self.config_init[self.subcommand]
            root = Path(cfg.trainer.default_root_dir or os.getcwd())
            checkpoint = cfg.checkpoint
            callbacks = [
                ModelCheckpoint(dirpath=root / "checkpoints", filename="step{step:08d}", auto_insert_metric_name=False,
                                every_n_train_steps=checkpoint.every_n_steps, save_top_k=checkpoint.keep_last,
                                monitor="step", mode="max", save_last=True),
                CarryTokenizer(),
            ]
            if cfg.trainer.logger in (None, True):
                kwargs["logger"] = _mlflow_logger(cfg.tracking)
            return super().instantiate_trainer(callbacks=callbacks, **kwargs)

        def before_fit(self):
            self._check_ckpt_path()
            self._log_config()

        def _check_ckpt_path(self):
            ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
            if ckpt_path == "last":
                dirpath = Path(self.trainer.checkpoint_callback.dirpath)
                if not any(dirpath.glob("last*")):
                    raise UserError(f"--ckpt_path last: no checkpoint to resume in {dirpath}")
            elif ckpt_path and not Path(ckpt_path).exists():
                raise UserError(f"--ckpt_path: checkpoint {ckpt_path!r} does not exist")

        def _log_config(self):
            logger = self.trainer.logger
            if self.trainer.is_global_zero and hasattr(logger, "run_id"):
                text = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
                logger.experiment.log_text(logger.run_id, text, "config.yaml")

    return CPMCLI, CausalLM, PretrainDataModule


def _mlflow_logger(tracking: TrackingConfig):
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name=tracking.resolved_experiment, tracking_uri=tracking.resolved_uri,
                        run_name=tracking.run_name, synchronous=False)


def run_lightning(argv: list[str] | None) -> None:
    """argv None: LightningCLI reads sys.argv itself (it warns when given both)."""
    CPMCLI, CausalLM, PretrainDataModule = _lightning_cli_class()
    CPMCLI(CausalLM, PretrainDataModule, args=argv, save_config_callback=None, seed_everything_default=0)


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


if __name__ == "__main__":
    main()
