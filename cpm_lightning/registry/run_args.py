"""A run's config as `fit`'s command line gives it (docs/ARCHITECTURE.md, "Configuration"): the one
reader of run configs, used by `fit`/`validate`/`test` before LightningCLI parses (so that its
files are read strictly), by `live` (what the supervisor needs of the run), by the registry (which
keys the command line overrides) and, one file at a time, by `proposals trial|resolve` and
`data prepare`.

Every file, and every YAML value on the command line, is read as strictly as a proposal
(`parse_yaml`): no aliases, no duplicate keys, no tags. They are merged in LightningCLI's order:
left to right, a later value winning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cpm_lightning.core.errors import UserError
from cpm_lightning.core.strict_yaml import StrictLoader
from cpm_lightning.registry.schema import not_utf8, parse_yaml

CONFIG_OPTIONS = ("--config", "-c")
# A group's value may be a file of its own (`--trainer t.yaml`): jsonargparse reads any existing
# file given to a group (fit's groups: LightningCLI's and those cli/fit.py adds), whatever its
# name, and a file named so given to a key inside a group (`--model.arch arch.yaml`).
FIT_GROUPS = ("trainer", "model", "data", "tracking", "checkpoint", "eval", "registry", "live")
GROUP_FILE_SUFFIXES = (".yaml", ".yml")
# Mapping-valued fields of the groups: jsonargparse merges a group key by key, but such a field
# is a value, replaced whole (a later file's data.sources are the run's sources, not added to
# an earlier file's). tests/registry/test_run_args.py checks that this lists them all.
REPLACED = ("data.sources",)
_GROUPS = "a mapping of config groups (trainer, model, data, ...)"


@dataclass
class RunArgs:
    """What fit's arguments (after the verb) say of the run config."""

    config: dict = field(default_factory=dict)
    """The `--config` files or inline configs, group files and `--key value` options merged."""
    cli_keys: set[str] = field(default_factory=set)
    """The dotted keys the command line sets itself, `--config` aside: each option's key (a group
    given a file of its own: all of it), or, where a group is given an inline mapping, each key
    under it."""


def read_run_args(argv: list[str]) -> RunArgs:
    """The run config of fit's arguments `argv` (after the verb). A UserError names the file,
    line and key (and column, for YAML syntax) of the first problem."""
    run = RunArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            raise UserError(f"unexpected argument {arg!r}; expected --config FILE and --key value options")
        name, eq, value = arg.partition("=")
        if not eq:  # --key value; an option without a value (--print_config, --help) is a flag
            value = argv[i + 1] if i + 1 < len(argv) and not _is_option(argv[i + 1]) else None
            i += value is not None
        i += 1
        if name in CONFIG_OPTIONS:
            _merge(run.config, _config(value, name), "")
        elif name.startswith("--") and value is None:
            run.cli_keys.add(name[2:])
        elif name.startswith("--"):
            key = name[2:]
            if _is_group_file(key, value):  # a group's own file: all of the group is the command line's
                _set(run.config, key, read_run_config(Path(value)))
                run.cli_keys.add(key)
            else:
                given = _value(value, name)
                _set(run.config, key, given)
                run.cli_keys |= set(_leaves(key, given))
    return run


def read_run_config(path: Path) -> dict:
    """A run config file (or a group's file) as plain data, read as strictly as a proposal: no
    aliases (a few lines of them expand to gigabytes), no duplicate keys, no tags. A UserError
    names the file and line (and column, for YAML syntax) of the first problem."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the run config: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(str(not_utf8(str(path), raw, e))) from None
    data = _parsed(text, str(path))
    if data is None:
        raise UserError(f"{path}: empty; expected a run config: {_GROUPS}")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a run config: {_GROUPS}, got {type(data).__name__}")
    return data


def _is_group_file(key: str, value: str) -> bool:
    return value.endswith(GROUP_FILE_SUFFIXES) or (key in FIT_GROUPS and Path(value).is_file())


def _is_option(arg: str) -> bool:
    return arg.startswith("--") or arg in (*CONFIG_OPTIONS, "-h")  # "-1" is a value


def _config(value: str | None, name: str) -> dict:
    """`--config VALUE`: a file, whatever its name, else an inline config (a YAML mapping), as
    jsonargparse reads it."""
    if value is None:
        raise UserError(f"{name}: expected a run config file or an inline config (a YAML mapping)")
    if not Path(value).is_file() and isinstance(_composed(value), yaml.MappingNode):
        return _parsed(value, name)
    return read_run_config(Path(value))


def _value(text: str, name: str) -> Any:
    """An option's value, YAML as jsonargparse reads it: text that is not YAML is a string."""
    return _parsed(text, name) if _composed(text) is not None else text


def _composed(text: str) -> yaml.Node | None:
    """The YAML node of `text` (aliases not expanded), or None where it is not YAML."""
    try:
        return yaml.compose(text, StrictLoader)
    except yaml.YAMLError:
        return None


def _parsed(text: str, where: str) -> Any:
    data, _, problems = parse_yaml(text, where, "a run config")
    if problems:
        p = problems[0]
        raise UserError(f"{p.path}:{p.line}:{p.column}: not valid YAML: {p.message}" if p.column else str(p))
    return data


def _set(config: dict, key: str, value: Any) -> None:
    """Set dotted `key` of `config`: a mapping given to a group merges into it."""
    *parents, last = key.split(".")
    node = config
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    _merge(node, {last: value}, key.rpartition(".")[0])


def _merge(into: dict, new: dict, prefix: str) -> None:
    for key, value in new.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and isinstance(into.get(key), dict) and dotted not in REPLACED:
            _merge(into[key], value, dotted)
        else:
            into[key] = value


def _leaves(prefix: str, value: Any):
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaves(f"{prefix}.{k}", v)
    else:
        yield prefix
