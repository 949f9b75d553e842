"""What the supervisor needs of a run config, read without Lightning: the `--config` files and
`--key value` overrides of the command line merged in order, as LightningCLI merges them.
Everything else is passed through to the segments, whose `fit` checks the whole config (a
mistake there ends `live` with fit's own one-line error)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from cpm_lightning.core.errors import UserError
from cpm_lightning.live.config import LiveConfig
from cpm_lightning.registry.apply import RegistryConfig
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
    every_n_steps: int
    registry: RegistryConfig
    live: LiveConfig
    tracking_uri: str | None
    """Where the MLflow run is; None when trainer.logger is off."""
    experiment: str
    """The MLflow experiment (tracking.experiment resolved)."""
    eval: EvalConfig
    """What a nightly release is evaluated on."""
    config: dict
    """The merged run config (`--config` files and overrides)."""


def read_settings(argv: list[str]) -> Settings:
    config: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if not arg.startswith("-"):
            raise UserError(f"live: unexpected argument {arg!r}; expected --config FILE and --key value overrides")
        if name == "--ckpt_path":
            raise UserError(f"live: --ckpt_path is not an option of live: {OWN_CKPT}")
        if not eq:  # --key value (a flag without a value is left to fit)
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            i += value is not None
        i += 1
        if name in ("--config", "-c"):
            _merge(config, _read_file(value))
        elif value is not None and name.startswith("--"):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
            _merge(config, _nest(name[2:].split("."), parsed))
    return _settings(argv, config)


def _read_file(path: str | None) -> dict:
    if path is None:
        raise UserError("live: --config needs a file")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--config: cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config: {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} is not a mapping of config keys")
    return data


def _nest(parts: list[str], value) -> dict:
    return {parts[0]: _nest(parts[1:], value) if len(parts) > 1 else value}


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _group(config: dict, name: str, cls):
    """The group `name` of the merged config as `cls`, type-checked as LightningCLI would."""
    values = config.get(name) or {}
    if not isinstance(values, dict):
        raise UserError(f"{name}: expected a mapping of {name}.* keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        wrong = f"unknown key; expected: {', '.join(hints)}" if key not in hints else mismatch(value, hints[key])
        if wrong:
            raise UserError(f"{name}.{key}: {wrong}")
    return cls(**values)


def _settings(argv: list[str], config: dict) -> Settings:
    trainer = config.get("trainer") or {}
    max_steps = trainer.get("max_steps")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps <= 0:
        raise UserError(f"trainer.max_steps: live needs the run's length (a positive integer), got {max_steps!r}")
    registry = _group(config, "registry", RegistryConfig)
    if registry.at_step is not None:
        raise UserError(f"registry.at_step={registry.at_step}: {OWN_STEP}")
    if registry.trial is not None:  # a trial's arm (`proposals trial`), never a live run
        raise UserError(f"registry.trial={registry.trial}: live applies accepted proposals only; leave it unset "
                        "(`proposals trial` tries one)")
    every = (config.get("checkpoint") or {}).get("every_n_steps", 500)  # CheckpointConfig's default
    logger = trainer.get("logger")
    tracking = TrackingConfig(**{k: v for k, v in (config.get("tracking") or {}).items() if k in ("uri", "experiment")})
    uri = tracking.resolved_uri if logger in (None, True) else None
    live = _group(config, "live", LiveConfig)
    _check_publishing(live, uri, registry, every)
    return Settings(argv=argv, root=Path(trainer.get("default_root_dir") or Path.cwd()).absolute(),
                    max_steps=max_steps, every_n_steps=every, registry=registry, live=live, tracking_uri=uri,
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
