"""What the supervisor needs of a run config, read without Lightning by the reader `fit` reads
it with first (registry/run_args.py): a file or value `fit` refuses, `live` refuses with the same
line. Everything else is passed through to the segments, whose `fit` checks the whole config (a
mistake there ends `live` with fit's own one-line error)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

from cpm_lightning.checkpoint.config import CheckpointConfig
from cpm_lightning.core.errors import UserError
from cpm_lightning.live.config import LiveConfig
from cpm_lightning.registry.apply import RegistryConfig
from cpm_lightning.registry.run_args import read_run_args
from cpm_lightning.registry.typecheck import mismatch
from cpm_lightning.tracking.config import TrackingConfig
from cpm_lightning.train.config import EvalConfig

# `live` chooses each segment's checkpoint and the step its proposals are resolved at.
OWN_CKPT = "live resumes each segment from the run's own checkpoints"
OWN_STEP = "live applies the proposals in effect at the step each segment starts from; leave it unset"


@dataclass
class Settings:
    argv: list[str]
    """The `fit` arguments given to `live`, passed on to every segment."""
    root: Path
    """trainer.default_root_dir."""
    max_steps: int
    registry: RegistryConfig
    live: LiveConfig
    tracking_uri: str | None
    """Where the MLflow run is; None when trainer.logger is off."""
    experiment: str
    """The MLflow experiment (tracking.experiment resolved)."""
    eval: EvalConfig
    """What a nightly release is evaluated on."""
    config: dict
    """The merged run config (`--config` files, group files and overrides)."""


def read_settings(argv: list[str]) -> Settings:
    run = read_run_args(argv)
    if "ckpt_path" in run.cli_keys:
        raise UserError(f"live: --ckpt_path is not an option of live: {OWN_CKPT}")
    return _settings(argv, run.config)


def _group(config: dict, name: str, cls):
    """The group `name` of the merged config as `cls`, type-checked as LightningCLI would."""
    values = _mapping(config, name)
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        wrong = f"unknown key; expected: {', '.join(hints)}" if key not in hints else mismatch(value, hints[key])
        if wrong:
            raise UserError(f"{name}.{key}: {wrong}")
    return cls(**values)


def _mapping(config: dict, name: str) -> dict:
    values = config.get(name) or {}
    if not isinstance(values, dict):
        raise UserError(f"{name}: expected a mapping of {name}.* keys, got {values!r}")
    return values


def _settings(argv: list[str], config: dict) -> Settings:
    trainer = _mapping(config, "trainer")
    max_steps = trainer.get("max_steps")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps <= 0:
        raise UserError(f"trainer.max_steps: live needs the run's length (a positive integer), got {max_steps!r}")
    registry = _group(config, "registry", RegistryConfig)
    if registry.at_step is not None:
        raise UserError(f"registry.at_step={registry.at_step}: {OWN_STEP}")
    if registry.trial is not None:  # a trial's arm (`proposals trial`), never a live run
        raise UserError(f"registry.trial={registry.trial}: live applies accepted proposals only; leave it unset "
                        "(`proposals trial` tries one)")
    every = _mapping(config, "checkpoint").get("every_n_steps", CheckpointConfig.every_n_steps)
    logger = trainer.get("logger")
    tracking = TrackingConfig(**{k: v for k, v in _mapping(config, "tracking").items() if k in ("uri", "experiment")})
    uri = tracking.resolved_uri if logger in (None, True) else None
    live = _group(config, "live", LiveConfig)
    _check_publishing(live, uri, registry, every)
    return Settings(argv=argv, root=Path(trainer.get("default_root_dir") or Path.cwd()).absolute(),
                    max_steps=max_steps, registry=registry, live=live, tracking_uri=uri,
                    experiment=tracking.resolved_experiment, eval=_group(config, "eval", EvalConfig), config=config)


def _check_publishing(live: LiveConfig, uri: str | None, registry: RegistryConfig, every: int) -> None:
    """What the `live` group asks to publish must be publishable: releases and the site are made
    from MLflow, a release's checkpoint must be written at its step, the site shows the registry."""
    asked = [k for k, on in (("live.release_every_n_steps", live.release_every_n_steps),
                             ("live.site_dir", live.site_dir)) if on]
    if asked and uri is None:
        raise UserError(f"{asked[0]}: publishing reads the run from MLflow, and trainer.logger is off; "
                        "turn the logger on or unset it")
    if live.release_every_n_steps % every:
        raise UserError(f"live.release_every_n_steps={live.release_every_n_steps}: expected a multiple of "
                        f"checkpoint.every_n_steps={every}, so that a checkpoint is written at every release step")
    if live.site_dir and registry.path is None:
        raise UserError("live.site_dir: the site shows the run's proposals; set registry.path, or unset live.site_dir")
