"""How `fit` (and validate/test) apply the registry to the parsed run config, and what a run
records in MLflow. cli/fit.py calls `apply_registry` before the classes are built and
`AppliedRegistry.log` once the MLflow run exists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.ranges import ranged
from cpm_lightning.model.config import ArchConfig
from cpm_lightning.registry.keys import ConfigSchema
from cpm_lightning.registry.limits import Limits, size_problem
from cpm_lightning.registry.resolve import Resolution, annotate, load_registry, resolve
from cpm_lightning.registry.schema import KINDS, Kind, Proposal
from cpm_lightning.registry.typecheck import as_hinted


@dataclass(kw_only=True)
class RegistryConfig(Limits):
    """Which community proposals the run applies (docs/ARCHITECTURE.md, "The registry"): accepted ones, effective at
    `at_step`, of `kinds`, minus `exclude`, within the limits `allowed_sources` and
    `max_params`. Command-line overrides of their keys still win and are recorded as
    divergences (MLflow tag cpm.overrides)."""

    path: str | None = "proposals/"
    """Directory of proposal files (NNNN-slug.yaml); null runs without the registry."""
    kinds: list[Kind] = field(default_factory=lambda: list(KINDS))
    """Kinds of accepted proposals applied, e.g. [architecture, training] for a run that cannot
    reach the data proposals' sources."""
    exclude: list[int] = field(default_factory=list)
    """Ids of accepted proposals this run leaves out."""
    at_step: int | None = ranged(None, ge=0)
    """Apply the proposals effective at this optimizer step; unset: the step a resumed run
    continues from, 0 for a new run."""
    trial: int | None = ranged(None, ge=1, le=9999)
    """Id of a proposal applied on top of those, whatever its status, step and kind, its values
    winning over theirs: the arm of `cpm-lightning proposals trial` that tries it."""


@dataclass
class AppliedRegistry:
    """What the registry did to one run's config."""

    resolution: Resolution
    divergences: dict[str, Any] = field(default_factory=dict)
    """Key a proposal set -> the command-line value that replaced the proposal's."""

    def comments(self) -> dict[str, str]:
        """The comment on each proposal-set key of the resolved config."""
        out = {}
        for key, p in self.resolution.provenance.items():
            if key in self.divergences:
                out[key] = f"command line; diverges from proposal {p.label} ({_flow(self.resolution.values[key])})"
            else:
                out[key] = f"from proposal {p.label}"
        return out

    def overrides_tag(self) -> str:
        """The `cpm.overrides` tag: key=value (proposal NNNN: its value); ..."""
        res = self.resolution
        return "; ".join(f"{k}={_flow(v)} (proposal {res.provenance[k].label}: {_flow(res.values[k])})"
                         for k, v in sorted(self.divergences.items()))

    def log(self, client, run_id: str) -> None:
        """Tags cpm.proposals (and cpm.overrides) and the artifact proposals.lock of a run."""
        client.set_tag(run_id, "cpm.proposals", self.resolution.ids)
        if self.divergences:
            client.set_tag(run_id, "cpm.overrides", self.overrides_tag())
        client.log_text(run_id, self.resolution.lock(), "proposals.lock")

    def annotate(self, config_yaml: str) -> str:
        return annotate(config_yaml, self.comments())


def _flow(value: Any) -> str:
    """A value as one line of YAML."""
    value = list(value) if isinstance(value, tuple) else value  # betas: jsonargparse holds tuples
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...")


def override_keys(cli_keys: set[str]) -> set[str]:
    """The model.*/data.* keys among those the command line set (run_args.py `RunArgs.cli_keys`):
    the ones a proposal's value may be overridden at."""
    return {key for key in cli_keys if key.startswith(("model.", "data."))}


def _covered(key: str, cli_keys: set[str]) -> bool:
    return any(key == c or key.startswith(c + ".") for c in cli_keys)


def apply_registry(cfg, cli_keys: set[str], schema: ConfigSchema) -> AppliedRegistry | None:
    """Set the resolved proposals' values into a parsed LightningCLI namespace `cfg`, except
    where the command line set the key (`cli_keys`, RunArgs.cli_keys). Raises UserError, listing every problem, if the registry
    has any: then nothing is applied and the run does not start."""
    settings = _group(cfg.registry, RegistryConfig)
    if settings.path is None:
        return None
    reg = load_registry(settings.path, schema, settings)
    res = resolve(reg, settings.at_step or 0, settings.kinds, settings.exclude, settings.trial)
    applied = AppliedRegistry(res)
    cli_keys = override_keys(cli_keys)
    for key, value in res.values.items():
        value = as_hinted(value, schema.lookup(key)[0])
        if not _covered(key, cli_keys):
            _set(cfg, key.split("."), value)
        elif (given := _get(cfg, key)) != value:
            applied.divergences[key] = given
    applied_keys = {k: p for k, p in res.provenance.items() if not _covered(k, cli_keys)}
    _check_new_sources(cfg, applied_keys)
    _check_size(cfg, applied_keys, settings.max_params)
    _report(applied, settings.path)
    return applied


def _check_new_sources(cfg, applied_keys: dict[str, Proposal]) -> None:
    """A proposal may change a source of the run config (its weight, say) or add one, which
    needs a url: `proposals check` cannot tell the two apart, the run can."""
    for key, p in applied_keys.items():
        name = key.split(".")[2] if key.startswith("data.sources.") else None
        if name is not None and _get(cfg, f"data.sources.{name}.url") is None:
            raise UserError(f"data.sources.{name}: proposal {p.label} ({p.path}) sets {key}, but the run config "
                            f"has no source {name!r} and the proposals give it no url")


def _check_size(cfg, applied_keys: dict[str, Proposal], max_params: int) -> None:
    """Refuse a model above registry.max_params before anything is built. Its vocabulary is
    the model's own if set, else the size of the tokenizer the run trains, else (a tokenizer
    file, not read yet) the preset's."""
    arch = _group(cfg.model.arch, ArchConfig)
    data = cfg.get("data")
    if arch.vocab_size is None and data is not None and data.get("tokenizer") is None:
        arch.vocab_size = data.tokenizer_vocab_size
    if too_large := size_problem(arch, max_params):
        by = ", ".join(f"{k} (proposal {p.label})" for k, p in applied_keys.items() if k.startswith("model.arch."))
        raise UserError(f"the model would have {too_large}; model.arch keys set by proposals: {by or 'none'}")


def _group(namespace, cls):
    """The dataclass `cls` of a parsed group, without the `__path__` jsonargparse adds to a
    group read from a file of its own (--registry registry.yaml)."""
    return cls(**{k: v for k, v in namespace.as_dict().items() if k != "__path__"})


def _get(node, key: str) -> Any:
    for part in key.split("."):
        node = node[part] if node is not None and part in node else None
    return node


def _set(node, parts: list[str], value: Any) -> None:
    from jsonargparse import Namespace

    head, rest = parts[0], parts[1:]
    if not rest:
        node[head] = value
        return
    if head not in node or node[head] is None:
        node[head] = Namespace()  # a new entry of a dict of groups, e.g. a data source
    _set(node[head], rest, value)


def _report(applied: AppliedRegistry, path: str) -> None:
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    res = applied.resolution
    names = ", ".join(f"{p.label} {p.title}" for p in res.applied) or "none"
    rank_zero_info(f"proposals applied from {path} at step {res.at_step}: {names}")
    for key, value in applied.divergences.items():
        p = res.provenance[key]
        rank_zero_warn(f"the command line sets {key}={_flow(value)}, which proposal {p.label} ({p.path}) "
                       f"sets to {_flow(res.values[key])}; recorded as a divergence (MLflow tag cpm.overrides)")
