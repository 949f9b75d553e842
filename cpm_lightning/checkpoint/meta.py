"""`checkpoint["cpm"]`: what a checkpoint says about itself beside Lightning's own keys (weights,
optimizer, loops, the data module's position), defined once (docs/ARCHITECTURE.md, "Checkpoints").

Several hooks write parts of it as Lightning saves a checkpoint, each with `write` (the module:
the architecture and its counters; CarryProvenance: the tokenizer and the proposals; Checkpoints:
the RNG states; TrackRun: the MLflow run; LiveSegment: its loss window and the change ledger), and
every reader takes it through `CPMMeta.of`. On disk it stays a plain dict of plain values:
Lightning and `read_meta` load checkpoints with torch.load(weights_only=True), which builds no
class of ours.

Version 1 is the keys below; checkpoints written before the `version` key are version 1. A reader
refuses a newer version rather than misread it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from cpm_lightning.checkpoint.modeldir import check_arch
from cpm_lightning.core.errors import UserError
from cpm_lightning.model.config import MAX_TRAINED_PARAMS

VERSION = 1
"""The version this code writes and the newest it reads."""


@dataclass(frozen=True, kw_only=True)
class CPMMeta:
    """A checkpoint's `cpm` section."""

    arch: dict
    """model.arch as ArchConfig.to_dict(): the architecture the weights are of."""
    tokens_seen: int = 0
    """Training tokens seen by the run, all ranks together."""
    skipped_steps: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient, over the whole run."""
    migrations: list = field(default_factory=list)
    """Every migration the model went through (model/migrate.py Step.as_dict() and the `step` it
    was applied at), oldest first."""
    tokenizer: bytes | None = None
    """The tokenizer's model file: a checkpoint alone can generate text and be released."""
    proposals: str | None = None
    """The ids of the proposals in effect when it was saved, comma-separated (None: a run without
    a registry, or a checkpoint older than the record)."""
    mlflow_run_id: str | None = None
    """The MLflow run that trained it, which a resumed fit continues."""
    rng: list = field(default_factory=list)
    """Each rank's RNG states (torch, python, numpy, cuda), by rank."""
    live: dict | None = None
    """Under `live`: the divergence watch's state, `losses` (the loss window), `nonfinite`
    (skipped steps in a row) and `data` (the fingerprint of the mixture the losses are of)."""
    changes: list | None = None
    """Under `live`: the change ledger's records written before it (live/ledger.py)."""
    version: int = VERSION
    """The format's version."""

    def to_dict(self) -> dict:
        """The section as it is saved; unset optional fields are left out, as before `version`."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data, where: str) -> CPMMeta:
        """The section `data` of checkpoint `where`, checked: one UserError line naming `where`
        for a section that is missing, of a newer version or holds a value of the wrong type."""
        if not isinstance(data, dict) or "arch" not in data:
            raise UserError(f"{where}: not a cpm-lightning checkpoint (no 'cpm' section)")
        version = data.get("version", 1)
        if type(version) is not int or version < 1:
            raise UserError(f"{where}: its cpm section has version {version!r}; expected a positive integer")
        if version > VERSION:
            raise UserError(f"{where}: its cpm section is version {version}, written by a newer cpm-lightning; "
                            f"this one reads versions up to {VERSION}")
        for key, value in data.items():
            _check(key, value, where)
        check_arch(data["arch"], where, MAX_TRAINED_PARAMS)  # a run config may train past MAX_PARAMS
        return cls(**data)

    @classmethod
    def of(cls, checkpoint: dict, where: str) -> CPMMeta:
        """The `cpm` section of a checkpoint as loaded (the dict Lightning or read_meta loaded)."""
        return cls.from_dict(checkpoint.get("cpm"), where)


def write(checkpoint: dict, **values) -> None:
    """Set fields of `checkpoint`'s cpm section, as a hook saving its part of it does (the section
    is complete once every hook has run: the module's comes last)."""
    for key, value in values.items():
        _check(key, value, "a checkpoint being saved", bug=True)
    checkpoint.setdefault("cpm", {"version": VERSION}).update(values)


_FIELDS = {f.name: f for f in dataclasses.fields(CPMMeta)}
_TYPES = typing.get_type_hints(CPMMeta)


def _check(key: str, value, where: str, bug: bool = False) -> None:
    """A key of the section and a value of its type, else a UserError (a TypeError for our own
    writers: a bug)."""
    error = TypeError if bug else UserError
    if key not in _FIELDS:
        raise error(f"{where}: unknown key {key!r} in its cpm section; expected: {', '.join(_FIELDS)}")
    expected = tuple(typing.get_origin(t) or t for t in typing.get_args(_TYPES[key]) or (_TYPES[key],))
    if key != "arch" and (not isinstance(value, expected) or isinstance(value, bool)):  # bool is an int
        names = " or ".join("None" if t is type(None) else t.__name__ for t in expected)
        raise error(f"{where}: cpm.{key} is {type(value).__name__}; expected {names}")
