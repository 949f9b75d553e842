"""Which run-config keys a proposal may set, and with what values.

The keys come from the same typed signatures LightningCLI turns into the run config: the
__init__ parameters of the model and data classes, dataclass parameters recursed into by their
fields, and `dict[str, Dataclass]` parameters (data.sources) by NAME and then fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Union, get_args, get_origin

from cpm_lightning.core.errors import UserError, closest, lookup
from cpm_lightning.core.ranges import Range, out_of_range, range_of
from cpm_lightning.model.config import PRESETS, ArchConfig
from cpm_lightning.model.layers import COMPONENTS
from cpm_lightning.registry.limits import LOCATION_KEYS, Limits, location_problem, size_problem
from cpm_lightning.registry.schema import Problem, Proposal
from cpm_lightning.registry.typecheck import as_hinted, mismatch, python_name
from cpm_lightning.train.config import LossConfig, OptimConfig, ScheduleConfig

# What each kind of proposal may change (docs/ARCHITECTURE.md, "The registry"). A data proposal
# that adds a task source may also give the model the task's prompt rows (model.arch.num_tasks):
# the task and its rows are reviewed and take effect as one change, and growing num_tasks is exact
# on everything the model computed before (model/migrate.py grow_num_tasks), so a run that takes
# data proposals takes no change to what its model does on its old inputs.
SCOPES: dict[str, tuple[str, ...]] = {
    "architecture": ("model.arch.*",),
    "training": ("model.optim.*", "model.schedule.*", "model.loss.*"),
    "data": ("data.*", "model.arch.num_tasks"),
}


def in_scope(key: str, kind: str) -> bool:
    """Whether a proposal of `kind` may set `key` (SCOPES: a group, GROUP.*, or one key); the
    group itself is in scope, so that its key check says it is a group, not a value."""
    return any(key == s.removesuffix(".*") or (s.endswith(".*") and key.startswith(s[:-1])) for s in SCOPES[kind])
# Keys that are the operator's, not the community's (docs/ARCHITECTURE.md, "Configuration": where and how a run runs).
OPERATOR_KEYS = {"data.cache_dir": "where a run caches its shards is the operator's choice",
                 "data.local_cache": "where a machine mirrors a shared data cache is the operator's choice"}
# jsonargparse reads these as instructions to import a class.
CODE_PARTS = ("class_path", "init_args", "dict_kwargs")
# String fields whose values are names in a registry; a bad name lists the valid ones.
NAMED: dict[str, dict] = {"model.arch.preset": PRESETS,
                          **{f"model.arch.{kind}": registry for kind, registry in COMPONENTS.items()}}
# The dataclass behind each model group, to check a proposal's values together on `tiny`.
GROUPS = {"model.arch": ArchConfig, "model.optim": OptimConfig, "model.schedule": ScheduleConfig,
          "model.loss": LossConfig}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def _parameters(cls) -> dict[str, Any]:
    """{name: type hint} of a dataclass's init fields, or of a class's __init__ parameters."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls.__init__)
    return {n: hints[n] for n in inspect.signature(cls.__init__).parameters if n != "self"}


class ConfigSchema:
    """The `model.*` and `data.*` keys of the run config, from the classes LightningCLI builds."""

    def __init__(self, roots: dict[str, type]):
        """roots: {group: class}, e.g. {"model": CausalLM, "data": PretrainDataModule}."""
        self.roots = roots

    def lookup(self, key: str) -> tuple[Any, str | None]:
        """(type hint of a leaf key, None) or (None, what is wrong with the key)."""
        hint, _, wrong = self._walk(key)
        return hint, wrong

    def range(self, key: str) -> Range | None:
        """The range a valid leaf key's field declares (cpm_lightning.core.ranges), if any."""
        _, owner, _ = self._walk(key)
        name = key.rpartition(".")[2]
        fields = {f.name: f for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else {}
        return range_of(fields[name]) if name in fields else None

    def _walk(self, key: str) -> tuple[Any, Any, str | None]:
        """(type hint, the class whose field the key is, None), or (None, None, what is wrong)."""
        head, *parts = key.split(".")  # head is a root: check_changes has checked the scope
        node: Any = self.roots[head]
        path, owner = head, None
        for part in parts:
            node = _unwrap_optional(node)
            fields = self._fields(node)
            if fields is None:
                return None, None, f"{path} has no field {part!r}; it is a value ({_type_name(node)})"
            if fields == "NAME":  # a dict[str, X] parameter: any entry name, then X
                if not _NAME.match(part):
                    return None, None, f"{part!r} is not a valid entry name (letters, digits, _ and -)"
                node, path = get_args(node)[1], f"{path}.{part}"
                continue
            if part not in fields:
                siblings = [f"{path}.{f}" for f in fields]
                return None, None, (f"unknown config key {key!r}{closest(f'{path}.{part}', siblings)}; "
                                    f"{path} has: {', '.join(fields)}")
            owner, node, path = _unwrap_optional(node), fields[part], f"{path}.{part}"
        fields = self._fields(node)
        if fields is not None:
            example = "NAME" if fields == "NAME" else next(iter(fields))
            return None, None, f"{key} is a group, not a value; set its keys, e.g. {key}.{example}"
        return node, owner, None

    def _fields(self, node):
        """{name: hint} of a group, "NAME" for a dict of groups, None for a value."""
        node = _unwrap_optional(node)
        if inspect.isclass(node) and (dataclasses.is_dataclass(node) or node in self.roots.values()):
            return _parameters(node)
        if get_origin(node) is dict and dataclasses.is_dataclass(get_args(node)[1]):
            return "NAME"
        return None


def _unwrap_optional(hint):
    """X for `X | None` where X is a group: a dataclass or a dict of them (an unset group is
    built from its defaults, so its keys are the group's)."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and (dataclasses.is_dataclass(args[0]) or get_origin(args[0]) is dict):
            return args[0]
    return hint


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_changes(p: Proposal, schema: ConfigSchema, limits: Limits) -> list[Problem]:
    """Every key of `p.changes` inside its kind's scope, a real run-config key, with a value of
    the key's type (a location within `limits`); then the model groups built from the values on
    the tiny preset, within the field ranges and the size limit."""
    problems = []
    scope = SCOPES[p.kind]
    for key, value in p.changes.items():
        where = f"changes.{key}"
        parts = key.split(".")
        if parts[0] == "trainer":
            problems.append(p.problem(where, "trainer.* is the operator's (devices, precision, steps); "
                                             "a proposal sets model.* or data.* keys"))
        elif code := [part for part in parts if part in CODE_PARTS]:
            problems.append(p.problem(where, f"{code[0]} names a Python class; a proposal is data and "
                                             "chooses components by name"))
        elif key in OPERATOR_KEYS:
            problems.append(p.problem(where, OPERATOR_KEYS[key]))
        elif not in_scope(key, p.kind):
            problems.append(p.problem(where, f"outside the scope of a {p.kind} proposal ({', '.join(scope)})"))
        else:
            hint, wrong = schema.lookup(key)
            wrong = wrong or _check_value(key, value, hint, schema.range(key), limits)
            if wrong:
                problems.append(p.problem(where, wrong))
    return problems or _check_groups(p, schema, limits)


def _check_value(key: str, value: Any, hint: Any, rng: Range | None, limits: Limits) -> str | None:
    if (wrong := mismatch(value, hint)) is not None:
        return wrong
    if rng is not None and (wrong := out_of_range(key, value, rng)):
        return wrong
    if isinstance(value, str):
        if key in NAMED:
            try:
                lookup(NAMED[key], value, key)
            except UserError as e:
                return str(e)
        elif module := python_name(value):
            return f"{value!r} names Python code (module {module!r}); a proposal is data"
        elif LOCATION_KEYS.match(key):
            return location_problem(value, limits.allowed_sources)
    return None


def _check_groups(p: Proposal, schema: ConfigSchema, limits: Limits) -> list[Problem]:
    """Build each model group from the proposal's values alone: this runs the groups' own
    validation (field ranges; num_kv_heads must divide num_heads) on the default preset, `tiny`,
    or the preset the proposal sets, and sizes the architecture against `limits.max_params`."""
    problems = []
    for prefix, cls in GROUPS.items():
        values = {k[len(prefix) + 1:]: as_hinted(v, schema.lookup(k)[0])
                  for k, v in p.changes.items() if k.startswith(prefix + ".")}
        if not values:
            continue
        preset = f"preset {values['preset']}" if "preset" in values else "the default preset, tiny"
        on = f" (checked on {preset})" if cls is ArchConfig else ""
        try:
            group = cls(**values)
            # The shape checks and the size need the preset's values filled in.
            too_large = isinstance(group, ArchConfig) and size_problem(group.resolved(), limits.max_params)
        except UserError as e:
            problems.append(p.problem("changes", f"{e}{on}"))
            continue
        if too_large:
            keys = ", ".join(f"{prefix}.{k}" for k in values)
            problems.append(p.problem("changes", f"with {keys}, the model has {too_large}{on}"))
    return problems
